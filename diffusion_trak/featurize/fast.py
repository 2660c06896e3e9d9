"""Fast featurization: per-layer per-example gradients from hooks, sketched one layer at a time.

The reference path (:func:`~diffusion_trak.featurize.gradients.per_sample_gradients` + a dense JL
matrix) writes a ``B × p`` buffer of per-example gradients and multiplies it by a ``p × k`` matrix.
This path never forms the ``p``-dimensional gradient:

1. All ``B × T`` (example, timestep) pairs go through ONE batched forward of the UNet and ONE backward
   of ``Σ_i (1/T) Σ_j f(θ; x0_i, t_ij, ε_ij)``. Parameters are frozen during that pass, so autograd
   computes only gradients with respect to activations; since the pairs do not interact (GroupNorm and
   attention act within a sample; the model is in ``eval`` mode), the gradient reaching a layer's output
   at row ``(i, j)`` is the gradient of pair ``(i, j)``'s own term. When B × T exceeds the rows per pass
   (``max_rows``, by default what fits :data:`ACTIVATION_BUDGET` bytes of saved activations, measured on
   the first call), the rows go through in passes of whole examples, or of chunks of one example's
   timesteps, each scaled by the full ``1/T``; the sketch is linear, so the passes add up to the same
   features and memory stays bounded whatever B and T are.
2. A forward hook on every parameterised module keeps the module's input; a hook on its output receives
   the output gradient during the backward. From the two it forms that layer's exact per-example
   gradient, summed over the T rows of each example (so the result is the gradient of the mean over T,
   exactly what the reference differentiates):

   - ``Linear``: ``Σ_{rows} g ⊗ a`` (rows = timesteps × sequence positions), bias ``Σ g``;
   - ``Conv2d``: the convolution weight-gradient kernel run on each example's T rows (it sums the outer
     products of input patches and output gradients over positions and timesteps; no unfolded copy), on
     small feature maps (for examples of one row, small weights) as one grouped call with each example's channels
     as their own groups;
   - ``GroupNorm`` / ``LayerNorm``: weight ``Σ g · x̂`` with ``x̂`` the normalised input, bias ``Σ g``;
   - ``Embedding``: the output gradient scattered onto the looked-up rows (sketched sparsely).
3. The layer's ``B × p_layer`` block is sketched at once into the ``B × k`` features by a sparse JL
   projection (:class:`~diffusion_trak.featurize.sketch.CountSketchProjector`) over the coordinates the
   layer occupies in the flattened parameter vector (``model.named_parameters()`` order, as in the
   reference), and freed. Extra memory: one layer's ``B × p_layer`` block at a time, plus the sketch
   tables (17 bytes per parameter); no ``B × p`` buffer and no ``p × k`` matrix.

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
#: saves (measured by :meth:`FastGradientSketch._sketch` on the first call); results do not depend on it
ACTIVATION_BUDGET = 256 * 2 ** 20
#: Conv2d outputs with at most this many positions get their per-example weight gradients from one grouped
#: kernel call (measured faster on CPU at 8×8 and below), larger ones from one call per example
GROUPED_CONV_MAX_POSITIONS = 64
#: for single-row examples (T = 1: the GGN kernel's single-draw rows) the grouped call is faster while a group's
#: weight is small, whatever the map (measured on CPU: 2× faster at 16 × 16 channels, 2× slower at 64 × 64, even
#: on 4×4 maps): grouped iff in-channels per group × out-channels is at most this, on maps of at most
#: GROUPED_CONV_SINGLE_ROW_MAX_POSITIONS positions (16×16)
GROUPED_CONV_SINGLE_ROW_MAX_WEIGHT = 2048
GROUPED_CONV_SINGLE_ROW_MAX_POSITIONS = 256
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
        max_rows: (example, timestep) rows per forward/backward pass; default: as many as fit
            :data:`ACTIVATION_BUDGET`, measured on the first call. Bounds memory; results do not depend on it.
    """

    def __init__(self, model: nn.Module, scheduler, k: int, seed: int = 0, device="cpu", precision: str = "fp32",
                 nnz: int = 1, self_check: bool = True, max_rows: Optional[int] = None):
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
        self._checked = not self_check
        self._slices = {}

    # -- hooks -------------------------------------------------------------------------------------
    def _cache(self, lo, n):
        key = (lo, n)
        if key not in self._slices:
            self._slices[key] = self.projector.slice(lo, n)
        return self._slices[key]

    def _add(self, lo, n, values):
        self.projector.add_(self._out, lo, values, self._cache(lo, n))

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
            self.projector.add_scattered_(self._out, coords, gv)
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
        """Per-example Conv2d gradients: the convolution weight-gradient kernel run on each example's T rows
        (it sums over those rows and all positions), so no unfolded patches are ever formed."""
        mod = layer.module
        O = g.shape[1]
        if "weight" in layer.slots:
            if mod.padding_mode != "zeros":
                x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
                padding = (0, 0)
            else:
                padding = (0, 0) if mod.padding == "valid" else mod.padding
            x = x.to(g.dtype)
            w = mod.weight.detach().to(g.dtype)
            conv_args = (list(mod.stride), list(padding), list(mod.dilation), False, [0, 0])
            if B > 1 and _grouped_conv(mod, g.shape[-1] * g.shape[-2], T):
                # one grouped call for all B examples: example b's channels form groups of their own, and the
                # T rows of each example are the batch that the kernel sums over
                xg = x.reshape(B, T, *x.shape[1:]).transpose(0, 1).reshape(T, B * x.shape[1], *x.shape[2:])
                gg = g.reshape(B, T, *g.shape[1:]).transpose(0, 1).reshape(T, B * O, *g.shape[2:])
                gw = torch.ops.aten.convolution_backward(gg, xg, w.repeat(B, 1, 1, 1), None, *conv_args,
                                                         mod.groups * B, [False, True, False])[1].reshape(B, *w.shape)
            else:  # one call per example: cheaper than the grouped kernel on large feature maps
                gw = torch.empty(B, *w.shape, device=g.device, dtype=g.dtype)
                for i in range(B):
                    gw[i] = torch.ops.aten.convolution_backward(
                        g[i * T:(i + 1) * T], x[i * T:(i + 1) * T], w, None, *conv_args, mod.groups,
                        [False, True, False])[1]
            self._add(*layer.slots["weight"], gw)
        if "bias" in layer.slots:
            self._add(*layer.slots["bias"], g.reshape(B * T, O, -1).sum(-1, dtype=torch.float32).reshape(B, T, O).sum(1))

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
        rows = self.max_rows or max(1, int(ACTIVATION_BUDGET // max(self.row_bytes, 1.0)))
        out = torch.zeros(B, self.k, device=dev, dtype=torch.float32)
        tc = _even(T, min(T, rows))
        bc = _even(B, max(1, rows // tc))
        for b0 in range(0, B, bc):
            bs = slice(b0, min(B, b0 + bc))
            for t0 in range(0, T, tc):
                ts = slice(t0, min(T, t0 + tc))
                out[bs] += self._sketch(x0[bs], timesteps[bs, ts], noises[bs, ts],
                                        self._cond_rows(cond, bs, ts, cond_per_timestep), output, cond_per_timestep, T)
        if not torch.isfinite(out).all():
            raise NonFiniteError(NON_FINITE)
        return out

    @staticmethod
    def _cond_rows(cond, bs, ts, cond_per_timestep):
        return {key: v[bs, ts] if cond_per_timestep else v[bs] for key, v in cond.items()}

    def _sketch(self, x0, timesteps, noises, cond, output, cond_per_timestep, T_total, measure=False) -> torch.Tensor:
        """One pass: ``S · (1/T_total) Σ_{j in this chunk} ∇_θ f`` per example, (B, k). With ``measure``, also
        sets :attr:`row_bytes`: the bytes of the tensors the forward saves for the backward, per row."""
        dev = self.device
        B, T = timesteps.shape
        xs, ts, ns, c = self._pairs(x0, timesteps, noises, cond, cond_per_timestep)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._out = torch.zeros(B, self.k, device=dev, dtype=torch.float32)
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
            if not torch.isfinite(total):
                raise NonFiniteError(NON_FINITE)  # the same one line as for the gradients, whatever the method
            total.backward()
        finally:
            for h in handles:
                h.remove()
            for p in params:
                p.requires_grad_(True)
        out, self._out = self._out, None
        return out

    def _self_check(self, sketches, x0, timesteps, noises, cond, output, cond_per_timestep):
        """Once, on probe rows: Σ_i S g_i (``sketches`` of those rows) must equal S (Σ_i g_i), the latter from one
        plain batched backward."""
        T = timesteps.shape[1]
        got = sketches.sum(0)
        if not torch.isfinite(got).all():
            raise NonFiniteError(NON_FINITE)
        xs, ts, ns, c = self._pairs(x0, timesteps, noises, cond, cond_per_timestep)
        self.model.zero_grad(set_to_none=True)
        with torch.enable_grad(), self._precision():
            total = output_value(self.model, self.scheduler, xs, ts, ns, output, c).sum() / T
        total.backward()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(1, -1).float()
                          for p in self.model.parameters() if p.requires_grad], 1)
        self.model.zero_grad(set_to_none=True)
        want = self.projector(flat)[0]
        err = float((got - want).norm() / want.norm().clamp_min(1e-30))
        tol = 5e-2 if self.precision == "bf16" else 1e-3
        if err > tol:
            raise FastPathError(f"method=fast self-check failed (relative error {err:.2e}): some parameter is used outside "
                                "its module's forward; use method=vmap for this model")
        self._checked = True


def _grouped_conv(mod: nn.Conv2d, positions: int, T: int) -> bool:
    """Whether one grouped kernel call forms the per-example weight gradients (else one call per example)."""
    if T == 1:
        return (positions <= GROUPED_CONV_SINGLE_ROW_MAX_POSITIONS
                and (mod.in_channels // mod.groups) * mod.out_channels <= GROUPED_CONV_SINGLE_ROW_MAX_WEIGHT)
    return positions <= GROUPED_CONV_MAX_POSITIONS


def _even(n: int, most: int) -> int:
    """The chunk size that splits ``n`` into as few chunks of at most ``most`` as possible, evenly."""
    chunks = -(-n // most)
    return -(-n // chunks)


def _check_module(name: str, mod: nn.Module) -> None:
    if isinstance(mod, nn.Conv2d) and isinstance(mod.padding, str) and mod.padding != "valid":
        raise FastPathError(f"{name}: Conv2d padding={mod.padding!r} is not supported by method=fast; use method=vmap")
    if isinstance(mod, nn.Embedding) and (mod.max_norm is not None or mod.sparse):
        raise FastPathError(f"{name}: Embedding with max_norm/sparse is not supported by method=fast; use method=vmap")
