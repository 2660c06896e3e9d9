"""The TRAK estimator, streamed in blocks and averaged over checkpoints.

For checkpoint ``c`` with training features ``Φ_c`` (n × k), target features ``Ψ_c`` (m × k) and kernel
``K_c`` (k × k)::

    λ_c = ridge · tr(K_c) / k
    S_c = Ψ_c (K_c + λ_c I)⁻¹ Φ_cᵀ                   (m × n)
    S   = (1/C) Σ_c S_c

``K_c`` is the GGN kernel that featurization stored (``kernels``; the default ``FeaturizeArgs.kernel="ggn"``),
or ``Φ_cᵀ Φ_c`` (the paper's, ``kernel="features"``).

Positive scores are proponents (training examples whose up-weighting lowers the target's
output, i.e. the loss), negative ones opponents. No other rescaling is applied: the
out-to-loss term Q of TRAK's classification version is 1 for diffusion outputs.

Memory: :meth:`TRAKScorer.score` returns the whole (m × n) matrix. :meth:`TRAKScorer.score_into`
is bounded independently of n and m: per checkpoint the k × k factor and a block of target weights,
plus one (target block × ``block_size``) block of scores, written straight into the memmap of a
:class:`~diffusion_trak.store.StoredArray`. Training features may be memmaps; they are read in blocks
of ``block_size`` rows, and the pages of memmaps that were read or written are dropped from the
process's resident set after each block (they stay on disk / in the page cache), so resident memory
does not grow with the number of training rows either (``evaluations/bench_scoring.py`` measures it).
"""
from __future__ import annotations

from typing import Optional, Sequence

import mmap

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import InputError

_TINY = float(np.finfo(np.float32).tiny)


