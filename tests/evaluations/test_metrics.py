import numpy as np
import pytest
from scipy.stats import spearmanr

from diffusion_trak.evaluations.metrics import (bootstrap_ci, cosine_distance, l2_distance, lds, lds_ceiling, neg_l2_similarity,
                                 quartiles, spearman, spearman_brown, split_half, subset_sums)


def test_lds_hand_computed():
    # one target, four training examples, three models
    scores = np.array([[1.0, 2.0, 0.0, -1.0]])
    masks = np.array([[1, 1, 0, 0],    # subset sum 3
                      [0, 1, 1, 0],    # subset sum 2
                      [1, 0, 0, 1]],   # subset sum 0
                     dtype=bool)
    outputs = np.array([[0.1], [0.5], [0.3]])  # losses; -loss = [-0.1, -0.5, -0.3]
    # ranks of the sums: [3, 2, 1]; ranks of -loss: [3, 1, 2]; d = [0, 1, -1]
    # Spearman = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 24 = 0.5
    assert subset_sums(scores, masks)[:, 0].tolist() == [3.0, 2.0, 0.0]
    np.testing.assert_allclose(lds(scores, masks, outputs), [0.5])


def test_lds_sign_convention():
    rng = np.random.default_rng(0)
    n, M = 30, 20
    scores = rng.standard_normal((2, n))
    masks = rng.random((M, n)) < 0.5
    sums = subset_sums(scores, masks)
    # a loss that falls as the proponents in the subset add up: perfect LDS of +1
    np.testing.assert_allclose(lds(scores, masks, -sums), [1.0, 1.0])
    np.testing.assert_allclose(lds(-scores, masks, -sums), [-1.0, -1.0])


def test_spearman_matches_scipy_with_ties():
    a = np.array([1, 2, 2, 3, 5, 5, 5, 0.5])
    b = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).correlation)
    assert np.isnan(spearman(np.ones(4), np.arange(4)))


def test_lds_rejects_bad_shapes():
    with pytest.raises(ValueError):
        lds(np.zeros((2, 5)), np.zeros((3, 4), dtype=bool), np.zeros((3, 2)))
    with pytest.raises(ValueError):
        lds(np.zeros((2, 5)), np.zeros((3, 5)), np.zeros((3, 2)))  # masks not boolean
    with pytest.raises(ValueError):
        lds(np.zeros((2, 5)), np.zeros((3, 5), dtype=bool), np.zeros((2, 3)))


def test_bootstrap_ci():
    v = np.array([0.1, 0.2, 0.3, 0.4, np.nan])
    mean, lo, hi = bootstrap_ci(v, n_boot=500, seed=3)
    assert mean == pytest.approx(0.25)
    assert 0.1 <= lo < mean < hi <= 0.4
    assert bootstrap_ci(v, n_boot=500, seed=3) == (mean, lo, hi)
    assert all(np.isnan(bootstrap_ci([np.nan])))


def test_split_half_and_ceiling():
    rng = np.random.default_rng(1)
    truth = rng.standard_normal((40, 3))
    a = truth + 0.01 * rng.standard_normal(truth.shape)
    b = truth + 0.01 * rng.standard_normal(truth.shape)
    r = split_half(a, b)
    assert (r > 0.99).all()
    assert spearman_brown(0.5) == pytest.approx(2 / 3)
    assert lds_ceiling(0.5) == pytest.approx(np.sqrt(2 / 3))
    assert lds_ceiling(-0.2) == 0.0


def test_distances():
    a = np.zeros((2, 1, 2, 2))
    b = np.ones((2, 1, 2, 2))
    np.testing.assert_allclose(l2_distance(a, b), [2.0, 2.0])
    np.testing.assert_allclose(cosine_distance(b, 2 * b), [0.0, 0.0], atol=1e-12)
    q = np.array([[0.0, 0.0], [3.0, 4.0]])
    k = np.array([[0.0, 0.0], [3.0, 0.0]])
    np.testing.assert_allclose(neg_l2_similarity(q, k), [[0, -3], [-5, -4]])
    assert quartiles([1, 2, 3, 4, 5]) == (2.0, 3.0, 4.0)


def test_two_way_bootstrap():
    from diffusion_trak.evaluations.metrics import lds_ci, paired_bootstrap_ci

    rng = np.random.default_rng(2)
    n, M, T = 40, 24, 6
    scores = rng.standard_normal((T, n))
    masks = rng.random((M, n)) < 0.5
    sums = subset_sums(scores, masks)
    outputs = -(sums + 2.0 * rng.standard_normal((M, T)))
    mean, lo, hi = lds_ci(scores, masks, outputs, n_boot=300, seed=1)
    assert mean == pytest.approx(np.mean(lds(scores, masks, outputs)))
    assert lo < mean < hi
    assert (mean, lo, hi) == lds_ci(scores, masks, outputs, n_boot=300, seed=1)
    # a shared model effect makes per-target values move together: resampling models widens the interval
    a = rng.standard_normal((M, 1))  # a per-model effect shared by all targets
    x = a + 0.3 * rng.standard_normal((M, T))
    y = a + rng.standard_normal((M, 1)) + 0.1 * rng.standard_normal((M, T))
    _, lo2, hi2 = paired_bootstrap_ci(x, y, n_boot=300, seed=0)
    _, lo1, hi1 = bootstrap_ci([spearman(x[:, j], y[:, j]) for j in range(T)], n_boot=300, seed=0)
    assert hi2 - lo2 > hi1 - lo1


def test_replicate_ceiling_bounds_a_perfect_predictor():
    from diffusion_trak.evaluations.metrics import replicate_ceiling, split_half

    rng = np.random.default_rng(0)
    M, T = 4000, 3
    f = rng.normal(size=(M, T))                       # what the subset explains
    a, b = f + rng.normal(size=(M, T)), f + rng.normal(size=(M, T))   # two training runs per subset
    r = split_half(a, b)
    assert np.allclose(r, 0.5, atol=0.05)
    c = replicate_ceiling(r)
    best = np.array([spearman(f[:, j], a[:, j]) for j in range(T)])
    assert np.allclose(best, c, atol=0.05)          # the perfect predictor reaches the ceiling
    assert np.allclose(replicate_ceiling([-0.2, 0.0, 1.0]), [0.0, 0.0, 1.0])


def test_lds_difference_ci():
    """The paired difference: the mean is LDS(a) − LDS(b); identical scores give exactly 0 with a zero-width
    interval; a good predictor against a random one gives an interval above 0, and swapping them mirrors it."""
    from diffusion_trak.evaluations.metrics import lds_ci, lds_difference_ci

    rng = np.random.default_rng(0)
    M, B, N = 40, 12, 30
    masks = rng.random((M, N)) < 0.5
    tau = rng.normal(size=(B, N))
    outputs = -(masks.astype(float) @ tau.T) + 0.5 * rng.normal(size=(M, B))  # output = −Σ τ over the subset + noise
    noisy = tau + rng.normal(size=tau.shape)
    rand = rng.normal(size=tau.shape)
    m, lo, hi = lds_difference_ci(noisy, rand, masks, outputs, 300, seed=1)
    assert m == pytest.approx(lds_ci(noisy, masks, outputs, 10)[0] - lds_ci(rand, masks, outputs, 10)[0])
    assert 0 < lo < m < hi
    m2, lo2, hi2 = lds_difference_ci(rand, noisy, masks, outputs, 300, seed=1)
    assert (m2, lo2, hi2) == pytest.approx((-m, -hi, -lo))
    assert lds_difference_ci(noisy, noisy, masks, outputs, 50) == (0.0, 0.0, 0.0)
