"""Sparse Johnson–Lindenstrauss projection (CountSketch) ``R^p → R^k``.

Coordinate ``j`` of the ``p``-dimensional gradient is sent to ``s`` buckets ``h_r(j) ∈ [0, k)`` with
random signs ``σ_r(j) = ±1`` and weight ``1/sqrt(s)`` (``s = nnz``, default 1: the classic CountSketch)::

    (S x)_b = (1/sqrt(s)) Σ_r Σ_{j : h_r(j) = b} σ_r(j) x_j

Buckets and signs are drawn from the seed in blocks of ``2**20`` coordinates (CPU generator, so they are
the same on every device), hence any contiguous slice of coordinates, e.g. one layer's parameters, can
be sketched on its own and added in: ``S x = Σ_layers S[:, layer] x[layer]``. This is what lets the fast
featurizer (:mod:`diffusion_trak.featurize.fast`) sketch one layer's per-example gradients at a time.

Error of projected inner products. For fixed ``x, y`` and ``s = 1``, ``E[<Sx, Sy>] = <x, y>`` and::

    Var[<Sx, Sy>] = (|x|²|y|² + <x,y>² - 2 Σ_j x_j² y_j²) / k  ≤  (|x|²|y|² + <x,y>²) / k

which is exactly the variance of the dense Rademacher projection (:class:`TorchProjector`): the two differ
in their tails, not in their mean or variance. For ``s > 1`` the variance is at most the same bound.
So ``|<Sx,Sy> - <x,y>| ≤ c · sqrt((|x|²|y|² + <x,y>²)/k)`` with probability ≥ ``1 - 1/c²`` (Chebyshev);
``tests/featurize/test_projectors.py`` checks the mean, the variance and this bound.

Memory: ``5·s`` bytes per coordinate (int32 bucket, int8 sign), e.g. 180 MB for a 36M-parameter UNet,
against ``4·k`` bytes per coordinate for a cached dense matrix (295 GB at k = 2048). The fast featurizer
also keeps each layer's slice ready to use (int64 signed buckets: 8 more bytes per coordinate).
"""
from __future__ import annotations

import math
import weakref

import numpy as np
import torch

from .projectors import Projector

BLOCK = 1 << 20


def _block_seed(seed: int, block: int, rep: int) -> int:
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF, int(block), int(rep), 29])
    return int(ss.generate_state(2, dtype=np.uint64)[0] >> 1)


class _Tables:
    def __init__(self, buckets: torch.Tensor, signs: torch.Tensor):
        self.buckets, self.signs = buckets, signs


_TABLES: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


