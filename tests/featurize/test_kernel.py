"""The GGN kernel (``FeaturizeArgs.kernel="ggn"``): what it estimates, how it is stored, and the paper's kernel."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from diffusion_trak import api
from diffusion_trak.config import FeaturizeArgs, ScoreArgs, asdict, from_dict, preset
from diffusion_trak.data import load_dataset
from diffusion_trak.featurize.featurizer import Featurizer
from diffusion_trak.score import trak_scores
from diffusion_trak.store import StoreError


@pytest.mark.parametrize("method", ["fast", "vmap"])
def test_probe_outer_products_estimate_the_gauss_newton_matrix(tiny_unet, scheduler, method):
    """For one (x0, t, ε), the mean over probes v of g gᵀ, g the projected gradient of mean(ε̂ · v) as the featurizer
    computes it, approaches P JᵀJ Pᵀ / d² (J: the Jacobian of ε̂ in θ, written out pixel by pixel); the outer
    product of the loss gradient is another matrix (rank one)."""
    k, N = 8, 1500
    f = Featurizer(tiny_unet, scheduler, FeaturizeArgs(proj_dim=k, method=method, projector="countsketch"))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 1, 8, 8, generator=g) * 2 - 1
    t, eps = torch.tensor([300]), torch.randn(1, 1, 8, 8, generator=g)
    v = torch.randn(N, 1, 8, 8, generator=g)
    rows = f.features(x0.expand(N, -1, -1, -1), t.expand(N).reshape(N, 1),
                      torch.cat([eps.expand(N, -1, -1, -1), v], 1).unsqueeze(1), output="probe").double()
    mc = rows.T @ rows / N
    # the exact Gauss-Newton matrix, from the Jacobian
    model = f.model
    params = dict(model.named_parameters())
    abar = scheduler.alphas_cumprod[t].reshape(1, 1, 1, 1)
    pred = model(abar.sqrt() * x0 + (1 - abar).sqrt() * eps, t).sample.reshape(-1)
    d = pred.numel()
    J = torch.stack([torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(pred[i], [params[n] for n in f.param_names],
                                                                             retain_graph=True)]) for i in range(d)])
    PJ = f.projector(J).double()  # (d, k): the projection of each row of J
    exact = PJ.T @ PJ / d ** 2
    err = torch.linalg.norm(mc - exact) / torch.linalg.norm(exact)
    assert err < 0.15, f"Monte Carlo GGN off by {err:.3f}"
    loss_row = f.features(x0, t.reshape(1, 1), eps.unsqueeze(1)).double()
    ef = loss_row.T @ loss_row
    cos = (ef * exact).sum() / (torch.linalg.norm(ef) * torch.linalg.norm(exact))
    assert cos < 0.95  # the loss gradient's outer product is not the curvature


def _data():
    return load_dataset(name="digits", limit=12)


def test_kernel_resumes_and_shards_bit_identically(tmp_path, tiny_unet, scheduler):
    """The kernel is kept as partial sums (slots) with done flags: a store missing a slot finishes it to the same
    bits, and shards of rows (each its whole slots) give the same kernel as one call."""
    data = _data()
    args = FeaturizeArgs(num_timesteps=2, proj_dim=16, batch_size=4, kernel_draws=3)
    ckpts = [(tiny_unet, scheduler)]
    whole = api.featurize(ckpts, data, args, str(tmp_path / "whole"), progress=False)
    K = whole.kernels[0]
    assert K.shape == (16, 16) and np.allclose(K, K.T) and np.linalg.eigvalsh(K).min() > -1e-6 * np.abs(K).max()
    slots = whole.store.get("kernel_00")
    assert slots.shape == (3, 16, 16)  # 12 rows in blocks of 4: one slot per block
    whole.store.close()
    # an interrupted run: slot 1 never finished
    done = np.lib.format.open_memmap(str(tmp_path / "whole" / "kernel_00.done.npy"), mode="r+")
    done[1] = False
    done.flush()
    del done
    again = api.featurize(ckpts, data, args, str(tmp_path / "whole"), progress=False)
    np.testing.assert_array_equal(again.kernels[0], K)
    # two shards of rows, each holding whole slots
    api.featurize(ckpts, data, args, str(tmp_path / "shards"), progress=False, rows=range(0, 8))
    shards = api.featurize(ckpts, data, args, str(tmp_path / "shards"), progress=False, rows=range(8, 12))
    np.testing.assert_array_equal(shards.kernels[0], K)
    np.testing.assert_array_equal(np.asarray(shards.arrays[0]), np.asarray(again.arrays[0]))


def test_the_papers_kernel_and_stores_made_before_the_ggn_kernel(tmp_path, tiny_unet, scheduler):
    """``kernel="features"`` (the paper preset) stores no kernel and scores with ΦᵀΦ; its settings leave the
    field out, so a store saved before the field existed resumes with it, and reads back as ``features``; the
    default settings (ggn) over such a store refuse in one line naming --overwrite."""
    data = _data()
    paper, _ = preset("paper")
    assert paper.kernel == "features" and FeaturizeArgs().kernel == "ggn"
    args = dataclasses.replace(paper, num_timesteps=2, proj_dim=16, batch_size=4)
    ckpts = [(tiny_unet, scheduler)]
    fs = api.featurize(ckpts, data, args, str(tmp_path / "f"), progress=False)
    assert fs.kernel_names == [] and fs.kernels is None and "kernel" not in fs.store.settings["featurize"]
    sa = ScoreArgs(num_noises=2, ridge=0.1, destination_draws=0)
    sc = api.score(fs, ckpts, data.indices.numpy(), sa, images=data.images[:2], image_timesteps=[50], progress=False)
    from diffusion_trak.targets import image_target_features

    f = Featurizer(tiny_unet, scheduler, args)
    psi = image_target_features(f, data.images[:2], [50], 2, sa.seed)[0].numpy()
    np.testing.assert_allclose(sc.values[0], trak_scores([np.asarray(fs.arrays[0])], [psi], 0.1), rtol=1e-4, atol=1e-6)
    fs.store.close()
    with open(tmp_path / "f" / "manifest.json") as fh:
        saved = json.load(fh)["settings"]["featurize"]
    assert from_dict(FeaturizeArgs, saved).kernel == "features"
    assert "kernel" in asdict(FeaturizeArgs()) and "kernel_draws" not in asdict(FeaturizeArgs())
    api.featurize(ckpts, data, args, str(tmp_path / "f"), progress=False).store.close()  # resumes: nothing to do
    with pytest.raises(StoreError, match="overwrite"):
        api.featurize(ckpts, data, dataclasses.replace(args, kernel="ggn"), str(tmp_path / "f"), progress=False)
    assert not os.path.exists(tmp_path / "f" / "kernel_00.npy")


def test_kernel_settings_are_checked():
    from diffusion_trak.errors import InputError

    with pytest.raises(InputError, match="kernel must be one of ggn, features"):
        FeaturizeArgs(kernel="fisher")
    with pytest.raises(InputError, match="kernel_draws"):
        FeaturizeArgs(kernel_draws=0)


def test_kernel_slots_bound_the_disk():
    from diffusion_trak.featurize.featurizer import KERNEL_SLOT_BYTES, kernel_slots

    assert kernel_slots(12, 4, 16) == 3 and kernel_slots(10_000, 16, 2048) == 16
    for k in (4096, 8192, 16384, 32768):
        assert 1 <= kernel_slots(10_000, 16, k) and (kernel_slots(10_000, 16, k) * 4 * k * k <= KERNEL_SLOT_BYTES
                                                       or kernel_slots(10_000, 16, k) == 1)
    assert kernel_slots(10_000, 16, 8192) == 4

