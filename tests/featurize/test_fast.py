
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion_trak.config import FeaturizeArgs
from diffusion_trak.featurize.fast import FastGradientSketch, FastPathError
from diffusion_trak.featurize.featurizer import Featurizer
from diffusion_trak.featurize.gradients import per_sample_gradients, use_vmap_friendly_attention
from diffusion_trak.featurize.projectors import ProjectorError, TorchProjector
from diffusion_trak.score import trak_scores


def _draws(B, T, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, *shape, generator=g) * 2 - 1, torch.randint(0, 1000, (B, T), generator=g),
            torch.randn(B, T, *shape, generator=g))


def _perturb(model, scale=0.05):
    """Random init leaves norm weights at 1 and biases at 0; move them so every gradient formula is exercised."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_fast_is_countsketch_of_the_reference_gradient(tiny_unet, scheduler):
    model = _perturb(tiny_unet)
    x0, ts, ns = _draws(4, 3, (1, 8, 8))
    fast = FastGradientSketch(model, scheduler, k=128, seed=3)
    got = fast.features(x0, ts, ns)
    use_vmap_friendly_attention(model)
    want = fast.projector(per_sample_gradients(model, scheduler, x0, ts, ns))
    assert got.shape == (4, 128)
    assert _rel(got, want) < 1e-5
    # parameters are left as they were: trainable, no .grad
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_fast_class_labels_and_other_outputs(scheduler):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = _perturb(UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 attention_head_dim=None, num_class_embeds=3))
    x0, ts, ns = _draws(3, 2, (1, 8, 8), seed=1)
    cond = {"class_labels": torch.tensor([2, 0, 2])}
    fast = FastGradientSketch(model, scheduler, k=64, seed=0, nnz=2)
    use_vmap_friendly_attention(model)
    for output in ("loss", "sqnorm"):
        got = fast.features(x0, ts, ns, output, cond)
        want = fast.projector(per_sample_gradients(model, scheduler, x0, ts, ns, output, cond))
        assert _rel(got, want) < 1e-5


def test_fast_text_unet_with_conditioning_per_timestep(scheduler):
    """Cross-attention, LayerNorm, GEGLU: a UNet2DConditionModel with one caption embedding per timestep."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = _perturb(UNet2DConditionModel(
        sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4))
    assert any(isinstance(m, nn.LayerNorm) for m in model.modules())
    x0, ts, ns = _draws(2, 2, (2, 8, 8), seed=2)
    cond = {"encoder_hidden_states": torch.randn(2, 2, 5, 12, generator=torch.Generator().manual_seed(0))}
    fast = FastGradientSketch(model, scheduler, k=64, seed=1)
    got = fast.features(x0, ts, ns, "loss", cond, cond_per_timestep=True)
    use_vmap_friendly_attention(model)
    want = fast.projector(per_sample_gradients(model, scheduler, x0, ts, ns, "loss", cond, cond_per_timestep=True))
    assert _rel(got, want) < 1e-5


def test_fast_is_the_default_and_dense_projectors_keep_vmap():
    """``method`` defaults to fast; naming a dense projector selects the paper's vmap recipe; the resolved
    method is what the settings record."""
    from diffusion_trak.config import asdict

    assert FeaturizeArgs().method == "fast" and asdict(FeaturizeArgs())["method"] == "fast"
    assert FeaturizeArgs(projector="countsketch").method == "fast"
    assert FeaturizeArgs(projector="torch").method == "vmap"
    assert FeaturizeArgs(projector="fast_jl").method == "vmap"
    assert FeaturizeArgs(method="vmap").method == "vmap" and FeaturizeArgs(method="vmap").projector == "auto"
    assert FeaturizeArgs(**asdict(FeaturizeArgs(method="vmap"))).method == "vmap"  # old stores reload as they were


