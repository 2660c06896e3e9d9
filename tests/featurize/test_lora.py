"""LoRA fine-tunes: gradients over the peft adapter's parameters only (``FeaturizeArgs(params="lora")``).

A tiny text-conditional ``UNet2DConditionModel`` gets a peft ``LoraConfig`` adapter the way diffusers'
LoRA training script adds one (``unet.requires_grad_(False); unet.add_adapter(config)``). The features
must cover exactly the adapter's parameters, and the TRAK scores must equal an explicit computation:
per-example gradients of the DDPM loss by a python loop over examples, projected with the featurizer's
own projector, then ``S = Ψ (ΦᵀΦ + λI)⁻¹ Φᵀ`` with ``λ = ridge · tr(ΦᵀΦ)/k``.
"""
import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")

from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402

from diffusion_trak import api  # noqa: E402
from diffusion_trak.config import FeaturizeArgs, ScoreArgs  # noqa: E402
from diffusion_trak.data import ImageDataset  # noqa: E402
from diffusion_trak.errors import InputError  # noqa: E402
from diffusion_trak.featurize.fast import FastPathError  # noqa: E402
from diffusion_trak.featurize.featurizer import Featurizer, example_draws  # noqa: E402
from diffusion_trak.store import StoreError  # noqa: E402
from diffusion_trak.targets import target_noises  # noqa: E402

N_T = 100  # scheduler training timesteps
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def tiny_text_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)


def with_lora(unet, **config):
    """The adapter as diffusers' train_text_to_image_lora.py adds it, with random (nonzero) LoRA weights."""
    unet.requires_grad_(False)
    unet.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=list(TARGETS), **config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return unet


def adapter_names(unet):
    """The adapter's parameters, by peft's naming (``<module>.lora_A.<adapter>.weight``), independently of the code."""
    return [n for n, _ in unet.named_parameters() if ".lora_A." in n or ".lora_B." in n]


@pytest.fixture(scope="module")
def lora_unet():
    return with_lora(tiny_text_unet())


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(num_train_timesteps=N_T)


@pytest.mark.parametrize("method", ["vmap", "fast"])
def test_features_cover_exactly_the_adapter(lora_unet, scheduler, method):
    before = {n: p.requires_grad for n, p in lora_unet.named_parameters()}
    f = Featurizer(lora_unet, scheduler, FeaturizeArgs(params="lora", method=method, proj_dim=8, num_timesteps=2,
                                                       projector="countsketch" if method == "vmap" else "auto"))
    names = adapter_names(lora_unet)
    assert len(names) == 2 * 4 * 8  # (A, B) × (q, k, v, out) × 8 attention modules (self + cross in 4 blocks)
    assert f.param_names == names
    assert f.num_params == sum(p.numel() for n, p in lora_unet.named_parameters() if n in names)
    assert f.projector.p == f.num_params  # the projection takes exactly these coordinates
    if method == "fast":
        assert f.fast.p == f.num_params
    # the caller's model is untouched (the featurizer selects on its private copy, or on the shared model during
    # its own calls only)
    assert {n: p.requires_grad for n, p in lora_unet.named_parameters()} == before


def test_base_parameters_are_not_included(lora_unet, scheduler):
    base = [n for n, _ in lora_unet.named_parameters() if n not in adapter_names(lora_unet)]
    lora = Featurizer(lora_unet, scheduler, FeaturizeArgs(params="lora", proj_dim=8, num_timesteps=2))
    every = Featurizer(lora_unet, scheduler, FeaturizeArgs(params="all", proj_dim=8, num_timesteps=2))
    assert not set(lora.param_names) & set(base)
    assert set(every.param_names) == set(base) | set(lora.param_names)
    assert every.num_params == sum(p.numel() for p in lora_unet.parameters()) > lora.num_params
    # only the adapter's parameters get gradients: the fast path's probe and the vmap path both differentiate
    # the parameters with requires_grad, and the model has it on the adapter only while the featurizer uses it
    with every._in_use(), lora._in_use():
        assert [n for n, p in lora.model.named_parameters() if p.requires_grad] == lora.param_names
    # "trainable" follows requires_grad: add_adapter froze the base, so it is the adapter too
    trainable = Featurizer(lora_unet, scheduler, FeaturizeArgs(params="trainable", proj_dim=8, num_timesteps=2))
    assert trainable.param_names == lora.param_names
    x0, ts, ns = torch.randn(2, 1, 8, 8), torch.randint(0, N_T, (2, 2)), torch.randn(2, 2, 1, 8, 8)
    cond = {"encoder_hidden_states": torch.randn(2, 3, 8)}
    assert lora.gradients(x0, ts, ns, cond).shape == (2, lora.num_params)
    assert every.gradients(x0, ts, ns, cond).shape == (2, every.num_params)


def test_lora_without_adapter_refuses(scheduler):
    with pytest.raises(InputError, match="no active peft LoRA adapter.*--params all"):
        Featurizer(tiny_text_unet(), scheduler, FeaturizeArgs(params="lora", proj_dim=8))
    with pytest.raises(InputError, match="params must be one of auto, all, lora, trainable"):
        FeaturizeArgs(params="adapter")


def test_fast_path_refuses_what_it_cannot_sketch(scheduler):
    # DoRA keeps a magnitude vector outside Linear/Conv layers: the fast path must refuse, never drop it
    unet = with_lora(tiny_text_unet(), use_dora=True)
    with pytest.raises(FastPathError, match=r"cannot cover .*lora_magnitude_vector.*--method vmap"):
        Featurizer(unet, scheduler, FeaturizeArgs(params="lora", method="fast", proj_dim=8))


