"""Tests for pipelines.trajectory (tiny random UNet, CPU, few steps)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from diffusion_trak.pipelines import Trajectory, TrajectoryOutput, TrajectoryPipeline

STEPS = 6


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny CPU convolutions are far faster single-threaded on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_unet(seed: int = 0, **extra) -> UNet2DModel:
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        **extra,
    )
    return unet.eval()


@pytest.fixture(scope="module")
def unet():
    return make_unet(0)


@pytest.fixture(scope="module")
def other_unet(unet):
    """Same architecture, perturbed weights (stands in for a retrained model)."""
    perturbed = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return perturbed


def ddpm():
    return DDPMScheduler(num_train_timesteps=1000)


def ddim():
    return DDIMScheduler(num_train_timesteps=1000)


def to_np(images: torch.Tensor) -> np.ndarray:
    return (images / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()


# 1. Exact agreement with diffusers' own pipelines -------------------------------------------


def test_ddpm_matches_diffusers(unet):
    ref = DDPMPipeline(unet, ddpm())(
        batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, output_type="np"
    ).images
    out = TrajectoryPipeline(unet, ddpm())(
        batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, show_progress=False
    )
    assert isinstance(out, TrajectoryOutput)
    np.testing.assert_array_equal(out.images_np(), ref)
    np.testing.assert_array_equal(to_np(out.trajectory.final), ref)
    # the seed shortcut is the same as a CPU generator with that seed
    out_seed = TrajectoryPipeline(unet, ddpm())(batch_size=2, seed=0, num_inference_steps=STEPS, show_progress=False)
    assert torch.equal(out_seed.images, out.images)
    assert out_seed.trajectory.seed == 0
    assert out.trajectory.seed is None
    # DDPM injects noise at every step but the last
    noises = out.trajectory.noises
    assert noises.shape == (STEPS, 2, 1, 8, 8)
    assert all(noises[i].abs().sum() > 0 for i in range(STEPS - 1))
    assert torch.count_nonzero(noises[-1]) == 0
    pil = out.images_pil()
    assert len(pil) == 2 and pil[0].size == (8, 8)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(unet, eta):
    ref = DDIMPipeline(unet, ddim())(
        batch_size=2,
        generator=torch.Generator().manual_seed(1),
        num_inference_steps=STEPS,
        eta=eta,
        output_type="np",
    ).images
    out = TrajectoryPipeline(unet, ddim())(
        batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=STEPS, eta=eta,
        show_progress=False,
    )
    np.testing.assert_array_equal(out.images_np(), ref)
    n_nonzero = sum(int(torch.count_nonzero(n) > 0) for n in out.trajectory.noises)
    assert n_nonzero == (0 if eta == 0.0 else STEPS)
    assert out.trajectory.eta == eta


def test_recorded_noise_is_what_the_scheduler_used(unet):
    """Re-running the DDPM steps by hand with the recorded noise reproduces every x_t."""
    traj = TrajectoryPipeline(unet, ddpm())(batch_size=1, seed=5, num_inference_steps=STEPS, show_progress=False).trajectory
    sched = ddpm()
    sched.set_timesteps(STEPS)
    for i in range(STEPS - 1):
        t = sched.timesteps[i]
        prev_t = sched.previous_timestep(t)
        a, a_prev = sched.alphas_cumprod[t], sched.alphas_cumprod[prev_t]
        beta = 1 - a / a_prev
        x, x0 = traj.x_t[i], traj.x0_pred[i]
        mean = (a_prev.sqrt() * beta / (1 - a)) * x0 + ((a / a_prev).sqrt() * (1 - a_prev) / (1 - a)) * x
        expected = mean + sched._get_variance(t).sqrt() * traj.noises[i]
        torch.testing.assert_close(traj.x_t[i + 1], expected, rtol=1e-5, atol=1e-5)


# 2. Recorded quantities ------------------------------------------------------------------------


def test_x0_pred_and_initial_noise(unet):
    sched = ddpm()
    traj = TrajectoryPipeline(unet, sched)(batch_size=2, seed=3, num_inference_steps=STEPS, show_progress=False).trajectory
    assert traj.x_t.shape == (STEPS, 2, 1, 8, 8) and traj.x0_pred.shape == traj.x_t.shape
    assert traj.step_indices.tolist() == list(range(STEPS))
    torch.testing.assert_close(traj.x_t[0], traj.initial_noise * sched.init_noise_sigma)
    expected_noise = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    assert torch.equal(traj.initial_noise, expected_noise)
    assert traj.timesteps.dtype == torch.long
    assert torch.equal(traj.timesteps, sched.timesteps)

    check = ddpm()
    check.set_timesteps(STEPS)
    for step in (0, 3, STEPS - 1):
        x, t = traj.x_t_at(step), traj.timestep_at(step)
        with torch.no_grad():
            eps = unet(x, t).sample
        x0 = check.step(eps, t, x, generator=torch.Generator().manual_seed(0)).pred_original_sample
        torch.testing.assert_close(traj.x0_pred_at(step), x0)
        a = check.alphas_cumprod[t]
        torch.testing.assert_close(traj.x0_pred_at(step), ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1), rtol=1e-4, atol=1e-4)


def test_v_prediction_x0(unet):
    sched = DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    traj = TrajectoryPipeline(unet, sched)(seed=0, num_inference_steps=4, record_steps=[2], show_progress=False).trajectory
    x, t = traj.x_t_at(2), traj.timestep_at(2)
    with torch.no_grad():
        v = unet(x, t).sample
    a = sched.alphas_cumprod[t]
    torch.testing.assert_close(traj.x0_pred_at(2), (a.sqrt() * x - (1 - a).sqrt() * v).clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_class_labels_pass_through():
    unet = make_unet(1, num_class_embeds=3)
    pipe = TrajectoryPipeline(unet, ddim())
    a = pipe(batch_size=2, seed=0, num_inference_steps=3, class_labels=[0, 2], show_progress=False)
    b = pipe(batch_size=2, seed=0, num_inference_steps=3, class_labels=[1, 1], show_progress=False)
    assert not torch.allclose(a.images, b.images)
    assert a.trajectory.class_labels.tolist() == [0, 2]
    restarted = pipe(start_from=a.trajectory, start_step=1, show_progress=False)
    torch.testing.assert_close(restarted.images, a.trajectory.final)


# 3. Restart ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make_sched,eta", [(ddpm, 0.0), (ddim, 0.0), (ddim, 1.0)])
def test_restart_reproduces_and_counterfactual_differs(unet, other_unet, make_sched, eta):
    pipe = TrajectoryPipeline(unet, make_sched())
    out = pipe(batch_size=2, seed=11, num_inference_steps=STEPS, eta=eta, show_progress=False)
    traj = out.trajectory
    mid = STEPS // 2

    same = pipe(start_from=traj, start_step=mid, show_progress=False)
    torch.testing.assert_close(same.images, traj.final, rtol=1e-6, atol=1e-6)
    # the restarted trajectory records the remaining steps, identical to the original ones
    assert same.trajectory.step_indices.tolist() == list(range(mid, STEPS))
    torch.testing.assert_close(same.trajectory.x_t, traj.x_t[mid:], rtol=1e-6, atol=1e-6)
    assert same.trajectory.start_step == mid
    assert torch.equal(same.trajectory.noises, traj.noises)

    from_start = pipe(start_from=traj, start_step=0, show_progress=False)
    torch.testing.assert_close(from_start.images, traj.final, rtol=1e-6, atol=1e-6)

    counterfactual = TrajectoryPipeline(other_unet, make_sched())(start_from=traj, start_step=mid, show_progress=False)
    assert not torch.allclose(counterfactual.images, traj.final, atol=1e-3)
    assert counterfactual.trajectory.x_t.shape[0] == STEPS - mid
    # the first restarted x_t is the shared starting point
    assert torch.equal(counterfactual.trajectory.x_t[0], traj.x_t[mid])


def test_restart_from_unrecorded_step_raises(unet):
    pipe = TrajectoryPipeline(unet, ddpm())
    traj = pipe(seed=0, num_inference_steps=STEPS, record_steps=[1, 4], show_progress=False).trajectory
    with pytest.raises(ValueError, match=r"trajectory lacks step 2; recorded steps are \[1, 4\]; "
                                         r"regenerate with record_steps including 2"):
        pipe(start_from=traj, start_step=2, show_progress=False)
    with pytest.raises(ValueError, match="lacks step 7"):
        traj.step_of(7)
    with pytest.raises(ValueError):
        pipe(start_from=traj, start_step=1, seed=3, show_progress=False)
    with pytest.raises(ValueError):
        pipe(start_from=traj, show_progress=False)


def test_restart_ignores_pipeline_scheduler_settings(unet):
    """The restart uses the trajectory's scheduler config, not the pipeline's current one."""
    traj = TrajectoryPipeline(unet, ddpm())(seed=2, num_inference_steps=STEPS, show_progress=False).trajectory
    pipe = TrajectoryPipeline(unet, DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"))
    pipe.scheduler.set_timesteps(3)
    out = pipe(start_from=traj, start_step=2, show_progress=False)
    torch.testing.assert_close(out.images, traj.final, rtol=1e-6, atol=1e-6)


# 4. Save / load ------------------------------------------------------------------------------


def test_save_load_round_trip(unet, tmp_path):
    traj = TrajectoryPipeline(unet, ddim())(
        batch_size=2, seed=9, num_inference_steps=STEPS, eta=0.5, record_steps=[0, 2, 5], show_progress=False
    ).trajectory
    path = traj.save(tmp_path / "traj.safetensors")
    assert path.exists() and len(list(tmp_path.iterdir())) == 1
    loaded = Trajectory.load(path)
    for name in ("timesteps", "step_indices", "x_t", "x0_pred", "noises", "initial_noise", "final"):
        assert torch.equal(getattr(loaded, name), getattr(traj, name)), name
    for name in ("seed", "scheduler_class", "num_inference_steps", "eta", "start_step", "class_labels"):
        assert getattr(loaded, name) == getattr(traj, name), name
    assert loaded.scheduler_config == traj.scheduler_config
    assert loaded.scheduler_config["num_train_timesteps"] == 1000
    # a loaded trajectory restarts like the original
    again = TrajectoryPipeline(unet, ddim())(start_from=loaded, start_step=2, show_progress=False)
    torch.testing.assert_close(again.images, traj.final, rtol=1e-6, atol=1e-6)


def test_save_load_with_class_labels_and_no_recorded_steps(tmp_path):
    unet = make_unet(1, num_class_embeds=3)
    traj = TrajectoryPipeline(unet, ddpm())(
        batch_size=2, seed=0, num_inference_steps=3, class_labels=2, record_steps=[], show_progress=False
    ).trajectory
    assert traj.x_t.shape == (0, 2, 1, 8, 8)
    loaded = Trajectory.load(traj.save(tmp_path / "t.safetensors"))
    assert torch.equal(loaded.class_labels, torch.tensor([2, 2]))
    assert loaded.x_t.shape == (0, 2, 1, 8, 8)
    assert torch.equal(loaded.final, traj.final)


# 5. record_steps -----------------------------------------------------------------------------


def test_record_steps_subset(unet):
    pipe = TrajectoryPipeline(unet, ddpm())
    full = pipe(batch_size=2, seed=4, num_inference_steps=STEPS, show_progress=False).trajectory
    part = pipe(batch_size=2, seed=4, num_inference_steps=STEPS, record_steps=[4, 1, 4], show_progress=False).trajectory
    assert part.step_indices.tolist() == [1, 4]
    assert part.x_t.shape == (2, 2, 1, 8, 8) and part.x0_pred.shape == (2, 2, 1, 8, 8)
    assert part.noises.shape == (STEPS, 2, 1, 8, 8)
    assert torch.equal(part.x_t, full.x_t[[1, 4]])
    assert torch.equal(part.x0_pred, full.x0_pred[[1, 4]])
    assert torch.equal(part.noises, full.noises)
    assert torch.equal(part.final, full.final)
    assert part.step_of(4) == 1 and part.timestep_at(3) == int(full.timesteps[3])
    with pytest.raises(ValueError):
        pipe(seed=4, num_inference_steps=STEPS, record_steps=[STEPS], show_progress=False)


# misc -----------------------------------------------------------------------------------------


def test_generator_list_matches_diffusers(unet):
    gens = lambda: [torch.Generator().manual_seed(s) for s in (7, 8)]  # noqa: E731
    ref = DDPMPipeline(unet, ddpm())(batch_size=2, generator=gens(), num_inference_steps=4, output_type="np").images
    out = TrajectoryPipeline(unet, ddpm())(batch_size=2, generator=gens(), num_inference_steps=4, show_progress=False)
    np.testing.assert_array_equal(out.images_np(), ref)
    restarted = TrajectoryPipeline(unet, ddpm())(start_from=out.trajectory, start_step=1, show_progress=False)
    torch.testing.assert_close(restarted.images, out.trajectory.final, rtol=1e-6, atol=1e-6)


def test_loadable_as_community_pipeline(unet, tmp_path, monkeypatch):
    import diffusion_trak.pipelines.trajectory as module
    from diffusers import DiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    DDPMPipeline(unet, ddpm()).save_pretrained(tmp_path / "model")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "model", custom_pipeline=module.__file__, trust_remote_code=True
    )
    assert type(pipe).__name__ == "TrajectoryPipeline"
    out = pipe(seed=0, num_inference_steps=3, show_progress=False)
    assert out.trajectory.x_t.shape == (3, 1, 1, 8, 8)
