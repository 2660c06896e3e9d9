"""Timestep-aware TRAK features: projected per-example gradients of an output function."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import time
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import FeaturizeArgs
from ..errors import NonFiniteError
from .gradients import num_parameters, per_sample_gradients, select_parameters, use_vmap_friendly_attention
from .projectors import ProjectorError, make_projector


def seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (``numpy.random.SeedSequence``); the same parts give the same seed."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def sample_timesteps(strategy: str, T: int, num_train_timesteps: int, generator: torch.Generator,
                     timestep_range=None) -> torch.Tensor:
    """T training timesteps by ``uniform`` (i.i.d.), ``evenly_spaced`` or ``stratified`` sampling,
    over ``0..num_train_timesteps-1`` or over ``timestep_range = (lo, hi)`` (inclusive)."""
    lo, hi = (0, num_train_timesteps - 1) if timestep_range is None else (int(timestep_range[0]), int(timestep_range[1]))
    if hi >= num_train_timesteps:
        raise ValueError(f"timestep_range {timestep_range} reaches past the model's {num_train_timesteps} timesteps")
    if strategy == "uniform":
        return torch.randint(lo, hi + 1, (T,), generator=generator)
    if strategy == "evenly_spaced":
        return torch.linspace(lo, hi, T).round().long() if T > 1 else torch.tensor([(lo + hi + 1) // 2])
    if strategy == "stratified":
        edges = torch.linspace(lo, hi + 1, T + 1)
        u = torch.rand(T, generator=generator)
        return (edges[:-1] + u * (edges[1:] - edges[:-1])).floor().long().clamp(lo, hi)
    raise ValueError(f"unknown timestep strategy {strategy!r}")


def example_draws(index: int, args: FeaturizeArgs, num_train_timesteps: int, shape: Sequence[int]):
    """The (timesteps, noises) of training example ``index``: a function of ``(args.seed, index)`` only. For a
    probed output (the GGN kernel's ``probe``) each noise is ``[ε, v]`` (twice the channels), drawn from a stream
    of its own, so the kernel's draws are independent of the features'."""
    from ..outputs import PROBED

    probed = args.output in PROBED
    g = torch.Generator().manual_seed(seed_for(args.seed, index, 19 if probed else 7))
    t = sample_timesteps(args.timestep_strategy, args.num_timesteps, num_train_timesteps, g, args.timestep_range)
    shape = tuple(shape)
    noise = torch.randn(args.num_timesteps, *((2 * shape[0],) + shape[1:] if probed else shape), generator=g)
    return t, noise


def _on(have: torch.device, want: torch.device) -> bool:
    """Whether a tensor on ``have`` is already on ``want`` (a bare ``cuda`` means the current GPU)."""
    if have.type != want.type:
        return False
    if want.type == "cuda" and want.index is None:
        return have.index == torch.cuda.current_device()
    return want.index is None or have.index == want.index


def model_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


class Featurizer:
    """Projected gradients of one model (one checkpoint).

    ``features(x0, timesteps, noises)`` returns ``P · (1/T) Σ_j ∇_θ f(θ; x0, t_j, ε_j)`` for each
    example; the same call serves training examples (sampled timesteps) and targets (a fixed
    timestep repeated with R fresh noises).
    """

    def __init__(self, model: torch.nn.Module, scheduler, args: FeaturizeArgs = FeaturizeArgs(), device="cpu"):
        self.device = torch.device(device)
        fast = args.method.startswith("fast")
        #: whether ``model`` is the caller's own module (the fast methods on the model's device: no copy, which for a
        #: Stable-Diffusion UNet is 3.4 GB), used in eval mode with this featurizer's ``requires_grad`` selection only
        #: during its own calls (:meth:`_in_use`), the caller's mode and flags put back after each. Otherwise a
        #: private copy: the vmap path switches attention processors for good, and a model on another device must
        #: be copied there anyway
        self.shared = fast and all(_on(t.device, self.device) for t in list(model.parameters()) + list(model.buffers()))
        self.model = model if self.shared else copy.deepcopy(model).to(self.device).eval()
        self.scheduler, self.args = scheduler, args
        with self._in_use(select=False):
            #: the parameters θ the gradients cover (``args.params``), in the order of the flattened gradient
            self.param_names = select_parameters(self.model, args.params)
            if not fast:  # the fast path runs plain batched passes: SDPA is fine there
                use_vmap_friendly_attention(self.model)
            self.num_params = num_parameters(self.model)
            self.fast = None
            if fast:  # per-layer hooks + CountSketch, see featurize/fast.py
                from .fast import FastGradientSketch
                if args.projector not in ("auto", "countsketch"):
                    raise ProjectorError(f"method={args.method} uses its own sparse JL projector; use projector auto or countsketch")
                precision = {"fast": "fp32", "fast_tf32": "tf32", "fast_bf16": "bf16"}[args.method]
                self.fast = FastGradientSketch(self.model, scheduler, args.proj_dim, args.seed, self.device, precision,
                                               max_memory=getattr(args, "max_memory", None))
                self.projector = self.fast.projector
        if self.fast is not None:
            return
        if args.projector == "countsketch":
            from .sketch import CountSketchProjector
            self.projector = CountSketchProjector(self.num_params, args.proj_dim, args.seed, self.device)
        else:
            self.projector = make_projector(args.projector, self.num_params, args.proj_dim, args.seed, self.device)

    @contextlib.contextmanager
    def _in_use(self, select: bool = True):
        """The model as this featurizer uses it: eval mode, ``requires_grad`` on the selected parameters only and, on
        a shared model, its attention processors; the caller's mode, flags and processors put back afterwards (a
        private copy keeps them)."""
        if not self.shared:
            yield
            return
        named = list(self.model.named_parameters())
        flags, training = [p.requires_grad for _, p in named], self.model.training
        procs = {m: m.processor for m in self.model.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")}
        try:
            self.model.eval()
            if select:
                chosen = set(self.param_names)
                for n, p in named:
                    p.requires_grad_(n in chosen)
            yield
        finally:
            for (_, p), f in zip(named, flags):
                p.requires_grad_(f)
            for m, proc in procs.items():
                if m.processor is not proc:
                    m.set_processor(proc)
            self.model.train(training)

    def with_args(self, args: FeaturizeArgs) -> "Featurizer":
        """This featurizer (the same model copy, projector and hooks: the same projection) with other draws and
        output, e.g. the GGN kernel's probe features (:func:`kernel_args`)."""
        if (args.proj_dim, args.seed, args.method, args.projector, args.params) != (
                self.args.proj_dim, self.args.seed, self.args.method, self.args.projector, self.args.params):
            raise ValueError("with_args changes draws and output only, not the projection or the parameters")
        other = copy.copy(self)
        other.args = args
        return other

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def gradients(self, x0, timesteps, noises, cond=None, output: Optional[str] = None, cond_per_timestep=False):
        """Flattened per-example gradients (B, p) by ``vmap``, whatever the method."""
        with self._in_use():
            if self.fast is not None:
                use_vmap_friendly_attention(self.model)  # SDPA falls back to a slow path under vmap
            return per_sample_gradients(self.model, self.scheduler, x0.to(self.device), timesteps.to(self.device),
                                        noises.to(self.device), output or self.args.output,
                                        {k: v.to(self.device) for k, v in (cond or {}).items()}, cond_per_timestep)

    def features(self, x0, timesteps, noises, cond=None, output: Optional[str] = None, cond_per_timestep=False) -> torch.Tensor:
        """(B, k) features on the CPU. The fast methods take all B × T rows at once (they bound memory by
        rows themselves); ``vmap`` works in batches of ``batch_size`` examples."""
        if self.fast is not None:
            with self._in_use():
                return self.fast.features(x0, timesteps, noises, output or self.args.output, cond, cond_per_timestep).cpu()
        out = []
        bs = self.args.batch_size
        for i in range(0, x0.shape[0], bs):
            c = {k: v[i:i + bs] for k, v in (cond or {}).items()}
            try:
                g = self.gradients(x0[i:i + bs], timesteps[i:i + bs], noises[i:i + bs], c, output, cond_per_timestep)
            except (torch.OutOfMemoryError, MemoryError):
                from .fast import FastPathError
                raise FastPathError(f"out of memory in method={self.args.method} (per-example gradients of {bs} examples "
                                    "at once); lower --batch-size, or use --method fast, whose passes follow "
                                    "--max-memory") from None
            if not torch.isfinite(g).all():
                raise NonFiniteError("NaN/Inf in per-example gradients; check the checkpoint for NaN weights "
                                     "(retrain with a lower learning rate) and the inputs for NaN")
            out.append(self.projector(g).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.args.proj_dim)

    def featurize_dataset(self, dataset, stored, cond_fn=None, progress: bool = True, rows=None, desc="featurize",
                          cond_per_timestep: bool = False, clock: Optional["RunClock"] = None):
        """Fill ``stored`` (a :class:`~diffusion_trak.store.StoredArray` of shape (N, k)) row by row,
        skipping rows already done. Row ``r`` is dataset position ``r``; its draws use the example's
        stable index ``dataset.indices[r]``. ``cond_fn(rows)`` gives the unet's keyword arguments of those
        rows, ``(B, T, ...)`` tensors with ``cond_per_timestep``."""
        todo = stored.pending(rows)
        bs = self.args.batch_size
        bar = tqdm(total=len(todo), desc=desc, unit="ex", disable=not progress)
        # Batches are aligned blocks of ``batch_size`` rows, computed whole, so a row's features never
        # depend on which other rows were pending: resumed and sharded runs are bit-identical.
        for block in np.unique(todo // bs):
            block_rows = np.arange(block * bs, min((block + 1) * bs, len(dataset)))
            x0, ts, ns, cond = self._block_inputs(dataset, block_rows, cond_fn)
            feats = self.features(x0, ts, ns, cond, cond_per_timestep=cond_per_timestep).numpy()
            keep = np.isin(block_rows, todo)
            stored.write(block_rows[keep], feats[keep])
            bar.update(int(keep.sum()))
            if clock is not None:  # the whole run's ETA, from the pairs computed so far
                clock.done(len(block_rows) * self.args.num_timesteps, bar)
        bar.close()
        return stored

    def _block_inputs(self, dataset, rows, cond_fn=None):
        """``(x0, timesteps (B, T), noises (B, T, ...), cond)`` of dataset positions ``rows`` with this featurizer's
        draws (:func:`example_draws` of each example's stable index); one block at a time, so a disk-backed
        dataset is never read whole."""
        draws = [example_draws(int(dataset.indices[r]), self.args, self.num_train_timesteps, dataset.image_shape)
                 for r in rows]
        return (dataset.read(rows), torch.stack([d[0] for d in draws]), torch.stack([d[1] for d in draws]),
                cond_fn(rows) if cond_fn else None)

    def kernel_block(self, x0, timesteps, noises, cond=None, cond_per_timestep: bool = False,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``Σ g gᵀ`` (k × k, float64) over the B × T (example, draw) pairs of ``timesteps`` and ``noises`` (B, T, ...),
        ``g`` the projected gradient of ONE pair: each pair is its own featurizer row (not the mean over an
        example's draws: the outer products of single draws estimate the curvature, those of means do not).
        ``cond``: ``(B, ...)`` tensors, or ``(B, T, ...)`` with ``cond_per_timestep``. With ``out``, added to it."""
        B, T = timesteps.shape
        if cond is not None:  # one entry per pair either way
            cond = {k: (v.reshape(B * T, 1, *v.shape[2:]) if cond_per_timestep else v.repeat_interleave(T, 0))
                    for k, v in cond.items()}
        g = self.features(x0.repeat_interleave(T, dim=0), timesteps.reshape(B * T, 1),
                          noises.reshape(B * T, 1, *noises.shape[2:]), cond, cond_per_timestep=cond_per_timestep).double()
        return g.T @ g if out is None else out.addmm_(g.T, g)

    def featurize_kernel(self, dataset, stored, cond_fn=None, progress: bool = True, slots=None, desc="GGN kernel",
                         cond_per_timestep: bool = False, clock: Optional["RunClock"] = None):
        """Fill ``stored`` (a :class:`~diffusion_trak.store.StoredArray` of shape (S, k, k), see :func:`kernel_slots`)
        with the GGN kernel of this featurizer's settings (``self.args``: output ``probe``, T = ``kernel_draws``):
        slot ``s`` is the sum of :meth:`kernel_block` over the dataset blocks of that slot (:func:`slot_rows`).
        Slots already done are skipped; ``slots`` restricts the work to some slots (a process's share). A slot
        is a function of its rows' draws only."""
        bs = self.args.batch_size
        ranges = slot_rows(len(dataset), bs, stored.shape[0])
        todo = stored.pending(slots)
        bar = tqdm(total=sum(-(-(ranges[s][1] - ranges[s][0]) // bs) for s in todo), desc=desc, unit="block",
                   disable=not progress)
        for s in todo:
            K = torch.zeros(stored.shape[1], stored.shape[2], dtype=torch.float64)
            lo, hi = ranges[s]
            for start in range(lo, hi, bs):
                self.kernel_block(*self._block_inputs(dataset, np.arange(start, min(start + bs, hi)), cond_fn),
                                  cond_per_timestep=cond_per_timestep, out=K)
                bar.update(1)
                if clock is not None:
                    clock.done((min(start + bs, hi) - start) * self.args.num_timesteps, bar, "kernel")
            stored.write([s], K.numpy()[None])
        bar.close()
        return stored


#: the GGN kernel of a checkpoint is stored as this many partial sums at most (resumable and shardable by slot),
#: and as fewer when their float32 copies would take more than KERNEL_SLOT_BYTES together
KERNEL_SLOTS = 16
KERNEL_SLOT_BYTES = 2 ** 30


def slot_rows(n: int, batch_size: int, num_slots: int) -> list:
    """The dataset rows ``(lo, hi)`` of each kernel slot: ``num_slots`` contiguous runs of whole blocks of
    ``batch_size`` rows (the same blocks as the features')."""
    parts = np.array_split(np.arange(-(-n // batch_size)), num_slots)
    return [(int(p[0]) * batch_size, min((int(p[-1]) + 1) * batch_size, n)) for p in parts]


def kernel_slots(n: int, batch_size: int, k: int) -> int:
    """How many partial sums the GGN kernel of ``n`` examples is kept as: one per run of blocks, at most
    :data:`KERNEL_SLOTS` and at most what fits :data:`KERNEL_SLOT_BYTES` of float32 ``k × k`` matrices (a function
    of the data set size, batch size and k only, not of the number of processes)."""
    return max(1, min(KERNEL_SLOTS, KERNEL_SLOT_BYTES // (4 * k * k), -(-n // batch_size)))


def kernel_args(args: FeaturizeArgs) -> FeaturizeArgs:
    """The settings of the GGN kernel's probe features: ``kernel_draws`` draws of the ``probe`` output, with the
    features' seed (so the same projection) and timestep strategy and range."""
    return replace(args, output="probe", num_timesteps=args.kernel_draws)


def held_slots(n: int, batch_size: int, num_slots: int, rows) -> np.ndarray:
    """The kernel slots all of whose rows are among ``rows`` (a process's share of the dataset rows): the slots that
    share computes."""
    held = np.zeros(n, dtype=bool)
    held[np.asarray(rows, dtype=int)] = True
    return np.array([s for s, (lo, hi) in enumerate(slot_rows(n, batch_size, num_slots)) if held[lo:hi].all()], dtype=int)


# -- the cost of a run, before it starts ------------------------------------------------------------------------------
@dataclass
class Estimate:
    """What a featurize run computes and the memory it plans for (:func:`estimate_run`); ``str()`` is the statement
    that ``featurize`` prints before it starts and ``--dry-run`` prints instead of running.

    ``examples``: training examples with rows to compute (each counted once, whatever the number of checkpoints);
    ``pairs``: (example, timestep) rows of the features; ``kernel_rows``: single-draw rows of the GGN kernel (both
    summed over checkpoints). Each row is one forward + backward of the model over one input, so
    ``pairs + kernel_rows`` is the run's cost in units of the model's own forward + backward of one input (the fast
    path's per-example work on top measured on CPU at up to 2× for features and 2.5× for kernel rows: docs/speed.md).
    ``peak_bytes``: the planned peak (model, featurizer state and the largest pass), within ``max_memory``."""

    examples: int
    checkpoints: int
    pairs: int
    kernel_rows: int
    rows_per_pass: int
    kernel_rows_per_pass: int
    row_bytes: int
    model_bytes: int
    state_bytes: int
    peak_bytes: int
    max_memory: Optional[int]

    @property
    def units(self) -> int:
        """Forward + backward passes of the model over one input: ``pairs + kernel_rows``."""
        return self.pairs + self.kernel_rows

    def __str__(self) -> str:
        gib = lambda n: f"{n / 2 ** 30:.2f} GiB"  # noqa: E731
        kern = f" + {self.kernel_rows:,} GGN kernel rows" if self.kernel_rows else ""
        budget = gib(self.max_memory) if self.max_memory else "no limit"
        return (f"featurize plan: {self.examples:,} examples × {self.checkpoints} checkpoint(s): {self.pairs:,} "
                f"(example, timestep) pairs{kern} = {self.units:,} forward + backward passes of the model over one input; "
                f"{self.rows_per_pass} rows per pass ({self.kernel_rows_per_pass} for kernel rows); planned peak memory "
                f"{gib(self.peak_bytes)} (model {gib(self.model_bytes)}, state {gib(self.state_bytes)}, activations "
                f"{self.row_bytes / 2 ** 20:.1f} MiB per row) of --max-memory {budget}")


def estimate_run(featurizers, probe, cond_fn, cond_per_timestep: bool, examples: int, pairs: int, kernel_rows: int,
                 kernel_draws: int = 0) -> Estimate:
    """The :class:`Estimate` of featurizing ``examples`` examples (``pairs`` and ``kernel_rows`` rows in all) with
    ``featurizers`` (one per checkpoint, fast methods). ``probe``: a dataset in the unet's space whose first example
    measures the activation bytes of one row, by one forward without backward (nothing sketched or written)."""
    f = featurizers[0]
    if f.fast is None:
        raise ValueError("estimate_run needs a fast method (method=fast, fast_tf32 or fast_bf16)")
    x0, ts, ns, cond = f._block_inputs(probe, np.arange(1), cond_fn)
    peak = 0
    for fz in featurizers:
        with fz._in_use():
            fz.fast.measure(x0, ts, ns, fz.args.output, cond, cond_per_timestep)
        bs, T = fz.args.batch_size, fz.args.num_timesteps
        bc, tc, feat_peak = fz.fast.plan(bs, T)
        kb, _, kern_peak = fz.fast.plan(bs * max(1, kernel_draws), 1) if kernel_rows else (0, 1, 0)
        peak = max(peak, feat_peak, kern_peak)
    fast = f.fast
    return Estimate(examples=int(examples), checkpoints=len(featurizers), pairs=int(pairs), kernel_rows=int(kernel_rows),
                    rows_per_pass=int(bc * tc), kernel_rows_per_pass=int(kb), row_bytes=int(fast.row_bytes),
                    model_bytes=int(fast.model_bytes), state_bytes=int(fast.state_bytes), peak_bytes=int(peak),
                    max_memory=fast.max_memory)


class RunClock:
    """The whole run's ETA on the progress bars, after the first pass: the feature pairs and the kernel rows still to
    do, each at its own measured seconds per row (a kernel row, one example of its own, costs more than a feature
    pair; until one is measured it counts :data:`KERNEL_ROW_COST` feature pairs)."""

    def __init__(self, pairs: int, kernel_rows: int = 0):
        self.left = {"pairs": int(pairs), "kernel": int(kernel_rows)}
        self.rate = {}
        self.last = time.perf_counter()

    def done(self, rows: int, bar, kind: str = "pairs") -> None:
        now = time.perf_counter()
        spent, self.last = now - self.last, now
        rows = int(rows)
        seconds, n = self.rate.get(kind, (0.0, 0))
        self.rate[kind] = (seconds + spent, n + rows)
        self.left[kind] = max(self.left[kind] - rows, 0)
        per = {k: s / max(n, 1) for k, (s, n) in self.rate.items()}
        if "kernel" not in per:
            per["kernel"] = per.get("pairs", 0.0) * KERNEL_ROW_COST
        if "pairs" not in per:
            per["pairs"] = per["kernel"] / KERNEL_ROW_COST
        eta = sum(self.left[k] * per[k] for k in self.left)
        done = sum(n for _, n in self.rate.values())
        bar.set_postfix_str(f"run ETA {_clock(eta)} ({done:,}/{done + sum(self.left.values()):,} rows)", refresh=False)


#: seconds of a GGN kernel row over those of a feature pair, before the run has measured its own (CPU, SD 1.5's
#: UNet at 16×16: about 1.7; docs/speed.md)
KERNEL_ROW_COST = 1.7


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
