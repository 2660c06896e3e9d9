"""EK-FAC influence (kronfluence) on the harness: rows built from TRAK's own draws, scores with TRAK's sign and
shape, self-influence first."""
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("kronfluence")

from diffusers import DDPMScheduler  # noqa: E402

from diffusion_trak.config import FeaturizeArgs, ScoreArgs  # noqa: E402
from diffusion_trak.data import ImageDataset  # noqa: E402
from diffusion_trak.evaluations import ekfac  # noqa: E402
from diffusion_trak.featurize.featurizer import example_draws  # noqa: E402
from diffusion_trak.targets import TargetSet, target_noises  # noqa: E402

sys.path.insert(0, __file__.rsplit("/evaluations/", 1)[0])
from tiny_models import tiny_pixel_unet  # noqa: E402


def _data(n=10):
    g = torch.Generator().manual_seed(0)
    return ImageDataset(torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, None, torch.arange(100, 100 + n), None, "rand")


def test_rows_are_the_featurizers_and_targets_draws():
    data, fargs = _data(3), FeaturizeArgs(num_timesteps=4, seed=3)
    rows = ekfac.train_rows(data, fargs, 1000)
    assert len(rows) == 12
    t, noise = example_draws(101, fargs, 1000, (1, 8, 8))
    torch.testing.assert_close(rows.t[4:8], t.long())
    torch.testing.assert_close(rows.noise[4:8], noise)
    torch.testing.assert_close(rows.x0[4:8], data.images[1:2].expand(4, 1, 8, 8))
    ts = TargetSet.from_images(data.images[:2], [0, 1], [10, 500])
    q = ekfac.step_rows(ts, R=3, seed=1, num_train_timesteps=1000)
    assert len(q) == 2 * 2 * 3
    # step 1, target 0, noise 2: row (1·2 + 0)·3 + 2, with TRAK's target noise of key 500 (held-out: the timestep)
    torch.testing.assert_close(q.noise[8], target_noises(1, 500, 0, 3, (1, 8, 8))[2])
    assert int(q.t[8]) == 500 and torch.equal(q.x0[8], data.images[0])
    d = ekfac.destination_rows(data.images[:2], D=5, seed=1, num_train_timesteps=1000)
    assert len(d) == 10 and torch.equal(d.x0[7], data.images[1])


def test_scores_have_trak_shape_and_sign_and_rank_an_example_first_on_itself(tmp_path):
    data, fargs = _data(10), FeaturizeArgs(num_timesteps=4, seed=0)
    unet, sched = tiny_pixel_unet(), DDPMScheduler(num_train_timesteps=1000)
    train = ekfac.train_rows(data, fargs, 1000)
    own = ekfac.train_rows(data.subset([2, 7]), fargs, 1000)  # examples 2 and 7, exactly as trained on
    ts = TargetSet.from_images(data.images[:3], [0, 1], [10, 300])
    s = ekfac.ekfac_scores(unet, sched, train, 4, {"own": own, "steps": ekfac.step_rows(ts, 2, 1, 1000)},
                           {"own": 4, "steps": 2}, str(tmp_path / "k"))
    assert s["own"].shape == (2, 10) and s["steps"].shape == (2 * 3, 10)
    assert np.isfinite(s["steps"]).all() and np.abs(s["steps"]).sum() > 0
    # gᵀ(G + λI)⁻¹g > 0: an example's influence on its own loss is positive (a proponent, TRAK's sign) and the largest
    assert s["own"].argmax(1).tolist() == [2, 7]
    assert s["own"][0, 2] > 0 and s["own"][1, 7] > 0
    again = ekfac.ekfac_scores(unet, sched, train, 4, {"own": own}, {"own": 4}, str(tmp_path / "k"))
    np.testing.assert_allclose(again["own"], s["own"], rtol=1e-5)  # factors read back from the folder


def test_harness_scores_shapes(tmp_path):
    data, fargs = _data(6), FeaturizeArgs(num_timesteps=2, seed=0)
    unet, sched = tiny_pixel_unet(), DDPMScheduler(num_train_timesteps=1000)
    ts = {"heldout": TargetSet.from_images(data.images[:2], [0, 1, 2], [10, 300, 900])}
    res = ekfac.harness_scores(unet, sched, data, fargs, ScoreArgs(num_noises=2, destination_draws=3), ts,
                               {"heldout": data.images[:2]}, str(tmp_path))
    assert res["steps"]["heldout"].shape == (3, 2, 6) and res["destination"]["heldout"].shape == (1, 2, 6)


def test_missing_kronfluence_is_one_line(monkeypatch):
    import builtins

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("kronfluence") else real(name, *a, **k))
    with pytest.raises(ekfac.EKFACMissing, match=r'pip install "diffusion-trak\[ekfac\]"') as e:
        ekfac._kronfluence()
    assert "\n" not in str(e.value)
