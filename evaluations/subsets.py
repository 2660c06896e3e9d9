"""Random α-subsets of the training set for linear datamodeling (LDS) and their per-model seeds.

Row ``m`` of :func:`subset_masks` keeps exactly ``round(α·n)`` training positions, drawn without
replacement from a generator seeded by ``(seed, m)`` only, so

- the same ``(n, α, seed)`` gives the same masks on every machine and every rerun;
- asking for more models later (larger ``M``) keeps the first rows unchanged.
"""
from __future__ import annotations

import numpy as np

from diffusion_trak.featurize.featurizer import seed_for


def subset_size(n: int, alpha: float) -> int:
    """``round(α·n)``, at least 1 and at most ``n``."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if n < 1:
        raise ValueError("cannot draw subsets of an empty training set")
    return int(min(n, max(1, round(alpha * n))))


def subset_mask(n: int, alpha: float, seed: int, m: int) -> np.ndarray:
    """The ``(n,)`` boolean mask of model ``m``."""
    k = subset_size(n, alpha)
    rng = np.random.default_rng(seed_for(seed, m, 23))
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[:k]] = True
    return mask


def subset_masks(n: int, num_models: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """``(M, n)`` boolean masks; every row has exactly ``round(α·n)`` True entries."""
    if num_models < 1:
        raise ValueError("num_models must be at least 1")
    return np.stack([subset_mask(n, alpha, seed, m) for m in range(num_models)])


def model_seed(base_seed: int, m: int, mode: str = "distinct") -> int:
    """Training seed of subset model ``m``.

    ``distinct``: every model gets its own initialisation, shuffling and noise (a seed derived from
    ``(base_seed, m)``); the ground truth then varies with the subset *and* with training randomness,
    as in TRAK's and D-TRAK's LDS. ``shared``: every model uses ``base_seed`` (common random numbers:
    same initialisation and the same batch-slot noise), so differences between models come from the
    data subset alone; this lowers the variance of the ground truth at the price of measuring one
    draw of the training randomness.
    """
    if mode == "shared":
        return int(base_seed)
    if mode == "distinct":
        return int(seed_for(base_seed, m, 29) % (2**31 - 1))
    raise ValueError(f"unknown seed mode {mode!r}; use 'distinct' or 'shared'")