def release_pages(array) -> None:
    """Drop the pages of a numpy memmap from this process's resident set (``MADV_DONTNEED``; the data stays
    in the file and the page cache, and is read back on the next access). No-op for in-memory arrays."""
    mm = getattr(array, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        mm.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        pass


def _f64(rows) -> torch.Tensor:
    """Rows of an array or (read-only) memmap as a float64 tensor (never written to)."""
    a = np.asarray(rows, dtype=np.float64)
    return torch.from_numpy(a if a.flags.writeable and a is not rows else a.copy())


def kernel(features, block_size: int = 4096) -> torch.Tensor:
    """``ΦᵀΦ`` in float64, reading ``features`` (n × k, array or memmap) in row blocks."""
    n, k = features.shape
    G = torch.zeros(k, k, dtype=torch.float64)
    for i in range(0, n, block_size):
        b = _f64(features[i:i + block_size])
        G.addmm_(b.T, b)
        release_pages(features)
    return G


def ridge_lambda(G: torch.Tensor, ridge: float) -> float:
    """The absolute λ for relative ``ridge``: ``ridge · tr(G)/k`` (scale-free)."""
    return float(ridge * torch.diagonal(G).mean())


class TRAKScorer:
    """Precomputes the Cholesky factor of ``K + λI`` per checkpoint once (``K``: ``kernels[c]``, else ``ΦᵀΦ``), then
    scores any number of targets."""

    def __init__(self, train_features: Sequence, ridge: float = 1e-2, block_size: int = 4096,
                 kernels: Optional[Sequence] = None):
        self.train_features = list(train_features)
        if not self.train_features:
            raise ValueError("no checkpoints to score with")
        self.n = self.train_features[0].shape[0]
        if self.n == 0:
            raise ValueError("no training features; featurize a non-empty dataset first")
        self.block_size, self.ridge = block_size, ridge
        self.chol, self.lambdas = [], []
        if kernels is not None and len(kernels) != len(self.train_features):
            raise ValueError(f"got kernels for {len(kernels)} checkpoints, training features for {len(self.train_features)}")
        for c, phi in enumerate(self.train_features):
            if phi.shape[0] != self.n:
                raise ValueError("checkpoints have different numbers of training rows")
            G = kernel(phi, block_size) if kernels is None else torch.tensor(np.asarray(kernels[c]), dtype=torch.float64)
            lam = ridge_lambda(G, ridge)
            k = G.shape[0]
            if not np.isfinite(lam):
                raise InputError(f"the ridge λ = {ridge:g}·tr(K)/k of checkpoint {c} is not a finite number; "
                                 "use a smaller --ridge (ScoreArgs(ridge=...)), e.g. the default 0.1")
            G.diagonal().add_(lam)
            L, info = torch.linalg.cholesky_ex(G)
            if int(info) != 0 or not torch.isfinite(L).all():
                rank = f", more than the {self.n} training rows (the kernel's rank is at most {self.n})" if k > self.n else ""
                raise InputError(f"the kernel K + λI of checkpoint {c} is not positive definite with ridge {ridge:g} "
                                 f"(λ = {lam:.3g}; k = {k} features{rank}), so no score can be computed; raise --ridge "
                                 "(ScoreArgs(ridge=...)), e.g. to 1e-3, or use a smaller --proj-dim")
            self.chol.append(L)
            self.lambdas.append(lam)

    def weights(self, c: int, target_features) -> torch.Tensor:
        """``Ψ_c (Φ_cᵀΦ_c + λI)⁻¹``: (m × k), float64."""
        psi = _f64(target_features)
        W = torch.cholesky_solve(psi.T, self.chol[c]).T
        if not W.any() and psi.any():
            self._underflow(c)
        return W

    def _underflow(self, c: int):
        raise InputError(f"every score underflows to 0 with ridge {self.ridge:g} (λ = {self.lambdas[c]:.3g} swamps the "
                         "kernel, the scores are no longer numbers a float can hold); use a smaller --ridge "
                         "(ScoreArgs(ridge=...)), e.g. the default 0.1")

    def _scores(self, W, i: int) -> np.ndarray:
        """:meth:`_block` as float32, refusing a block whose scores all underflow to 0."""
        acc = self._block(W, i)
        block = acc.numpy().astype(np.float32)
        if not block.any() and (acc.any() or (any(w.any() for w in W) and any(
                np.asarray(phi[i:i + self.block_size]).any() for phi in self.train_features))):
            self._underflow(0)
        return block

    def check(self, target_features: Sequence, rows: int = 8) -> None:
        """Score a few targets (``rows`` of each checkpoint's ``target_features``) against the first block of
        training rows: the checks of a whole scoring (degenerate ridge), before anything is written."""
        self._scores([self.weights(c, np.asarray(t[:rows])) for c, t in enumerate(target_features)], 0)

    def score(self, target_features: Sequence, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Scores (m × n) for per-checkpoint target features ``[Ψ_1, …, Ψ_C]`` (each m × k)."""
        if len(target_features) != len(self.train_features):
            raise ValueError(f"got target features for {len(target_features)} checkpoints, "
                             f"training features for {len(self.train_features)}")
        m = target_features[0].shape[0]
        out = np.zeros((m, self.n), dtype=np.float32) if out is None else out
        W = [self.weights(c, psi) for c, psi in enumerate(target_features)]
        for i in range(0, self.n, self.block_size):
            block = self._scores(W, i)
            out[:, i:i + block.shape[1]] = block
        return out

    def _block(self, W, i: int) -> torch.Tensor:
        """Scores of the weighted targets ``W`` (per checkpoint, r × k) against training rows ``i … i+block_size``."""
        acc = None
        for c, phi in enumerate(self.train_features):
            b = _f64(phi[i:i + self.block_size])
            acc = W[c] @ b.T if acc is None else acc.addmm_(W[c], b.T)
            release_pages(phi)
        return acc / len(self.train_features)

    def score_into(self, target_features: Sequence, stored, target_block: int = 0, progress: bool = True,
                   rows: Optional[Sequence[int]] = None):
        """Stream scores into a :class:`~diffusion_trak.store.StoredArray` of shape (m, n).

        Targets go in blocks of ``target_block`` rows (default ``min(m, 2048)``), training rows in blocks of
        ``block_size``; each (target block × training block) of scores is written into the memmap at once,
        and a target row is marked done once all its training blocks are written (resumable: finished
        target rows are skipped; ``rows`` restricts the work to some target rows, e.g. one process's shard). Memory: ``target_block × (block_size + C·k)`` float64 plus one training
        block, whatever n and m; every pass over the training features serves ``target_block`` targets.
        """
        from .store import StoreError

        if len(target_features) != len(self.train_features):
            raise ValueError(f"got target features for {len(target_features)} checkpoints, "
                             f"training features for {len(self.train_features)}")
        m = target_features[0].shape[0]
        if tuple(stored.shape) != (m, self.n):
            raise ValueError(f"score array is {tuple(stored.shape)}, expected {(m, self.n)}")
        target_block = target_block or max(1, min(m, 2048))
        todo = stored.pending(rows)
        data = stored.data
        for s in tqdm(range(0, len(todo), target_block), desc="score", disable=not progress):
            rows = todo[s:s + target_block]
            contiguous = len(rows) and rows[-1] - rows[0] == len(rows) - 1
            W = [self.weights(c, np.asarray(t[rows])) for c, t in enumerate(target_features)]
            for i in range(0, self.n, self.block_size):
                block = self._scores(W, i).astype(data.dtype, copy=False)
                if not np.isfinite(block).all():
                    raise StoreError(f"NaN/Inf scores for target rows {rows[:5].tolist()}...; check the features for NaN "
                                     "(refeaturize with --overwrite) or raise --ridge")
                if contiguous:
                    data[rows[0]:rows[-1] + 1, i:i + block.shape[1]] = block
                else:
                    data[rows, i:i + block.shape[1]] = block
                release_pages(data)  # written pages stay in the page cache, out of our resident set
            data.flush()
            stored.seal(rows)
        return stored


def trak_scores(train_features: Sequence, target_features: Sequence, ridge: float = 1e-2) -> np.ndarray:
    """One-shot TRAK scores, see the module docstring for the formula."""
    return TRAKScorer(train_features, ridge).score(target_features)


def top_k(scores: np.ndarray, k: int):
    """Indices and values of the k largest (proponents) and k smallest (opponents) per row."""
    k = min(k, scores.shape[-1])
    order = np.argsort(-scores, axis=-1, kind="stable")
    top = order[..., :k]
    bottom = order[..., ::-1][..., :k]
    return (top, np.take_along_axis(scores, top, -1), bottom, np.take_along_axis(scores, bottom, -1))