def explicit_gradient(unet, names, scheduler, x0, ts, noises, emb, probe=None):
    """∇ over ``names`` of (1/T) Σ_j mean((ε̂(x_t_j, t_j, emb) − ε_j)²), one example, written out by hand; with
    ``probe`` (T, C, H, W) the gradient of (1/T) Σ_j mean(ε̂_j · v_j) instead (the GGN kernel's output)."""
    params = dict(unet.named_parameters())
    abar = scheduler.alphas_cumprod[ts].reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noises
    pred = unet(x_t, ts, encoder_hidden_states=emb.expand(len(ts), *emb.shape)).sample
    loss = ((pred - noises) ** 2).mean() if probe is None else (pred * probe).mean()
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return torch.cat([g.reshape(-1) for g in grads])


class _Embeddings:
    """A conditioning that hands each training row its own (test-made) text embedding, no text model."""

    def __init__(self, emb):
        self.emb = emb

    def encode(self, dataset, *a, **k):
        return dataset

    def training(self, unet, dataset, num_timesteps, seed):
        return (lambda rows: {"encoder_hidden_states": self.emb[torch.as_tensor(rows)]}), False

    def settings(self, unet, dataset):
        return {"conditioning": {"kind": "text", "embeddings": "test"}}


@pytest.mark.parametrize("method", ["vmap", "fast"])
def test_scores_equal_explicit_computation(tmp_path, lora_unet, scheduler, method):
    n, k, T, R, ridge = 6, 16, 3, 2, 0.5
    g = torch.Generator().manual_seed(2)
    images = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    data = ImageDataset(images, indices=torch.arange(10, 10 + n))  # stable indices other than positions
    emb = torch.randn(n, 4, 8, generator=g)  # one caption embedding per example
    targets, t_emb = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1, torch.randn(2, 4, 8, generator=g)
    image_timesteps = [5, 60]
    args = FeaturizeArgs(params="lora", method=method, proj_dim=k, num_timesteps=T, batch_size=4, kernel_draws=3,
                         projector="torch" if method == "vmap" else "auto")
    ckpts = [(lora_unet, scheduler)]
    fs = api.featurize(ckpts, data, args, out=str(tmp_path / "f"), progress=False,
                       conditioning=_Embeddings(emb))
    assert fs.store.settings["featurize"]["params"] == "lora"
    sargs = ScoreArgs(num_noises=R, ridge=ridge, destination_draws=0)
    sc = api.score(fs, ckpts, data.indices.numpy(), sargs, images=targets, image_timesteps=image_timesteps,
                   cond={"encoder_hidden_states": t_emb}, progress=False)

    names = adapter_names(lora_unet)
    P = fs.featurizers(ckpts, "cpu")[0].projector  # the same projector (seeded), applied to explicit gradients
    G = []
    for r in range(n):
        t, noise = example_draws(int(data.indices[r]), args, N_T, (1, 8, 8))
        G.append(explicit_gradient(lora_unet, names, scheduler, images[r:r + 1], t, noise, emb[r]))
    phi = P(torch.stack(G)).double().numpy()
    np.testing.assert_allclose(np.asarray(fs.arrays[0]), phi, rtol=1e-4, atol=1e-6 * np.abs(phi).max())
    psi = []
    for t in image_timesteps:
        rows = []
        for b in range(2):
            noise = target_noises(sargs.seed, t, b, R, (1, 8, 8))
            rows.append(explicit_gradient(lora_unet, names, scheduler, targets[b:b + 1], torch.full((R,), t), noise, t_emb[b]))
        psi.append(P(torch.stack(rows)).double().numpy())
    # the GGN kernel: Σ over examples and their kernel draws of the outer products of single-pair probe gradients
    K = np.zeros((k, k))
    for r in range(n):
        t, noise = example_draws(int(data.indices[r]), api.kernel_args(args), N_T, (1, 8, 8))
        assert noise.shape == (3, 2, 8, 8)  # [ε, v]
        for j in range(len(t)):
            gj = P(explicit_gradient(lora_unet, names, scheduler, images[r:r + 1], t[j:j + 1], noise[j:j + 1, :1], emb[r],
                                     probe=noise[j:j + 1, 1:])[None]).double().numpy()[0]
            K += np.outer(gj, gj)
    np.testing.assert_allclose(fs.kernels[0], K, rtol=1e-3, atol=1e-5 * np.abs(K).max())
    lam = ridge * np.trace(K) / k
    want = np.stack([p @ np.linalg.solve(K + lam * np.eye(k), phi.T) for p in psi])  # (S, B, n)
    assert sc.values.shape == want.shape == (2, 2, n)
    np.testing.assert_allclose(sc.values, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())

    # the selection is part of the store's settings: another selection over the same store refuses
    with pytest.raises(StoreError, match="overwrite"):
        api.featurize(ckpts, data, FeaturizeArgs(**{**args.__dict__, "params": "all"}), out=str(tmp_path / "f"),
                      progress=False, conditioning=_Embeddings(emb))


def test_cli_params_flag():
    from diffusion_trak import cli

    parser = cli.build_parser()
    assert cli._featurize_args(parser.parse_args(["featurize", "--params", "lora"])).params == "lora"
    # the default, with or without --lora: "auto" (resolved by the Attributor against the loaded model)
    assert cli._featurize_args(parser.parse_args(["featurize"])).params == "auto"
    assert cli._featurize_args(parser.parse_args(["featurize", "--lora", "x", "-T", "2"])).params == "auto"
    assert cli._featurize_args(parser.parse_args(["featurize", "--lora", "x", "--params", "all"])).params == "all"
    with pytest.raises(SystemExit):
        parser.parse_args(["featurize", "--params", "adapter"])
