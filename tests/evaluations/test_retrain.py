import os
import shutil

import numpy as np
import pytest
import torch

from diffusion_trak.config import TrainArgs
from diffusion_trak.data import load_dataset
from diffusion_trak.train import load_checkpoint
from diffusion_trak.evaluations.retrain import StackedTrainer, benchmark_stacked, final_checkpoint, process_share, train_models
from diffusion_trak.evaluations.subsets import subset_masks

ARGS = TrainArgs(block_out_channels=(8, 16), layers_per_block=1, attention_levels=(1,), norm_num_groups=4,
                 epochs=3, batch_size=8, learning_rate=2e-3, num_checkpoints=2, seed=0)


@pytest.fixture(scope="module")
def data():
    return load_dataset(name="digits", limit=24)


def _params(ck):
    unet, _ = load_checkpoint(ck)
    return torch.cat([p.detach().reshape(-1) for p in unet.parameters()])


def _init_params(seed, shape):
    from diffusion_trak.train import build_unet

    torch.manual_seed(seed)
    return torch.cat([p.detach().reshape(-1) for p in build_unet(ARGS, shape).parameters()])


def test_stacked_equals_sequential(data, tmp_path):
    masks = subset_masks(len(data), 2, 0.5, seed=0)
    seeds = [5, 5]  # the same seed for both models (and both trainers)
    seq = train_models(data, ARGS, masks, str(tmp_path / "seq"), seeds, method="sequential", progress=False, device="cpu")
    stk = train_models(data, ARGS, masks, str(tmp_path / "stk"), seeds, method="stacked", progress=False, device="cpu")
    init = _init_params(5, data.image_shape)
    finals = []
    for a, b in zip(seq, stk):
        pa, pb = _params(final_checkpoint(a, ARGS)), _params(final_checkpoint(b, ARGS))
        moved = (pa - init).norm()
        assert moved > 1e-2  # training did something
        # equal up to float error (the gradients agree to ~1e-7; Adam's first steps amplify that a little)
        assert (pa - pb).abs().max() < 1e-3
        assert (pa - pb).norm() < 1e-2 * moved
        finals.append(pa)
        # optimizer states are saved in train_ddpm's format and agree too
        sa = torch.load(os.path.join(final_checkpoint(a, ARGS), "train_state.pt"), weights_only=False)
        sb = torch.load(os.path.join(final_checkpoint(b, ARGS), "train_state.pt"), weights_only=False)
        assert sa["epoch"] == sb["epoch"] == ARGS.epochs
        assert sa["lr_scheduler"]["last_epoch"] == sb["lr_scheduler"]["last_epoch"]
        for i in sa["optimizer"]["state"]:
            torch.testing.assert_close(sa["optimizer"]["state"][i]["exp_avg"], sb["optimizer"]["state"][i]["exp_avg"],
                                       atol=1e-5, rtol=1e-3)
    # different subsets give different models
    assert (finals[0] - finals[1]).abs().max() > 1e-3


def test_stacked_resumes_and_skips(data, tmp_path):
    masks = subset_masks(len(data), 3, 0.5, seed=1)
    seeds = [1, 2, 3]
    out = str(tmp_path / "stk")
    dirs = train_models(data, ARGS, masks, out, seeds, method="stacked", progress=False, device="cpu")
    ref = [_params(final_checkpoint(d, ARGS)) for d in dirs]
    # interrupt: model 1 loses its last checkpoint, model 2 loses everything
    shutil.rmtree(final_checkpoint(dirs[1], ARGS))
    for d in os.listdir(dirs[2]):
        if d.startswith("ckpt-"):
            shutil.rmtree(os.path.join(dirs[2], d))
    mtime = os.path.getmtime(os.path.join(final_checkpoint(dirs[0], ARGS), "done"))
    train_models(data, ARGS, masks, out, seeds, method="stacked", progress=False, device="cpu")
    assert os.path.getmtime(os.path.join(final_checkpoint(dirs[0], ARGS), "done")) == mtime  # finished model skipped
    for d, r in zip(dirs, ref):
        # resumed = uninterrupted, up to float error (a different stack size changes the summation order)
        assert (_params(final_checkpoint(d, ARGS)) - r).abs().max() < 1e-3


def test_stacked_needs_equal_sizes(data, tmp_path):
    with pytest.raises(ValueError, match="equal-sized"):
        StackedTrainer(data, [np.arange(4), np.arange(5)], [0, 0], ARGS, [str(tmp_path / "a"), str(tmp_path / "b")])


def test_process_share():
    assert process_share(7, 0, 3) == [0, 3, 6]
    assert process_share(7, 2, 3) == [2, 5]
    assert sorted(sum((process_share(10, p, 4) for p in range(4)), [])) == list(range(10))


def test_benchmark_reports_speedup(data):
    masks = subset_masks(len(data), 2, 0.5, seed=0)
    r = benchmark_stacked(data, ARGS, [np.flatnonzero(m) for m in masks], [0, 1], steps=1)
    assert r["models"] == 2 and r["sequential_s"] > 0 and r["stacked_s"] > 0
    assert r["speedup"] == pytest.approx(r["sequential_s"] / r["stacked_s"])


def test_masked_replays_the_full_run(data, tmp_path):
    """Masked training with every example kept is train_ddpm on the full dataset; dropping examples
    changes the model, and does so less than a reshuffled retrain on the same subset does."""
    from diffusion_trak.train import train_ddpm

    full = train_ddpm(data, ARGS, str(tmp_path / "full"), progress=False, device="cpu")[-1]
    keep = np.ones((3, len(data)), dtype=bool)
    keep[1, [0, 5]] = False
    keep[2, [0, 5]] = False
    dirs = train_models(data, ARGS, keep[:2], str(tmp_path / "masked"), [ARGS.seed] * 2, method="stacked",
                        progress=False, device="cpu", masked=True)
    ref = _params(full)
    p_all, p_drop = _params(final_checkpoint(dirs[0], ARGS)), _params(final_checkpoint(dirs[1], ARGS))
    assert (p_all - ref).abs().max() < 1e-3 and (p_all - ref).norm() < 1e-2 * (ref - _init_params(0, data.image_shape)).norm()
    re = train_models(data, ARGS, keep[2:], str(tmp_path / "retrain"), [ARGS.seed], method="stacked",
                      progress=False, device="cpu")
    p_re = _params(final_checkpoint(re[0], ARGS))
    assert (p_drop - ref).norm() > 10 * (p_all - ref).norm()
    assert (p_drop - ref).norm() < (p_re - ref).norm()


@pytest.mark.parametrize("method,masked", [("sequential", False), ("stacked", False), ("stacked", True)])
def test_finished_model_on_other_examples_is_refused(data, tmp_path, method, masked):
    """A rerun whose masks changed (e.g. an audit whose top-k changed) must not reuse a finished model."""
    from diffusion_trak.errors import InputError

    args = TrainArgs(block_out_channels=(8, 16), norm_num_groups=4, epochs=1, batch_size=8, num_checkpoints=1)
    masks = subset_masks(len(data), 2, 0.5, seed=1)
    out = str(tmp_path / "m")
    kw = dict(method=method, progress=False, device="cpu", masked=masked)
    train_models(data, args, masks, out, [1, 2], **kw)
    train_models(data, args, masks, out, [1, 2], **kw)  # same masks: reused
    other = masks.copy()
    other[1] = ~other[1]
    with pytest.raises(InputError, match="delete that folder"):
        train_models(data, args, other, out, [1, 2], **kw)
    with pytest.raises(InputError, match="delete that folder"):
        train_models(data, args, masks, out, [1, 3], **kw)  # another seed
