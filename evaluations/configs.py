"""Named benchmark configurations for :mod:`evaluations.run`.

A config fixes everything a run depends on (data, the training recipe shared by the attributed
model and every retrained model, featurization and scoring settings, the harness sizes), so two runs
of the same config give the same numbers. ``config.json`` is saved in the run folder and compared on
rerun: the same config resumes, a different one refuses unless ``--overwrite``.

The featurization and scoring settings are spelled out explicitly here (rather than taken from the
library defaults, which may be retuned) so that a benchmark's meaning does not change silently.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Tuple

from diffusion_trak.config import FeaturizeArgs, ScoreArgs, TrainArgs, asdict, from_dict
from diffusion_trak.data import DataArgs
from diffusion_trak.errors import UserError

from .groundtruth import OUTPUT_KINDS

class ConfigError(UserError, ValueError):
    """A benchmark config that cannot run as given (one line, names the fix)."""


METHODS = ("random", "pixel_neg_l2", "pixel_cosine", "embedding", "grad_dot", "grad_cosine", "trak", "ekfac")
#: what a config compares unless it says otherwise (``ekfac`` needs the optional kronfluence: ``--set methods=[...]``)
DEFAULT_METHODS = METHODS[:-1]


@dataclass
class EvalConfig:
    """One benchmark.

    Attributes:
        name, description: shown in the report.
        data: the training set (attributed model and subsets).
        heldout: real images used as targets (first ``num_heldout`` of it).
        train: the recipe of the attributed model AND of every retrained model.
        featurize, score: TRAK settings (passed to ``diffusion_trak.api.featurize`` / ``score``).
        num_models, alpha, subset_seed: the LDS harness: ``M`` models on α-subsets.
        seed_mode: ``distinct`` (each subset model its own training seed) or ``shared``
            (all use ``train.seed``), see :func:`evaluations.subsets.model_seed`.
        lds_mode: how each subset model is trained. ``retrain``: from scratch on its subset (TRAK's and
            D-TRAK's LDS; training randomness differs between models unless ``seed_mode="shared"``).
            ``masked``: replay the attributed model's own training run (same seed, initialisation,
            batch order, timesteps and noises) with the examples outside the subset weighted 0, so
            models differ by their data alone (common random numbers; ``seed_mode`` is then unused).
        num_replicates: train a second model, with other training randomness, for the first ``R``
            subsets and measure its ground truth too. The correlation over subsets between the two
            replicates (per target) is the share of the output's variance that the subset explains; its
            square root bounds the LDS any attribution method can reach (the *seed ceiling*). 0 = skip.
        train_method, stack_size: how the retrained models are trained (:func:`evaluations.retrain.train_models`).
        num_generated, generation_seed, num_inference_steps: the generated targets (one DDPM batch).
        lds_steps: sampling-step indices (0 = first, ``num_inference_steps-1`` = last) evaluated.
        num_heldout: real held-out targets.
        gt_outputs: ground-truth outputs (:data:`evaluations.groundtruth.OUTPUT_KINDS`).
        gt_noises: noises per half for ``xhat0_loss``; gt_final_draws: (timestep, noise) pairs per half
            for ``final_loss_le_t``; gt_seed: their seed.
        gt_destination_draws: (timestep, noise) pairs per half for the *destination* ground truth (the final
            image's loss with timesteps stratified over the whole range), against which TRAK's destination
            row (``score.destination_draws``) and the baselines with the final image as query are compared;
            0 = no destination column.
        methods: attribution methods compared (:data:`METHODS`).
        encoder_epochs: epochs of the baseline autoencoder.
        audit_targets, audit_steps, audit_ks: retrain-without-top-k cases (k a count, or a fraction
            of the training set when < 1); audit_modes: ``masked`` (replay the attributed run with the
            removed examples weighted 0) and/or ``retrain`` (train from scratch on what is left), see
            :mod:`evaluations.audit`; audit_seed seeds the random controls; audit_random_draws: models
            trained without k random examples, per k; each regenerates every target from every audit
            step, and a target's top-k removal is compared with the mean over the draws.
        n_boot: bootstrap resamples for the confidence intervals.
        threads: ``torch.set_num_threads``.
    """

    name: str
    description: str = ""
    data: DataArgs = field(default_factory=DataArgs)
    heldout: DataArgs = field(default_factory=lambda: DataArgs(split="test"))
    train: TrainArgs = field(default_factory=TrainArgs)
    featurize: FeaturizeArgs = field(default_factory=FeaturizeArgs)
    score: ScoreArgs = field(default_factory=ScoreArgs)
    num_models: int = 64
    alpha: float = 0.5
    subset_seed: int = 0
    seed_mode: str = "distinct"
    lds_mode: str = "retrain"
    num_replicates: int = 0
    train_method: str = "auto"
    stack_size: int = 16
    num_generated: int = 16
    generation_seed: int = 1234
    num_inference_steps: int = 100
    lds_steps: Tuple[int, ...] = (0, 25, 50, 75, 99)
    num_heldout: int = 16
    gt_outputs: Tuple[str, ...] = OUTPUT_KINDS
    gt_noises: int = 16
    gt_final_draws: int = 32
    gt_seed: int = 5
    gt_destination_draws: int = 0
    methods: Tuple[str, ...] = DEFAULT_METHODS
    encoder_epochs: int = 30
    audit_targets: int = 8
    audit_steps: Tuple[int, ...] = (50,)
    audit_ks: Tuple[float, ...] = (0.1,)
    audit_modes: Tuple[str, ...] = ("masked",)
    audit_seed: int = 0
    audit_random_draws: int = 8
    n_boot: int = 1000
    threads: int = 2

    def __post_init__(self):
        self._check_numbers()
        for s in tuple(self.lds_steps) + tuple(self.audit_steps):
            if not 0 <= int(s) < self.num_inference_steps:
                raise ConfigError(f"step {s} is outside 0..{self.num_inference_steps - 1}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"unknown methods {bad}; choose from {METHODS}")
        bad = [o for o in self.gt_outputs if o not in OUTPUT_KINDS]
        if bad:
            raise ConfigError(f"unknown ground-truth outputs {bad}; choose from {OUTPUT_KINDS}")
        bad = [m for m in self.audit_modes if m not in ("masked", "retrain")]
        if bad:
            raise ConfigError(f"unknown audit modes {bad}; choose from ('masked', 'retrain')")
        if self.lds_mode not in ("retrain", "masked"):
            raise ConfigError(f"unknown lds_mode {self.lds_mode!r}; choose 'retrain' or 'masked'")
        if not 0 <= self.num_replicates <= self.num_models:
            raise ConfigError(f"num_replicates must be in 0..num_models ({self.num_models}), got {self.num_replicates}")
        if self.audit_random_draws < 1:
            raise ConfigError(f"audit_random_draws must be at least 1, got {self.audit_random_draws}")
        if self.audit_targets > self.num_generated:
            raise ConfigError("audit_targets cannot exceed num_generated; lower audit_targets")

    #: the least value of every integer setting
    INT_MINIMA = {"num_models": 2, "subset_seed": 0, "num_replicates": 0, "stack_size": 1, "num_generated": 1,
                  "generation_seed": 0, "num_inference_steps": 1, "num_heldout": 1, "gt_noises": 1, "gt_final_draws": 1,
                  "gt_seed": 0, "gt_destination_draws": 0, "encoder_epochs": 0, "audit_targets": 0, "audit_seed": 0,
                  "audit_random_draws": 1, "n_boot": 1, "threads": 1}

    def _check_numbers(self) -> None:
        """One-line :class:`ConfigError` for a number setting of the wrong type or out of range (``--set`` values
        are parsed as JSON, so ``--set num_models=abc`` arrives here as a string)."""
        from diffusion_trak.config import check_float, check_int
        from diffusion_trak.errors import InputError

        try:
            for name, lo in self.INT_MINIMA.items():
                check_int(name, getattr(self, name), lo)
            for name in ("lds_steps", "audit_steps"):
                for v in getattr(self, name):
                    check_int(f"every one of {name}", v, 0)
            for k in self.audit_ks:
                check_float("every one of audit_ks", k, 0, lo_open=True)
            alpha = check_float("alpha", self.alpha, 0, lo_open=True)
        except InputError as e:
            raise ConfigError(f"{e}; fix it in the config or with --set") from None
        if alpha >= 1:
            raise ConfigError(f"alpha (the subset fraction) must be between 0 and 1, got {alpha}; fix it in the config "
                              "or with --set")
        if self.seed_mode not in ("distinct", "shared"):
            raise ConfigError(f"unknown seed_mode {self.seed_mode!r}; choose 'distinct' or 'shared'")

    def to_dict(self) -> dict:
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, DataArgs):
                d[f.name] = v.to_dict()
            elif dataclasses.is_dataclass(v):
                d[f.name] = asdict(v)
            else:
                d[f.name] = v
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: dict) -> "EvalConfig":
        kw = dict(d)
        kw["data"] = DataArgs.from_dict(kw["data"])
        kw["heldout"] = DataArgs.from_dict(kw["heldout"])
        kw["train"] = from_dict(TrainArgs, kw["train"])
        kw["featurize"] = from_dict(FeaturizeArgs, kw["featurize"])
        kw["score"] = from_dict(ScoreArgs, kw["score"])
        for f in dataclasses.fields(cls):
            if f.name in kw and isinstance(kw[f.name], list):
                kw[f.name] = tuple(kw[f.name])
        return cls(**{k: v for k, v in kw.items() if k in {f.name for f in dataclasses.fields(cls)}})


def digits_quick() -> EvalConfig:
    """scikit-learn digits (8×8), 600 training images, 32 subset models: ~25 minutes on 2 CPU cores
    (about half of it for the 56 masked audit models: 16 targets × 3 steps of top-k removals, and 8
    random removals shared by every target and step)."""
    return EvalConfig(
        name="digits-quick",
        description="digits 8×8, 600 training images, M=32 half-subsets, 40 epochs, small UNet; CPU in minutes",
        data=DataArgs(name="digits", split="train", limit=600),
        heldout=DataArgs(name="digits", split="test", limit=16),
        train=TrainArgs(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(1,), norm_num_groups=8,
                        epochs=40, batch_size=32, learning_rate=2e-3, num_checkpoints=3, seed=0),
        featurize=FeaturizeArgs(num_timesteps=10, timestep_strategy="uniform", proj_dim=2048, projector="torch",
                                output="loss", seed=0, batch_size=16, kernel="features"),
        score=ScoreArgs(num_noises=20, ridge=1e-2, target_output="loss", seed=1),
        num_models=32, alpha=0.5, seed_mode="distinct",
        # measured on this machine: stacking 16 of these small models is ~2x faster than one at a time on CPU too
        train_method="stacked", stack_size=16,
        num_generated=16, num_inference_steps=100, lds_steps=(0, 25, 50, 75, 99), num_heldout=16,
        gt_noises=16, gt_final_draws=32,
        # 8 random removals shared by all targets and steps: with one per target, the control's median
        # moved by 0.13 between draws at step 50 (evaluations/results/digits-quick/report.md also has
        # k = 25%, which did not widen the gap)
        audit_targets=16, audit_steps=(25, 50, 75), audit_ks=(0.1,), audit_modes=("masked",), audit_random_draws=8,
        threads=1,
    )


def fmnist_2() -> EvalConfig:
    """Fashion-MNIST, two classes (T-shirt/top and ankle boot), 1000 training images at 16×16, M=64.

    Measured per-step costs on one CPU core: one model step 0.17 s, 16 stacked 4.7 s (stacking does
    not pay on CPU at this size, so ``auto`` trains one at a time there and stacks on a GPU). Estimated
    on two CPU cores: ~1 h for the 64 subset models, ~10 min ground truth, ~5 min featurization,
    ~30-50 min for the 16 masked audit models; resumable, so it can be finished across interruptions."""
    return EvalConfig(
        name="fmnist-2",
        description="Fashion-MNIST classes 0 (T-shirt/top) and 9 (ankle boot), 1000 images at 16×16, M=64 half-subsets",
        data=DataArgs(name="fmnist", split="train", classes=[0, 9], limit=1000, image_size=16),
        heldout=DataArgs(name="fmnist", split="test", classes=[0, 9], limit=16, image_size=16),
        train=TrainArgs(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(1,), norm_num_groups=8,
                        epochs=40, batch_size=64, learning_rate=2e-3, num_checkpoints=3, seed=0),
        featurize=FeaturizeArgs(num_timesteps=10, timestep_strategy="uniform", proj_dim=2048, projector="torch",
                                output="loss", seed=0, batch_size=16, kernel="features"),
        score=ScoreArgs(num_noises=20, ridge=1e-2, target_output="loss", seed=1),
        num_models=64, alpha=0.5, seed_mode="distinct",
        train_method="auto", stack_size=16,
        num_generated=16, num_inference_steps=100, lds_steps=(0, 25, 50, 75, 99), num_heldout=16,
        gt_noises=16, gt_final_draws=32,
        # 8 top-k and 8 shared random removals keep the run under 2 hours on 2 CPU cores; add draws
        # with --set audit_random_draws=16 (the run resumes and trains only the new controls)
        audit_targets=8, audit_steps=(50,), audit_ks=(0.1,), audit_modes=("masked",), audit_random_draws=8,
        threads=2,
    )


def _power(name: str, description: str, data: DataArgs, heldout: DataArgs) -> EvalConfig:
    """The benchmark with statistical power (issue 15), on any 8×8 data set of a few hundred images.

    Design, so that the retrained models differ by their data more than by their training randomness:

    - every model (attributed, subset, replicate) starts from the same initial weights (``init_seed``)
      and trains to convergence: 250 epochs of batches of 32, i.e. 2,000 optimiser steps on a half
      subset of 500 images (stacked 32 at a time);
    - the final image's ground truth (the *destination*) is its denoising loss averaged over 200
      (timestep, noise) pairs per half, timesteps stratified over the whole range, common to every model;
      the per-step ground truth is the paper's (x̂0_t's loss at t);
    - 64 subset models, 16 seed replicates (the same subsets, other shuffling and noise) for the seed
      ceiling, 64 generated and 64 held-out targets.

    TRAK here is the candidate default, fixed before the benchmark was run: the fast featurizer, T = 100
    timesteps stratified over the range, the loss output, ridge 1, R = 20 target noises and a destination
    target of 100 draws. Other estimators (the paper's among them) are measured on the same run with
    ``python -m diffusion_trak.evaluations.ablations``."""
    return EvalConfig(
        name=name, description=description, data=data, heldout=heldout,
        train=TrainArgs(block_out_channels=(16, 32, 32), layers_per_block=1, attention_levels=(1,), norm_num_groups=8,
                        epochs=250, batch_size=32, learning_rate=2e-3, num_checkpoints=3, seed=0, init_seed=0),
        featurize=FeaturizeArgs(num_timesteps=100, timestep_strategy="stratified", proj_dim=2048, projector="auto",
                                output="loss", seed=0, batch_size=16, method="fast",
                                # the estimator these runs were made with (ΦᵀΦ); the GGN kernel is measured
                                # on them by the ablations (--group choices)
                                kernel="features"),
        score=ScoreArgs(num_noises=20, ridge=1.0, target_output="loss", seed=1, destination_draws=100),
        num_models=64, alpha=0.5, seed_mode="distinct", lds_mode="retrain", num_replicates=16,
        train_method="stacked", stack_size=32,
        # EK-FAC influence (kronfluence's defaults, on the attributed model) beside TRAK: pip install ".[ekfac]"
        methods=DEFAULT_METHODS + ("ekfac",),
        num_generated=64, num_inference_steps=100, lds_steps=(10, 30, 50, 70, 90), num_heldout=64,
        gt_outputs=("xhat0_loss",), gt_noises=16, gt_final_draws=32, gt_destination_draws=200,
        audit_targets=8, audit_steps=(50,), audit_ks=(0.1,), audit_modes=("masked",), audit_random_draws=8,
        threads=2,
    )


def fmnist_power() -> EvalConfig:
    """Fashion-MNIST, all ten classes, 500 training images average-pooled to 8×8: the benchmark on which
    estimator choices are made (see :func:`_power`)."""
    return _power("fmnist-power", "Fashion-MNIST 8×8 (10 classes), 500 training images, M=64 half-subsets from one "
                  "initialisation, trained to convergence; 64 generated + 64 held-out targets",
                  DataArgs(name="fmnist", split="train", limit=500, image_size=8),
                  DataArgs(name="fmnist", split="test", limit=64, image_size=8))


def digits_power() -> EvalConfig:
    """scikit-learn digits (8×8), 500 training images: the second data set, on which nothing was tuned."""
    return _power("digits-power", "digits 8×8, 500 training images, M=64 half-subsets from one initialisation, "
                  "trained to convergence; 64 generated + 64 held-out targets (nothing tuned on it)",
                  DataArgs(name="digits", split="train", limit=500),
                  DataArgs(name="digits", split="test", limit=64))


CONFIGS = {"digits-quick": digits_quick, "fmnist-2": fmnist_2, "fmnist-power": fmnist_power,
           "digits-power": digits_power}


def get_config(name: str) -> EvalConfig:
    if name not in CONFIGS:
        raise ConfigError(f"unknown benchmark config {name!r}; choose one of {sorted(CONFIGS)}")
    return CONFIGS[name]()
