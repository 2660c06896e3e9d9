import math

import numpy as np
import pytest
import torch

from diffusion_trak.featurize.projectors import TorchProjector, make_projector
from diffusion_trak.featurize.sketch import CountSketchProjector

PROJECTORS = {
    "torch": lambda p, k, seed: TorchProjector(p, k, seed, block_rows=700),
    "countsketch": lambda p, k, seed: CountSketchProjector(p, k, seed),
    "sparse_jl_4": lambda p, k, seed: CountSketchProjector(p, k, seed, nnz=4),
}


def _pair(p, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p, generator=g)
    y = 0.6 * x + 0.8 * torch.randn(p, generator=g)
    return x, y


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_same_seed_same_projection_other_seed_other(name):
    x = torch.randn(3, 1500)
    a = PROJECTORS[name](1500, 32, 5)(x)
    b = PROJECTORS[name](1500, 32, 5)(x)
    c = PROJECTORS[name](1500, 32, 6)(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_inner_products_unbiased_with_the_stated_variance(name):
    """E<Px,Py> = <x,y>; Var = (|x|²|y|² + <x,y>² − 2Σx_j²y_j²)/k for Rademacher and CountSketch."""
    p, k, n = 1200, 48, 300
    x, y = _pair(p)
    xy = torch.stack([x, y])
    est = np.array([float((lambda f: f[0] @ f[1])(PROJECTORS[name](p, k, s)(xy))) for s in range(n)])
    exact = float(x @ y)
    var = (float(x @ x) * float(y @ y) + exact ** 2 - 2 * float((x ** 2 * y ** 2).sum())) / k
    if name == "sparse_jl_4":  # collisions between a coordinate's own buckets only lower the variance
        assert est.var() < 1.3 * var
    else:
        assert 0.75 * var < est.var() < 1.3 * var
    assert abs(est.mean() - exact) < 4 * math.sqrt(var / n)


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_jl_norm_and_inner_product_bounds(name):
    """Norms within 1 ± ε for ε = sqrt(8 log n / k); inner products within 4 standard deviations of the bound
    sqrt((|x|²|y|² + <x,y>²)/k) for at least 1 − 1/16 of the pairs (Chebyshev)."""
    n, p, k = 40, 4000, 1024
    X = torch.randn(n, p, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.5, 2, p)
    Y = PROJECTORS[name](p, k, 3)(X).double()
    X = X.double()
    eps = math.sqrt(8 * math.log(n) / k)
    ratio = Y.norm(dim=1) / X.norm(dim=1)
    assert ((ratio - 1).abs() < eps).all()
    exact, got = X @ X.T, Y @ Y.T
    sq = X.norm(dim=1) ** 2
    sd = ((sq[:, None] * sq[None, :] + exact ** 2) / k).sqrt()
    off = ~torch.eye(n, dtype=torch.bool)
    bad = ((got - exact).abs() > 4 * sd)[off].float().mean()
    assert bad <= 1 / 16


def test_torch_projector_matrix_is_its_seeded_blocks_and_shared():
    x = torch.randn(4, 5000)
    P = TorchProjector(5000, 64, 9, block_rows=1024)
    want = torch.cat([P._block(j) for j in range(5)])
    assert torch.equal(P.matrix(), want)
    assert torch.allclose(P(x), x @ want, rtol=1e-5, atol=1e-6)
    assert torch.equal(P(x), P(x))
    # a second projector with the same (p, k, seed) reuses the matrix instead of generating it again
    Q = TorchProjector(5000, 64, 9, block_rows=1024)
    assert Q.matrix() is P.matrix()
    assert TorchProjector(5000, 64, 10, block_rows=1024).matrix() is not P.matrix()


def test_torch_projector_refuses_a_matrix_over_the_limit(monkeypatch):
    """No silent per-batch regeneration: too large a matrix is a one-line error naming the fixes."""
    from diffusion_trak.featurize.projectors import CACHE_ENV, ProjectorError

    with pytest.raises(ProjectorError, match=r"needs .* GiB, over the .* limit; use --method fast .*countsketch.*" + CACHE_ENV):
        TorchProjector(5000, 64, 9, cache_bytes=5000 * 64 * 4 - 1)
    TorchProjector(5000, 64, 9, cache_bytes=5000 * 64 * 4)  # exactly fits
    monkeypatch.setenv(CACHE_ENV, "0.000001")  # ~1 KiB
    with pytest.raises(ProjectorError, match=CACHE_ENV):
        make_projector("torch", 5000, 64, 0)
    monkeypatch.setenv(CACHE_ENV, "1")
    assert make_projector("auto", 5000, 64, 0).name == "torch"
    monkeypatch.setenv(CACHE_ENV, "lots")
    with pytest.raises(ProjectorError, match="not a number"):
        make_projector("torch", 5000, 64, 0)


def test_countsketch_slices_scatter_and_matrix_agree():
    p, k = 3000, 50
    x = torch.randn(5, p, dtype=torch.float64).float()
    for nnz in (1, 3):
        P = CountSketchProjector(p, k, 2, nnz=nnz)
        full = P(x)
        acc = P.accumulator(5)
        for lo, hi in ((0, 1000), (1000, 1001), (1001, p)):
            P.add_(acc, lo, x[:, lo:hi])
        torch.testing.assert_close(P.finish(acc), full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close((x.double() @ P.matrix()).float(), full, rtol=1e-5, atol=1e-5)
        # per-row coordinate lists (sparse gradients)
        coords = torch.tensor([[3, 7, 2999], [0, 0, 5]])
        vals = torch.tensor([[1.0, -2.0, 0.5], [1.0, 1.0, 3.0]])
        dense = torch.zeros(2, p)
        dense.scatter_add_(1, coords, vals)
        got = P.finish(P.add_scattered_(P.accumulator(2), coords, vals))
        torch.testing.assert_close(got, P(dense), rtol=1e-5, atol=1e-5)


def test_countsketch_large_p_blocks_are_independent_of_layout():
    """Buckets come from 2**20-coordinate blocks: a prefix of a longer sketch is the shorter sketch."""
    a = CountSketchProjector(1_500_000, 16, 4)
    b = CountSketchProjector(2_100_000, 16, 4)
    assert torch.equal(a.buckets, b.buckets[:, :1_500_000])
    assert torch.equal(a.signs, b.signs[:, :1_500_000])
    assert set(a.signs.unique().tolist()) == {-1, 1}
    counts = torch.bincount(a.buckets[0].long(), minlength=16).double()
    assert (counts / counts.mean() - 1).abs().max() < 0.02  # buckets uniform


def test_make_projector_errors():
    with pytest.raises(ValueError, match="unknown projector"):
        make_projector("nope", 10, 4, 0)
    with pytest.raises(ValueError):
        TorchProjector(10, 4)(torch.zeros(2, 11))
    with pytest.raises(ValueError):
        CountSketchProjector(10, 4, nnz=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_countsketch_same_on_cuda():
    x = torch.randn(3, 2000)
    a = CountSketchProjector(2000, 64, 1)(x)
    b = CountSketchProjector(2000, 64, 1, device="cuda")(x.cuda()).cpu()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_countsketch_state_is_a_bounded_cache_and_the_map_is_pinned():
    """No table of p entries is held: blocks are drawn from the seed into a cache of at most CACHE_BYTES shared by all
    projectors; the map is the one the stored tables of earlier versions held (values pinned from that code)."""
    from diffusion_trak.featurize import sketch

    sketch.clear_cache()
    a, b = CountSketchProjector(3000, 50, 4), CountSketchProjector(3000, 50, 4)
    assert not sketch._CACHE  # construction draws nothing
    assert torch.equal(a.buckets, b.buckets) and torch.equal(a.signs, b.signs)
    assert len(sketch._CACHE) == 1  # one block, drawn once for both
    big = CountSketchProjector(40 * sketch.BLOCK, 2048, 0)
    acc = big.accumulator(1)
    for lo in range(0, big.p, sketch.BLOCK):
        big.add_(acc, lo, torch.ones(1, sketch.BLOCK))
    held = sum(t.numel() * t.element_size() for t in sketch._CACHE.values())
    assert held <= sketch.CACHE_BYTES < big.p * 8
    assert big.slice(0, 6)[0].tolist() == [1077 + 2048, 993 + 2048, 1102 + 2048, 1687 + 2048, 869, 1344]
    assert big.slice(sketch.BLOCK, 3)[0].tolist() == [886, 1786 + 2048, 131]
    c = CountSketchProjector(3000, 50, 5)
    assert not torch.equal(a.buckets, c.buckets)
    x = torch.randn(3, 3000)
    torch.testing.assert_close(a(x), (x.double() @ a.matrix()).float(), rtol=1e-5, atol=1e-5)
