"""Pure metric functions: arrays in, numbers out (nothing here trains, loads or samples).

Sign convention of :func:`lds`
------------------------------
Attribution scores in this project are positive for *proponents*: training examples whose
inclusion lowers the target's output (the denoising loss). A model trained on subset ``S_m``
is therefore predicted to have a *low* loss when ``Σ_{i∈S_m} τ_i`` is *high*. The linear
datamodeling score correlates the prediction with the *negated* measured output::

    LDS(τ) = Spearman_m( Σ_{i ∈ S_m} τ_i ,  −y_m )

so a good method has a positive LDS, a method that ranks at random has LDS ≈ 0, and a method
whose sign is flipped has a negative LDS.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
from scipy.stats import rankdata


def spearman(a, b) -> float:
    """Spearman rank correlation of two 1-D arrays (ties get average ranks); ``nan`` if either is constant."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"spearman needs equal lengths, got {a.shape[0]} and {b.shape[0]}")
    return float(_colwise_spearman(a[:, None], b[:, None])[0])


def subset_sums(scores, masks) -> np.ndarray:
    """``(M, targets)``: the sum of each target's scores over each model's subset."""
    scores = np.asarray(scores, dtype=np.float64)
    masks = np.asarray(masks)
    if masks.dtype != bool:
        raise ValueError("masks must be boolean (M, n)")
    if scores.ndim != 2 or masks.ndim != 2 or scores.shape[1] != masks.shape[1]:
        raise ValueError(f"scores (targets, n) and masks (M, n) disagree: {scores.shape} vs {masks.shape}")
    return masks.astype(np.float64) @ scores.T


def lds(scores, masks, outputs) -> np.ndarray:
    """Linear datamodeling score of every target.

    Args:
        scores: ``(targets, n)`` attribution scores, positive = proponent (lowers the output).
        masks: ``(M, n)`` boolean; ``masks[m, i]`` is True if model ``m`` was trained on example ``i``.
        outputs: ``(M, targets)`` measured output (e.g. loss) of model ``m`` on each target.

    Returns:
        ``(targets,)`` Spearman correlation over the ``M`` models between ``Σ_{i∈S_m} scores[target, i]``
        and ``−outputs[m, target]`` (see the module docstring for the sign).
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    pred = subset_sums(scores, masks)
    if outputs.shape != pred.shape:
        raise ValueError(f"outputs must be (M, targets) = {pred.shape}, got {outputs.shape}")
    return _colwise_spearman(pred, -outputs)


def split_half(outputs_a, outputs_b) -> np.ndarray:
    """Per-target Spearman correlation over models of two independent measurements ``(M, targets)``
    of the same output (two disjoint sets of timesteps and noises): the ground truth's reliability."""
    a = np.asarray(outputs_a, dtype=np.float64)
    b = np.asarray(outputs_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"split_half needs two (M, targets) arrays of one shape, got {a.shape} and {b.shape}")
    return _colwise_spearman(a, b)


def spearman_brown(r) -> np.ndarray:
    """Reliability of the average of both halves, from the split-half correlation ``r``: ``2r/(1+r)``."""
    r = np.asarray(r, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r > -1, 2 * r / (1 + r), np.nan)


def lds_ceiling(r) -> np.ndarray:
    """Highest LDS a perfect predictor of the *expected* output can reach against the two-half average
    when measurement noise is the only obstacle: ``sqrt(spearman_brown(r))`` (0 where ``r ≤ 0``)."""
    rel = spearman_brown(r)
    return np.sqrt(np.clip(rel, 0, None))


def replicate_ceiling(r) -> np.ndarray:
    """Highest LDS reachable against a ground truth measured on ONE training run per subset, from the
    per-target correlation ``r`` over subsets between two replicate runs (other training randomness,
    the same subsets; :func:`split_half` of the two). With ``y = f(S) + e`` (``e`` the run's own
    randomness), ``r = var f / var y`` and the best predictor ``f`` reaches ``corr(f, y) = √r``
    (0 where ``r ≤ 0``). A low value means the subset explains little of the output: no attribution
    method can then score well, whatever its quality."""
    r = np.asarray(r, dtype=np.float64)
    return np.sqrt(np.clip(r, 0, None))


