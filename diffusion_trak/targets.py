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
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .featurize.featurizer import seed_for


def target_noises(seed: int, key: int, target: int, R: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed_for(seed, key, target, 13))
    return torch.randn(R, *shape, generator=g)


def features_at_steps(featurizer, x0: torch.Tensor, timesteps: Sequence[int], keys: Sequence[int], R: int, seed: int,
                      output: Optional[str] = None, cond: Optional[dict] = None) -> torch.Tensor:
    """Projected target gradients of ``x0`` (S, B, C, H, W) at one timestep per step: (S, B, k).

    Step ``s`` uses ``timesteps[s]`` and the noises of key ``keys[s]`` (target ``b`` of that step gets
    :func:`target_noises` ``(seed, keys[s], b)``); ``cond`` holds per-target tensors with leading dim B.
    The S · B targets, R noises each, go through the featurizer in one call."""
    S, B = x0.shape[:2]
    if len(timesteps) != S or len(keys) != S:
        raise ValueError(f"{S} steps of images but {len(timesteps)} timesteps and {len(keys)} keys")
    for t in timesteps:
        if not 0 <= int(t) < featurizer.num_train_timesteps:
            raise ValueError(f"timestep {t} is outside the scheduler's 0..{featurizer.num_train_timesteps - 1}")
    shape = x0.shape[2:]
    ts = torch.tensor([int(t) for t in timesteps], dtype=torch.long).reshape(S, 1, 1).expand(S, B, R).reshape(S * B, R)
    noises = torch.stack([target_noises(seed, int(key), b, R, shape) for key in keys for b in range(B)])
    c = {name: v.repeat(S, *([1] * (v.dim() - 1))) for name, v in (cond or {}).items()}  # row s·B + b gets v[b]
    feats = featurizer.features(x0.reshape(S * B, *shape), ts, noises, c or None, output)
    return feats.reshape(S, B, -1)


def target_features(featurizer, x0: torch.Tensor, timestep: int, R: int, seed: int, key: int = 0,
                    output: Optional[str] = None, cond: Optional[dict] = None) -> torch.Tensor:
    """Projected target gradients for a batch of clean images ``x0`` (B, C, H, W) at one timestep: (B, k)."""
    return features_at_steps(featurizer, x0.unsqueeze(0), [timestep], [key], R, seed, output, cond)[0]


def image_target_features(featurizer, images: torch.Tensor, timesteps: Sequence[int], R: int, seed: int,
                          output: Optional[str] = None, cond: Optional[dict] = None) -> torch.Tensor:
    """Real ``images`` (B, C, H, W) as targets at each of ``timesteps`` (noise key = the timestep): (S, B, k);
    equal to stacking :func:`target_features` ``(..., t, key=t)`` over the timesteps."""
    S = len(timesteps)
    x0 = images.unsqueeze(0).expand(S, *images.shape)
    return features_at_steps(featurizer, x0, list(timesteps), list(timesteps), R, seed, output, cond)


def trajectory_target_features(featurizer, trajectory, steps: Sequence[int], R: int, seed: int,
                               output: Optional[str] = None, cond: Optional[dict] = None) -> torch.Tensor:
    """Target features for every requested step of a trajectory: (S, B, k), the noises of step ``s``
    keyed by ``s``.

    Raises ``ValueError`` naming the recorded steps if a step was not recorded."""
    steps = [int(s) for s in steps]
    x0 = torch.stack([trajectory.x0_pred[trajectory.step_of(s)] for s in steps])
    return features_at_steps(featurizer, x0, [int(trajectory.timesteps[s]) for s in steps], steps, R, seed, output, cond)


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
