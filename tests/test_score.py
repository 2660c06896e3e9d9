import numpy as np
import pytest

from diffusion_trak.score import TRAKScorer, kernel, ridge_lambda, top_k, trak_scores
from diffusion_trak.store import Store, StoreError


def _features(n, m, k, C, seed=0):
    rng = np.random.default_rng(seed)
    train = [rng.standard_normal((n, k)).astype(np.float32) for _ in range(C)]
    targets = [rng.standard_normal((m, k)).astype(np.float32) for _ in range(C)]
    return train, targets


def _explicit(train, targets, ridge):
    """S = (1/C) Σ_c Ψ_c (Φ_cᵀΦ_c + λ_c I)⁻¹ Φ_cᵀ with λ_c = ridge · tr(Φ_cᵀΦ_c)/k, by plain numpy."""
    S = 0
    for phi, psi in zip(train, targets):
        phi, psi = phi.astype(np.float64), psi.astype(np.float64)
        k = phi.shape[1]
        A = phi.T @ phi
        lam = ridge * np.trace(A) / k
        S = S + psi @ np.linalg.inv(A + lam * np.eye(k)) @ phi.T
    return S / len(train)


def test_scores_equal_the_explicit_formula():
    train, targets = _features(30, 4, 8, C=2)
    got = trak_scores(train, targets, ridge=0.05)
    np.testing.assert_allclose(got, _explicit(train, targets, 0.05), rtol=1e-4, atol=1e-6)


def test_dual_form_and_lambda():
    """Ψ(ΦᵀΦ + λI)⁻¹Φᵀ = ΨΦᵀ(ΦΦᵀ + λI)⁻¹ (push-through), with λ = ridge·tr/k scale-free."""
    (phi,), (psi,) = _features(6, 3, 10, C=1, seed=1)
    ridge = 0.2
    lam = ridge * np.trace(phi.T.astype(np.float64) @ phi) / 10
    assert ridge_lambda(kernel(phi, block_size=4), ridge) == pytest.approx(lam)
    dual = psi @ phi.T @ np.linalg.inv(phi.astype(np.float64) @ phi.T + lam * np.eye(6))
    np.testing.assert_allclose(trak_scores([phi], [psi], ridge), dual, rtol=1e-4, atol=1e-6)
    # scale-free: multiplying the features by a constant rescales the scores by nothing at all
    np.testing.assert_allclose(trak_scores([3 * phi], [3 * psi], ridge), dual, rtol=1e-4, atol=1e-6)


def test_blocking_does_not_change_scores():
    train, targets = _features(50, 7, 6, C=3, seed=2)
    one = TRAKScorer(train, 0.01, block_size=4096).score(targets)
    many = TRAKScorer(train, 0.01, block_size=7).score(targets)
    np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-6)


def test_score_into_memmap_in_blocks_and_resumes(tmp_path):
    n, m = 53, 11
    train, targets = _features(n, m, 5, C=2, seed=3)
    # training features as memmaps, like a feature store
    mm = []
    for c, phi in enumerate(train):
        a = np.lib.format.open_memmap(str(tmp_path / f"phi{c}.npy"), mode="w+", dtype=np.float32, shape=phi.shape)
        a[:] = phi
        a.flush()
        mm.append(np.lib.format.open_memmap(str(tmp_path / f"phi{c}.npy"), mode="r"))
    scorer = TRAKScorer(mm, 0.01, block_size=8)
    want = _explicit(train, targets, 0.01)
    arr = Store(str(tmp_path / "s"), {"x": 1}).array("scores", (m, n))
    # first run: only some rows (simulate an interruption by marking others as done, then clearing them)
    arr.done[[1, 4, 5]] = True
    scorer.score_into(targets, arr, target_block=3, progress=False)
    assert arr.complete()
    rest = [i for i in range(m) if i not in (1, 4, 5)]
    np.testing.assert_allclose(arr.data[rest], want[rest], rtol=1e-4, atol=1e-6)
    assert not arr.data[[1, 4, 5]].any()  # rows already done were skipped
    arr.done[[1, 4, 5]] = False
    scorer.score_into(targets, arr, target_block=2, progress=False)
    np.testing.assert_allclose(arr.read(), want, rtol=1e-4, atol=1e-6)


def test_score_into_checks_shape_and_nan(tmp_path):
    train, targets = _features(10, 3, 4, C=1, seed=4)
    scorer = TRAKScorer(train, 0.01)
    store = Store(str(tmp_path / "s"), {"x": 1})
    with pytest.raises(ValueError, match="expected"):
        scorer.score_into(targets, store.array("bad", (3, 9)), progress=False)
    targets[0][1, 0] = np.nan
    with pytest.raises(StoreError, match="NaN"):
        scorer.score_into(targets, store.array("scores", (3, 10)), progress=False)


def test_top_k():
    s = np.array([[0.1, 3.0, -2.0, 0.5], [1.0, 0.0, 2.0, -1.0]])
    ti, tv, bi, bv = top_k(s, 2)
    assert ti.tolist() == [[1, 3], [2, 0]] and bi.tolist() == [[2, 0], [3, 1]]
    np.testing.assert_allclose(tv, [[3.0, 0.5], [2.0, 1.0]])
    np.testing.assert_allclose(bv, [[-2.0, 0.1], [-1.0, 0.0]])