def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of ``values`` (NaNs dropped) with a percentile bootstrap interval."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def _colwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of matching columns of two (M, T) arrays (average ranks for ties)."""
    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    den = np.sqrt((ra ** 2).sum(0) * (rb ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(0) / den, np.nan)


def _mean_or_nan(v) -> float:
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def _two_way_bootstrap(stat, M: int, T: int, n_boot: int, seed: int, level: float) -> Tuple[float, float, float]:
    """``(stat(all), lo, hi)``: a percentile interval of ``stat(model_idx, target_idx)`` over ``n_boot`` resamples of
    the ``M`` models *and* the ``T`` targets (NaN resamples dropped)."""
    everyone = (np.arange(M), np.arange(T))
    mean = stat(*everyone)
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for i in range(n_boot):
        mi = rng.integers(0, M, M)
        ti = rng.integers(0, T, T)
        reps[i] = stat(mi, ti)
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return mean, float("nan"), float("nan")
    a = (1 - level) / 2
    return mean, float(np.quantile(reps, a)), float(np.quantile(reps, 1 - a))


def paired_bootstrap_ci(x, y, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Tuple[float, float, float]:
    """``(mean, lo, hi)`` of the mean over targets of the per-target Spearman correlation over models of
    ``x`` and ``y`` (both ``(M, targets)``), with a two-way percentile bootstrap that resamples models
    *and* targets.

    The LDS of every target is computed on the same ``M`` models, so per-target values are not
    independent (a few unusual models move all of them together); resampling targets alone
    (:func:`bootstrap_ci`) then understates the uncertainty. For LDS pass ``x = subset_sums(scores, masks)``
    and ``y = −outputs``; for the split-half ceiling pass the two halves."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"need two (M, targets) arrays of one shape, got {x.shape} and {y.shape}")
    return _two_way_bootstrap(lambda mi, ti: _mean_or_nan(_colwise_spearman(x[mi][:, ti], y[mi][:, ti])),
                              *x.shape, n_boot, seed, level)


def lds_difference_ci(scores_a, scores_b, masks, outputs, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> Tuple[float, float, float]:
    """``(mean, lo, hi)`` of LDS(a) − LDS(b) for two methods' scores of the same targets against the same
    models: the two-way bootstrap of :func:`paired_bootstrap_ci` with the SAME resampled models and targets for
    both, so what the two share (unusual models, hard targets) cancels. An interval that contains 0 means the
    two are not distinguishable on this ground truth."""
    y = -np.asarray(outputs, dtype=np.float64)
    xa, xb = subset_sums(scores_a, masks), subset_sums(scores_b, masks)

    def stat(mi, ti):
        ys = y[mi][:, ti]
        return _mean_or_nan(_colwise_spearman(xa[mi][:, ti], ys)) - _mean_or_nan(_colwise_spearman(xb[mi][:, ti], ys))
    return _two_way_bootstrap(stat, *y.shape, n_boot, seed, level)


def lds_ci(scores, masks, outputs, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Tuple[float, float, float]:
    """Mean LDS over targets with the two-way (models × targets) bootstrap interval of
    :func:`paired_bootstrap_ci`."""
    return paired_bootstrap_ci(subset_sums(scores, masks), -np.asarray(outputs, dtype=np.float64), n_boot, seed, level)


def quartiles(values) -> Tuple[float, float, float]:
    """``(q25, median, q75)`` of the finite values."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    q = np.quantile(v, [0.25, 0.5, 0.75])
    return float(q[0]), float(q[1]), float(q[2])


# ----------------------------------------------------------------------------------------------
# Image distances and similarities (rows are images of any shape; computed on flattened pixels)
# ----------------------------------------------------------------------------------------------


def _flat(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


def l2_distance(a, b) -> np.ndarray:
    """Row-wise Euclidean distance ``‖a_i − b_i‖₂`` of two equally shaped batches: ``(B,)``."""
    a, b = _flat(a), _flat(b)
    if a.shape != b.shape:
        raise ValueError(f"l2_distance needs equal shapes, got {a.shape} and {b.shape}")
    return np.sqrt(((a - b) ** 2).sum(1))


def rms_distance(a, b) -> np.ndarray:
    """Root-mean-square per-pixel difference: ``‖a_i − b_i‖₂ / sqrt(#pixels)``: ``(B,)``."""
    return l2_distance(a, b) / np.sqrt(_flat(a).shape[1])


def cosine_distance(a, b) -> np.ndarray:
    """Row-wise ``1 − cos(a_i, b_i)``: ``(B,)``."""
    a, b = _flat(a), _flat(b)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return 1 - num / np.maximum(den, 1e-12)


def neg_l2_similarity(queries, keys) -> np.ndarray:
    """``(Q, N)``: ``−‖q − k‖₂`` for every query/key pair (higher = more similar)."""
    q, k = _flat(queries), _flat(keys)
    d2 = (q ** 2).sum(1)[:, None] + (k ** 2).sum(1)[None, :] - 2 * q @ k.T
    return -np.sqrt(np.clip(d2, 0, None))


def cosine_similarity(queries, keys) -> np.ndarray:
    """``(Q, N)`` cosine similarity of every query/key pair."""
    q, k = _flat(queries), _flat(keys)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    k = k / np.maximum(np.linalg.norm(k, axis=1, keepdims=True), 1e-12)
    return q @ k.T
