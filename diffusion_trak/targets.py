"""Per-step targets: the output whose change attribution explains.

At recorded step ``s`` of a generated trajectory (scheduler timestep ``t_s``), the target is
``(1/R) Σ_r f(θ; x̂0_s, t_s, ε_r)``: the output function (default: the denoising loss) of the
predicted clean image x̂0_s re-noised to timestep ``t_s`` with R fresh noises (journey-TRAK).
Real images given as targets use the same formula with ``x0`` the image and a chosen timestep.
The noises are a function of ``(seed, step, target)`` only, so targets are reproducible.
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
