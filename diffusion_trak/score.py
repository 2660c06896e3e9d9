"""The TRAK estimator, streamed in blocks and averaged over checkpoints.

For checkpoint ``c`` with training features ``Φ_c`` (n × k) and target features ``Ψ_c`` (m × k)::

    λ_c = ridge · tr(Φ_cᵀ Φ_c) / k
    S_c = Ψ_c (Φ_cᵀ Φ_c + λ_c I)⁻¹ Φ_cᵀ              (m × n)
    S   = (1/C) Σ_c S_c

Positive scores are proponents (training examples whose up-weighting lowers the target's
output, i.e. the loss), negative ones opponents. No other rescaling is applied: the
out-to-loss term Q of TRAK's classification version is 1 for diffusion outputs.

Memory: the k × k kernel per checkpoint, plus one block of targets × all training rows.
Training features may be memmaps; they are read in blocks of ``block_size`` rows.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


def kernel(features, block_size: int = 4096) -> torch.Tensor:
    """``ΦᵀΦ`` in float64, reading ``features`` (n × k, array or memmap) in row blocks."""
    n, k = features.shape
    G = torch.zeros(k, k, dtype=torch.float64)
    for i in range(0, n, block_size):
        b = torch.as_tensor(np.asarray(features[i:i + block_size]), dtype=torch.float64)
        G.addmm_(b.T, b)
    return G


def ridge_lambda(G: torch.Tensor, ridge: float) -> float:
    """The absolute λ for relative ``ridge``: ``ridge · tr(G)/k`` (scale-free)."""
    return float(ridge * torch.diagonal(G).mean())


class TRAKScorer:
    """Precomputes ``(ΦᵀΦ + λI)⁻¹`` per checkpoint once, then scores any number of targets."""

    def __init__(self, train_features: Sequence, ridge: float = 1e-2, block_size: int = 4096):
        self.train_features = list(train_features)
        if not self.train_features:
            raise ValueError("no checkpoints to score with")
        self.n = self.train_features[0].shape[0]
        if self.n == 0:
            raise ValueError("no training features; featurize a non-empty dataset first")
        self.block_size, self.ridge = block_size, ridge
        self.chol, self.lambdas = [], []
        for phi in self.train_features:
            if phi.shape[0] != self.n:
                raise ValueError("checkpoints have different numbers of training rows")
            G = kernel(phi, block_size)
            lam = ridge_lambda(G, ridge)
            G.diagonal().add_(lam)
            self.chol.append(torch.linalg.cholesky(G))
            self.lambdas.append(lam)

    def weights(self, c: int, target_features) -> torch.Tensor:
        """``Ψ_c (Φ_cᵀΦ_c + λI)⁻¹``: (m × k), float64."""
        psi = torch.as_tensor(np.asarray(target_features), dtype=torch.float64)
        return torch.cholesky_solve(psi.T, self.chol[c]).T

    def score(self, target_features: Sequence, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Scores (m × n) for per-checkpoint target features ``[Ψ_1, …, Ψ_C]`` (each m × k)."""
        if len(target_features) != len(self.train_features):
            raise ValueError(f"got target features for {len(target_features)} checkpoints, "
                             f"training features for {len(self.train_features)}")
        m = target_features[0].shape[0]
        out = np.zeros((m, self.n), dtype=np.float32) if out is None else out
        W = [self.weights(c, psi) for c, psi in enumerate(target_features)]
        C = len(W)
        for i in range(0, self.n, self.block_size):
            acc = torch.zeros(m, min(self.block_size, self.n - i), dtype=torch.float64)
            for c, phi in enumerate(self.train_features):
                b = torch.as_tensor(np.asarray(phi[i:i + self.block_size]), dtype=torch.float64)
                acc.addmm_(W[c], b.T)
            out[:, i:i + acc.shape[1]] = (acc / C).numpy()
        return out

    def score_into(self, target_features: Sequence, stored, target_block: int = 0, progress: bool = True):
        """Stream scores into a :class:`~diffusion_trak.store.StoredArray` of shape (m, n), one block of
        target rows at a time (resumable: finished blocks are skipped). Memory: ``target_block × n``."""
        m = target_features[0].shape[0]
        target_block = target_block or max(1, min(m, (64 * 2**20) // (8 * self.n)))
        todo = stored.pending()
        for i in tqdm(range(0, len(todo), target_block), desc="score", disable=not progress):
            rows = todo[i:i + target_block]
            stored.write(rows, self.score([np.asarray(t[rows]) for t in target_features]))
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