class CountSketchProjector(Projector):
    """Seeded CountSketch / sparse JL projector with ``nnz`` nonzeros per coordinate.

    ``project(grads)`` maps ``(B, p)`` to ``(B, k)``; ``add_(acc, lo, values)`` adds coordinates ``lo … lo +
    values.shape[1]`` of a batch of vectors into a signed accumulator (:meth:`accumulator`) and :meth:`finish`
    turns it into the sketches: the same linear map applied slice by slice.
    """

    name = "countsketch"

    def __init__(self, p: int, k: int, seed: int = 0, device="cpu", nnz: int = 1):
        super().__init__(p, k, seed)
        if nnz < 1 or nnz > k:
            raise ValueError(f"nnz must be in 1..k, got {nnz}")
        if k >= 2 ** 31:
            raise ValueError("k must be below 2**31")
        self.device, self.nnz = torch.device(device), int(nnz)
        self.scale = 1.0 / math.sqrt(self.nnz)
        key = (self.p, self.k, self.seed, self.nnz, str(self.device))
        tables = _TABLES.get(key)  # shared with equal projectors (e.g. the featurizers of several checkpoints)
        if tables is None:
            tables = _TABLES[key] = _Tables(*self._draw())
        self._tables = tables
        self.buckets, self.signs = tables.buckets, tables.signs

    def _draw(self):
        """Buckets (int32) and signs (int8), ``(nnz, p)`` each, on ``device``."""
        buckets = torch.empty(self.nnz, self.p, dtype=torch.int32)
        signs = torch.empty(self.nnz, self.p, dtype=torch.int8)
        for r in range(self.nnz):
            for j, lo in enumerate(range(0, self.p, BLOCK)):
                n = min(BLOCK, self.p - lo)
                g = torch.Generator().manual_seed(_block_seed(self.seed, j, r))
                # whole blocks are drawn, so coordinate j's bucket and sign do not depend on p
                buckets[r, lo:lo + n] = torch.randint(0, self.k, (BLOCK,), generator=g, dtype=torch.int32)[:n]
                signs[r, lo:lo + n] = (torch.randint(0, 2, (BLOCK,), generator=g, dtype=torch.int8) * 2 - 1)[:n]
        return buckets.to(self.device), signs.to(self.device)

    # Sketching adds each value into its bucket of a *signed accumulator* of 2k columns, the positive-sign buckets
    # then the negative-sign ones, and :meth:`finish` takes their difference (times 1/sqrt(nnz)) once at the end:
    # the values go straight into ``index_add_``, with no signed copy of every value (3× faster on CPU for 512 rows
    # of a 64 × 64 conv layer). Each half sums values of both signs (the hash's sign is independent of the
    # value's), so the difference loses no precision to cancellation.
    def accumulator(self, rows: int, device=None) -> torch.Tensor:
        """A zero signed accumulator ``(rows, 2k)`` float32 for :meth:`add_` / :meth:`add_scattered_`."""
        return torch.zeros(rows, 2 * self.k, device=device or self.device, dtype=torch.float32)

    def finish(self, acc: torch.Tensor) -> torch.Tensor:
        """The sketches ``(rows, k)`` that the signed accumulator ``acc`` holds."""
        return (acc[:, :self.k] - acc[:, self.k:]) * self.scale

    def slice(self, lo: int, n: int) -> torch.Tensor:
        """The signed buckets (int64 ``(nnz, n)``: bucket, plus k where the sign is negative) of coordinates
        ``lo … lo+n``."""
        if lo < 0 or lo + n > self.p:
            raise ValueError(f"coordinates {lo}..{lo + n} outside 0..{self.p}")
        return self._signed(self.buckets[:, lo:lo + n], self.signs[:, lo:lo + n])

    def _signed(self, buckets, signs):
        return buckets.long() + self.k * (signs < 0).long()

    def add_(self, acc: torch.Tensor, lo: int, values: torch.Tensor, cache=None) -> torch.Tensor:
        """``acc += `` the signed contributions of coordinates ``lo … lo+n`` of ``values`` (B, n), into a signed
        accumulator (:meth:`accumulator`); returns ``acc``. ``cache``: :meth:`slice` of the same ``(lo, n)``."""
        values = values.reshape(values.shape[0], -1)
        b = cache if cache is not None else self.slice(lo, values.shape[1])
        values = values.to(acc.dtype)
        for r in range(self.nnz):
            acc.index_add_(1, b[r], values)
        return acc

    def add_scattered_(self, acc: torch.Tensor, coords: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``acc[i] += `` the signed contributions of ``values[i, j]`` at coordinate ``coords[i, j]``: per-row
        coordinate lists (sparse gradients, e.g. embedding rows), into a signed accumulator; (B, m) each."""
        coords = coords.reshape(coords.shape[0], -1)
        values = values.reshape(values.shape[0], -1).to(acc.dtype)
        for r in range(self.nnz):
            acc.scatter_add_(1, self._signed(self.buckets[r][coords], self.signs[r][coords]), values)
        return acc

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        grads = grads.to(self.device, torch.float32)
        acc = self.accumulator(grads.shape[0])
        for lo in range(0, self.p, BLOCK):
            self.add_(acc, lo, grads[:, lo:lo + BLOCK])
        return self.finish(acc)

    def matrix(self) -> torch.Tensor:
        """The dense ``p × k`` matrix (tests and small ``p`` only)."""
        M = torch.zeros(self.p, self.k, dtype=torch.float64)
        rows = torch.arange(self.p)
        for r in range(self.nnz):
            M.index_put_((rows, self.buckets[r].long().cpu()), self.signs[r].double().cpu() * self.scale, accumulate=True)
        return M
