"""Fast featurization: per-layer per-example gradients from hooks, sketched one layer at a time.

The reference path (:func:`~diffusion_trak.featurize.gradients.per_sample_gradients` + a dense JL
matrix) writes a ``B × p`` buffer of per-example gradients and multiplies it by a ``p × k`` matrix.
This path never forms the ``p``-dimensional gradient:

1. All ``B × T`` (example, timestep) pairs go through ONE batched forward of the UNet and ONE backward
   of ``Σ_i (1/T) Σ_j f(θ; x0_i, t_ij, ε_ij)``. Parameters are frozen during that pass, so autograd
   computes only gradients with respect to activations; since the pairs do not interact (GroupNorm and
   attention act within a sample; the model is in ``eval`` mode), the gradient reaching a layer's output
   at row ``(i, j)`` is the gradient of pair ``(i, j)``'s own term. When B × T exceeds the rows per pass
   (``max_rows``, by default :meth:`FastGradientSketch.plan`: the speed rule :func:`rows_per_pass` of the bytes of
   activations one row saves, measured on the first call, within the memory budget ``max_memory``), the rows go
   through in passes of whole
   examples, or of chunks of one example's timesteps, each scaled by the full ``1/T``; the sketch is
   linear, so the passes add up to the same features and memory stays bounded whatever B and T are.
2. A forward hook on every parameterised module keeps the module's input; a hook on its output receives
   the output gradient during the backward. From the two it forms that layer's exact per-example
   gradient, summed over the T rows of each example (so the result is the gradient of the mean over T,
   exactly what the reference differentiates):

   - ``Linear``: ``Σ_{rows} g ⊗ a`` (rows = timesteps × sequence positions), bias ``Σ g``;
   - ``Conv2d``: ``Σ_{rows, positions} g ⊗ patch``, for all examples of the pass at once, by one grouped
     convolution weight-gradient call with each example's channels as their own groups (no unfolded copy) or by
     unfolded patches and a batched matmul, whichever :func:`conv_kernel` picks for the shapes and device;
   - ``GroupNorm`` / ``LayerNorm``: weight ``Σ g · x̂`` with ``x̂`` the normalised input, bias ``Σ g``;
   - ``Embedding``: the output gradient scattered onto the looked-up rows (sketched sparsely).
3. The layer's ``B × p_layer`` block is sketched at once, by one ``index_add_`` into a ``B × 2k`` signed
   accumulator that the pass turns into the ``B × k`` features at its end, by a sparse JL projection
   (:class:`~diffusion_trak.featurize.sketch.CountSketchProjector`) over the coordinates the layer occupies in
   the flattened parameter vector (``model.named_parameters()`` order, as in the reference), and freed. Extra
   memory: one layer's ``B × p_layer`` block at a time, plus the sketch's bounded block cache (no table per parameter); no
   ``B × p`` buffer and no ``p × k`` matrix.

So the features are ``S · g_i`` with ``g_i`` exactly the reference gradient and ``S`` a CountSketch:
an unbiased JL projection with the same inner-product variance as the dense Rademacher one (see
:mod:`~diffusion_trak.featurize.sketch`). ``FastGradientSketch.projector`` applied to the reference
``per_sample_gradients`` gives the same features up to float rounding (tested).

At construction every trainable parameter must belong to a supported module, otherwise
:class:`FastPathError` names the parameters that are not covered. On the first call the sum of the
per-example sketches of one probe row is compared with the sketch of a plain gradient (by linearity they
must agree); a mismatch, e.g. a weight used outside its module's ``forward``, raises instead of
returning wrong features.

Precision: ``fp32`` (default; TF32 disabled on CUDA), ``tf32`` (CUDA only) or ``bf16`` (autocast;
per-example gradients formed in bf16, accumulated and sketched in fp32).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import NonFiniteError, UserError
from ..outputs import output_value
from .sketch import CountSketchProjector

SUPPORTED = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)
PRECISIONS = ("fp32", "tf32", "bf16")
#: bytes of activations saved for the backward per pass: the rows per pass are this over the bytes one row
#: saves (measured by :meth:`FastGradientSketch._sketch` on the first call); ``None``: sized for the device by
#: :func:`rows_per_pass`. Results do not depend on it beyond float rounding
ACTIVATION_BUDGET: Optional[int] = None
#: the device's share of memory that one pass's saved activations may take: on CUDA a fraction of the device's
#: total memory; on CPU CPU_BUDGET bytes (larger passes were measured slower there: 256 MiB against 1 GiB, 1.1M
#: UNet, 8–12% faster), but at least CPU_MIN_ROWS rows while they fit CPU_BUDGET_FRACTION of the machine's memory
#: (each pass costs a fixed number of ops per layer: passes of a few rows of a large UNet are dominated by them).
#: Functions of the hardware, not of what happens to be free, so the rows per pass, and with them the float
#: rounding, are the same in every run and every process
CUDA_BUDGET_FRACTION = 0.25
CPU_BUDGET = 256 * 2 ** 20
CPU_MIN_ROWS = 16
CPU_BUDGET_FRACTION = 1 / 16
#: the unfolded input patches of one Conv2d (the ``unfold`` kernel) are formed for at most this share of one
#: pass's saved activations at once
UNFOLD_BUDGET_SHARE = 0.25
#: Per-example Conv2d weight gradients come from one of two kernels, each a fixed number of torch ops per layer
#: whatever the number of examples (see :func:`conv_kernel`): ``grouped`` (one convolution weight-gradient call
#: with each example's channels as groups of their own) or ``unfold`` (input patches unfolded, one batched matmul
#: per chunk of examples). Measured on CPU, one thread, per layer (ms, grouped against unfold): with T ≥ 2 rows
#: per example ``grouped`` always wins (unfold copies every patch of every row: 64 × 64 channels at 4×4, 16
#: examples × 10 rows: 19 against 56); for single rows (T = 1: the GGN kernel's), ``unfold`` wins
#: on small maps with large weights (64 × 64 channels at 4×4, 512 single rows: 92 against 48; 256 × 256 at 8×8,
#: 16 rows: 55 against 35), ``grouped`` everywhere else (64 × 64 at 8×8, 512 rows: 107 against 127; 128 × 128 at
#: 32×32: 55 against 115; 32 × 32 at 16×16: 56 against 167). So on CPU: ``unfold`` for single rows and a weight
#: of more than UNFOLD_MIN_WEIGHT in-channels per group × out-channels on maps of at most UNFOLD_MAX_POSITIONS
#: positions, or of at least UNFOLD_LARGE_WEIGHT on maps of at most UNFOLD_LARGE_WEIGHT_MAX_POSITIONS. On CUDA, ``grouped``
#: for fewer than CUDA_GROUPED_MAX_EXAMPLES examples per pass and ``unfold`` above (the rule of torch's own
#: per-sample convolution gradients, ``torch.nn.utils._expanded_weights``). (A loop of one call per example,
#: the old choice on CPU, is up to 1.4× faster there on large layers, but its ops grow with the examples:
#: on a GPU the launches, not the arithmetic, then set the pace.)
#: the share of a memory budget (``max_memory``) kept free of the plan: the backward's transient gradients of
#: activations and the allocator's slack. Calibrated on CPU (``tests/featurize/test_memory.py``)
MEMORY_MARGIN = 0.3
#: a model whose sketch blocks do not all fit the sketch's cache redraws them every pass (about 7-10 ns per parameter
#: on one CPU thread): on CPU a pass then holds at least one row per this many parameters, budget permitting (860M
#: parameters: 52 rows, the redraw about a tenth of a second per row)
AMORTIZE_PARAMS_PER_ROW = 2 ** 24
UNFOLD_MIN_WEIGHT = 2048
UNFOLD_MAX_POSITIONS = 16
UNFOLD_LARGE_WEIGHT = 16384
UNFOLD_LARGE_WEIGHT_MAX_POSITIONS = 64
CUDA_GROUPED_MAX_EXAMPLES = 32
NON_FINITE = ("NaN/Inf in per-example gradients; check the checkpoint for NaN weights (retrain with a lower learning rate) "
              "and the inputs for NaN")


class FastPathError(UserError, RuntimeError):
    """The fast path cannot featurize this model or setting (one line, names the fix)."""


class _Layer:
    """A module with trainable parameters and the coordinates they occupy in the flat gradient."""

    def __init__(self, name: str, module: nn.Module, slots: Dict[str, tuple]):
        self.name, self.module, self.slots = name, module, slots  # slots: 'weight'/'bias' -> (lo, n)


class FastGradientSketch:
    """Sketched per-example gradients of the mean over T of an output function.

    Args:
        model: a diffusers UNet (any module whose trainable parameters all live in ``Linear``, ``Conv2d``,
            ``GroupNorm``, ``LayerNorm`` or ``Embedding`` modules).
        scheduler: the noise scheduler.
        k: sketch dimension.
        seed: seeds the sketch.
        device: where to compute.
        precision: ``fp32``, ``tf32`` or ``bf16``.
        nnz: nonzeros per coordinate of the sparse JL (1 = CountSketch).
        self_check: on the first call, compare the sketches of a few rows against a plain batched gradient.
        max_rows: (example, timestep) rows per forward/backward pass; default: :func:`rows_per_pass` of the
            activation bytes of one row (measured on the first call), but no more than fit ``max_memory``.
            Bounds memory; results do not depend on it beyond float rounding.
        max_memory: bytes this featurizer's passes may hold at their peak, the model included (``--max-memory``);
            default: the memory free when it is built (:func:`diffusion_trak.store.free_memory`) plus the model's
            own bytes (already resident). :meth:`plan` says how it is spent.
    """

    def __init__(self, model: nn.Module, scheduler, k: int, seed: int = 0, device="cpu", precision: str = "fp32",
                 nnz: int = 1, self_check: bool = True, max_rows: Optional[int] = None,
                 max_memory: Optional[int] = None):
        if precision not in PRECISIONS:
            raise FastPathError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
        self.device = torch.device(device)
        if precision == "tf32" and self.device.type != "cuda":
            raise FastPathError("tf32 needs a CUDA device; use method=fast (fp32) on CPU")
        self.model, self.scheduler, self.precision = model, scheduler, precision
        offsets, p = {}, 0
        for name, prm in model.named_parameters():
            if prm.requires_grad:
                offsets[id(prm)] = (name, p, prm.numel())
                p += prm.numel()
        if p == 0:
            raise FastPathError("the model has no trainable parameters")
        self.p = p
        self.layers: List[_Layer] = []
        covered = set()
        for mname, mod in model.named_modules():
            own = {n: prm for n, prm in mod.named_parameters(recurse=False) if prm.requires_grad}
            if not own:
                continue
            if not isinstance(mod, SUPPORTED):
                continue  # reported below as uncovered
            _check_module(mname, mod)
            slots = {}
            for n, prm in own.items():
                if n not in ("weight", "bias"):
                    continue
                slots[n] = offsets[id(prm)][1:]
                covered.add(id(prm))
            self.layers.append(_Layer(mname, mod, slots))
        missing = [offsets[i][0] for i in offsets if i not in covered]
        if missing:
            raise FastPathError(f"method=fast cannot cover {len(missing)} trainable parameters "
                                f"({', '.join(missing[:4])}{', …' if len(missing) > 4 else ''}): they are not the weight/bias "
                                f"of a {'/'.join(c.__name__ for c in SUPPORTED)}; use --method vmap (FeaturizeArgs(method='vmap')) for this model")
        assert covered == set(offsets), "fast path must cover exactly the trainable parameters"
        self.projector = CountSketchProjector(p, k, seed, self.device, nnz)
        self.k = k
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be positive, got {max_rows}")
        self.max_rows = max_rows
        self.row_bytes: Optional[float] = None  # activation bytes one row saves, measured on the first call
        tensors = list(model.parameters()) + list(model.buffers())
        #: bytes of the model (parameters and buffers), of the largest layer (one per-example gradient block of it is
        #: formed at a time) and of the featurizer's own state (bounded: the sketch's block cache and one layer's slice)
        self.model_bytes = sum(t.numel() * t.element_size() for t in tensors)
        self.layer_params = max(sum(n for _, n in l.slots.values()) for l in self.layers)
        from .sketch import CACHE_BYTES, BLOCK
        drawn = -(-p // BLOCK) * BLOCK * 8 * nnz
        # a model whose blocks overflow the cache redraws them every pass; the allocator then holds about as much again
        # in freed blocks (measured on CPU: peak 1.2-1.4x the plan without it at 34M parameters, 0.86-0.94x with it)
        self.state_bytes = (2 * CACHE_BYTES if drawn > CACHE_BYTES else drawn) + 8 * nnz * self.layer_params
        if max_memory is None:
            from ..store import free_memory
            free = free_memory(self.device)
            max_memory = None if free is None else free + self.model_bytes
        elif max_memory < 1:
            raise ValueError(f"max_memory must be positive, got {max_memory}")
        self.max_memory = max_memory
        if max_memory is not None and max_memory < self.model_bytes + self.state_bytes:
            raise FastPathError(f"--max-memory {_gb(max_memory)} is less than the model ({_gb(self.model_bytes)}) and the "
                                f"featurizer's state ({_gb(self.state_bytes)}); raise --max-memory (FeaturizeArgs.max_memory) "
                                "or free memory")
        self._checked = not self_check

    # -- hooks -------------------------------------------------------------------------------------
    def _add(self, lo, n, values):
        self.projector.add_(self._acc, lo, values)

    def _forward_hook(self, layer: _Layer, module, inputs, kwargs, output):
        if not inputs:
            inputs = (kwargs.get("input"),)
        if not isinstance(output, torch.Tensor) or not isinstance(inputs[0], torch.Tensor):
            raise FastPathError(f"module {layer.name} was called without a tensor input or returned "
                                f"{type(output).__name__}; use method=vmap for this model")
        replaced = None
        if not output.requires_grad:
            # nothing upstream needs a gradient (parameters are frozen): make the output a leaf
            replaced = output = output.detach().requires_grad_()
        x = inputs[0].detach()
        output.register_hook(functools.partial(self._grad_hook, layer, x))
        return replaced

    def _grad_hook(self, layer: _Layer, x, g):
        B, T = self._BT
        mod = layer.module
        if g.shape[0] != B * T:
            raise FastPathError(f"module {layer.name} saw {g.shape[0]} rows, expected {B * T} (batch × timesteps); "
                                "use method=vmap for this model")
        if isinstance(mod, nn.Linear):
            gw = g.reshape(B, -1, g.shape[-1])
            if "weight" in layer.slots:
                a = x.reshape(B, -1, x.shape[-1]).to(g.dtype)
                self._add(*layer.slots["weight"], torch.bmm(gw.transpose(1, 2), a))
            if "bias" in layer.slots:
                self._add(*layer.slots["bias"], gw.sum(1, dtype=torch.float32))
        elif isinstance(mod, nn.Conv2d):
            self._conv(layer, x, g, B, T)
        elif isinstance(mod, nn.GroupNorm):
            self._group_norm(layer, x, g, B, T)
        elif isinstance(mod, nn.LayerNorm):
            shape = tuple(mod.normalized_shape)
            xhat = F.layer_norm(x.float(), shape, eps=mod.eps)
            gf = g.float().reshape(B, -1, *shape)
            if "weight" in layer.slots:
                self._add(*layer.slots["weight"], (gf * xhat.reshape(gf.shape)).sum(1))
            if "bias" in layer.slots:
                self._add(*layer.slots["bias"], gf.sum(1))
        elif isinstance(mod, nn.Embedding):
            lo, n = layer.slots["weight"]
            D = mod.embedding_dim
            idx = x.reshape(B, -1)
            gv = g.float().reshape(B, idx.shape[1], D)
            if mod.padding_idx is not None:
                gv = gv * (idx != mod.padding_idx).unsqueeze(-1)
            coords = lo + idx.unsqueeze(-1) * D + torch.arange(D, device=idx.device)
            self.projector.add_scattered_(self._acc, coords, gv)
        return None

    def _group_norm(self, layer: _Layer, x, g, B, T):
        """weight: Σ_pos g·x̂ per channel (x̂ the normalised input, recomputed); bias: Σ_pos g."""
        mod = layer.module
        N, C = x.shape[:2]
        gf = g.float().reshape(N, C, -1)
        if "weight" in layer.slots:
            xhat = F.group_norm(x.float(), mod.num_groups, eps=mod.eps).reshape(N, C, -1)
            self._add(*layer.slots["weight"], (gf * xhat).sum(-1).reshape(B, T, C).sum(1))
        if "bias" in layer.slots:
            self._add(*layer.slots["bias"], gf.sum(-1).reshape(B, T, C).sum(1))

    def _conv(self, layer: _Layer, x, g, B, T):
        """Per-example Conv2d gradients summed over each example's T rows, in a fixed number of ops whatever B is:
        the ``grouped`` or the ``unfold`` kernel (:func:`conv_kernel`); the two agree up to float rounding."""
        mod = layer.module
        O = g.shape[1]
        if "weight" in layer.slots:
            if mod.padding_mode != "zeros":
                x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
                padding = (0, 0)
            else:
                padding = (0, 0) if mod.padding == "valid" else tuple(mod.padding)
            x = x.to(g.dtype)
            shape = mod.weight.shape
            if conv_kernel(mod, g.shape[-1] * g.shape[-2], B, T, g.device) == "unfold":
                gw = _unfold_weight_grads(mod, x, g, B, T, padding, self._unfold_rows())
            else:
                # one grouped call for all B examples: example b's channels form groups of their own, and the
                # T rows of each example are the batch that the kernel sums over
                conv_args = (list(mod.stride), list(padding), list(mod.dilation), False, [0, 0])
                xg = x.reshape(B, T, *x.shape[1:]).transpose(0, 1).reshape(T, B * x.shape[1], *x.shape[2:])
                gg = g.reshape(B, T, *g.shape[1:]).transpose(0, 1).reshape(T, B * O, *g.shape[2:])
                # the kernel reads the weight's shape only (no input gradient is asked for): an uninitialised
                # B-fold weight, not a copy (the copy took a third of the call's time on CPU)
                wb = torch.empty(B * shape[0], *shape[1:], device=g.device, dtype=g.dtype)
                gw = torch.ops.aten.convolution_backward(gg, xg, wb, None, *conv_args, mod.groups * B,
                                                         [False, True, False])[1].reshape(B, *shape)
            self._add(*layer.slots["weight"], gw)
        if "bias" in layer.slots:
            self._add(*layer.slots["bias"], g.reshape(B * T, O, -1).sum(-1, dtype=torch.float32).reshape(B, T, O).sum(1))

    def _unfold_rows(self) -> int:
        """Bytes of unfolded patches the ``unfold`` kernel may form at once: a share of one pass's activations."""
        return int(UNFOLD_BUDGET_SHARE * (self.row_bytes or 1.0) * rows_per_pass(self.device, self.row_bytes or 1.0))

    # -- main ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _precision(self):
        if self.device.type != "cuda":
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16" else contextlib.nullcontext()
            with ctx:
                yield
            return
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        tf32 = self.precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        try:
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.precision == "bf16" else contextlib.nullcontext()
            with ctx:
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old

    @staticmethod
    def _pairs(x0, timesteps, noises, cond, cond_per_timestep):
        B, T = timesteps.shape
        xs = x0.unsqueeze(1).expand(B, T, *x0.shape[1:]).reshape(B * T, *x0.shape[1:])
        ts = timesteps.reshape(B * T)
        ns = noises.reshape(B * T, *noises.shape[2:])
        c = {}
        for key, v in (cond or {}).items():
            if cond_per_timestep:
                c[key] = v.reshape(B * T, *v.shape[2:])
            else:
                c[key] = v.unsqueeze(1).expand(B, T, *v.shape[1:]).reshape(B * T, *v.shape[1:])
        return xs, ts, ns, c

    def features(self, x0, timesteps, noises, output: str = "loss", cond: Optional[dict] = None,
                 cond_per_timestep: bool = False) -> torch.Tensor:
        """:meth:`_features`; running out of memory anyway (the plan is an estimate) is one line naming ``--max-memory``."""
        try:
            return self._features(x0, timesteps, noises, output, cond, cond_per_timestep)
        except (torch.OutOfMemoryError, MemoryError):
            self._acc = None
            planned = "" if self.row_bytes is None else f" (planned peak {_gb(self.plan(*timesteps.shape)[2])})"
            raise FastPathError(f"out of memory featurizing{planned}; lower --max-memory (FeaturizeArgs.max_memory, now "
                                f"{_gb(self.max_memory) if self.max_memory else 'unset'}) or free memory") from None

    def _features(self, x0, timesteps, noises, output: str = "loss", cond: Optional[dict] = None,
                  cond_per_timestep: bool = False) -> torch.Tensor:
        """``S · (1/T) Σ_j ∇_θ f(θ; x0_i, t_ij, ε_ij)`` for each example: (B, k) float32 on ``device``.

        Same arguments as :func:`~diffusion_trak.featurize.gradients.per_sample_gradients`. The B × T
        (example, timestep) rows go through the model in passes of at most ``max_rows`` rows: whole
        examples while they fit, otherwise one example's timesteps in chunks. The sketch is linear, so
        the chunks of an example add up to its features exactly (up to float rounding), and memory is
        bounded by ``max_rows`` rows of activations whatever B and T are. The first call also sketches one
        probe row: for the self-check and to measure the activation bytes of one row."""
        dev = self.device
        B, T = timesteps.shape
        x0, timesteps, noises = x0.to(dev), timesteps.to(dev), noises.to(dev)
        cond = {key: v.to(dev) for key, v in (cond or {}).items()}
        if B == 0:
            return torch.zeros(0, self.k, device=dev, dtype=torch.float32)
        if not self._checked or self.row_bytes is None:
            # one row, whatever the batch: the check is about the model, not the data, and a probe of fixed
            # size makes the rows per pass (and so the float rounding) the same in every run, resumed or not
            probe = (x0[:1], timesteps[:1, :1], noises[:1, :1],
                     self._cond_rows(cond, slice(0, 1), slice(0, 1), cond_per_timestep), output, cond_per_timestep)
            got = self._sketch(*probe, 1, measure=True)
            if not self._checked:
                self._self_check(got, *probe)
        bc, tc, _ = self.plan(B, T)
        out = torch.zeros(B, self.k, device=dev, dtype=torch.float32)
        for b0 in range(0, B, bc):
            bs = slice(b0, min(B, b0 + bc))
            for t0 in range(0, T, tc):
                ts = slice(t0, min(T, t0 + tc))
                out[bs] += self._sketch(x0[bs], timesteps[bs, ts], noises[bs, ts],
                                        self._cond_rows(cond, bs, ts, cond_per_timestep), output, cond_per_timestep, T)
        if not torch.isfinite(out).all():
            raise NonFiniteError(NON_FINITE)
        return out

    def pass_bytes(self, rows: int, examples: int) -> float:
        """Planned bytes of one pass of ``rows`` rows of ``examples`` examples on top of the model and the state: the
        saved activations (:attr:`row_bytes` each), one per-example gradient block of the largest layer and the
        signed accumulator per example, and :data:`MEMORY_MARGIN` of the whole for the backward's transients."""
        body = rows * (self.row_bytes or 0.0) + examples * 4 * (self.layer_params + 2 * self.k)
        return body / (1 - MEMORY_MARGIN)

    def rows_that_fit(self) -> Optional[int]:
        """The most rows per pass that fit ``max_memory`` (each row its own example: the worst case); None: no budget."""
        if self.max_memory is None or self.row_bytes is None:
            return None
        free = self.max_memory - self.model_bytes - self.state_bytes
        return int(free // self.pass_bytes(1, 1))

    def plan(self, B: int, T: int):
        """``(examples per pass, timesteps per pass, planned peak bytes)`` for B examples of T rows, once
        :attr:`row_bytes` is known: passes of :func:`rows_per_pass` rows (or ``max_rows``), fewer when they do not
        fit ``max_memory``; a budget that does not hold one row is one line naming ``--max-memory``."""
        fit = self.rows_that_fit()
        if self.max_rows:
            rows = self.max_rows
        elif self.device.type == "cuda" and fit is not None:
            rows = fit  # no speed rule on a GPU: as many rows as the budget holds
        else:
            rows = rows_per_pass(self.device, self.row_bytes)
            from .sketch import CACHE_BYTES
            if self.p * 8 > CACHE_BYTES:  # the sketch redraws its blocks every pass: passes large enough to amortize it
                rows = max(rows, -(-self.p // AMORTIZE_PARAMS_PER_ROW))
        if fit is not None:
            if fit < 1:
                need = self.model_bytes + self.state_bytes + self.pass_bytes(1, 1)
                raise FastPathError(f"one row of this model needs about {_gb(need)} (model {_gb(self.model_bytes)}, state "
                                    f"{_gb(self.state_bytes)}, activations {_gb(self.row_bytes)}), over --max-memory "
                                    f"{_gb(self.max_memory)}; raise --max-memory (FeaturizeArgs.max_memory) or free memory")
            rows = min(rows, fit)
        tc = _even(T, min(T, rows))
        bc = _even(B, max(1, rows // tc))
        return bc, tc, self.model_bytes + self.state_bytes + self.pass_bytes(bc * tc, bc)

    def measure(self, x0, timesteps, noises, output: str = "loss", cond: Optional[dict] = None,
                cond_per_timestep: bool = False) -> float:
        """:attr:`row_bytes` from one forward of the first row (no backward, nothing sketched): what a dry run needs."""
        if self.row_bytes is None:
            dev = self.device
            cond = {key: v[:1, :1].to(dev) if cond_per_timestep else v[:1].to(dev) for key, v in (cond or {}).items()}
            self._sketch(x0[:1].to(dev), timesteps[:1, :1].to(dev), noises[:1, :1].to(dev), cond, output,
                         cond_per_timestep, 1, measure=True, backward=False)
        return self.row_bytes

    @staticmethod
    def _cond_rows(cond, bs, ts, cond_per_timestep):
        return {key: v[bs, ts] if cond_per_timestep else v[bs] for key, v in cond.items()}

    def _sketch(self, x0, timesteps, noises, cond, output, cond_per_timestep, T_total, measure=False,
                backward=True) -> Optional[torch.Tensor]:
        """One pass: ``S · (1/T_total) Σ_{j in this chunk} ∇_θ f`` per example, (B, k). With ``measure``, also
        sets :attr:`row_bytes`: the bytes of the tensors the forward saves for the backward, per row."""
        dev = self.device
        B, T = timesteps.shape
        xs, ts, ns, c = self._pairs(x0, timesteps, noises, cond, cond_per_timestep)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._acc = self.projector.accumulator(B, dev)  # the hooks add every layer's signed values into it
        self._BT = (B, T)
        handles = [l.module.register_forward_hook(functools.partial(self._forward_hook, l), with_kwargs=True)
                   for l in self.layers]
        try:
            for p in params:
                p.requires_grad_(False)
            saved, weights = {}, {q.untyped_storage().data_ptr() for q in self.model.parameters()}

            def pack(t):  # activations only: the (frozen) weights saved for input gradients do not grow with rows
                ptr = t.untyped_storage().data_ptr()
                if ptr not in weights:
                    saved[(ptr, t.device)] = t.untyped_storage().nbytes()
                return t
            counting = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if measure else contextlib.nullcontext()
            with torch.enable_grad(), self._precision(), counting:
                total = output_value(self.model, self.scheduler, xs, ts, ns, output, c).sum() / T_total
            if measure:
                self.row_bytes = sum(saved.values()) / (B * T)
            if not backward:
                self._acc = None
                return None
            if not torch.isfinite(total):
                raise NonFiniteError(NON_FINITE)  # the same one line as for the gradients, whatever the method
            total.backward()
        finally:
            for h in handles:
                h.remove()
            for p in params:
                p.requires_grad_(True)
        acc, self._acc = self._acc, None
        return self.projector.finish(acc)

    def _self_check(self, sketches, x0, timesteps, noises, cond, output, cond_per_timestep):
        """Once, on probe rows: Σ_i S g_i (``sketches`` of those rows) must equal S (Σ_i g_i), the latter from one
        plain batched backward whose parameter gradients are sketched one at a time as autograd finishes each
        (``register_post_accumulate_grad_hook``) and freed at once: extra memory is the largest parameter's gradient,
        not a gradient of every parameter. Gradients the caller's parameters already hold are set aside and put back."""
        T = timesteps.shape[1]
        got = sketches.sum(0)
        if not torch.isfinite(got).all():
            raise NonFiniteError(NON_FINITE)
        xs, ts, ns, c = self._pairs(x0, timesteps, noises, cond, cond_per_timestep)
        slots = {id(getattr(l.module, n)): lo for l in self.layers for n, (lo, _) in l.slots.items()}
        params = [p for p in self.model.parameters() if p.requires_grad]
        kept = [p.grad for p in params]
        acc = self.projector.accumulator(1, self.device)

        def sketch_grad(p):
            self.projector.add_(acc, slots[id(p)], p.grad.reshape(1, -1).float())
            p.grad = None

        handles = [p.register_post_accumulate_grad_hook(sketch_grad) for p in params]
        try:
            for p in params:
                p.grad = None
            with torch.enable_grad(), self._precision():
                total = output_value(self.model, self.scheduler, xs, ts, ns, output, c).sum() / T
            total.backward()
        finally:
            for h in handles:
                h.remove()
            for p, g in zip(params, kept):
                p.grad = g
        want = self.projector.finish(acc)[0]
        err = float((got - want).norm() / want.norm().clamp_min(1e-30))
        tol = 5e-2 if self.precision == "bf16" else 1e-3
        if err > tol:
            raise FastPathError(f"method=fast self-check failed (relative error {err:.2e}): some parameter is used outside "
                                "its module's forward; use method=vmap for this model")
        self._checked = True


def conv_kernel(mod: nn.Conv2d, positions: int, examples: int, T: int, device) -> str:
    """Which kernel forms the per-example weight gradients of ``mod`` (``positions`` output positions, ``examples``
    examples of ``T`` rows each in the pass): ``grouped`` or ``unfold``, both a fixed number of ops per layer. A
    function of shapes and the device type only, so every run and every process makes the same choice."""
    if torch.device(device).type == "cuda":
        return "grouped" if examples < CUDA_GROUPED_MAX_EXAMPLES else "unfold"
    weight = (mod.in_channels // mod.groups) * mod.out_channels
    if T == 1 and weight > UNFOLD_MIN_WEIGHT and (positions <= UNFOLD_MAX_POSITIONS or
                                       (positions <= UNFOLD_LARGE_WEIGHT_MAX_POSITIONS and weight >= UNFOLD_LARGE_WEIGHT)):
        return "unfold"
    return "grouped"


def _unfold_weight_grads(mod: nn.Conv2d, x, g, B, T, padding, max_bytes: int) -> torch.Tensor:
    """``(B, *weight.shape)``: per example, the sum over its T rows and all positions of output gradient ⊗ input
    patch, from unfolded patches and one batched matmul per chunk of examples (at most ``max_bytes`` of patches at
    once; the chunks depend on the shapes only)."""
    O, Cg, kh, kw = mod.weight.shape
    G = mod.groups
    L = g.shape[-1] * g.shape[-2]
    gw = torch.empty(B, O, Cg * kh * kw, device=g.device, dtype=g.dtype)
    per_example = T * x.shape[1] * kh * kw * L * x.element_size()
    step = max(1, min(B, int(max_bytes // max(per_example, 1))))
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        n = b1 - b0
        u = F.unfold(x[b0 * T:b1 * T], (kh, kw), dilation=mod.dilation, padding=padding, stride=mod.stride)
        # (n·T, G·Cg·kh·kw, L) → (n·G, T·L, Cg·kh·kw) and gradients (n·T, G·Og, L) → (n·G, Og, T·L)
        u = u.reshape(n, T, G, Cg * kh * kw, L).permute(0, 2, 1, 4, 3).reshape(n * G, T * L, Cg * kh * kw)
        gg = g[b0 * T:b1 * T].reshape(n, T, G, O // G, L).permute(0, 2, 3, 1, 4).reshape(n * G, O // G, T * L)
        gw[b0:b1] = torch.bmm(gg, u).reshape(n, O, Cg * kh * kw)
    return gw.reshape(B, O, Cg, kh, kw)


def rows_per_pass(device, row_bytes: float) -> int:
    """(example, timestep) rows per forward/backward pass on ``device`` for rows of ``row_bytes`` saved bytes each:
    what fits :data:`ACTIVATION_BUDGET` when it is set, else :data:`CUDA_BUDGET_FRACTION` of a CUDA device's total
    memory, or on CPU :data:`CPU_BUDGET` bytes but at least :data:`CPU_MIN_ROWS` rows within
    :data:`CPU_BUDGET_FRACTION` of the machine's memory."""
    row_bytes = max(float(row_bytes), 1.0)
    if ACTIVATION_BUDGET is not None:
        return max(1, int(ACTIVATION_BUDGET // row_bytes))
    device = torch.device(device)
    if device.type == "cuda":
        return max(1, int(torch.cuda.get_device_properties(device).total_memory * CUDA_BUDGET_FRACTION // row_bytes))
    most = max(CPU_BUDGET, _total_memory() * CPU_BUDGET_FRACTION)
    return max(1, int(CPU_BUDGET // row_bytes), min(CPU_MIN_ROWS, int(most // row_bytes)))


@functools.lru_cache(maxsize=1)
def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0  # unknown: CPU_BUDGET alone


def _gb(n) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def _even(n: int, most: int) -> int:
    """The chunk size that splits ``n`` into as few chunks of at most ``most`` as possible, evenly."""
    chunks = -(-n // most)
    return -(-n // chunks)


def _check_module(name: str, mod: nn.Module) -> None:
    if isinstance(mod, nn.Conv2d) and isinstance(mod.padding, str) and mod.padding != "valid":
        raise FastPathError(f"{name}: Conv2d padding={mod.padding!r} is not supported by method=fast; use method=vmap")
    if isinstance(mod, nn.Embedding) and (mod.max_norm is not None or mod.sparse):
        raise FastPathError(f"{name}: Embedding with max_norm/sparse is not supported by method=fast; use method=vmap")