@pytest.mark.parametrize("max_rows", [1, 3, 7])
def test_chunked_passes_add_up_to_the_whole_batch(tiny_unet, scheduler, max_rows):
    """Passes of whole examples (max_rows ≥ T) or of chunks of one example's timesteps (max_rows < T)
    give the features of one pass over all B × T rows, with conditioning per example or per timestep."""
    model = _perturb(tiny_unet)
    x0, ts, ns = _draws(3, 5, (1, 8, 8), seed=9)
    whole = FastGradientSketch(model, scheduler, k=64, seed=2, max_rows=15)
    chunked = FastGradientSketch(model, scheduler, k=64, seed=2, max_rows=max_rows)
    assert _rel(chunked.features(x0, ts, ns), whole.features(x0, ts, ns)) < 1e-5
    with pytest.raises(ValueError, match="max_rows must be positive"):
        FastGradientSketch(model, scheduler, k=8, max_rows=-1)


def test_chunked_passes_with_conditioning(scheduler):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = _perturb(UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=3))
    x0, ts, ns = _draws(3, 4, (1, 8, 8), seed=3)
    per_example = {"class_labels": torch.tensor([2, 0, 1])}
    per_step = {"class_labels": torch.tensor([[2, 0, 1, 1], [0, 0, 2, 1], [1, 2, 2, 0]])}
    whole = FastGradientSketch(model, scheduler, k=64, seed=2, max_rows=12)
    chunked = FastGradientSketch(model, scheduler, k=64, seed=2, max_rows=3)
    assert _rel(chunked.features(x0, ts, ns, "loss", per_example), whole.features(x0, ts, ns, "loss", per_example)) < 1e-5
    got = chunked.features(x0, ts, ns, "loss", per_step, cond_per_timestep=True)
    assert _rel(got, whole.features(x0, ts, ns, "loss", per_step, cond_per_timestep=True)) < 1e-5
    assert _rel(got, whole.features(x0, ts, ns, "loss", per_example)) > 1e-3  # the per-timestep labels mattered


def test_featurizer_fast_equals_vmap_with_countsketch(tiny_unet, scheduler):
    model = _perturb(tiny_unet)
    x0, ts, ns = _draws(5, 2, (1, 8, 8), seed=4)
    fast = Featurizer(model, scheduler, FeaturizeArgs(num_timesteps=2, proj_dim=32, method="fast", batch_size=2))
    ref = Featurizer(model, scheduler, FeaturizeArgs(num_timesteps=2, proj_dim=32, projector="countsketch", batch_size=3,
                                                     method="vmap"))
    assert ref.fast is None and fast.fast is not None
    assert fast.projector.name == ref.projector.name == "countsketch"
    assert _rel(fast.features(x0, ts, ns), ref.features(x0, ts, ns)) < 1e-5
    with pytest.raises(ProjectorError, match="projector auto or countsketch"):
        Featurizer(model, scheduler, FeaturizeArgs(method="fast", projector="torch"))
    with pytest.raises(ValueError, match="method must be one of"):
        FeaturizeArgs(method="fastest")


def test_projected_inner_products_within_the_stated_bound(tiny_unet, scheduler):
    """|<Sg_i, Sg_j> − <g_i, g_j>| ≤ 4·sqrt((|g_i|²|g_j|² + <g_i,g_j>²)/k) for all but ≤ 1/16 of the pairs
    (Chebyshev with the CountSketch variance), and the error is of the size the bound predicts."""
    model = _perturb(tiny_unet)
    n, k = 12, 1024
    x0, ts, ns = _draws(n, 2, (1, 8, 8), seed=5)
    fast = FastGradientSketch(model, scheduler, k=k, seed=0)
    f = fast.features(x0, ts, ns).double()
    use_vmap_friendly_attention(model)
    g = per_sample_gradients(model, scheduler, x0, ts, ns).double()
    exact, got = g @ g.T, f @ f.T
    sq = torch.diagonal(exact)
    sd = ((sq[:, None] * sq[None, :] + exact ** 2) / k).sqrt()
    err = (got - exact).abs()
    iu = torch.triu_indices(n, n)
    assert (err > 4 * sd)[iu[0], iu[1]].float().mean() <= 1 / 16
    # not vacuous: the typical error is a sizeable fraction of the bound's standard deviation
    assert 0.1 < float((err / sd)[iu[0], iu[1]].mean()) < 2.0


