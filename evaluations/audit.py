"""Retrain without the top-k proponents of a step, regenerate from that step, measure the change.

For a generated target ``b`` and a step ``s`` of its recorded trajectory:

1. remove the ``k`` training examples with the highest scores at step ``s`` (``k`` a count, or a
   fraction of the training set when ``0 < k < 1``), and, as the control, ``k`` examples drawn at
   random. A random removal does not depend on the target or the step, so each of the
   ``random_draws`` random models (seeded by k and the draw) is shared: it regenerates every
   target from every audited step, and each target's control is the mean over all the draws;
2. retrain with the attributed model's recipe and seed on what is left. ``mode="masked"`` (default)
   replays the attributed model's own training run (same initialisation, batch order, timesteps
   and noises, same number of steps) with the removed examples weighted 0, so the counterfactual
   differs from the original *only* by the removal; ``mode="retrain"`` trains from scratch on the
   remaining subset with :func:`~diffusion_trak.train.train_ddpm`'s recipe, which also reshuffles
   every batch and so adds the chaos of SGD to the effect of the removal;
3. restart the recorded trajectory at step ``s`` with the retrained UNet: same ``x_t``, same
   injected noise at every later step (:class:`pipelines.TrajectoryPipeline` ``start_from``);
4. measure how far the new final image is from the original one, in pixel L2 (on images clamped to
   [-1, 1]) and in the embedding space of :func:`evaluations.baselines.train_encoder`'s encoder.

If attribution finds the examples that matter for the step, removing them moves the image more than
removing the same number of random examples. Because SGD is chaotic, even random removal changes the
model, so the comparison is made target by target and reported as a distribution (quartiles and
the fraction of targets where top-k moved the image more than the mean of its random draws), not
only as a mean.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusion_trak.featurize.featurizer import seed_for
from diffusion_trak.store import write_json_atomic

from .folder import AuditFolder
from .metrics import l2_distance, quartiles
from .retrain import final_checkpoint, train_models

MODES = ("masked", "retrain")


def resolve_k(k, n: int) -> int:
    """A count (``k ≥ 1``) or a fraction of ``n`` (``0 < k < 1``), as an int in ``1..n-1``."""
    k = float(k)
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    kk = int(round(k * n)) if k < 1 else int(k)
    if not 1 <= kk < n:
        raise ValueError(f"k={k} removes {kk} of {n} examples; choose 1 ≤ k < n")
    return kk


def removed_positions(scores_row, k: int, kind: str, seed: int) -> np.ndarray:
    """Sorted training positions removed: the ``k`` highest scores, or ``k`` random ones."""
    s = np.asarray(scores_row)
    if kind == "top":
        return np.sort(np.argsort(-s, kind="stable")[:k])
    if kind == "random":
        return np.sort(np.random.default_rng(seed).choice(s.shape[0], size=k, replace=False))
    raise ValueError(f"unknown removal kind {kind!r}; use top or random")


@dataclass
class Case:
    """One retrained model: the training set without ``removed``. A top-k case belongs to one
    (``step``, ``target``); a random control (``step`` and ``target`` None) serves every target and step."""
    step: Optional[int]
    target: Optional[int]
    k: int
    kind: str
    removed: np.ndarray
    label: str = ""   # names the scores behind a top-k case, so audits of several estimators share a folder
    draw: int = 0     # which random control (0, 1, ...); always 0 for top-k

    @property
    def name(self) -> str:
        if self.kind == "random":
            return f"k{self.k}-random{self.draw}"
        tag = f"-{self.label}" if self.label else ""
        return f"s{self.step:04d}-b{self.target:03d}-k{self.k}-top{tag}"

    @classmethod
    def from_row(cls, row: dict, label: str = "") -> "Case":
        """The case behind a row of ``audit-MODE.json``'s ``cases``."""
        shared = row["kind"] == "random"
        return cls(None if shared else row["step"], None if shared else row["target"], row["k"], row["kind"],
                   np.asarray(row["removed"]), label, row.get("draw", 0))

    def image_file(self, regen_dir: str, step: int) -> str:
        """Cache of what this case's model regenerates from ``step``: the target's image for a top-k
        case, the whole batch for a random control."""
        if self.kind == "top":
            return os.path.join(regen_dir, f"{self.name}.npy")
        return os.path.join(regen_dir, f"{self.name}-s{step:04d}.npy")

    def image(self, regen_dir: str, step: int, target: int) -> np.ndarray:
        x = np.load(self.image_file(regen_dir, step))
        return x if self.kind == "top" else x[target]


