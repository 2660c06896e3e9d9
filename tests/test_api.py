"""The core path on a tiny model: featurize (resumable), score (explicit formula), self-attribution."""
import numpy as np
import pytest
import torch

from diffusion_trak import api
from diffusion_trak.config import FeaturizeArgs, ScoreArgs, TrainArgs
from diffusion_trak.data import load_dataset
from diffusion_trak.errors import InputError
from diffusion_trak.store import StoreError


@pytest.fixture
def tiny_data():
    return load_dataset(name="digits", limit=24)


def test_resume_after_interruption_gives_identical_features(tmp_path, tiny_unet, scheduler, tiny_data):
    args = FeaturizeArgs(num_timesteps=2, proj_dim=32, batch_size=4)
    full = api.featurize([(tiny_unet, scheduler)], tiny_data, args, str(tmp_path / "a"), progress=False).arrays[0].copy()
    # an interrupted run: only some rows done, then the same command again
    api.featurize([(tiny_unet, scheduler)], tiny_data, args, str(tmp_path / "b"), progress=False, rows=[0, 1, 2, 3, 9])
    part = api.FeatureSet.open(str(tmp_path / "b"))
    assert part.store.get("features_00").pending().size == len(tiny_data) - 5
    resumed = api.featurize([(tiny_unet, scheduler)], tiny_data, args, str(tmp_path / "b"), progress=False).arrays[0]
    np.testing.assert_array_equal(full, resumed)


def test_featurize_refuses_changed_settings(tmp_path, tiny_unet, scheduler, tiny_data):
    args = FeaturizeArgs(num_timesteps=2, proj_dim=32, batch_size=8)
    api.featurize([(tiny_unet, scheduler)], tiny_data, args, str(tmp_path / "f"), progress=False)
    with pytest.raises(StoreError, match="proj_dim: 32 -> 16"):
        api.featurize([(tiny_unet, scheduler)], tiny_data, FeaturizeArgs(num_timesteps=2, proj_dim=16), str(tmp_path / "f"),
                      progress=False)
    api.featurize([(tiny_unet, scheduler)], tiny_data, FeaturizeArgs(num_timesteps=2, proj_dim=16), str(tmp_path / "f"),
                  progress=False, overwrite=True)


def test_store_made_with_vmap_names_the_method_to_resume_it(tmp_path, tiny_unet, scheduler, tiny_data):
    """A store made when vmap was the default refuses the new default (fast) and says how to resume it."""
    old = FeaturizeArgs(num_timesteps=2, proj_dim=16, batch_size=8, method="vmap")
    api.featurize([(tiny_unet, scheduler)], tiny_data, old, str(tmp_path / "f"), progress=False, rows=[0])
    with pytest.raises(StoreError, match=r"featurize.method: 'vmap' -> 'fast'.*; or pass --method vmap .* to resume it"):
        api.featurize([(tiny_unet, scheduler)], tiny_data, FeaturizeArgs(num_timesteps=2, proj_dim=16, batch_size=8),
                      str(tmp_path / "f"), progress=False)
    fs = api.featurize([(tiny_unet, scheduler)], tiny_data, old, str(tmp_path / "f"), progress=False)  # resumes
    assert fs.store.settings["featurize"]["method"] == "vmap" and fs.store.settings["projector"] == "torch"
    # other differences keep the plain message
    with pytest.raises(StoreError) as e:
        api.featurize([(tiny_unet, scheduler)], tiny_data, FeaturizeArgs(num_timesteps=3, proj_dim=16, batch_size=8,
                                                                         method="vmap"), str(tmp_path / "f"), progress=False)
    assert "--method" not in str(e.value)


def test_scoring_dense_features_over_the_matrix_limit_names_the_fix(tmp_path, tiny_unet, scheduler, tiny_data, monkeypatch):
    from diffusion_trak.featurize.projectors import CACHE_ENV, ProjectorError

    args = FeaturizeArgs(num_timesteps=2, proj_dim=16, batch_size=8, method="vmap")
    fs = api.featurize([(tiny_unet, scheduler)], tiny_data, args, str(tmp_path / "f"), progress=False)
    monkeypatch.setenv(CACHE_ENV, "0.0001")
    with pytest.raises(ProjectorError, match=f"made with method=vmap .*; raise {CACHE_ENV} to score them, or featurize again"):
        api.score(fs, [(tiny_unet, scheduler)], tiny_data.indices.numpy(), ScoreArgs(num_noises=2),
                  images=tiny_data.images[:2], progress=False)


def test_wrong_image_size_is_a_one_line_error(tmp_path, tiny_unet, scheduler):
    data = load_dataset(name="digits", limit=4, image_size=16)
    with pytest.raises(InputError, match="--image-size 8"):
        api.featurize([(tiny_unet, scheduler)], data, FeaturizeArgs(proj_dim=8), str(tmp_path / "f"), progress=False)


