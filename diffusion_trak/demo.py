"""``diffusion-trak demo [--latent]``: the whole path on the embedded digits data, on CPU.

train → featurize → generate (recording the trajectory) → score per step → plot, then the
self-attribution check: training images scored as targets at a low-noise timestep, and how
often each ranks its own index first. Everything after training goes through one
:class:`~diffusion_trak.Attributor`; ``latent=True`` trains a VAE and a text-conditional latent UNet
instead of a pixel DDPM and generates a prompt with guidance.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional

from .config import FeaturizeArgs, ScoreArgs, TrainArgs


@dataclass
class DemoSettings:
    limit: int = None
    train: TrainArgs = None
    featurize: FeaturizeArgs = None
    score: ScoreArgs = None
    sampling_steps: int = 100
    record: int = 10
    num_images: int = 4
    self_attribution_images: int = 50
    self_attribution_timestep: int = 50


def demo_settings(quick: bool = False) -> DemoSettings:
    if quick:  # for tests: seconds, not minutes
        return DemoSettings(limit=64, train=TrainArgs(block_out_channels=(8, 16), norm_num_groups=4, epochs=4,
                                                      batch_size=32, num_checkpoints=2),
                            featurize=FeaturizeArgs(num_timesteps=2, proj_dim=64, batch_size=32),
                            score=ScoreArgs(num_noises=2, destination_draws=4), sampling_steps=10, record=3,
                            num_images=2, self_attribution_images=8)
    return DemoSettings(train=TrainArgs(block_out_channels=(16, 32), epochs=40, batch_size=64, num_checkpoints=2),
                        featurize=FeaturizeArgs(proj_dim=1024, batch_size=32),  # the library's estimator
                        score=ScoreArgs(num_noises=20))


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEMO_TEMPLATES = ("a photo of a {}", "a handwritten {}", "the digit {}")


def _latent_vae_args():
    from .latent import VAEArgs
    return VAEArgs(epochs=20)


def _latent_train_args():
    from .latent import LatentTrainArgs
    return LatentTrainArgs(block_out_channels=(16, 32), epochs=80)


@dataclass
class LatentDemoSettings:
    limit: Optional[int] = 500
    image_size: int = 16
    vae: object = field(default_factory=_latent_vae_args)
    train: object = field(default_factory=_latent_train_args)
    featurize: FeaturizeArgs = field(default_factory=lambda: FeaturizeArgs(
        num_timesteps=20, timestep_strategy="stratified", proj_dim=1024, batch_size=32))
    score: ScoreArgs = field(default_factory=lambda: ScoreArgs(num_noises=20))
    caption_mode: str = "random"
    prompt_class: int = 3
    guidance_scale: float = 2.0
    sampling_steps: int = 100
    record: int = 8
    self_attribution_images: int = 50
    self_attribution_timestep: int = 50
    text_hidden_size: int = 32


def latent_demo_settings(quick: bool = False) -> LatentDemoSettings:
    from .latent import LatentTrainArgs, VAEArgs

    if quick:  # for tests: seconds, not minutes
        return LatentDemoSettings(limit=48, vae=VAEArgs(block_out_channels=(8, 16, 16), norm_num_groups=4, epochs=2),
                                  train=LatentTrainArgs(block_out_channels=(16, 16), norm_num_groups=4, epochs=3,
                                                        batch_size=16, num_checkpoints=2),
                                  featurize=FeaturizeArgs(num_timesteps=2, proj_dim=64, batch_size=16),
                                  score=ScoreArgs(num_noises=2), sampling_steps=8, record=3, self_attribution_images=8,
                                  text_hidden_size=16)
    return LatentDemoSettings()


def run_demo(out: str = "runs/demo", quick: bool = False, device: str = "cpu", overwrite: bool = False,
             latent: bool = False, prompt: Optional[str] = None) -> dict:
    """Run the demo into the run folder ``out``; rerunning it reuses every finished stage.

    Prints where the per-step PNG, the journey page and the scores are, and the self-attribution rate; returns
    them in a dict. ``latent``: the latent, text-conditional model (``prompt``: what to generate)."""
    from .store import claim

    claim(out, "run")  # a folder with files not ours: refused before anything is written
    t0 = time.time()
    say = lambda m: print(f"[{time.time() - t0:6.1f}s] {m}", flush=True)
    if latent:
        cfg = latent_demo_settings(quick)
        attr, sample = _latent_model(cfg, out, device, overwrite, say, prompt)
    else:
        cfg = demo_settings(quick)
        attr, sample = _pixel_model(cfg, out, device, overwrite, say)
    attr.featurize(self_check=False)  # the demo prints its own self-attribution below
    fa = cfg.featurize
    kernel = f"GGN kernel of {fa.kernel_draws} draws" if fa.kernel == "ggn" else "kernel ΦᵀΦ"
    say(f"featurized {len(attr.dataset)} examples × {len(attr.checkpoints)} checkpoints (T={fa.num_timesteps}, "
        f"k={fa.proj_dim}, {kernel}) in {attr.features_dir}")

    record = sorted({round(i * (cfg.sampling_steps - 1) / (cfg.record - 1)) for i in range(cfg.record)})
    gen = attr.pipeline(**sample, seed=0, num_inference_steps=cfg.sampling_steps, record_steps=record,
                        show_progress=False)
    tpath = os.path.join(out, "trajectories", "seed-0.safetensors")
    os.makedirs(os.path.dirname(tpath), exist_ok=True)
    gen.trajectory.save(tpath, overwrite=overwrite)
    what = f'"{sample["prompt"]}" (guidance {cfg.guidance_scale:g})' if latent else f"{cfg.num_images} images"
    say(f"generated {what} with {cfg.sampling_steps} DDPM steps; trajectory: {tpath}")

    sdir = attr.scores_dir("seed-0")
    scores = attr.attribute(gen, out=sdir)
    png, html = attr.report(scores, name="seed-0")
    say(f"scored {len(attr.dataset)} training examples at {len(scores.steps)} steps"
        + (" and at their destination (final image)" if scores.destination is not None else ""))

    rate, _ = attr.self_attribution(cfg.self_attribution_images, cfg.self_attribution_timestep)
    n = min(cfg.self_attribution_images, len(attr.dataset))
    own = " (own caption)" if latent else ""
    say(f"self-attribution: {rate:.0%} of {n} training images{own} rank their own index first "
        f"(of {len(attr.dataset)}) at timestep {cfg.self_attribution_timestep}")
    seconds = time.time() - t0
    if latent:
        print(f'\nprompt:        "{sample["prompt"]}"', end="")
    print(f"\nper-step plot: {png}\nhtml page:     {html}\nscores:        {sdir}/scores.npy "
          f"(+ top-k per step in {sdir}/scores.json)\ntotal time:    {seconds:.0f} s", flush=True)
    res = {"png": png, "html": html, "scores": sdir, "trajectory": tpath, "self_attribution": rate,
           "self_attribution_images": n, "seconds": seconds}
    if latent:
        res["prompt"] = sample["prompt"]
    return res


def _pixel_model(cfg: DemoSettings, out, device, overwrite, say):
    """A pixel DDPM trained on the digits, and the sampling arguments."""
    from .attributor import Attributor
    from .run_folder import check_run_json, write_run_json
    from .data import DataArgs, load_dataset
    from .train import check_training, train_ddpm

    data_args = DataArgs(name="digits", limit=cfg.limit)
    dataset = load_dataset(data_args)
    check_run_json(out, data_args, overwrite)  # every check before anything is written
    check_training(dataset, cfg.train, os.path.join(out, "model"), overwrite)
    write_run_json(out, data_args)
    say(f"data: {dataset}")
    ckpts = train_ddpm(dataset, cfg.train, os.path.join(out, "model"), device=device, overwrite=overwrite)
    say(f"trained {len(ckpts)} checkpoints in {out}/model")
    attr = Attributor(ckpts, dataset, out, featurize_args=cfg.featurize, score_args=cfg.score, device=device,
                      overwrite=overwrite)
    return attr, {"batch_size": cfg.num_images}


def _latent_model(cfg: LatentDemoSettings, out, device, overwrite, say, prompt):
    """A VAE and a text-conditional latent UNet trained on the digits (16×16) with three captions per image."""
    import torch

    from .attributor import Attributor
    from .config import asdict
    from .data import DataArgs, load_dataset
    from .latent import encode_dataset, train_latent_unet, train_vae
    from .store import write_json_atomic
    from .text import CaptionSet, TextConditioner, default_text_model

    os.makedirs(out, exist_ok=True)
    data_args = DataArgs(name="digits", image_size=cfg.image_size, limit=cfg.limit)
    pixels = load_dataset(data_args)
    pixels.class_names = list(DIGIT_NAMES)
    captions = CaptionSet.from_class_names(pixels, DEMO_TEMPLATES)
    write_json_atomic(os.path.join(out, "run.json"), {"data": data_args.to_dict(), "templates": list(DEMO_TEMPLATES),
                                                      "settings": asdict(cfg)})
    say(f"data: {pixels}, {len(DEMO_TEMPLATES)} captions per image, e.g. {captions.of(int(pixels.indices[0]))}")

    vae = train_vae(pixels, cfg.vae, os.path.join(out, "vae"), device=device, overwrite=overwrite)
    latents = encode_dataset(pixels, vae, os.path.join(out, "latents"), overwrite=overwrite, captions=captions)
    vdev = next(vae.parameters()).device
    with torch.no_grad():  # the VAE lives on the device; the latents and images on the CPU
        recon = torch.cat([vae.decode(latents.images[i:i + 256].to(vdev) / latents.scaling_factor).sample.cpu()
                           for i in range(0, len(latents), 256)])
    say(f"VAE {out}/vae: latents {latents.image_shape}, scaling_factor {latents.scaling_factor:.3f}, "
        f"reconstruction MSE {float(((recon - pixels.images) ** 2).mean()):.4f}")

    tok, enc = default_text_model(captions.all_texts(), hidden_size=cfg.text_hidden_size, seed=cfg.train.seed)
    tok.save_pretrained(os.path.join(out, "text", "tokenizer"))
    enc.save_pretrained(os.path.join(out, "text", "text_encoder"))
    ckpts = train_latent_unet(latents, cfg.train, os.path.join(out, "model"), text=TextConditioner(tok, enc, device),
                              device=device, overwrite=overwrite)
    say(f"trained {len(ckpts)} latent UNet checkpoints in {out}/model")
    attr = Attributor(ckpts, pixels, out, vae=vae, text_encoder=enc, tokenizer=tok, captions=captions,
                      caption_mode=cfg.caption_mode, featurize_args=cfg.featurize, score_args=cfg.score, device=device,
                      overwrite=overwrite)
    prompt = prompt or DEMO_TEMPLATES[0].format(DIGIT_NAMES[cfg.prompt_class])
    return attr, {"prompt": prompt, "guidance_scale": cfg.guidance_scale}
