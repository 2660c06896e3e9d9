"""Measured per-step outputs of retrained models: the ground truth that LDS correlates scores with.

For a target ``b`` and a step ``s`` of the sampling trajectory (scheduler timestep ``t_s``), every
retrained model ``θ_m`` is measured with *common random numbers*: the same timesteps and noises for
every model, so differences between models come from their weights, not from the draws.

Two outputs (``OUTPUT_KINDS``):

``xhat0_loss`` (the paper's, journey-TRAK): the denoising loss of the ORIGINAL model's predicted
    clean image ``x̂0_s`` at the same timestep ``t_s``, averaged over ``R`` noises::

        y_m(b, s) = (1/R) Σ_r ‖ε̂_θm(√ᾱ_ts x̂0_s + √(1−ᾱ_ts) ε_r, t_s) − ε_r‖² / d

    For a real image (held-out target) ``x̂0_s`` is the image itself.
``final_loss_le_t``: the denoising loss of the FINAL image ``x_0`` (the generated sample, or the real
    image) restricted to timesteps at or below ``t_s``, averaged over ``K`` (timestep, noise) pairs with
    the timesteps stratified over ``0..t_s``::

        y_m(b, s) = (1/K) Σ_j ‖ε̂_θm(√ᾱ_τj x_0 + √(1−ᾱ_τj) ε_j, τ_j) − ε_j‖² / d,   τ_j ∈ [0, t_s]

    i.e. how well the model explains the rest of the journey from step ``s`` to the final image.

Both are measured twice, on two independent halves of draws (``half`` 0 and 1). The LDS uses their
average; the noise ceiling is :func:`evaluations.metrics.split_half`
of the two halves (the correlation over models of two independent measurements of the same quantity).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusion_trak.featurize.featurizer import seed_for
from diffusion_trak.outputs import output_value
from diffusion_trak.store import Store
from diffusion_trak.targets import TargetSet  # noqa: F401 (what is measured; re-exported)

OUTPUT_KINDS = ("xhat0_loss", "final_loss_le_t")


def draws(kind: str, seed: int, half: int, step_pos: int, target: int, timestep: int, n: int, shape):
    """``(timesteps (n,), noises (n, C, H, W))`` of one (half, step, target): common to every model."""
    g = torch.Generator().manual_seed(seed_for(seed, OUTPUT_KINDS.index(kind), half, step_pos, target, 31))
    if kind == "xhat0_loss":
        t = torch.full((n,), int(timestep), dtype=torch.long)
    else:  # stratified over 0..timestep
        edges = torch.linspace(0, int(timestep) + 1, n + 1)
        u = torch.rand(n, generator=g)
        t = (edges[:-1] + u * (edges[1:] - edges[:-1])).floor().long().clamp(0, int(timestep))
        t = t[torch.randperm(n, generator=g)]
    noise = torch.randn(n, *shape, generator=g)
    return t, noise


@torch.no_grad()
def measure(unet, scheduler, targets: TargetSet, kind: str, n: int, seed: int, batch_size: int = 512,
            device="cpu") -> np.ndarray:
    """``(2, S, B)``: the output ``kind`` of ``unet`` for every (half, step, target), each the mean over
    ``n`` draws (see the module docstring)."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown ground-truth output {kind!r}; choose one of {OUTPUT_KINDS}")
    unet = unet.to(device).eval()
    S, B = len(targets.steps), targets.num_targets
    shape = tuple(targets.final.shape[1:])
    xs, ts, ns, labels, slots = [], [], [], [], []
    for half in range(2):
        for si, tstep in enumerate(targets.timesteps):
            for b in range(B):
                t, noise = draws(kind, seed, half, si, b, tstep, n, shape)
                x0 = targets.x0_by_step[si, b] if kind == "xhat0_loss" else targets.final[b]
                xs.append(x0.unsqueeze(0).expand(n, *shape))
                ts.append(t)
                ns.append(noise)
                if targets.class_labels is not None:
                    labels.append(torch.full((n,), int(targets.class_labels[b]), dtype=torch.long))
                slots.append((half, si, b))
    X, Tt, N = torch.cat(xs), torch.cat(ts), torch.cat(ns)
    L = torch.cat(labels) if labels else None
    vals = torch.empty(X.shape[0])
    for i in range(0, X.shape[0], batch_size):
        cond = {"class_labels": L[i:i + batch_size].to(device)} if L is not None else None
        vals[i:i + batch_size] = output_value(unet, scheduler, X[i:i + batch_size].to(device), Tt[i:i + batch_size].to(device),
                                              N[i:i + batch_size].to(device), "loss", cond).float().cpu()
    out = np.zeros((2, S, B), dtype=np.float64)
    per = vals.reshape(len(slots), n).mean(1).numpy()
    for (half, si, b), v in zip(slots, per):
        out[half, si, b] = v
    return out


@dataclass
class GroundTruthJob:
    """One ground-truth store: what is measured (``targets``, ``kinds``, draws per kind, ``seed``) and where
    (``out``, with ``settings`` recorded beside the draws)."""

    targets: TargetSet
    kinds: Sequence[str]
    n_by_kind: dict
    seed: int
    out: str
    settings: dict


def measure_all(checkpoints: Sequence[str], jobs: Sequence[GroundTruthJob], device="cpu", progress: bool = True,
                batch_size: int = 512) -> List[dict]:
    """Measure every model (checkpoint folder) for every job, each job into its resumable store, loading each
    model once. Returns, per job, ``{kind: (M, 2, S, B) array}``. Rows (models) already measured are skipped."""
    from diffusion_trak.train import load_checkpoint

    M = len(checkpoints)
    opened = []
    for j in jobs:
        S, B = len(j.targets.steps), j.targets.num_targets
        store = Store(j.out, {**j.settings, "kinds": list(j.kinds), "n": {k: int(j.n_by_kind[k]) for k in j.kinds},
                              "seed": j.seed, "targets": j.targets.name, "steps": j.targets.steps,
                              "timesteps": j.targets.timesteps, "num_models": M})
        opened.append((j, {k: store.array(f"{j.targets.name}_{k}", (M, 2 * S * B), "float64") for k in j.kinds}, S, B))
    todo = sorted(set().union(*[set(a.pending().tolist()) for _, arrays, _, _ in opened for a in arrays.values()]))
    names = ", ".join(j.targets.name for j in jobs)
    for m in tqdm(todo, desc=f"ground truth ({names})", disable=not progress):
        unet, sched = load_checkpoint(checkpoints[m], device)
        for j, arrays, _, _ in opened:
            for k, arr in arrays.items():
                if not arr.done[m]:
                    arr.write([m], measure(unet, sched, j.targets, k, j.n_by_kind[k], j.seed, batch_size, device).reshape(1, -1))
    return [{k: np.asarray(a.read(), dtype=np.float64).reshape(M, 2, S, B) for k, a in arrays.items()}
            for _, arrays, S, B in opened]


def measure_models(checkpoints: Sequence[str], targets: TargetSet, kinds: Sequence[str], n_by_kind: dict, seed: int,
                   out: str, settings: dict, device="cpu", progress: bool = True, batch_size: int = 512) -> dict:
    """Measure every model (checkpoint folder) into a resumable store at ``out`` (:func:`measure_all` of one job).

    Returns ``{kind: (M, 2, S, B) array}``. Rows (models) already measured are skipped."""
    return measure_all(checkpoints, [GroundTruthJob(targets, kinds, n_by_kind, seed, out, settings)], device, progress,
                       batch_size)[0]