def random_seed(seed: int, k: int, draw: int) -> int:
    """Seed of the random control ``draw`` for ``k`` removed examples."""
    return seed_for(seed, k, 47, draw)


def plan(scores_by_step: Dict[int, np.ndarray], targets: Sequence[int], ks: Sequence, n: int, seed: int = 0,
         label: str = "", random_draws: int = 1) -> List[Case]:
    """Every (step, target, k) top-k case, then ``random_draws`` random controls per k.
    ``scores_by_step[s]`` is ``(B, n)``. The random controls depend on neither the scores nor the
    target nor the step, so they serve every target and step, and audits of several estimators
    (``label``) in one folder share them."""
    if random_draws < 1:
        raise ValueError(f"random_draws must be at least 1, got {random_draws}")
    cases = []
    kks = list(dict.fromkeys(resolve_k(k, n) for k in ks))
    for s, sc in scores_by_step.items():
        for b in targets:
            for kk in kks:
                cases.append(Case(int(s), int(b), kk, "top", removed_positions(sc[b], kk, "top", 0), label))
    for kk in kks:
        for r in range(random_draws):
            cases.append(Case(None, None, kk, "random", removed_positions(np.zeros(n), kk, "random",
                                                                          random_seed(seed, kk, r)), label, r))
    return cases


def regenerate(checkpoint, trajectory, step: int, device="cpu") -> torch.Tensor:
    """Final images of the whole trajectory batch restarted at ``step`` with ``checkpoint``'s UNet
    (a checkpoint folder, or its loaded ``(unet, scheduler)``)."""
    from diffusion_trak.train import load_checkpoint
    from diffusion_trak.pipelines import TrajectoryPipeline

    unet, sched = load_checkpoint(checkpoint, device) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    out = TrajectoryPipeline(unet, sched)(start_from=trajectory, start_step=int(step), record_steps=[],
                                          show_progress=False)
    return out.images.detach().float().cpu()