def test_scores_equal_explicit_formula(tmp_path, tiny_unet, scheduler, tiny_data):
    args = FeaturizeArgs(num_timesteps=2, proj_dim=16, batch_size=8, kernel_draws=3)
    unet2 = type(tiny_unet).from_config(tiny_unet.config)
    ckpts = [(tiny_unet, scheduler), (unet2, scheduler)]
    fs = api.featurize(ckpts, tiny_data, args, str(tmp_path / "f"), progress=False)
    images = tiny_data.images[:3]
    sa = ScoreArgs(num_noises=2, ridge=0.1, destination_draws=0)
    sc = api.score(fs, ckpts, tiny_data.indices.numpy(), sa, images=images, image_timesteps=[5, 50], progress=False)
    from diffusion_trak.featurize.featurizer import Featurizer
    from diffusion_trak.targets import target_features

    from diffusion_trak.featurize.featurizer import example_draws

    expected = 0
    for c, ((u, s), phi) in enumerate(zip(ckpts, fs.arrays)):
        f = Featurizer(u, s, args)
        phi = torch.as_tensor(np.asarray(phi), dtype=torch.float64)
        # the default GGN kernel, by hand: per-pair gradients of mean(ε̂ · v) by vmap, projected, outer products summed
        G = torch.zeros(16, 16, dtype=torch.float64)
        for r in range(len(tiny_data)):
            t, nz = example_draws(int(tiny_data.indices[r]), api.kernel_args(args), 1000, tiny_data.image_shape)
            g = f.projector(f.gradients(tiny_data.images[r:r + 1].expand(len(t), -1, -1, -1), t[:, None], nz[:, None],
                                        output="probe")).double()
            G += g.T @ g
        torch.testing.assert_close(torch.from_numpy(fs.kernels[c]), G, rtol=1e-4, atol=1e-6 * float(G.abs().max()))
        lam = 0.1 * torch.trace(G) / G.shape[0]
        inv = torch.linalg.inv(G + lam * torch.eye(G.shape[0], dtype=torch.float64))
        psi = torch.stack([target_features(f, images, t, 2, sa.seed, key=t) for t in (5, 50)]).double()
        expected = expected + psi @ inv @ phi.T / len(ckpts)
    np.testing.assert_allclose(sc.values, expected.numpy(), rtol=1e-4, atol=1e-6)
    # target-independent work is kept for the next call: featurizers, kernel and factorisation
    built = dict(fs.reuse)
    assert len(built) == 2
    again = api.score(fs, ckpts, tiny_data.indices.numpy(), sa, images=images, image_timesteps=[5, 50], progress=False)
    assert all(fs.reuse[key] is obj for key, obj in built.items()) and len(fs.reuse) == 2
    np.testing.assert_array_equal(again.values, sc.values)
    top, _, bottom, _ = sc.top(3)
    assert top.shape == (2, 3, 3) and set(top.reshape(-1)) <= set(tiny_data.indices.tolist())
    assert sc.destination is None  # destination_draws=0 below; ScoreArgs' default scores it


def test_destination_row_equals_explicit_formula(tmp_path, tiny_unet, scheduler, tiny_data):
    """The destination row: the final image's output averaged over D timesteps stratified over the whole
    range, scored with the same estimator and saved beside the per-step rows."""
    from diffusion_trak.featurize.featurizer import Featurizer
    from diffusion_trak.targets import destination_draws

    args = FeaturizeArgs(num_timesteps=2, proj_dim=16, batch_size=8, kernel="features")  # the kernel: test_kernel.py
    fs = api.featurize([(tiny_unet, scheduler)], tiny_data, args, str(tmp_path / "f"), progress=False)
    images = tiny_data.images[:3]
    sa = ScoreArgs(num_noises=2, ridge=0.1, destination_draws=5)
    sc = api.score(fs, [(tiny_unet, scheduler)], tiny_data.indices.numpy(), sa, images=images, image_timesteps=[5],
                   out=str(tmp_path / "s"), progress=False)
    f = Featurizer(tiny_unet, scheduler, args)
    phi = torch.as_tensor(np.asarray(fs.arrays[0]), dtype=torch.float64)
    G = phi.T @ phi
    inv = torch.linalg.inv(G + 0.1 * torch.trace(G) / G.shape[0] * torch.eye(G.shape[0], dtype=torch.float64))
    n_t = scheduler.config.num_train_timesteps
    psi = []
    for b in range(3):
        t, noise = destination_draws(sa.seed, b, 5, n_t, images.shape[1:])
        assert sorted(t.tolist()) == t.tolist() and t[0] < n_t / 5 and t[-1] >= n_t * 4 / 5  # one per fifth
        psi.append(f.features(images[b:b + 1], t[None], noise[None]))
    expected = torch.cat(psi).double() @ inv @ phi.T
    np.testing.assert_allclose(sc.destination, expected.numpy(), rtol=1e-4, atol=1e-6)
    loaded = api.Scores.load(str(tmp_path / "s"))
    np.testing.assert_array_equal(loaded.destination, np.asarray(sc.destination, dtype=np.float32))


def test_self_attribution_above_half(tmp_path):
    """Acceptance: 50 training images scored as targets at a low-noise timestep rank themselves first > 50%."""
    from diffusion_trak.train import train_ddpm

    data = load_dataset(name="digits", limit=300)
    ck = train_ddpm(data, TrainArgs(block_out_channels=(16, 32), epochs=15, num_checkpoints=2), str(tmp_path / "m"),
                    progress=False, device="cpu")
    fs = api.featurize(ck, data, FeaturizeArgs(num_timesteps=10, timestep_strategy="stratified", proj_dim=512,
                                               batch_size=32), str(tmp_path / "f"), progress=False)
    rate, pos = api.self_attribution_rate(fs, ck, data, num=50, timestep=50, args=ScoreArgs(num_noises=20))
    print(f"self-attribution rate: {rate:.2f}")
    assert len(pos) == 50
    assert rate > 0.5


def test_class_conditional_features_use_labels(tmp_path, scheduler):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=10)
    data = load_dataset(name="digits", limit=8)
    args = FeaturizeArgs(num_timesteps=2, proj_dim=16, batch_size=8)
    a = api.featurize([(unet, scheduler)], data, args, str(tmp_path / "a"), progress=False).arrays[0]
    relabelled = type(data)(data.images, (data.labels + 1) % 10, data.indices)
    b = api.featurize([(unet, scheduler)], relabelled, args, str(tmp_path / "b"), progress=False).arrays[0]
    assert not np.allclose(a, b)  # the labels reach the model
