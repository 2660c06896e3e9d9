"""Typed, documented settings for every step of the flow.

Each dataclass is saved next to the results it produced (``settings.json`` inside a
store) and compared on rerun: a rerun with the same settings resumes, a rerun with
different settings refuses unless ``overwrite=True`` (``--overwrite``).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Optional, Tuple

from .errors import InputError

TIMESTEP_STRATEGIES = ("uniform", "evenly_spaced", "stratified")
SEED_MAX = 2**32 - 1  #: seeds are mixed as 32-bit words (``featurizer.seed_for``), so larger ones would alias
FEATURIZE_METHODS = ("vmap", "fast", "fast_tf32", "fast_bf16")
#: which UNet parameters the gradients cover (``FeaturizeArgs.params``); ``auto`` is resolved to ``lora`` or ``all``
#: before anything is saved (:func:`diffusion_trak.api.resolve_params`)
PARAM_SELECTIONS = ("auto", "all", "lora", "trainable")
KERNELS = ("ggn", "features")


def check_int(name: str, value, lo: int = None, hi: int = None) -> int:
    """``value`` as an int in ``lo..hi`` (either bound optional), else :class:`InputError` naming the valid range."""
    ok = isinstance(value, Integral) and not isinstance(value, bool)
    if ok and (lo is None or value >= lo) and (hi is None or value <= hi):
        return int(value)
    rng = f"between {lo} and {hi}" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"
    raise InputError(f"{name} must be an integer {rng}, got {value!r}")


def check_float(name: str, value, lo: float = None, lo_open: bool = False) -> float:
    """``value`` as a finite float ``>= lo`` (``> lo`` with ``lo_open``), else :class:`InputError` naming the range."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (lo is None or (value > lo if lo_open else value >= lo)):
        return value
    rng = "a finite number" + ("" if lo is None else f" {'>' if lo_open else '>='} {lo}")
    raise InputError(f"{name} must be {rng}, got {value!r}")


def check_output(name: str, value) -> None:
    """:class:`InputError` unless ``value`` names an output function of :mod:`diffusion_trak.outputs`
    (imported only for names other than the default ``loss``, so that building defaults stays light)."""
    if value == "loss":
        return
    from .outputs import OUTPUTS

    if value not in OUTPUTS:
        raise InputError(f"{name} must be one of {', '.join(sorted(OUTPUTS))}, got {value!r}")


#: field metadata of settings added after results were first saved: written only when set, so the
#: settings of earlier results still compare equal and those results stay resumable
ADDED_LATER = {"omit_when_default": True}


def asdict(obj) -> dict:
    """JSON-friendly dict of a settings dataclass (tuples become lists); fields marked
    :data:`ADDED_LATER` are left out while they hold their default."""
    d = json.loads(json.dumps(dataclasses.asdict(obj)))
    for f in dataclasses.fields(obj):
        if f.metadata.get("omit_when_default") and getattr(obj, f.name) == f.default:
            d.pop(f.name, None)
        elif "omit_when" in f.metadata and getattr(obj, f.name) == f.metadata["omit_when"]:
            d.pop(f.name, None)
        elif getattr(obj, f.name) in f.metadata.get("omit_also", ()):
            d.pop(f.name, None)
        elif f.metadata.get("never_saved"):  # how a run is done, not what it computes (e.g. a memory budget)
            d.pop(f.name, None)
    return d