def test_top10_proponents_identical_to_reference(tiny_unet, scheduler):
    """Toy case with a known answer: 40 training rows, 10 of them near-copies of the target image with the
    target's (t, noise) draws, 30 unrelated. Exact-gradient scores, the reference path (vmap + dense
    Rademacher) and the fast path all put exactly the 10 near-copies on top."""
    model = _perturb(tiny_unet)
    n, k = 40, 2048
    g = torch.Generator().manual_seed(0)
    x0, ts, ns = _draws(n, 2, (1, 8, 8), seed=6)
    xq, tq, nq = _draws(1, 2, (1, 8, 8), seed=7)
    near = torch.arange(3, 40, 4)
    x0[near] = xq + 0.05 * torch.randn(10, 1, 8, 8, generator=g)
    ts[near], ns[near] = tq, nq
    fast = FastGradientSketch(model, scheduler, k=k, seed=0)
    phi_f, psi_f = fast.features(x0, ts, ns), fast.features(xq, tq, nq)
    use_vmap_friendly_attention(model)
    G, Q = per_sample_gradients(model, scheduler, x0, ts, ns).double(), per_sample_gradients(model, scheduler, xq, tq, nq).double()
    P = TorchProjector(G.shape[1], k, 0)
    ridge = 0.1
    K = G @ G.T
    s_exact = torch.linalg.solve(K + ridge * torch.trace(K) / k * torch.eye(n), G @ Q.T).T.numpy()  # dual form
    s_fast = trak_scores([phi_f.numpy()], [psi_f.numpy()], ridge=ridge)
    s_ref = trak_scores([P(G.float()).numpy()], [P(Q.float()).numpy()], ridge=ridge)
    top = lambda s: set(np.argsort(-s[0])[:10].tolist())
    assert top(s_exact) == set(near.tolist())
    assert top(s_fast) == top(s_ref) == top(s_exact)
    # and the fast scores track the exact ones closely over all rows
    assert np.corrcoef(s_fast[0], s_exact[0])[0, 1] > 0.95


def test_bf16_close_and_tf32_needs_cuda(tiny_unet, scheduler):
    model = _perturb(tiny_unet)
    x0, ts, ns = _draws(3, 2, (1, 8, 8), seed=8)
    fp32 = FastGradientSketch(model, scheduler, k=256, seed=0).features(x0, ts, ns)
    bf16 = FastGradientSketch(model, scheduler, k=256, seed=0, precision="bf16").features(x0, ts, ns)
    assert _rel(bf16, fp32) < 0.1
    if not torch.cuda.is_available():
        with pytest.raises(FastPathError, match="tf32 needs a CUDA device"):
            FastGradientSketch(model, scheduler, k=8, precision="tf32")


