import numpy as np
import pytest
import torch

from diffusion_trak.evaluations.groundtruth import OUTPUT_KINDS, TargetSet, draws, measure


def _targets():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 1, 8, 8, generator=g) * 2 - 1  # (S, B, C, H, W)
    return TargetSet("t", steps=[0, 5], timesteps=[800, 20], x0_by_step=x0, final=x0[-1])


def test_draws_are_common_and_independent_between_halves():
    for kind in OUTPUT_KINDS:
        t0, n0 = draws(kind, 3, 0, 1, 2, 500, 16, (1, 8, 8))
        t0b, n0b = draws(kind, 3, 0, 1, 2, 500, 16, (1, 8, 8))
        t1, n1 = draws(kind, 3, 1, 1, 2, 500, 16, (1, 8, 8))
        assert torch.equal(t0, t0b) and torch.equal(n0, n0b)  # same for every model
        assert not torch.equal(n0, n1)  # halves independent
    t, _ = draws("xhat0_loss", 0, 0, 0, 0, 321, 8, (1, 4, 4))
    assert (t == 321).all()
    t, _ = draws("final_loss_le_t", 0, 0, 0, 0, 40, 64, (1, 4, 4))
    assert t.min() >= 0 and t.max() <= 40 and len(set(t.tolist())) > 20  # stratified over 0..t


def test_measure_shapes_and_determinism(tiny_unet, scheduler):
    ts = _targets()
    a = measure(tiny_unet, scheduler, ts, "xhat0_loss", 4, seed=1, batch_size=7)
    b = measure(tiny_unet, scheduler, ts, "xhat0_loss", 4, seed=1, batch_size=64)
    assert a.shape == (2, 2, 3)
    np.testing.assert_allclose(a, b, rtol=1e-5)  # batching does not change the result
    c = measure(tiny_unet, scheduler, ts, "final_loss_le_t", 4, seed=1)
    assert c.shape == (2, 2, 3) and np.isfinite(c).all()
    assert not np.allclose(a, c)


def test_measure_matches_direct_loss(tiny_unet, scheduler):
    from diffusion_trak.outputs import output_value

    ts = _targets()
    got = measure(tiny_unet, scheduler, ts, "xhat0_loss", 3, seed=2)
    t, noise = draws("xhat0_loss", 2, 1, 0, 2, 800, 3, (1, 8, 8))
    with torch.no_grad():
        want = output_value(tiny_unet, scheduler, ts.x0_by_step[0, 2].expand(3, 1, 8, 8), t, noise).mean()
    assert got[1, 0, 2] == pytest.approx(float(want), rel=1e-5)


def test_from_images():
    imgs = torch.zeros(3, 1, 8, 8)
    ts = TargetSet.from_images(imgs, [0, 9], [900, 0])
    assert ts.x0_by_step.shape == (2, 3, 1, 8, 8) and ts.num_targets == 3
    with pytest.raises(ValueError):
        measure(None, None, ts, "nope", 2, 0)