def from_dict(cls, d: dict):
    """Build a settings dataclass from a dict, ignoring unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names}
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and "absent" in f.metadata:  # saved before the field existed: what it meant then
            kwargs[f.name] = f.metadata["absent"]
        if f.name in kwargs and isinstance(kwargs[f.name], list) and "tuple" in str(f.type).lower():
            kwargs[f.name] = tuple(kwargs[f.name])
    return cls(**kwargs)


@dataclass
class TrainArgs:
    """How to train a DDPM (``UNet2DModel`` + ``DDPMScheduler``).

    Attributes:
        block_out_channels: UNet channel widths, one per resolution level.
        layers_per_block: ResNet layers per UNet block.
        attention_levels: indices of levels that get self-attention (``AttnDownBlock2D``).
        norm_num_groups: GroupNorm groups (must divide every width).
        num_train_timesteps: diffusion steps of the scheduler.
        beta_schedule: ``DDPMScheduler`` beta schedule.
        epochs: passes over the training set.
        batch_size: images per optimiser step.
        learning_rate: AdamW learning rate (cosine decay to 10%, 50 warm-up steps).
        num_checkpoints: checkpoints saved, evenly spaced over the last half of training;
            the featurizer ensembles over them.
        seed: seeds initialisation, shuffling and noise; epoch ``e`` uses ``(seed, e)`` so a
            resumed run is identical to an uninterrupted one.
        class_conditional: condition the UNet on the dataset's labels (``class_labels``).
        mixed_precision: passed to ``accelerate`` ("no", "fp16", "bf16").
        init_seed: seeds the initial weights only (None: ``seed``). Models that share it start from the
            same weights and differ only in their data and in the shuffling and noise that ``seed`` draws;
            the counterfactual benchmarks use it so that retrained models differ by their data more than
            by their initialisation.
    """

    block_out_channels: tuple = (32, 64)
    layers_per_block: int = 1
    attention_levels: tuple = (1,)
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    epochs: int = 100
    batch_size: int = 64
    learning_rate: float = 2e-3
    num_checkpoints: int = 3
    seed: int = 0
    class_conditional: bool = False
    mixed_precision: str = "no"
    init_seed: Optional[int] = field(default=None, metadata=ADDED_LATER)

    def initial_seed(self) -> int:
        """The seed of the initial weights: ``init_seed`` if set, else ``seed``."""
        return int(self.seed if self.init_seed is None else self.init_seed)

    def __post_init__(self):
        widths = tuple(self.block_out_channels)
        if not widths:
            raise InputError("block_out_channels needs at least one width")
        self.norm_num_groups = check_int("norm_num_groups", self.norm_num_groups, 1)
        for w in widths:
            check_int("each of block_out_channels", w, 1)
            if w % self.norm_num_groups:
                raise InputError(f"every width of block_out_channels {list(widths)} must be a multiple of "
                                 f"norm_num_groups={self.norm_num_groups}")
        for a in self.attention_levels:  # levels past the last one are ignored (a one-level UNet keeps the default)
            check_int("each of attention_levels", a, 0)
        self.layers_per_block = check_int("layers_per_block", self.layers_per_block, 1)
        self.num_train_timesteps = check_int("num_train_timesteps", self.num_train_timesteps, 1)
        self.epochs = check_int("epochs", self.epochs, 1)
        self.batch_size = check_int("batch_size", self.batch_size, 1)
        self.learning_rate = check_float("learning_rate", self.learning_rate, 0.0, lo_open=True)
        self.num_checkpoints = check_int("num_checkpoints", self.num_checkpoints, 1, self.epochs)
        self.seed = check_int("seed", self.seed, 0, SEED_MAX)
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise InputError(f"mixed_precision must be one of no, fp16, bf16, got {self.mixed_precision!r}")


@dataclass
class FeaturizeArgs:
    """How training examples become TRAK features.

    For example ``i`` the feature is ``P · g_i`` with
    ``g_i = (1/T) Σ_j ∇_θ f(θ; x0_i, t_ij, ε_ij)``: the *mean* over ``T`` (timestep, noise)
    pairs of the gradient of the output function ``f`` (default: the DDPM loss), projected to
    ``proj_dim`` dimensions by a seeded JL projector ``P``. We average rather than sum so that
    the scale of the features (and so the meaning of the ridge ``λ``) does not change with ``T``;
    a sum would only rescale ``λ`` by ``T²``.

    Attributes:
        num_timesteps: T, the (timestep, noise) pairs per example.
        timestep_strategy: ``uniform`` (i.i.d. uniform over the training timesteps, journey-TRAK),
            ``evenly_spaced`` (the same T evenly spaced timesteps for every example, D-TRAK) or
            ``stratified`` (one uniform draw in each of T equal bins).
        timestep_range: ``(lo, hi)``: draw the timesteps from ``lo..hi`` (inclusive) only, by the same
            strategy; None = all training timesteps. Features restricted to a window around the
            timestep of a sampling step are that step's *timestep-matched* features.
        proj_dim: k, the projected dimension.
        projector: for ``method="vmap"``: ``auto`` (fast_jl when installed and CUDA is used, else ``torch``),
            ``torch`` (dense Rademacher, seeded; held in memory, refused over
            ``$DIFFUSION_TRAK_PROJECTOR_CACHE_GB``, default 4 GiB), ``fast_jl`` (error if unusable) or
            ``countsketch``. The fast methods always use their CountSketch (``auto`` or ``countsketch``).
        output: output function name, see :mod:`diffusion_trak.outputs`.
        seed: seeds the projection and every example's timesteps and noises. The draws of
            example ``i`` depend only on ``(seed, i)``, never on batch or shard.
        batch_size: examples per batch written to the store; with ``vmap`` also per vmap call (memory ≈
            batch_size × T activations + batch_size × p). The fast methods bound memory by rows instead
            (passes of as many (example, timestep) rows as fit
            :func:`diffusion_trak.featurize.fast.rows_per_pass`, a share of the device's memory).
        method: ``fast`` (the default; :mod:`diffusion_trak.featurize.fast`: all batch × T pairs in one
            batched forward/backward, exact per-layer per-example gradients from hooks, sketched layer by
            layer with a seeded CountSketch; never forms the p-dimensional gradient nor a p × k matrix; same
            gradient as ``vmap``, another JL matrix with the same inner-product variance) or ``vmap`` (the
            paper's recipe: per-sample gradients with ``torch.func``, then the dense ``projector``).
            ``fast_tf32`` (CUDA only) and ``fast_bf16`` are the same as ``fast`` with TF32 matmuls or bf16
            autocast (faster on GPUs, less exact). ``auto`` (the value to pass for "the default") becomes
            ``fast``, or ``vmap`` when a dense ``projector`` (``torch``, ``fast_jl``) is named; the resolved
            method is what ``settings.json`` records. The fast methods need ``projector`` ``auto`` or
            ``countsketch``; ``countsketch`` with ``vmap`` gives the same features as ``fast`` up to float rounding.
        params: which parameters θ the gradients cover: ``auto`` (the default: the LoRA adapter's when the model
            carries one, else every parameter; resolved to ``lora`` or ``all`` before featurizing, and saved so),
            ``all`` (every UNet parameter, also with an adapter loaded), ``lora`` (only the
            active ``peft`` LoRA adapter's parameters, as D-TRAK attributes Stable Diffusion LoRA fine-tunes)
            or ``trainable`` (the parameters with ``requires_grad``, e.g. what a ``peft`` model leaves
            unfrozen). See :func:`diffusion_trak.featurize.gradients.select_parameters`.
        kernel: the matrix that TRAK's scores invert, per checkpoint. ``ggn`` (the default): the Gauss-Newton
            matrix of the training loss, ``Σ_i Σ_j JᵀJ`` over examples and (timestep, noise) draws, in the
            projected space: the sum of ``g gᵀ`` over ``kernel_draws`` (timestep, noise, probe) draws per example,
            ``g`` the projected gradient of ``mean(ε̂ · v)`` at ONE draw, with an independent random probe ``v``
            (output ``probe`` of :mod:`diffusion_trak.outputs`): ``E[g gᵀ]`` is the GGN of that draw
            (:meth:`~diffusion_trak.featurize.featurizer.Featurizer.featurize_kernel`). ``features``: the paper's
            ``ΦᵀΦ`` of the training features themselves (with T draws averaged per example, that is the outer
            products of mean gradients, not the curvature of the loss). The choice was measured on the power
            benchmarks (docs/quality.md).
        kernel_draws: (timestep, noise, probe) draws per example for the ``ggn`` kernel (timesteps drawn by
            ``timestep_strategy`` over ``timestep_range``); each draw is a featurizer row of its own, so this costs
            ``kernel_draws`` single-draw rows per example (docs/speed.md).
    """

    num_timesteps: int = 100
    timestep_strategy: str = "stratified"
    proj_dim: int = 2048
    projector: str = "auto"
    output: str = "loss"
    seed: int = 0
    batch_size: int = 16
    method: str = "auto"
    timestep_range: Optional[Tuple[int, int]] = field(default=None, metadata=ADDED_LATER)
    #: settings saved before ``auto`` existed meant ``all`` (then the default, left out when saving): ``all`` is still
    #: left out, so that they resume; ``auto`` is resolved before saving, and left out of the dicts of settings that
    #: are never featurized as they are (the evaluations' configs), where it means ``all``
    params: str = field(default="auto", metadata={"absent": "all", "omit_when": "all", "omit_also": ("auto",)})
    #: settings saved before it existed meant ``features``: that value is left out when saving, so they resume
    kernel: str = field(default="ggn", metadata={"absent": "features", "omit_when": "features"})
    kernel_draws: int = field(default=32, metadata=ADDED_LATER)
    #: bytes a featurizer's passes may hold at their peak, the model included (``--max-memory``); None: what is free
    #: when the run starts, measured, plus the model. Rows per pass follow it (results equal within float rounding);
    #: never saved with the settings, so a store resumes under another budget
    max_memory: Optional[int] = field(default=None, metadata={"never_saved": True})

    def __post_init__(self):
        if self.max_memory is not None:
            self.max_memory = check_int("max_memory", self.max_memory, 1)
        if self.kernel not in KERNELS:
            raise InputError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        self.kernel_draws = check_int("kernel_draws", self.kernel_draws, 1)
        if self.params not in PARAM_SELECTIONS:
            raise InputError(f"params must be one of {', '.join(PARAM_SELECTIONS)}, got {self.params!r}")
        if self.timestep_range is not None:
            lo, hi = (int(v) for v in self.timestep_range)
            if not 0 <= lo <= hi:
                raise InputError(f"timestep_range must be (lo, hi) with 0 <= lo <= hi, got {self.timestep_range}")
            self.timestep_range = (lo, hi)
        if self.timestep_strategy not in TIMESTEP_STRATEGIES:
            raise InputError(f"timestep_strategy must be one of {TIMESTEP_STRATEGIES}, got {self.timestep_strategy!r}")
        check_output("output", self.output)
        self.num_timesteps = check_int("num_timesteps", self.num_timesteps, 1)
        self.proj_dim = check_int("proj_dim", self.proj_dim, 1)
        self.batch_size = check_int("batch_size", self.batch_size, 1)
        self.seed = check_int("seed", self.seed, 0, SEED_MAX)
        if self.method == "auto":  # fast, unless a dense projector was asked for by name
            self.method = "vmap" if self.projector in ("torch", "fast_jl") else "fast"
        if self.method not in FEATURIZE_METHODS:
            raise InputError(f"method must be one of {FEATURIZE_METHODS}, got {self.method!r}")


@dataclass
class ScoreArgs:
    """How targets are scored.

    Attributes:
        num_noises: R, fresh noises per target step; the target output at step t is the mean
            over R noises of the output function of x̂0_t at timestep t.
        ridge: relative ridge; the absolute ``λ = ridge · tr(K)/k`` per checkpoint (``K`` the kernel, see
            ``FeaturizeArgs.kernel``), invariant to the scale of the features. The default 0.1 (λ = a tenth of
            the kernel's mean eigenvalue) was picked for the GGN kernel from a fixed grid on the selection half
            of the ``fmnist-power`` models (0…31) and not changed on any other data; the paper's preset uses
            0.01 with ``ΦᵀΦ``.
        target_output: output function for targets (default: same as featurization).
        seed: seeds the target noises.
        block_size: training rows per block when streaming scores.
        top_k: proponents/opponents saved per step.
        destination_draws: D, the (timestep, noise) pairs of the *destination* target: the final image's
            output averaged over D timesteps stratified over the whole range
            (:func:`diffusion_trak.targets.destination_target_features`), scored beside the per-step
            rows (``Scores.destination``). 0 = no destination row.
    """

    num_noises: int = 20
    ridge: float = 0.1
    target_output: Optional[str] = None
    seed: int = 1
    block_size: int = 4096
    top_k: int = 8
    destination_draws: int = field(default=100, metadata=ADDED_LATER)

    def __post_init__(self):
        if self.target_output is not None:
            check_output("target_output", self.target_output)
        self.num_noises = check_int("num_noises", self.num_noises, 1)
        self.ridge = check_float("ridge", self.ridge, 0.0, lo_open=True)
        self.seed = check_int("seed", self.seed, 0, SEED_MAX)
        self.block_size = check_int("block_size", self.block_size, 1)
        self.top_k = check_int("top_k", self.top_k, 1)
        self.destination_draws = check_int("destination_draws", self.destination_draws, 0)


#: Named estimators: ``default`` (this library's defaults, chosen on the ``fmnist-power`` benchmark) and
#: ``paper`` (journey-TRAK's recipe: the loss, T = 10 uniformly drawn timesteps per example, a small ridge).
PRESETS = ("default", "paper")


def preset(name: str) -> Tuple["FeaturizeArgs", "ScoreArgs"]:
    """``(FeaturizeArgs, ScoreArgs)`` of a named estimator (:data:`PRESETS`); fields can be changed
    afterwards with ``dataclasses.replace``. Both presets use the fast featurizer (a CountSketch instead
    of the paper's dense JL matrix: the same inner-product variance); ``method="vmap", projector="torch"``
    gives the paper's dense projection."""
    if name == "default":
        return FeaturizeArgs(), ScoreArgs()
    if name == "paper":
        return (FeaturizeArgs(num_timesteps=10, timestep_strategy="uniform", output="loss", kernel="features"),
                ScoreArgs(ridge=0.01))
    raise InputError(f"unknown preset {name!r}; choose one of {PRESETS}")
