"""Every bad input of the README's table: a one-line error that names the fix, and the store unchanged."""
import errno
import hashlib
import os
import subprocess
import sys
import types

import pytest
import torch

from diffusion_trak import api
from diffusion_trak.config import FeaturizeArgs, ScoreArgs
from diffusion_trak.data import ImageDataset, load_dataset
from diffusion_trak.errors import UserError
from diffusion_trak.featurize.projectors import ProjectorError, make_projector

ARGS = FeaturizeArgs(num_timesteps=2, proj_dim=16, batch_size=8)


def snapshot(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.relpath(os.path.join(dirpath, f), root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture
def setup(tmp_path, tiny_unet, scheduler):
    data = load_dataset(name="digits", limit=16)
    store = str(tmp_path / "features")
    fs = api.featurize([(tiny_unet, scheduler)], data, ARGS, store, progress=False)
    return types.SimpleNamespace(data=data, store=store, fs=fs, unet=tiny_unet, scheduler=scheduler, tmp=tmp_path)


def _other_unet(s):
    u = type(s.unet).from_config(s.unet.config)
    return u


def _traj(s, record):
    from pipelines import TrajectoryPipeline

    return TrajectoryPipeline(unet=s.unet, scheduler=s.scheduler)(seed=0, num_inference_steps=4, record_steps=record,
                                                                  show_progress=False).trajectory


def case_changed_settings(s):
    api.featurize([(s.unet, s.scheduler)], s.data, FeaturizeArgs(num_timesteps=3, proj_dim=16, batch_size=8), s.store,
                  progress=False)


def case_model_mismatch(s):
    api.featurize([(_other_unet(s), s.scheduler)], s.data, ARGS, s.store, progress=False)


def case_model_mismatch_at_scoring(s):
    api.score(s.fs, [(_other_unet(s), s.scheduler)], s.data.indices.numpy(), ScoreArgs(num_noises=1),
              images=s.data.images[:1], progress=False)


def case_dataset_mismatch(s):
    api.featurize([(s.unet, s.scheduler)], load_dataset(name="digits", limit=16, split="test"), ARGS, s.store, progress=False)


def case_wrong_size(s):
    api.featurize([(s.unet, s.scheduler)], load_dataset(name="digits", limit=16, image_size=16), ARGS, s.store, progress=False)


def case_wrong_channels(s):
    api.featurize([(s.unet, s.scheduler)], load_dataset(name="digits", limit=16, channels=3), ARGS, s.store, progress=False)


def case_nan_input(s):
    images = s.data.images.clone()
    images[3, 0, 0, 0] = float("nan")
    api.featurize([(s.unet, s.scheduler)], ImageDataset(images), ARGS, s.store, progress=False)


def case_nan_gradient(s):
    bad = _other_unet(s)
    with torch.no_grad():
        next(bad.parameters()).fill_(float("inf"))
    api.featurize([(bad, s.scheduler)], s.data, ARGS, str(s.tmp / "other"), progress=False)


def case_empty_dataset(s):
    load_dataset(name="digits", classes=[42])


def case_empty_dataset_in_memory(s):
    api.featurize([(s.unet, s.scheduler)], ImageDataset(torch.zeros(0, 1, 8, 8)), ARGS, s.store, progress=False)


def case_scheduler_timesteps(s):
    from diffusers import DDPMScheduler

    api.score(s.fs, [(s.unet, DDPMScheduler(num_train_timesteps=500))], s.data.indices.numpy(), ScoreArgs(num_noises=1),
              images=s.data.images[:1], progress=False)


def case_timestep_range(s):
    api.featurize([(s.unet, s.scheduler)], s.data, FeaturizeArgs(num_timesteps=2, proj_dim=16, batch_size=8,
                                                                  timestep_range=(900, 1000)), s.store, progress=False)


def case_missing_step(s):
    api.score(s.fs, [(s.unet, s.scheduler)], s.data.indices.numpy(), ScoreArgs(num_noises=1), trajectory=_traj(s, [0, 3]),
              steps=[1], progress=False)


def case_fast_jl_missing(s):
    sys.modules["fast_jl"] = None  # import fails
    try:
        make_projector("fast_jl", 100, 16, 0, "cpu")
    finally:
        del sys.modules["fast_jl"]


def case_fast_jl_zeros(s):
    from diffusion_trak.featurize import projectors

    fake = types.SimpleNamespace(project_rademacher_8=lambda g, k, seed, tiles: torch.zeros(g.shape[0], k))
    sys.modules["fast_jl"] = fake
    old = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        p = object.__new__(projectors.FastJLProjector)
        projectors.Projector.__init__(p, 100, 16, 0)
        p._fn, p.device, p.max_batch = fake.project_rademacher_8, torch.device("cpu"), 32
        p._check()
    finally:
        torch.cuda.is_available = old
        del sys.modules["fast_jl"]


def case_truncated_memmap(s):
    path = os.path.join(s.store, "features_00.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 64)
    api.FeatureSet.open(s.store).arrays


def case_disk_full(s, monkeypatch=None):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    old = os.posix_fallocate
    os.posix_fallocate = full
    try:
        api.featurize([(s.unet, s.scheduler)], s.data, ARGS, str(s.tmp / "new-store"), progress=False)
    finally:
        os.posix_fallocate = old


CASES = [  # (case, error type, message pattern, store left unchanged?)
    (case_changed_settings, UserError, r"other settings \(featurize.num_timesteps: 2 -> 3\).*--overwrite", True),
    (case_model_mismatch, UserError, r"other settings \(checkpoints: .*--overwrite", True),
    (case_model_mismatch_at_scoring, UserError, r"not the ones the features were computed with; featurize them again", True),
    (case_dataset_mismatch, UserError, r"other settings \(dataset.fingerprint: .*--overwrite", True),
    (case_wrong_size, UserError, r"model expects 8×8 images but the dataset has 16×16; use --image-size 8", True),
    (case_wrong_channels, UserError, r"model expects 1 channels but the dataset has 3; use --channels 1", True),
    (case_nan_input, UserError, r"NaN/Inf in the dataset at rows \[3\]; clean or drop", True),
    (case_nan_gradient, UserError, r"NaN/Inf in per-example gradients; check the checkpoint", True),
    (case_empty_dataset, UserError, r"empty.*--classes/--limit", True),
    (case_empty_dataset_in_memory, UserError, r"dataset is empty", True),
    (case_scheduler_timesteps, UserError, r"num_train_timesteps=500 but the features used 1000; load the scheduler", True),
    (case_timestep_range, UserError, r"timestep_range \(900, 1000\) reaches past the model's 1000 training timesteps; use HI <= 999", True),
    (case_missing_step, UserError, r"trajectory lacks step 1; recorded steps are \[0, 3\]; regenerate with record_steps", True),
    (case_fast_jl_missing, ProjectorError, r"fast_jl is not installed; pip install --no-build-isolation fast_jl, or use --projector torch", True),
    (case_fast_jl_zeros, ProjectorError, r"fast_jl returned all-zero .* use --projector torch", True),
    (case_truncated_memmap, UserError, r"truncated or corrupted .* --overwrite", False),
    (case_disk_full, UserError, r"disk full: .* free space or choose another --out", True),
]


@pytest.mark.parametrize("case,error,pattern,unchanged", CASES, ids=[c[0].__name__[5:] for c in CASES])
def test_bad_input(setup, case, error, pattern, unchanged):
    before = snapshot(setup.store)
    with pytest.raises(error, match=pattern) as info:
        case(setup)
    assert "\n" not in str(info.value), "errors are one line"
    if unchanged:
        assert snapshot(setup.store) == before
    assert not os.path.exists(setup.tmp / "new-store" / "features_00.npy")


def test_cli_prints_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "diffusion_trak", "featurize", "--run", str(tmp_path / "nothing")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "diffusion-trak train" in r.stderr
