import os
import shutil

import torch

from diffusion_trak.config import TrainArgs
from diffusion_trak.data import load_dataset
from diffusion_trak.train import checkpoint_epochs, list_checkpoints, load_checkpoint, train_ddpm

ARGS = TrainArgs(block_out_channels=(8, 16), norm_num_groups=4, epochs=4, batch_size=16, num_checkpoints=2)


def _weights(path):
    unet, _ = load_checkpoint(path)
    return torch.cat([p.detach().reshape(-1) for p in unet.parameters()])


def test_checkpoints_saved_in_diffusers_format(tmp_path):
    data = load_dataset(name="digits", limit=32)
    ck = train_ddpm(data, ARGS, str(tmp_path / "m"), progress=False, device="cpu")
    assert [os.path.basename(c) for c in ck] == [f"ckpt-{e:04d}" for e in checkpoint_epochs(ARGS)] == ["ckpt-0003", "ckpt-0004"]
    unet, sched = load_checkpoint(ck[-1])
    assert unet.config.sample_size == 8 and sched.config.num_train_timesteps == 1000
    assert not torch.equal(_weights(ck[0]), _weights(ck[1]))


def test_interrupted_training_resumes_to_identical_weights(tmp_path):
    data = load_dataset(name="digits", limit=32)
    full = train_ddpm(data, ARGS, str(tmp_path / "a"), progress=False, device="cpu")
    part = train_ddpm(data, ARGS, str(tmp_path / "b"), progress=False, device="cpu")
    shutil.rmtree(part[-1])  # the run died before its last checkpoint
    assert len(list_checkpoints(str(tmp_path / "b"))) == 1
    resumed = train_ddpm(data, ARGS, str(tmp_path / "b"), progress=False, device="cpu")
    assert torch.equal(_weights(full[-1]), _weights(resumed[-1]))