def run_audit(dataset, args, trajectory, attributed_checkpoint, scores_by_step: Dict[int, np.ndarray],
              targets: Sequence[int], ks: Sequence, out_dir: str, encoder=None, seed: int = 0,
              method: str = "auto", stack_size: int = 16, device="cpu", progress: bool = True,
              mode: str = "masked", label: str = "", random_draws: int = 8) -> dict:
    """Plan, retrain (resumable), regenerate (cached) and measure every case in ``out_dir`` (the layout of
    :class:`~evaluations.folder.AuditFolder`); write ``audit-MODE.json`` (``audit-MODE-LABEL.json`` for the
    scores named ``label``). ``random_draws`` random-removal models per k serve as the control of every
    target and step. ``attributed_checkpoint``: the attributed model's folder, or its loaded ``(unet, scheduler)``."""
    if mode not in MODES:
        raise ValueError(f"unknown audit mode {mode!r}; choose one of {MODES}")
    from diffusion_trak.train import load_checkpoint

    from .baselines import embedding_distance

    n = len(dataset)
    folder = AuditFolder(out_dir)
    cases = plan(scores_by_step, targets, ks, n, seed, label, random_draws)
    os.makedirs(out_dir, exist_ok=True)
    masks = np.ones((len(cases), n), dtype=bool)
    for j, c in enumerate(cases):
        masks[j, c.removed] = False
    names = [c.name for c in cases]
    run_dirs = train_models(dataset, args, masks, folder.models(mode), [args.seed] * len(cases),
                            method="stacked" if mode == "masked" else method, stack_size=stack_size, device=device,
                            progress=progress, names=names, masked=(mode == "masked"))
    original = trajectory.final.float().clamp(-1, 1)
    steps = sorted(int(st) for st in scores_by_step)
    # the restart with the attributed model itself must give back the original image
    check_path = folder.restart_check
    checked = {}
    if os.path.exists(check_path):
        with open(check_path) as f:
            checked = json.load(f).get("by_step", {})
    attributed = None  # loaded once, when a step is still unchecked
    for st in steps:
        if str(st) not in checked:
            attributed = attributed or (load_checkpoint(attributed_checkpoint, device)
                                        if isinstance(attributed_checkpoint, (str, os.PathLike)) else attributed_checkpoint)
            regen = regenerate(attributed, trajectory, st, device).clamp(-1, 1)
            checked[str(st)] = float((regen - original).abs().max())
            write_json_atomic(check_path, {"by_step": checked})
    restart_err = max(checked[str(st)] for st in steps)
    regen_dir = folder.regenerated(mode)
    os.makedirs(regen_dir, exist_ok=True)
    # (case, step, target) measured: a top-k case at its own step and target, a random control at all of them
    measured = [(j, st, b) for j, c in enumerate(cases)
                for st, b in ([(c.step, c.target)] if c.kind == "top" else [(st, b) for st in steps for b in targets])]
    jobs = list(dict.fromkeys((j, st) for j, st, _ in measured))  # one regeneration per (case, step)
    model = {}  # the case's model, loaded once for all its steps (jobs of a case are adjacent)
    for j, st in tqdm(jobs, desc="regenerate", disable=not progress):
        c = cases[j]
        path = c.image_file(regen_dir, st)
        if not os.path.exists(path):
            if j not in model:
                model = {j: load_checkpoint(final_checkpoint(run_dirs[j], args), device)}
            img = regenerate(model[j], trajectory, st, device).clamp(-1, 1).numpy()
            np.save(path + ".tmp.npy", img[c.target] if c.kind == "top" else img)
            os.replace(path + ".tmp.npy", path)
    rows = []
    for j, st, b in measured:
        c = cases[j]
        new = c.image(regen_dir, st, b)[None]
        ref = original[b:b + 1].numpy()
        row = {"step": st, "timestep": trajectory.timestep_at(st), "target": b, "k": c.k,
               "kind": c.kind, "draw": c.draw, "removed": c.removed.tolist(), "pixel_l2": float(l2_distance(new, ref)[0])}
        if encoder is not None:
            row["embedding_l2"] = float(embedding_distance(encoder, new, ref)[0])
        rows.append(row)
    result = {"mode": mode, "cases": rows, "summary": summarize(rows), "restart_check_max_abs": restart_err}
    write_json_atomic(folder.result(mode, label), result)
    return result


def summarize(rows: Sequence[dict]) -> List[dict]:
    """Per (step, k, distance): quartiles over targets of the top-k removal's distance and of the random
    removals' (all draws pooled: the distribution of the control), and the paired comparison of each
    target's top-k distance with the mean of its random draws: the fraction of targets where top-k moved
    the image more, the median difference and a one-sided Wilcoxon signed-rank p-value."""
    from scipy.stats import wilcoxon

    out = []
    keys = sorted({(r["step"], r["k"]) for r in rows})
    metrics = [m for m in ("pixel_l2", "embedding_l2") if all(m in r for r in rows)]
    for step, k in keys:
        mine = [r for r in rows if r["step"] == step and r["k"] == k]
        top = {r["target"]: r for r in mine if r["kind"] == "top"}
        rnd: Dict[int, list] = {}
        for r in mine:
            if r["kind"] == "random":
                rnd.setdefault(r["target"], []).append(r)
        common = sorted(set(top) & set(rnd))
        for m in metrics:
            t = np.array([top[b][m] for b in common])
            pooled = np.array([r[m] for b in common for r in rnd[b]])
            control = np.array([np.mean([r[m] for r in rnd[b]]) for b in common])
            diff = t - control
            try:
                p = float(wilcoxon(t, control, alternative="greater").pvalue) if len(common) > 1 and np.any(diff != 0) else float("nan")
            except ValueError:
                p = float("nan")
            out.append({"step": step, "timestep": mine[0]["timestep"], "k": k, "metric": m,
                        "num_targets": len(common), "random_draws": min((len(rnd[b]) for b in common), default=0),
                        "top_quartiles": quartiles(t), "random_quartiles": quartiles(pooled),
                        "top_wins": float((diff > 0).mean()) if len(common) else float("nan"),
                        "median_difference": float(np.median(diff)) if len(common) else float("nan"),
                        "difference_quartiles": quartiles(diff),
                        "wilcoxon_p_greater": p})
    return out