class _Toy(nn.Module):
    """A minimal 'UNet': conv → (optionally) a free parameter or a weight used outside its module's forward."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 1, 1)
        if mode == "free":
            self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x, t):
        h = self.conv(x)
        if self.mode == "free":
            h = h * self.scale
        if self.mode == "functional":  # bypasses self.head's forward: hooks never see it
            return (F.conv2d(h, self.head.weight, self.head.bias),)
        return (self.head(h),)


def test_uncovered_parameters_are_refused_at_construction(scheduler):
    with pytest.raises(FastPathError, match="cannot cover 1 trainable parameters \\(scale\\)"):
        FastGradientSketch(_Toy("free"), scheduler, k=8)
    FastGradientSketch(_Toy("plain"), scheduler, k=8)  # all covered


def test_self_check_catches_weights_used_outside_forward(scheduler):
    x0, ts, ns = _draws(2, 2, (1, 4, 4))
    ok = FastGradientSketch(_Toy("plain"), scheduler, k=16)
    ok.features(x0, ts, ns)
    bad = FastGradientSketch(_Toy("functional"), scheduler, k=16)
    with pytest.raises(FastPathError, match="self-check failed"):
        bad.features(x0, ts, ns)


def test_nan_weights_are_a_one_line_error(tiny_unet, scheduler):
    from diffusion_trak.errors import NonFiniteError

    model = _perturb(tiny_unet)
    with torch.no_grad():
        model.conv_in.weight[0, 0, 0, 0] = float("nan")
    x0, ts, ns = _draws(2, 2, (1, 8, 8))
    with pytest.raises(NonFiniteError, match="NaN"):
        FastGradientSketch(model, scheduler, k=8).features(x0, ts, ns)
    assert all(p.requires_grad for p in model.parameters())  # restored after the error


def test_cli_featurize_defaults_to_fast_and_keeps_vmap_by_name():
    from diffusion_trak.cli import _featurize_args, build_parser

    parse = lambda *a: _featurize_args(build_parser().parse_args(["featurize", *a]))
    assert parse().method == "fast" and parse().projector == "auto"
    assert parse("--method", "vmap").method == "vmap"
    assert parse("--projector", "torch").method == "vmap"  # the dense recipe by naming its projector
    assert parse("--projector", "countsketch").method == "fast"


def test_rows_per_pass_follow_the_activation_budget(tiny_unet, scheduler, monkeypatch):
    """By default the rows per pass are the activation budget over the measured bytes of one row; a budget of a
    few rows splits the batch into several passes and gives the same features."""
    from diffusion_trak.featurize import fast as fast_mod

    model = _perturb(tiny_unet)
    x0, ts, ns = _draws(3, 4, (1, 8, 8), seed=11)
    whole = FastGradientSketch(model, scheduler, k=64, seed=2)
    want = whole.features(x0, ts, ns)
    assert whole.row_bytes > 1000  # measured on the first call: activations of one 8×8 row, weights excluded
    passes = []
    small = FastGradientSketch(model, scheduler, k=64, seed=2)
    monkeypatch.setattr(fast_mod, "ACTIVATION_BUDGET", int(2.5 * whole.row_bytes))  # 2 rows per pass
    original = small._sketch
    small._sketch = lambda *a, **kw: passes.append(a[1].numel()) or original(*a, **kw)
    got = small.features(x0, ts, ns)
    assert _rel(got, want) < 1e-5
    assert passes[0] == 1 and max(passes[1:]) <= 2 and len(passes) == 1 + 6  # probe row, then 6 passes of 2 rows


def test_grouped_and_unfold_conv_kernels_agree(scheduler, monkeypatch):
    """Per-example Conv2d weight gradients by either kernel (one grouped call, or unfolded patches and a batched
    matmul in chunks), including a strided grouped convolution of the model itself, at T = 2 and at T = 1 (the GGN
    kernel's single-draw rows), equal the reference gradient."""
    from diffusion_trak.featurize import fast as fast_mod

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1, groups=2, stride=2)
            self.c = nn.Conv2d(4, 1, 1)

        def forward(self, x, t):
            return (F.interpolate(self.c(torch.tanh(self.b(torch.tanh(self.a(x))))), scale_factor=2),)

    torch.manual_seed(0)
    model = Grouped()
    for T in (2, 1):
        x0, ts, ns = _draws(3, T, (1, 8, 8), seed=12)
        want = FastGradientSketch(model, scheduler, k=64, seed=1).projector(per_sample_gradients(model, scheduler, x0, ts, ns))
        for kernel in ("grouped", "unfold"):
            choices = []
            monkeypatch.setattr(fast_mod, "conv_kernel", lambda *a: choices.append(kernel) or kernel)
            # a patch budget of one example's patches: the unfold kernel goes through the examples in chunks
            monkeypatch.setattr(fast_mod, "UNFOLD_BUDGET_SHARE", 1e-9)
            got = FastGradientSketch(model, scheduler, k=64, seed=1).features(x0, ts, ns)
            assert _rel(got, want) < 1e-5, (T, kernel)
            assert choices, kernel  # the kernel under test was used


