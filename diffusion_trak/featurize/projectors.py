"""Seeded Johnson–Lindenstrauss projectors ``R^p → R^k``.

All projectors scale so that ``E[<Px, Py>] = <x, y>``: a Rademacher matrix with entries
``±1/sqrt(k)``. For any fixed pair, the projected inner product has standard deviation
about ``sqrt((|x|²|y|² + <x,y>²)/k)``; norms are kept within ``1 ± ε`` for
``k ≳ 8 log(n)/ε²`` (the JL bound that ``tests/featurize/test_projectors.py`` checks).
"""
from __future__ import annotations

import math
import os
import weakref
from typing import Optional

import torch

from ..errors import UserError


class ProjectorError(UserError, RuntimeError):
    """A projector was asked for but cannot be used (one line, names the fix)."""


class Projector:
    """Maps ``(B, p)`` gradients to ``(B, k)`` features."""

    name = "base"

    def __init__(self, p: int, k: int, seed: int = 0):
        self.p, self.k, self.seed = int(p), int(k), int(seed)

    def project(self, grads: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        if grads.shape[-1] != self.p:
            raise ValueError(f"projector built for p={self.p} got gradients with {grads.shape[-1]} coordinates")
        return self.project(grads)


class MatrixTooLargeError(ProjectorError):
    """The dense projection matrix would not fit the cache limit (:func:`cache_limit_bytes`)."""


#: environment variable that raises (or lowers) the largest dense matrix :class:`TorchProjector` may hold, in GiB
CACHE_ENV = "DIFFUSION_TRAK_PROJECTOR_CACHE_GB"
DEFAULT_CACHE_GB = 4.0

# dense matrices already generated, shared by every TorchProjector with the same (p, k, seed, device, dtype):
# the featurizers of several checkpoints, or of several calls, hold one copy and generate it once
_MATRICES: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def cache_limit_bytes() -> int:
    """The largest dense projection matrix allowed in memory: ``$DIFFUSION_TRAK_PROJECTOR_CACHE_GB`` GiB (default 4)."""
    raw = os.environ.get(CACHE_ENV, "")
    try:
        gb = float(raw) if raw.strip() else DEFAULT_CACHE_GB
    except ValueError:
        raise ProjectorError(f"{CACHE_ENV}={raw!r} is not a number; set it to a size in GiB, e.g. {CACHE_ENV}=8") from None
    return int(gb * 1024 ** 3)


class TorchProjector(Projector):
    """Dense Rademacher projection generated in row blocks from the seed, then kept in memory.

    Block ``j`` (rows ``j·block_rows … (j+1)·block_rows`` of the ``p × k`` matrix) is drawn from a
    CPU ``torch.Generator`` seeded with ``(seed, j)``, so the matrix is identical on every device.
    It is generated once, on first use, and shared by every projector with the same
    ``(p, k, seed, device, dtype)``. A matrix larger than ``cache_bytes`` (default
    :func:`cache_limit_bytes`) is refused with :class:`ProjectorError` at construction: regenerating it
    for every batch would make the projection cost more than the gradients by orders of magnitude.
    """

    name = "torch"

    def __init__(self, p: int, k: int, seed: int = 0, device="cpu", dtype=torch.float32,
                 block_rows: int = 16384, cache_bytes: Optional[int] = None):
        super().__init__(p, k, seed)
        self.device, self.dtype = torch.device(device), dtype
        self.block_rows = int(block_rows)
        need = p * k * torch.finfo(dtype).bits // 8
        limit = cache_limit_bytes() if cache_bytes is None else int(cache_bytes)
        if need > limit:
            raise MatrixTooLargeError(f"the dense {p:,} × {k} projection matrix needs {need / 1024 ** 3:.1f} GiB, over the "
                                 f"{limit / 1024 ** 3:.1f} GiB limit; use --method fast (or --projector countsketch), "
                                 f"a smaller --proj-dim, or raise {CACHE_ENV}")
        self._matrix: Optional[torch.Tensor] = None

    def _block(self, j: int) -> torch.Tensor:
        lo = j * self.block_rows
        rows = min(self.block_rows, self.p - lo)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
        signs = torch.randint(0, 2, (rows, self.k), generator=g, dtype=torch.int8)
        return (signs.to(device=self.device, dtype=self.dtype) * 2 - 1) / math.sqrt(self.k)

    def matrix(self) -> torch.Tensor:
        """The ``p × k`` matrix, generated on first use and shared with equal projectors."""
        if self._matrix is None:
            key = (self.p, self.k, self.seed, str(self.device), self.dtype, self.block_rows)
            m = _MATRICES.get(key)
            if m is None:
                m = torch.empty(self.p, self.k, device=self.device, dtype=self.dtype)
                for j in range(math.ceil(self.p / self.block_rows)):
                    lo = j * self.block_rows
                    m[lo:lo + self.block_rows] = self._block(j)
                _MATRICES[key] = m
            self._matrix = m
        return self._matrix

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        return grads.to(device=self.device, dtype=self.dtype) @ self.matrix()


class FastJLProjector(Projector):
    """fast_jl (CUDA) Rademacher projection, checked on first use.

    fast_jl has been seen to return all-zero projections on some CUDA versions, so the
    constructor projects a random batch and raises :class:`ProjectorError` if the result is
    zero or does not preserve norms.
    """

    name = "fast_jl"

    def __init__(self, p: int, k: int, seed: int = 0, device="cuda", max_batch: int = 32):
        super().__init__(p, k, seed)
        try:
            import fast_jl  # noqa: F401
        except ImportError as e:
            raise ProjectorError("fast_jl is not installed; pip install --no-build-isolation fast_jl, "
                                 "or use --projector torch") from e
        if not torch.cuda.is_available() or torch.device(device).type != "cuda":
            raise ProjectorError("fast_jl needs a CUDA device; use --projector torch on CPU")
        import fast_jl
        self._fn = fast_jl.project_rademacher_8
        self.device, self.max_batch = torch.device(device), max_batch
        self._check()

    def _raw(self, grads: torch.Tensor) -> torch.Tensor:
        b = grads.shape[0]
        pad = (-b) % 8
        g = torch.nn.functional.pad(grads, (0, 0, 0, pad)).to(self.device, torch.float16)
        out = self._fn(g.contiguous(), self.k, self.seed, 1)
        return out[:b].float() / math.sqrt(self.k)

    def _check(self):
        gen = torch.Generator().manual_seed(12345)
        x = torch.randn(8, self.p, generator=gen).to(self.device)
        y = self._raw(x)
        if not torch.isfinite(y).all() or y.abs().max() == 0:
            raise ProjectorError("fast_jl returned all-zero or non-finite projections on this CUDA setup; "
                                 "reinstall fast_jl for your CUDA version or use --projector torch")
        ratio = (y.norm(dim=1) / x.norm(dim=1)).mean().item()
        if not 0.5 < ratio < 2.0:
            raise ProjectorError(f"fast_jl projections do not preserve norms (ratio {ratio:.3f}); use --projector torch")

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._raw(grads[i:i + self.max_batch]) for i in range(0, grads.shape[0], self.max_batch)])


def make_projector(name: str, p: int, k: int, seed: int, device="cpu") -> Projector:
    """``auto`` uses fast_jl when it is installed and ``device`` is CUDA, else the torch projector.
    Asking for ``fast_jl`` explicitly raises :class:`ProjectorError` if it cannot be used."""
    device = torch.device(device)
    if name == "torch":
        return TorchProjector(p, k, seed, device=device)
    if name == "fast_jl":
        return FastJLProjector(p, k, seed, device=device)
    if name == "auto":
        if device.type == "cuda":
            try:
                import fast_jl  # noqa: F401
            except ImportError:
                return TorchProjector(p, k, seed, device=device)
            return FastJLProjector(p, k, seed, device=device)
        return TorchProjector(p, k, seed, device=device)
    raise ValueError(f"unknown projector {name!r}; choose auto, torch or fast_jl")
