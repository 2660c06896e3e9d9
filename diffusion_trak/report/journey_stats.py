"""The numbers behind the journey page's charts: pure functions of top-k lists and pixel arrays.

Everything here is plain numpy on arrays the caller passes in; nothing loads, trains or draws.
The page (:mod:`diffusion_trak.report.journey`) only draws what these functions return.

Conventions: ``top`` is an ``(S, k)`` integer array of training indices (the top-k proponents of
one target at each of ``S`` recorded steps, in sampling order, most positive first).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

__all__ = ["topk_overlap", "label_shares", "pixel_clusters", "nearest_training", "first_entry_steps",
           "steps_in_topk"]


def topk_overlap(top) -> np.ndarray:
    """``(S-1,)``: the fraction of the top-k at step ``s`` that is still in the top-k at step ``s+1``,
    ``|A_s ∩ A_{s+1}| / k`` (1 = the same k images, 0 = none in common)."""
    top = np.asarray(top)
    if top.ndim != 2:
        raise ValueError(f"top must be (steps, k), got shape {top.shape}")
    k = top.shape[1]
    if k == 0:
        return np.zeros(max(top.shape[0] - 1, 0))
    return np.array([len(np.intersect1d(top[s], top[s + 1])) / k for s in range(top.shape[0] - 1)], dtype=np.float64)


def label_shares(top, label_of: Dict[int, int], num_labels: int) -> np.ndarray:
    """``(S, num_labels)``: the share of each label (or cluster) among the top-k at each step.

    ``label_of`` maps a training index to its label in ``0..num_labels-1``; each row sums to 1."""
    top = np.asarray(top)
    out = np.zeros((top.shape[0], num_labels), dtype=np.float64)
    for s, row in enumerate(top):
        for i in row:
            out[s, int(label_of[int(i)])] += 1
        if len(row):
            out[s] /= len(row)
    return out


def pixel_clusters(images, num_clusters: int = 10, seed: int = 0) -> np.ndarray:
    """Cluster id of each training image, by k-means on raw pixels: the stand-in for labels when the
    data has none. ``images`` is ``(N, ...)``; returns ``(N,)`` ints in ``0..num_clusters-1``."""
    from sklearn.cluster import KMeans

    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    c = max(1, min(int(num_clusters), len(x)))
    return KMeans(n_clusters=c, n_init=4, random_state=seed).fit_predict(x).astype(np.int64)


def nearest_training(image, train_images, n: int) -> np.ndarray:
    """Positions of the ``n`` training images closest to ``image`` in pixel L2, closest first
    (ties broken by position)."""
    q = np.asarray(image, dtype=np.float64).reshape(-1)
    d = np.concatenate([((np.asarray(train_images[a:a + 4096], dtype=np.float64).reshape(-1, q.size) - q) ** 2).sum(1)
                        for a in range(0, len(train_images), 4096)])  # in blocks: no float64 copy of the whole set
    return np.argsort(d, kind="stable")[: int(n)]


def first_entry_steps(top, indices) -> List[Optional[int]]:
    """For each training index in ``indices``: the first step position ``s`` (into the rows of
    ``top``) at which it is in the top-k, or ``None`` if it never is."""
    top = np.asarray(top)
    out: List[Optional[int]] = []
    for i in np.asarray(indices).reshape(-1):
        hits = np.flatnonzero((top == int(i)).any(axis=1))
        out.append(int(hits[0]) if hits.size else None)
    return out


def steps_in_topk(top) -> Dict[int, List[int]]:
    """``{training index: [step positions where it is in the top-k]}`` for every index in ``top``."""
    out: Dict[int, List[int]] = {}
    for s, row in enumerate(np.asarray(top)):
        for i in row:
            steps = out.setdefault(int(i), [])
            if not steps or steps[-1] != s:
                steps.append(s)
    return out
