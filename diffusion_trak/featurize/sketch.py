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

Memory: none that grows with ``p``. A block's buckets and signs are drawn again from its seed whenever they are
needed (about 7 ns per coordinate on one CPU thread) and kept in a cache of at most :data:`CACHE_BYTES` (shared by
every projector: 16 blocks of signed int64 buckets), so a model of up to 16M coordinates draws them once, and a
larger one draws the blocks beyond the cache's once per pass; the slice a layer needs is formed for that layer and freed. The
map is the one the earlier stored tables held, coordinate for coordinate (the blocks and their seeds are
unchanged), so features are equal to theirs.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict

import numpy as np
import torch

from .projectors import Projector

BLOCK = 1 << 20


def _block_seed(seed: int, block: int, rep: int) -> int:
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF, int(block), int(rep), 29])
    return int(ss.generate_state(2, dtype=np.uint64)[0] >> 1)


#: the most bytes of drawn blocks kept (all projectors together): a constant, whatever the number of parameters
CACHE_BYTES = 128 * 2 ** 20
_CACHE: "OrderedDict" = OrderedDict()
_CACHE_LOCK = threading.Lock()


#: of the cache, the bytes kept for the most recently used blocks (the rest holds the first blocks drawn, for good)
RECENT_BYTES = 4 * BLOCK * 8
_RECENT: "OrderedDict" = OrderedDict()


def _cached_block(key, draw):
    """The block ``key`` from the shared bounded cache, drawn by ``draw()`` when missing. The cache's first
    ``CACHE_BYTES - RECENT_BYTES`` keep the first blocks drawn for good, the rest the most recently used ones: every
    pass visits the blocks in the same order, a cyclic scan for which least-recently-used eviction alone hits
    nothing once the blocks outnumber the cache, while a fixed set hits its share every pass; the recent ones serve
    neighbouring layers that share a block (biases, norms: many small tensors in one block)."""
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is None:
            hit = _RECENT.get(key)
            if hit is not None:
                _RECENT.move_to_end(key)
        if hit is not None:
            return hit
    block = draw()
    size = block.numel() * block.element_size()
    with _CACHE_LOCK:
        if sum(t.numel() * t.element_size() for t in _CACHE.values()) + size <= CACHE_BYTES - RECENT_BYTES:
            _CACHE[key] = block
        else:
            _RECENT[key] = block
            total = sum(t.numel() * t.element_size() for t in _RECENT.values())
            while total > RECENT_BYTES and len(_RECENT) > 1:
                _, old = _RECENT.popitem(last=False)
                total -= old.numel() * old.element_size()
    return block


def _parts(lo: int, n: int):
    """``(block, a, b, c)`` for each block that coordinates ``lo … lo+n`` span: its offsets ``a … b`` hold the
    coordinates at ``c … c + b - a`` of the slice."""
    for j in range(lo // BLOCK, -(-(lo + n) // BLOCK)):
        a, b = max(lo, j * BLOCK) - j * BLOCK, min(lo + n, (j + 1) * BLOCK) - j * BLOCK
        yield j, a, b, j * BLOCK + a - lo


def clear_cache() -> None:
    """Drop every cached block (tests, and memory measurements)."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _RECENT.clear()


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

    def _block(self, j: int, r: int) -> torch.Tensor:
        """Signed buckets (int64 ``(BLOCK,)`` on ``device``: bucket, plus k where the sign is negative) of block ``j``
        of repetition ``r``, drawn from ``(seed, j, r)``: whole blocks, so a coordinate's bucket and sign do not
        depend on p."""
        return _cached_block(self._key(j, r), lambda: self._draw_block(j, r))

    def _key(self, j: int, r: int):
        return (self.seed, self.k, j, r, str(self.device))

    def _draw_block(self, j: int, r: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_block_seed(self.seed, j, r))
        buckets = torch.randint(0, self.k, (BLOCK,), generator=g, dtype=torch.int32)
        signs = torch.randint(0, 2, (BLOCK,), generator=g, dtype=torch.int8)  # sign 2s - 1: negative where s = 0
        signed = torch.empty(BLOCK, dtype=torch.int64)
        torch.add(buckets, (1 - signs).to(torch.int32), alpha=self.k, out=signed)  # 6× faster than via int8 signs
        return signed.to(self.device)

    def _signed_slice(self, r: int, lo: int, n: int) -> torch.Tensor:
        """Repetition ``r``'s signed buckets of coordinates ``lo … lo+n`` (int64 ``(n,)``), from the blocks they span."""
        parts = [self._block(j, r)[a:b] for j, a, b, _ in _parts(lo, n)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @property
    def buckets(self) -> torch.Tensor:
        """All buckets, int64 ``(nnz, p)`` (tests and small ``p`` only: p × 8 bytes per repetition)."""
        return torch.stack([self._signed_slice(r, 0, self.p) % self.k for r in range(self.nnz)])

    @property
    def signs(self) -> torch.Tensor:
        """All signs, ±1 int8 ``(nnz, p)`` (tests and small ``p`` only)."""
        return torch.stack([1 - 2 * (self._signed_slice(r, 0, self.p) >= self.k).to(torch.int8) for r in range(self.nnz)])

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
        return torch.stack([self._signed_slice(r, lo, n) for r in range(self.nnz)])

    def _signed(self, buckets, signs):
        return buckets.long() + self.k * (signs < 0).long()

    def add_(self, acc: torch.Tensor, lo: int, values: torch.Tensor) -> torch.Tensor:
        """``acc += `` the signed contributions of coordinates ``lo … lo+n`` of ``values`` (B, n), into a signed
        accumulator (:meth:`accumulator`); returns ``acc``. The slice's signed buckets are formed here and freed."""
        values = values.reshape(values.shape[0], -1).to(acc.dtype)
        if lo < 0 or lo + values.shape[1] > self.p:
            raise ValueError(f"coordinates {lo}..{lo + values.shape[1]} outside 0..{self.p}")
        for r in range(self.nnz):  # block by block: no copy of the slice's buckets (index_add_ takes the column view)
            for j, a, b, c in _parts(lo, values.shape[1]):
                acc.index_add_(1, self._block(j, r)[a:b], values[:, c:c + b - a])
        return acc

    def add_scattered_(self, acc: torch.Tensor, coords: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``acc[i] += `` the signed contributions of ``values[i, j]`` at coordinate ``coords[i, j]``: per-row
        coordinate lists (sparse gradients, e.g. embedding rows), into a signed accumulator; (B, m) each."""
        coords = coords.reshape(coords.shape[0], -1)
        values = values.reshape(values.shape[0], -1).to(acc.dtype)
        if coords.numel() == 0:
            return acc
        lo = int(coords.min())
        n = int(coords.max()) + 1 - lo
        for r in range(self.nnz):  # the signed buckets of the span the coordinates cover (one layer's), then theirs
            acc.scatter_add_(1, self._signed_slice(r, lo, n)[coords - lo], values)
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
        buckets, signs = self.buckets.cpu(), self.signs.cpu()
        for r in range(self.nnz):
            M.index_put_((rows, buckets[r]), signs[r].double() * self.scale, accumulate=True)
        return M
