"""``diffusion-trak demo``: the whole path on the embedded digits data, on CPU.

train → featurize → generate (recording the trajectory) → score per step → plot, then the
self-attribution check: 50 training images scored as targets at a low-noise timestep, and how
often each ranks its own index first.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass


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


def run_demo(out: str = "runs/demo", quick: bool = False, device: str = "cpu", overwrite: bool = False) -> dict:
    from diffusion_trak.pipelines import TrajectoryPipeline

    from . import api
    from .data import DataArgs, load_dataset
    from .cli import check_run_json, write_run_json
    from .report import plot_from_scores
    from .train import check_training, load_checkpoint, train_ddpm

    cfg = demo_settings(quick)
    t0 = time.time()
    say = lambda m: print(f"[{time.time() - t0:6.1f}s] {m}", flush=True)
    data_args = DataArgs(name="digits", limit=cfg.limit)
    dataset = load_dataset(data_args)
    check_run_json(out, data_args, overwrite)  # every check before anything is written
    check_training(dataset, cfg.train, os.path.join(out, "model"), overwrite)
    write_run_json(out, data_args)
    say(f"data: {dataset}")
    ckpts = train_ddpm(dataset, cfg.train, os.path.join(out, "model"), device=device, overwrite=overwrite)
    say(f"trained {len(ckpts)} checkpoints in {out}/model")
    features = api.featurize(ckpts, dataset, cfg.featurize, os.path.join(out, "features"), overwrite=overwrite, device=device)
    say(f"featurized {len(dataset)} examples × {len(ckpts)} checkpoints (T={cfg.featurize.num_timesteps}, "
        f"k={cfg.featurize.proj_dim}) in {out}/features")

    unet, sched = load_checkpoint(ckpts[-1], device)
    record = sorted({round(i * (cfg.sampling_steps - 1) / (cfg.record - 1)) for i in range(cfg.record)})
    gen = TrajectoryPipeline(unet=unet, scheduler=sched)(batch_size=cfg.num_images, seed=0,
                                                         num_inference_steps=cfg.sampling_steps,
                                                         record_steps=record, show_progress=False)
    tpath = os.path.join(out, "trajectories", "seed-0.safetensors")
    os.makedirs(os.path.dirname(tpath), exist_ok=True)
    gen.trajectory.save(tpath)
    say(f"generated {cfg.num_images} images with {cfg.sampling_steps} DDPM steps; trajectory: {tpath}")

    sdir = os.path.join(out, "scores", "seed-0")
    scores = api.score(features, ckpts, dataset.indices.numpy(), cfg.score, trajectory=gen.trajectory,
                       out=sdir, overwrite=overwrite, device=device)
    png, html = plot_from_scores(scores, dataset, gen.trajectory, os.path.join(out, "report", "seed-0"))
    say(f"scored {len(dataset)} training examples at {len(scores.steps)} steps of {cfg.num_images} images"
        + (" and at their destination (final image)" if scores.destination is not None else ""))

    rate, _ = api.self_attribution_rate(features, ckpts, dataset, cfg.self_attribution_images,
                                        cfg.self_attribution_timestep, cfg.score, device=device)
    n = min(cfg.self_attribution_images, len(dataset))
    say(f"self-attribution: {rate:.0%} of {n} training images rank their own index first "
        f"(of {len(dataset)}) at timestep {cfg.self_attribution_timestep}")
    print(f"\nper-step plot: {png}\nhtml page:     {html}\nscores:        {sdir}/scores.npy "
          f"(+ top-k per step in {sdir}/scores.json)\ntotal time:    {time.time() - t0:.0f} s", flush=True)
    return {"png": png, "html": html, "scores": sdir, "self_attribution": rate, "seconds": time.time() - t0}
