"""Per-step targets: the output whose change attribution explains.

At recorded step ``s`` of a generated trajectory (scheduler timestep ``t_s``), the target is
``(1/R) Σ_r f(θ; x̂0_s, t_s, ε_r)``: the output function (default: the denoising loss) of the
predicted clean image x̂0_s re-noised to timestep ``t_s`` with R fresh noises (journey-TRAK).
Real images given as targets use the same formula with ``x0`` the image and a chosen timestep.
The noises are a function of ``(seed, step, target)`` only, so targets are reproducible and do not
depend on how they are batched: every function here puts all (step, target, noise) triples it is
given into ONE call of the featurizer, which bounds its own memory (the fast path by rows, ``vmap``
by ``batch_size`` examples).

The *destination* target of a final image (:func:`destination_target_features`) averages the output
over many (timestep, noise) pairs spread over the whole range of timesteps instead of one step's.

What is attributed is a :class:`TargetSet` (steps of a trajectory, or real images at timesteps, with
their final images); :func:`all_target_features` is the one computation of its target features, per-step
and destination, for one featurizer (one checkpoint). :mod:`diffusion_trak.target_cache` keeps them so that
scoring, baselines and evaluations compute them once per (checkpoint, targets).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .featurize.featurizer import seed_for


def target_noises(seed: int, key: int, target: int, R: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed_for(seed, key, target, 13))
    return torch.randn(R, *shape, generator=g)


def _step_rows(x0: torch.Tensor, timesteps: Sequence[int], keys: Sequence[int], R: int, seed: int, cond, num_train_timesteps: int):
    """The featurizer rows of per-step targets: ``(x0 (S·B, C, H, W), timesteps (S·B, R), noises (S·B, R, C, H, W), cond)``."""
    S, B = x0.shape[:2]
    if len(timesteps) != S or len(keys) != S:
        raise ValueError(f"{S} steps of images but {len(timesteps)} timesteps and {len(keys)} keys")
    for t in timesteps:
        if not 0 <= int(t) < num_train_timesteps:
            raise ValueError(f"timestep {t} is outside the scheduler's 0..{num_train_timesteps - 1}")
    shape = x0.shape[2:]
    ts = torch.tensor([int(t) for t in timesteps], dtype=torch.long).reshape(S, 1, 1).expand(S, B, R).reshape(S * B, R)
    noises = torch.stack([target_noises(seed, int(key), b, R, shape) for key in keys for b in range(B)])
    c = {name: v.repeat(S, *([1] * (v.dim() - 1))) for name, v in (cond or {}).items()}  # row s·B + b gets v[b]
    return x0.reshape(S * B, *shape), ts, noises, c


def features_at_steps(featurizer, x0: torch.Tensor, timesteps: Sequence[int], keys: Sequence[int], R: int, seed: int,
                      output: Optional[str] = None, cond: Optional[dict] = None) -> torch.Tensor:
    """Projected target gradients of ``x0`` (S, B, C, H, W) at one timestep per step: (S, B, k).

    Step ``s`` uses ``timesteps[s]`` and the noises of key ``keys[s]`` (target ``b`` of that step gets
    :func:`target_noises` ``(seed, keys[s], b)``); ``cond`` holds per-target tensors with leading dim B.
    The S · B targets, R noises each, go through the featurizer in one call."""
    S, B = x0.shape[:2]
    xs, ts, noises, c = _step_rows(x0, timesteps, keys, R, seed, cond, featurizer.num_train_timesteps)
    return featurizer.features(xs, ts, noises, c or None, output).reshape(S, B, -1)


def target_features(featurizer, x0: torch.Tensor, timestep: int, R: int, seed: int, key: int = 0,
                    output: Optional[str] = None, cond: Optional[dict] = None) -> torch.Tensor:
    """Projected target gradients for a batch of clean images ``x0`` (B, C, H, W) at one timestep: (B, k)."""
    return features_at_steps(featurizer, x0.unsqueeze(0), [timestep], [key], R, seed, output, cond)[0]


def image_target_features(featurizer, images: torch.Tensor, timesteps: Sequence[int], R: int, seed: int,
                          output: Optional[str] = None, cond: Optional[dict] = None) -> torch.Tensor:
    """Real ``images`` (B, C, H, W) as targets at each of ``timesteps`` (noise key = the timestep): (S, B, k);
    equal to stacking :func:`target_features` ``(..., t, key=t)`` over the timesteps."""
    targets = TargetSet.from_images(images, range(len(timesteps)), timesteps)
    return all_target_features(featurizer, targets, R, seed, output, cond).steps


def trajectory_target_features(featurizer, trajectory, steps: Sequence[int], R: int, seed: int,
                               output: Optional[str] = None, cond: Optional[dict] = None) -> torch.Tensor:
    """Target features for every requested step of a trajectory: (S, B, k), the noises of step ``s``
    keyed by ``s``.

    Raises ``ValueError`` naming the recorded steps if a step was not recorded."""
    return all_target_features(featurizer, TargetSet.from_trajectory(trajectory, steps), R, seed, output, cond).steps


def destination_draws(seed: int, target: int, D: int, num_train_timesteps: int, shape):
    """The ``D`` (timestep, noise) pairs of target ``target``'s destination: timesteps stratified over the
    whole range ``0..num_train_timesteps-1`` (one uniform draw in each of D equal bins), noises fresh; a
    function of ``(seed, target)`` only."""
    from .featurize.featurizer import sample_timesteps

    g = torch.Generator().manual_seed(seed_for(seed, target, 17))
    t = sample_timesteps("stratified", D, num_train_timesteps, g)
    return t, torch.randn(D, *shape, generator=g)


def _destination_rows(images: torch.Tensor, D: int, seed: int, num_train_timesteps: int):
    """The featurizer rows of destination targets: ``(timesteps (B, D), noises (B, D, C, H, W))``."""
    if D < 1:
        raise ValueError(f"destination draws must be at least 1, got {D}")
    draws = [destination_draws(seed, b, D, num_train_timesteps, images.shape[1:]) for b in range(images.shape[0])]
    return torch.stack([d[0] for d in draws]), torch.stack([d[1] for d in draws])


def destination_target_features(featurizer, images: torch.Tensor, D: int, seed: int, output: Optional[str] = None,
                                cond: Optional[dict] = None) -> torch.Tensor:
    """The *destination* target of final images ``(B, C, H, W)``: ``(1/D) Σ_j f(θ; x0, t_j, ε_j)`` with the
    ``D`` timesteps spread over the whole range (:func:`destination_draws`), projected: (B, k).

    A per-step target asks what decided the image at step ``s``; the destination asks which training
    images make the model explain the final image at every noise level, like the denoising loss that
    training lowers. (The last step's per-step target, x̂0 re-noised to t ≈ 0, carries almost no signal.)"""
    ts, noises = _destination_rows(images, D, seed, featurizer.num_train_timesteps)
    return featurizer.features(images, ts, noises, cond, output)


def _split_rows(x0, ts, noises, cond, g: int):
    """Rows of ``T`` draws each as ``T/g`` rows of ``g`` draws (consecutive); the mean of a row's ``T/g`` parts'
    features is the row's feature (every feature is the mean of its rows' draws)."""
    n, T = ts.shape
    parts = T // g
    rep = lambda v: v.repeat_interleave(parts, dim=0)  # noqa: E731
    return (rep(x0), ts.reshape(n * parts, g), noises.reshape(n * parts, g, *noises.shape[2:]),
            {name: rep(v) for name, v in (cond or {}).items()})


def digest(*parts) -> str:
    """A short sha256 of tensors (their float bytes as given) and other values (their repr), in order."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.detach().cpu().contiguous().numpy().tobytes() if isinstance(p, torch.Tensor) else repr(p).encode())
    return h.hexdigest()[:16]


@dataclass
class TargetSet:
    """What is attributed (and, in the evaluations, measured): ``B`` targets at ``S`` steps.

    Attributes:
        name: e.g. ``generated`` or ``heldout``.
        steps: step indices (the columns of scores and tables).
        timesteps: the scheduler timestep ``t_s`` of each step.
        x0_by_step: ``(S, B, C, H, W)``: the clean image whose output at ``t_s`` is the target (``x̂0_s`` of a
            generated trajectory, the image itself for a real one).
        final: ``(B, C, H, W)``: the final image (the generated sample, or the real image): the destination.
        class_labels: optional ``(B,)`` labels of a class-conditional model's targets.
        keys: the noise key of each step (:func:`target_noises`): the step index for a trajectory, the
            timestep for real images; default ``steps``.
    """

    name: str
    steps: List[int]
    timesteps: List[int]
    x0_by_step: torch.Tensor
    final: torch.Tensor
    class_labels: Optional[torch.Tensor] = None
    keys: Optional[List[int]] = None

    def __post_init__(self):
        if self.keys is None:
            self.keys = list(self.steps)

    @property
    def num_targets(self) -> int:
        return int(self.final.shape[0])

    @classmethod
    def from_trajectory(cls, traj, steps: Sequence[int], name: str = "generated") -> "TargetSet":
        """Recorded ``steps`` of ``traj`` (``ValueError`` naming the recorded steps if one was not recorded)."""
        steps = [int(s) for s in steps]
        return cls(name, steps, [traj.timestep_at(s) for s in steps], torch.stack([traj.x0_pred_at(s) for s in steps]),
                   traj.final.clone(), traj.class_labels)

    @classmethod
    def from_images(cls, images: torch.Tensor, steps: Sequence[int], timesteps: Sequence[int], name: str = "heldout",
                    class_labels=None) -> "TargetSet":
        """Real ``images`` (B, C, H, W) as targets at ``timesteps``, one per step (noises keyed by the timestep)."""
        images = torch.as_tensor(images, dtype=torch.float32)
        timesteps = [int(t) for t in timesteps]
        return cls(name, [int(s) for s in steps], timesteps, images.unsqueeze(0).expand(len(timesteps), *images.shape).clone(),
                   images.clone(), class_labels, keys=timesteps)

    def step_digest(self) -> str:
        """A digest of what the per-step target features depend on (images, timesteps, noise keys)."""
        return digest(self.x0_by_step.float(), [int(t) for t in self.timesteps], [int(k) for k in self.keys])

    def final_digest(self) -> str:
        """A digest of the final images (what the destination target depends on)."""
        return digest(self.final.float())


@dataclass
class TargetFeatures:
    """Target features of one checkpoint: ``steps`` (S, B, k) and ``destination`` (B, k) or None."""

    steps: torch.Tensor
    destination: Optional[torch.Tensor] = None


def all_target_features(featurizer, targets: TargetSet, R: int, seed: int, output: Optional[str] = None,
                        cond: Optional[dict] = None, destination_draws: int = 0) -> TargetFeatures:
    """Every target feature of ``targets`` for one featurizer: the per-step targets (R noises each) and, with
    ``destination_draws = D > 0``, the destination of the final images (:func:`destination_target_features`).

    All of it is ONE featurizer call, so a trajectory's steps and its destination share the batched passes:
    with ``g = gcd(R, D)``, each step target is ``R/g`` rows of ``g`` (timestep, noise) pairs and each destination
    ``D/g`` such rows, and a target's feature is the mean of its rows' (every row's feature is the mean of its
    ``g`` draws, so this is the mean over all of the target's draws). The draws are those of
    :func:`features_at_steps` and :func:`destination_target_features`."""
    S, B = targets.x0_by_step.shape[:2]
    n_t = featurizer.num_train_timesteps
    xs, ts, noises, c = _step_rows(targets.x0_by_step, [int(t) for t in targets.timesteps], targets.keys, R, seed,
                                   cond, n_t)
    if destination_draws <= 0:
        return TargetFeatures(featurizer.features(xs, ts, noises, c or None, output).reshape(S, B, -1), None)
    final = targets.final.float()
    d_ts, d_noises = _destination_rows(final, destination_draws, seed, n_t)
    g = math.gcd(R, destination_draws)
    rows = [_split_rows(xs, ts, noises, c, g), _split_rows(final, d_ts, d_noises, cond, g)]
    feats = featurizer.features(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]),
                                torch.cat([r[2] for r in rows]),
                                {name: torch.cat([r[3][name] for r in rows]) for name in (cond or {})} or None, output)
    n_steps = S * B * (R // g)
    steps = feats[:n_steps].reshape(S * B, R // g, -1).mean(1).reshape(S, B, -1)
    dest = feats[n_steps:].reshape(B, destination_draws // g, -1).mean(1)
    return TargetFeatures(steps, dest)
