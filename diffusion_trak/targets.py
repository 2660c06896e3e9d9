"""Per-step targets: the output whose change attribution explains.

At recorded step ``s`` of a generated trajectory (scheduler timestep ``t_s``), the target is
``(1/R) Σ_r f(θ; x̂0_s, t_s, ε_r)``: the output function (default: the denoising loss) of the
predicted clean image x̂0_s re-noised to timestep ``t_s`` with R fresh noises (journey-TRAK).
Real images given as targets use the same formula with ``x0`` the image and a chosen timestep.
The noises are a function of ``(seed, step, target)`` only, so targets are reproducible.

The *destination* target of a final image (:func:`destination_target_features`) averages the output
over many (timestep, noise) pairs spread over the whole range of timesteps instead of one step's.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .featurize.featurizer import seed_for


def target_noises(seed: int, key: int, target: int, R: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed_for(seed, key, target, 13))
    return torch.randn(R, *shape, generator=g)


def target_features(featurizer, x0: torch.Tensor, timestep: int, R: int, seed: int, key: int = 0,
                    output: Optional[str] = None, cond: Optional[dict] = None) -> torch.Tensor:
    """Projected target gradients for a batch of clean images ``x0`` (B, C, H, W) at one timestep: (B, k)."""
    B = x0.shape[0]
    if not 0 <= int(timestep) < featurizer.num_train_timesteps:
        raise ValueError(f"timestep {timestep} is outside the scheduler's 0..{featurizer.num_train_timesteps - 1}")
    ts = torch.full((B, R), int(timestep), dtype=torch.long)
    noises = torch.stack([target_noises(seed, key, b, R, x0.shape[1:]) for b in range(B)])
    return featurizer.features(x0, ts, noises, cond, output)


def trajectory_target_features(featurizer, trajectory, steps: Sequence[int], R: int, seed: int,
                               output: Optional[str] = None, cond: Optional[dict] = None) -> torch.Tensor:
    """Target features for every requested step of a trajectory: (S, B, k).

    Raises ``ValueError`` naming the recorded steps if a step was not recorded."""
    out = []
    for step in steps:
        pos = trajectory.step_of(step)
        t = int(trajectory.timesteps[step])
        out.append(target_features(featurizer, trajectory.x0_pred[pos], t, R, seed, key=step, output=output, cond=cond))
    return torch.stack(out)


def destination_draws(seed: int, target: int, D: int, num_train_timesteps: int, shape):
    """The ``D`` (timestep, noise) pairs of target ``target``'s destination: timesteps stratified over the
    whole range ``0..num_train_timesteps-1`` (one uniform draw in each of D equal bins), noises fresh; a
    function of ``(seed, target)`` only."""
    from .featurize.featurizer import sample_timesteps

    g = torch.Generator().manual_seed(seed_for(seed, target, 17))
    t = sample_timesteps("stratified", D, num_train_timesteps, g)
    return t, torch.randn(D, *shape, generator=g)


def destination_target_features(featurizer, images: torch.Tensor, D: int, seed: int, output: Optional[str] = None,
                                cond: Optional[dict] = None) -> torch.Tensor:
    """The *destination* target of final images ``(B, C, H, W)``: ``(1/D) Σ_j f(θ; x0, t_j, ε_j)`` with the
    ``D`` timesteps spread over the whole range (:func:`destination_draws`), projected: (B, k).

    A per-step target asks what decided the image at step ``s``; the destination asks which training
    images make the model explain the final image at every noise level, like the denoising loss that
    training lowers. (The last step's per-step target, x̂0 re-noised to t ≈ 0, carries almost no signal.)"""
    if D < 1:
        raise ValueError(f"destination draws must be at least 1, got {D}")
    draws = [destination_draws(seed, b, D, featurizer.num_train_timesteps, images.shape[1:]) for b in range(images.shape[0])]
    ts = torch.stack([d[0] for d in draws])
    noises = torch.stack([d[1] for d in draws])
    return featurizer.features(images, ts, noises, cond, output)
