"""Every path on a CUDA device (skipped without one): the quick pixel and latent demos (Python and CLI), the
Attributor over a pixel, a class-conditional, a latent text (Stable-Diffusion-style) and a LoRA model, and the
step-by-step commands with ``--device cuda``.

The rule these check: the modules live on the device (also those given in memory on the CPU), the data, stores,
trajectories and results on the CPU. With TF32 off, the GPU's features and GGN kernels equal the CPU's within
float rounding (relative error < 1e-3), and so do the scores of the same target; the GPU's own samples are
scored too (finite scores, a report)."""
import copy
import os

import numpy as np
import pytest
import torch

from diffusion_trak import Attributor
from diffusion_trak.cli import main
from diffusion_trak.config import FeaturizeArgs, ScoreArgs
from diffusion_trak.data import load_dataset

from helpers import step_by_step
from tiny_models import save_ddpm_pipeline, save_image_folder, save_sd_pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"
FARGS = FeaturizeArgs(num_timesteps=2, proj_dim=32, batch_size=8)
SARGS = ScoreArgs(num_noises=2, destination_draws=2)
KW = dict(score_args=SARGS, progress=False)
PROMPT = "a photo of a digit1"
FEATURES_TOL, SCORES_TOL = 1e-3, 1e-2


@pytest.fixture(autouse=True)
def full_fp32():
    """No TF32 convolutions or matmuls on the GPU while a test runs: the comparisons are of devices, not precisions."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"ddpm": save_ddpm_pipeline(str(root / "ddpm")), "sd": save_sd_pipeline(str(root / "sd")),
            "imgs": save_image_folder(str(root / "imgs")), "root": root}


@pytest.fixture(scope="module")
def lora_dir(folders):
    """A LoRA adapter on the SD folder's UNet, saved as diffusers' LoRA scripts save it (random, nonzero weights)."""
    peft = pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(os.path.join(folders["sd"], "unet"))
    unet.requires_grad_(False)
    unet.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    out = str(folders["root"] / "lora")
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet))
    return out


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def on_device(module) -> bool:
    return next(module.parameters()).device.type == "cuda"


def check_cpu_and_gpu(make, tmp_path, sample: dict, images=None, **conditions):
    """``make(device, out)``: the same model as an Attributor on the CPU and on the GPU. The GPU's modules are on
    the GPU; its features and kernels equal the CPU's; the scores of the CPU's trajectory (and of ``images`` with
    ``conditions``) equal the CPU's; its own samples (``pipeline(**sample)``) are scored and reported, all
    results on the CPU."""
    cpu, gpu = make("cpu", str(tmp_path / "cpu")), make(DEVICE, str(tmp_path / "gpu"))
    assert all(on_device(u) for u, _ in gpu.checkpoints)
    if gpu.conditioning.vae is not None:
        assert on_device(gpu.conditioning.vae)
    if gpu.conditioning.text is not None:
        assert on_device(gpu.conditioning.text.text_encoder)
    fc, fg = cpu.featurize(), gpu.featurize()
    for a, b in zip(fc.arrays, fg.arrays):
        assert np.isfinite(b).all() and rel_err(b, a) < FEATURES_TOL
    for a, b in zip(fc.kernels or [], fg.kernels or []):
        assert rel_err(b, a) < FEATURES_TOL

    traj = cpu.pipeline(**sample).trajectory
    sc, sg = cpu.attribute(traj, save=False), gpu.attribute(traj, save=False)
    assert np.isfinite(sg.values).all() and rel_err(sg.values, sc.values) < SCORES_TOL
    assert rel_err(sg.destination, sc.destination) < SCORES_TOL
    if images is not None:
        ic, ig = (a.attribute(images, image_timesteps=[10, 500], save=False, **conditions) for a in (cpu, gpu))
        assert np.isfinite(ig.values).all() and rel_err(ig.values, ic.values) < SCORES_TOL

    own = gpu.pipeline(**sample)  # sampled on the GPU, recorded on the CPU
    assert own.trajectory.final.device.type == "cpu" and own.trajectory.x0_pred.device.type == "cpu"
    scores = gpu.attribute(own)
    assert np.isfinite(scores.values).all() and np.isfinite(scores.destination).all()
    png, html = gpu.report(scores)
    assert os.path.getsize(png) > 0 and os.path.getsize(html) > 0
    rate, pos = gpu.self_attribution(4, 10)
    assert 0.0 <= rate <= 1.0 and len(pos) == 4
    return cpu, gpu


# ---------------------------------------------------------------------------------------------- the demos
def _check_demo(res):
    scores = np.load(os.path.join(res["scores"], "scores.npy"))
    assert np.isfinite(scores).all() and np.abs(scores).sum() > 0
    assert os.path.getsize(res["png"]) > 0 and os.path.getsize(res["html"]) > 0
    assert 0.0 <= res["self_attribution"] <= 1.0


def test_quick_pixel_demo(tmp_path):
    from diffusion_trak.demo import run_demo

    _check_demo(run_demo(str(tmp_path / "demo"), quick=True, device=DEVICE))


def test_quick_latent_demo(tmp_path):
    from diffusion_trak.demo import run_demo

    res = run_demo(str(tmp_path / "demo"), quick=True, device=DEVICE, latent=True)
    _check_demo(res)
    assert res["prompt"]


@pytest.mark.parametrize("latent", [False, True], ids=["pixel", "latent"])
def test_cli_quick_demo(tmp_path, capsys, latent):
    out = str(tmp_path / "demo")
    assert main(["demo", "--quick", "--device", DEVICE, "--out", out] + (["--latent"] if latent else [])) == 0
    assert "per-step plot:" in capsys.readouterr().out
    assert np.isfinite(np.load(os.path.join(out, "scores", "seed-0", "scores.npy"))).all()


# ---------------------------------------------------------------------------------------------- the Attributor
def test_attributor_pixel_model(tmp_path, folders):
    def make(device, out):
        return Attributor.from_pretrained(folders["ddpm"], folders["imgs"], out, device=device, featurize_args=FARGS,
                                          **KW)

    data = load_dataset(name="folder", path=folders["imgs"])
    check_cpu_and_gpu(make, tmp_path, dict(seed=0, num_inference_steps=5, record_steps=[0, 2, 4]),
                      images=data.images[:2])


def test_attributor_class_conditional_model_given_in_memory_on_the_cpu(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=10)
    sched = DDPMScheduler(num_train_timesteps=1000)
    data = load_dataset(name="digits", limit=12)
    def make(device, out):  # a copy each: the Attributor moves the modules it is given to its device
        return Attributor([(copy.deepcopy(unet), sched)], data, out, device=device, featurize_args=FARGS, **KW)

    sample = dict(batch_size=2, class_labels=[3, 5], seed=0, num_inference_steps=5, record_steps=[0, 4])
    _, gpu = check_cpu_and_gpu(make, tmp_path, sample, images=data.images[:2], class_labels=data.labels[:2])
    assert gpu.pipeline(**sample).trajectory.class_labels.tolist() == [3, 5]


def test_attributor_latent_text_model_given_in_memory_on_the_cpu(tmp_path, folders):
    """A Stable-Diffusion-style pipeline in memory on the CPU (VAE, CLIP text encoder, UNet): moved to the device."""
    from diffusers import StableDiffusionPipeline

    def make(device, out):
        pipe = StableDiffusionPipeline.from_pretrained(folders["sd"], safety_checker=None,
                                                       requires_safety_checker=False)
        return Attributor.from_pipeline(pipe, folders["imgs"], out, device=device, featurize_args=FARGS, **KW)

    data = load_dataset(name="folder", path=folders["imgs"])
    check_cpu_and_gpu(make, tmp_path, dict(prompt=PROMPT, seed=0, num_inference_steps=5, record_steps=[0, 4],
                                           guidance_scale=2.0), images=data.images[:2], prompts=[PROMPT] * 2)


def test_attributor_latent_text_model_from_its_folder(tmp_path, folders):
    def make(device, out):
        return Attributor.from_pretrained(folders["sd"], folders["imgs"], out, device=device, featurize_args=FARGS,
                                          **KW)

    check_cpu_and_gpu(make, tmp_path, dict(prompt=PROMPT, seed=0, num_inference_steps=5, record_steps=[0, 4],
                                           guidance_scale=2.0))


def test_attributor_lora(tmp_path, folders, lora_dir):
    from dataclasses import replace

    args = replace(FARGS, params="lora")
    def make(device, out):
        return Attributor.from_pretrained(folders["sd"], folders["imgs"], out, lora=lora_dir, device=device,
                                          featurize_args=args, **KW)

    _, gpu = check_cpu_and_gpu(make, tmp_path, dict(prompt=PROMPT, seed=0, num_inference_steps=5, record_steps=[0, 4],
                                                    guidance_scale=2.0))
    settings = gpu.features.store.settings
    assert settings["featurize"]["params"] == "lora" and settings["lora"][0]["adapter"]


# ---------------------------------------------------------------------------------------------- the commands
def test_commands_pixel(tmp_path, capsys):
    run = str(tmp_path / "run")
    scores = step_by_step(run, DEVICE)
    assert "per-step plot:" in capsys.readouterr().out
    assert scores.shape == (3, 1, 40) and np.isfinite(scores).all()


def test_commands_latent_text_lora(tmp_path, capsys, folders, lora_dir):
    run = str(tmp_path / "run")
    model = ["--pipeline", folders["sd"], "--lora", lora_dir, "--run", run, "--device", DEVICE]
    assert main(["featurize", *model, "--data", "folder", "--data-path", folders["imgs"], "-T", "2", "-k", "32"]) == 0
    assert main(["generate", *model, "--prompt", PROMPT, "--steps", "5", "--num-record", "2"]) == 0
    assert main(["score", *model, "-R", "2"]) == 0
    assert main(["plot", "--run", run]) == 0
    assert "per-step plot:" in capsys.readouterr().out
    scores = np.load(os.path.join(run, "scores", "seed-0", "scores.npy"))
    assert scores.shape == (2, 1, 12) and np.isfinite(scores).all()