def test_conv_kernel_rule():
    """The rule is a function of shapes and device type: unfold only for single rows with a large weight on small
    maps on CPU; on CUDA, grouped for few examples per pass and unfold for many."""
    from diffusion_trak.featurize.fast import conv_kernel

    big, small = nn.Conv2d(256, 256, 3), nn.Conv2d(16, 16, 3)
    assert conv_kernel(big, 64, 16, 1, "cpu") == "unfold" and conv_kernel(big, 64, 16, 2, "cpu") == "grouped"
    assert conv_kernel(big, 1024, 16, 1, "cpu") == "grouped" and conv_kernel(small, 16, 512, 1, "cpu") == "grouped"
    assert conv_kernel(small, 1024, 4, 10, "cuda") == "grouped" and conv_kernel(small, 1024, 512, 1, "cuda") == "unfold"


def test_ops_per_call_do_not_grow_with_the_examples():
    """The hot path dispatches a fixed number of torch ops per layer and pass, whatever the number of examples: on
    the DDPM CIFAR-10 UNet (35.7M parameters, maps up to 32×32) the ops of a default featurize call grow by at most
    1.25× when its examples grow 4×, for multi-timestep examples (B = 2 → 8 at T = 2) and single-draw rows (B = 4 →
    16 at T = 1). Before, one conv call per example and passes of 5 rows made them grow 4.0×, and on a GPU the
    launches, not the arithmetic, set the pace."""
    from diffusion_trak.evaluations.bench_featurize import bench_ops, cifar_unet

    r = bench_ops(cifar_unet(), (3, 32, 32), "cpu", cases=((2, 8, 2), (4, 16, 1)), k=64)
    for case in r["cases"]:
        assert case["ops"][1] <= 1.25 * case["ops"][0], case


def test_rows_per_pass_rule(monkeypatch):
    """On CPU: the CPU budget's rows, but at least CPU_MIN_ROWS while they fit the machine's share; a set
    ACTIVATION_BUDGET overrides both. A function of the hardware and the row size only."""
    from diffusion_trak.featurize import fast as fast_mod

    monkeypatch.setattr(fast_mod, "_total_memory", lambda: 16 * 2 ** 30)  # 1 GiB share
    MiB = 2 ** 20
    assert fast_mod.rows_per_pass("cpu", 1 * MiB) == 256  # small rows: the 256 MiB budget
    assert fast_mod.rows_per_pass("cpu", 45 * MiB) == 16  # large rows: at least 16 within the share
    assert fast_mod.rows_per_pass("cpu", 200 * MiB) == 5  # larger still: what the share holds
    assert fast_mod.rows_per_pass("cpu", 2000 * MiB) == 1
    monkeypatch.setattr(fast_mod, "ACTIVATION_BUDGET", 90 * MiB)
    assert fast_mod.rows_per_pass("cpu", 45 * MiB) == 2


def test_fast_featurizer_shares_the_callers_model_and_puts_it_back(tiny_unet, scheduler):
    """No copy of the caller's model on its own device (a Stable-Diffusion UNet is 3.4 GB): the featurizer uses it in
    eval mode with its own requires_grad selection during its calls only; mode, flags and gradients come back as they
    were, and the features equal those of a featurizer over a private copy (the vmap path's rule)."""
    import copy

    model = copy.deepcopy(tiny_unet).train()
    first = next(model.parameters())
    first.requires_grad_(False)
    first.grad = torch.ones_like(first)
    f = Featurizer(model, scheduler, FeaturizeArgs(num_timesteps=2, proj_dim=32, params="all"))
    assert f.shared and f.model is model
    x0, ts, ns = torch.randn(3, 1, 8, 8), torch.randint(0, 1000, (3, 2)), torch.randn(3, 2, 1, 8, 8)
    got = f.features(x0, ts, ns)
    assert model.training and not first.requires_grad and torch.equal(first.grad, torch.ones_like(first))
    assert all(p.requires_grad for p in list(model.parameters())[1:])
    other = Featurizer(copy.deepcopy(model).eval(), scheduler, FeaturizeArgs(num_timesteps=2, proj_dim=32, params="all"))
    torch.testing.assert_close(got, other.features(x0, ts, ns), rtol=1e-5, atol=1e-6)
    vm = Featurizer(model, scheduler, FeaturizeArgs(num_timesteps=2, proj_dim=32, method="vmap", projector="countsketch"))
    assert not vm.shared and vm.model is not model
