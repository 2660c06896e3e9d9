"""Timestep-aware TRAK features: projected per-example gradients of an output function."""
from __future__ import annotations

import copy
import hashlib
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
    """The (timesteps, noises) of training example ``index``: a function of ``(args.seed, index)`` only."""
    g = torch.Generator().manual_seed(seed_for(args.seed, index, 7))
    t = sample_timesteps(args.timestep_strategy, args.num_timesteps, num_train_timesteps, g, args.timestep_range)
    noise = torch.randn(args.num_timesteps, *shape, generator=g)
    return t, noise


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
        # a private copy: switching attention processors (and hooks of the fast path) must not change
        # the caller's model, which may still be used for sampling
        self.model = copy.deepcopy(model).to(self.device).eval()
        #: the parameters θ the gradients cover (``args.params``), in the order of the flattened gradient
        self.param_names = select_parameters(self.model, args.params)
        if not args.method.startswith("fast"):  # the fast path runs plain batched passes: SDPA is fine there
            use_vmap_friendly_attention(self.model)
        self.scheduler, self.args = scheduler, args
        self.num_params = num_parameters(self.model)
        self.fast = None
        if args.method.startswith("fast"):  # per-layer hooks + CountSketch, see featurize/fast.py
            from .fast import FastGradientSketch
            if args.projector not in ("auto", "countsketch"):
                raise ProjectorError(f"method={args.method} uses its own sparse JL projector; use projector auto or countsketch")
            precision = {"fast": "fp32", "fast_tf32": "tf32", "fast_bf16": "bf16"}[args.method]
            self.fast = FastGradientSketch(self.model, scheduler, args.proj_dim, args.seed, self.device, precision)
            self.projector = self.fast.projector
        elif args.projector == "countsketch":
            from .sketch import CountSketchProjector
            self.projector = CountSketchProjector(self.num_params, args.proj_dim, args.seed, self.device)
        else:
            self.projector = make_projector(args.projector, self.num_params, args.proj_dim, args.seed, self.device)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def gradients(self, x0, timesteps, noises, cond=None, output: Optional[str] = None, cond_per_timestep=False):
        """Flattened per-example gradients (B, p) by ``vmap``, whatever the method."""
        if self.fast is not None:
            use_vmap_friendly_attention(self.model)  # SDPA falls back to a slow path under vmap
        return per_sample_gradients(self.model, self.scheduler, x0.to(self.device), timesteps.to(self.device),
                                    noises.to(self.device), output or self.args.output,
                                    {k: v.to(self.device) for k, v in (cond or {}).items()}, cond_per_timestep)

    def features(self, x0, timesteps, noises, cond=None, output: Optional[str] = None, cond_per_timestep=False) -> torch.Tensor:
        """(B, k) features on the CPU. The fast methods take all B × T rows at once (they bound memory by
        rows themselves); ``vmap`` works in batches of ``batch_size`` examples."""
        if self.fast is not None:
            return self.fast.features(x0, timesteps, noises, output or self.args.output, cond, cond_per_timestep).cpu()
        out = []
        bs = self.args.batch_size
        for i in range(0, x0.shape[0], bs):
            c = {k: v[i:i + bs] for k, v in (cond or {}).items()}
            g = self.gradients(x0[i:i + bs], timesteps[i:i + bs], noises[i:i + bs], c, output, cond_per_timestep)
            if not torch.isfinite(g).all():
                raise NonFiniteError("NaN/Inf in per-example gradients; check the checkpoint for NaN weights "
                                     "(retrain with a lower learning rate) and the inputs for NaN")
            out.append(self.projector(g).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.args.proj_dim)

    def featurize_dataset(self, dataset, stored, cond_fn=None, progress: bool = True, rows=None, desc="featurize",
                          cond_per_timestep: bool = False):
        """Fill ``stored`` (a :class:`~diffusion_trak.store.StoredArray` of shape (N, k)) row by row,
        skipping rows already done. Row ``r`` is dataset position ``r``; its draws use the example's
        stable index ``dataset.indices[r]``. ``cond_fn(rows)`` gives the unet's keyword arguments of those
        rows, ``(B, T, ...)`` tensors with ``cond_per_timestep``."""
        todo = stored.pending(rows)
        bs = self.args.batch_size
        shape = dataset.image_shape
        bar = tqdm(total=len(todo), desc=desc, unit="ex", disable=not progress)
        # Batches are aligned blocks of ``batch_size`` rows, computed whole, so a row's features never
        # depend on which other rows were pending: resumed and sharded runs are bit-identical.
        for block in np.unique(todo // bs):
            block_rows = np.arange(block * bs, min((block + 1) * bs, len(dataset)))
            draws = [example_draws(int(dataset.indices[r]), self.args, self.num_train_timesteps, shape) for r in block_rows]
            ts = torch.stack([d[0] for d in draws])
            ns = torch.stack([d[1] for d in draws])
            x0 = dataset.read(block_rows)  # one block at a time: a disk-backed dataset is never read whole
            cond = cond_fn(block_rows) if cond_fn else None
            feats = self.features(x0, ts, ns, cond, cond_per_timestep=cond_per_timestep).numpy()
            keep = np.isin(block_rows, todo)
            stored.write(block_rows[keep], feats[keep])
            bar.update(int(keep.sum()))
        bar.close()
        return stored
