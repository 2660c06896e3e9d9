"""Targets go through the featurizer in one call, with the same values as one step at a time."""
import math
import pytest
import torch

from diffusion_trak.config import FeaturizeArgs
from diffusion_trak.featurize.featurizer import Featurizer
from diffusion_trak.targets import image_target_features, target_features, target_noises, trajectory_target_features
from diffusion_trak.pipelines import Trajectory


def _trajectory(B=2, S=6, recorded=(0, 2, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    R = len(recorded)
    return Trajectory(timesteps=torch.linspace(900, 50, S).long(), step_indices=torch.tensor(recorded),
                      x_t=torch.randn(R, B, 1, 8, 8, generator=g), x0_pred=torch.rand(R, B, 1, 8, 8, generator=g) * 2 - 1,
                      noises=torch.zeros(S, B, 1, 8, 8), initial_noise=torch.zeros(B, 1, 8, 8), final=torch.zeros(B, 1, 8, 8))


def _one_step_at_a_time(f, traj, steps, R, seed, cond=None):
    """The previous implementation: one featurizer call per step, noises keyed by (seed, step, target)."""
    out = []
    for s in steps:
        x0 = traj.x0_pred[traj.step_of(s)]
        B = x0.shape[0]
        ts = torch.full((B, R), int(traj.timesteps[s]), dtype=torch.long)
        ns = torch.stack([target_noises(seed, s, b, R, x0.shape[1:]) for b in range(B)])
        out.append(f.features(x0, ts, ns, cond))
    return torch.stack(out)


class _Counting:
    """A featurizer wrapper that counts calls of ``features``."""

    def __init__(self, f):
        self.f, self.calls, self.num_train_timesteps = f, 0, f.num_train_timesteps

    def features(self, *args, **kwargs):
        self.calls += 1
        return self.f.features(*args, **kwargs)


@pytest.mark.parametrize("method", ["fast", "vmap"])
def test_trajectory_targets_in_one_call_equal_one_step_at_a_time(tiny_unet, scheduler, method):
    args = FeaturizeArgs(num_timesteps=2, proj_dim=64, batch_size=3, method=method, projector="countsketch")
    f = Featurizer(tiny_unet, scheduler, args)
    if f.fast is not None:
        f.fast.max_rows = 7  # several passes, splitting targets' noises: still the same values
    traj = _trajectory()
    counting = _Counting(f)
    got = trajectory_target_features(counting, traj, [5, 0, 2], R=4, seed=3)
    assert counting.calls == 1 and got.shape == (3, 2, 64)
    want = _one_step_at_a_time(f, traj, [5, 0, 2], R=4, seed=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the steps are distinct targets: different rows
    assert (got[0] - got[1]).norm() > 1e-3 * got.norm()
    with pytest.raises(ValueError, match="recorded steps are \\[0, 2, 5\\]"):
        trajectory_target_features(f, traj, [1], R=4, seed=3)


def test_image_targets_and_conditioning(scheduler):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=3)
    f = Featurizer(unet, scheduler, FeaturizeArgs(proj_dim=64))
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = {"class_labels": torch.tensor([2, 0, 1])}
    counting = _Counting(f)
    got = image_target_features(counting, images, [10, 400], R=3, seed=1, cond=cond)
    assert counting.calls == 1 and got.shape == (2, 3, 64)
    want = torch.stack([target_features(f, images, t, 3, 1, key=t, cond=cond) for t in (10, 400)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # each target keeps its own label: scoring target 1 alone with its label gives its row
    ns = target_noises(1, 400, 1, 3, (1, 8, 8)).unsqueeze(0)
    one = f.features(images[1:2], torch.full((1, 3), 400), ns, {"class_labels": cond["class_labels"][1:2]})
    torch.testing.assert_close(got[1, 1:2], one, rtol=1e-5, atol=1e-6)
    other = f.features(images[1:2], torch.full((1, 3), 400), ns, {"class_labels": torch.tensor([2])})
    assert (other - one).norm() > 1e-3 * one.norm()
    with pytest.raises(ValueError, match="outside the scheduler"):
        image_target_features(f, images, [1000], R=2, seed=0)


@pytest.mark.parametrize("method", ["fast", "vmap"])
def test_all_target_features_are_the_previous_computations_in_one_featurizer_call(tiny_unet, scheduler, method):
    """The one computation (:func:`all_target_features`) makes ONE featurizer call for a trajectory's steps and
    its destination together (each step target as R/g rows of g = gcd(R, D) draws, each destination as D/g rows),
    and gives, up to float rounding of the batched passes, what ``api.score`` computed before it (trajectory steps
    in one call, the destination in another); without a destination, bit for bit; and what the evaluations
    computed by stacking one timestep at a time."""
    from diffusion_trak.targets import TargetSet, all_target_features, destination_draws, features_at_steps

    args = FeaturizeArgs(num_timesteps=2, proj_dim=64, batch_size=3, method=method, projector="countsketch")
    f = Featurizer(tiny_unet, scheduler, args)
    traj = _trajectory()
    traj.final = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    seed = 4
    x0 = torch.stack([traj.x0_pred[traj.step_of(s)] for s in (5, 0, 2)])
    for R, D in ((3, 5), (2, 6), (4, 6)):  # g = 1, 2 (= R), 2 (< R)
        # before: api.score's trajectory branch and its destination row, two calls
        old_traj = features_at_steps(f, x0, [int(traj.timesteps[s]) for s in (5, 0, 2)], [5, 0, 2], R, seed)
        draws = [destination_draws(seed, b, D, 1000, (1, 8, 8)) for b in range(2)]
        old_dest = f.features(traj.final.float(), torch.stack([d[0] for d in draws]), torch.stack([d[1] for d in draws]))
        calls, real = [], f.features
        f.features = lambda *a, **k: calls.append(a[1].shape) or real(*a, **k)
        try:
            got = all_target_features(f, TargetSet.from_trajectory(traj, [5, 0, 2]), R, seed, destination_draws=D)
        finally:
            del f.features
        g = math.gcd(R, D)
        assert calls == [torch.Size([3 * 2 * (R // g) + 2 * (D // g), g])]
        torch.testing.assert_close(got.steps, old_traj, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.destination, old_dest, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got.destination, torch.zeros_like(got.destination))
    R = 3
    old_img = features_at_steps(f, images.unsqueeze(0).expand(2, *images.shape), [10, 400], [10, 400], R, seed)
    got_img = all_target_features(f, TargetSet.from_images(images, [0, 1], [10, 400]), R, seed)
    assert torch.equal(got_img.steps, old_img) and got_img.destination is None
    # the evaluations' former copies stacked one timestep at a time: the same up to float rounding
    stacked = torch.stack([target_features(f, images, t, R, seed, key=t) for t in (10, 400)])
    torch.testing.assert_close(got_img.steps, stacked, rtol=1e-5, atol=1e-5)


def test_target_cache_computes_once_per_checkpoint_and_targets(tmp_path, tiny_unet, scheduler, monkeypatch):
    """With a cache attached, scoring twice, and reading the features for baselines, computes the target
    features once per (checkpoint, targets); a cache folder gives them back bit for bit in a new process
    (a new FeatureSet), and other targets or noises are new entries."""
    import numpy as np

    from diffusion_trak import api, target_cache
    from diffusion_trak.config import ScoreArgs
    from diffusion_trak.data import load_dataset
    from diffusion_trak.targets import TargetSet

    data = load_dataset(name="digits", limit=12)
    unet2 = type(tiny_unet).from_config(tiny_unet.config)
    ckpts = [(tiny_unet, scheduler), (unet2, scheduler)]
    fs = api.featurize(ckpts, data, FeaturizeArgs(num_timesteps=2, proj_dim=16, batch_size=4), str(tmp_path / "f"),
                       progress=False)
    traj = _trajectory()
    traj.final = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    sa = ScoreArgs(num_noises=2, destination_draws=3)
    plain = api.score(fs, ckpts, data.indices.numpy(), sa, trajectory=traj, progress=False)  # no cache attached

    calls = []
    real = target_cache.all_target_features
    monkeypatch.setattr(target_cache, "all_target_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    folder = str(tmp_path / "targets")
    target_cache.attach(fs, folder)
    first = api.score(fs, ckpts, data.indices.numpy(), sa, trajectory=traj, progress=False)
    again = api.score(fs, ckpts, data.indices.numpy(), sa, trajectory=traj, progress=False)
    assert len(calls) == 2  # one per checkpoint
    for sc in (first, again):
        np.testing.assert_array_equal(sc.values, plain.values)
        np.testing.assert_array_equal(sc.destination, plain.destination)
    ts = TargetSet.from_trajectory(traj, traj.step_indices.tolist())
    fresh = api.FeatureSet.open(str(tmp_path / "f"))
    target_cache.attach(fresh, folder)
    steps, dest = target_cache.target_features_of(fresh, ckpts, ts, 2, sa.seed, "loss", None, 3)
    assert len(calls) == 2 and "featurizers" not in str(list(fresh.reuse))  # read back, no featurizer built
    direct, _ = target_cache.target_features_of(api.FeatureSet.open(str(tmp_path / "f")), ckpts, ts, 2, sa.seed,
                                                "loss", None, 3)
    assert all(np.array_equal(a, b) for a, b in zip(steps, direct)) and len(calls) == 4
    assert len(target_cache.TargetCache(folder).keys()) == 2
    target_cache.target_features_of(fresh, ckpts, ts, 3, sa.seed, "loss", None, 3)  # other R: new entries
    assert len(calls) == 6 and len(target_cache.TargetCache(folder).keys()) == 4
    assert {k["checkpoint"] for k in target_cache.TargetCache(folder).keys()} == set(fs.store.settings["checkpoints"])
