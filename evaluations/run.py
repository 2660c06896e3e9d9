"""Run a named counterfactual-validation benchmark end to end, resumably.

    python -m diffusion_trak.evaluations.run digits-quick --out runs/eval-digits

Stages (each skipped when its result is already in ``--out``; the folder's layout is
:class:`evaluations.folder.RunFolder`):

1. train the attributed model (``attributed/``, :func:`diffusion_trak.train.train_ddpm`);
2. sample the generated targets and record their trajectories (``trajectory.safetensors``);
3. featurize the training set and score every step with TRAK (``features/``, ``scores/``,
   :func:`diffusion_trak.api.featurize` / :func:`~diffusion_trak.api.score`); the target features are kept
   in ``target-features/`` for the baselines (:mod:`diffusion_trak.target_cache`);
4. baseline scores (``baselines/``, :mod:`evaluations.baselines`);
5. train ``M`` models on α-subsets (``subsets/``, or ``subsets-masked/`` with ``lds_mode="masked"``),
   printing the stacked-training speed-up, and ``num_replicates`` second-seed models (``replicates/``);
6. measure the ground truth of every retrained model (``groundtruth/``, ``groundtruth-replicates/``);
7. LDS of every method, step, target set and ground truth, with bootstrap CIs and the noise ceiling
   (``lds.json``);
8. retrain without the top-k proponents vs k random examples (``audit/``);
9. ``report.md`` and ``plots/``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from typing import Dict, List, Sequence

import numpy as np
import torch

from diffusion_trak.errors import UserError
from diffusion_trak.store import write_json_atomic

from .configs import ConfigError, EvalConfig, get_config
from .folder import SETS, RunFolder

METHOD_LABELS = {
    "random": "random",
    "pixel_neg_l2": "pixel −L2",
    "pixel_cosine": "pixel cosine",
    "embedding": "autoencoder embedding cosine",
    "grad_dot": "gradient dot (TracIn-like)",
    "grad_cosine": "gradient cosine",
    "trak": "TRAK (paper target)",
    "ekfac": "EK-FAC influence (kronfluence)",
}
SET_LABELS = {"generated": "generated targets", "heldout": "held-out real images"}
GT_LABELS = {"xhat0_loss": "loss of x̂0_t at t (paper)", "final_loss_le_t": "loss of the final image at timesteps ≤ t",
             "destination": "destination: loss of the final image over the whole range of timesteps"}


class ConfigMismatch(UserError):
    pass


class Timer:
    def __init__(self, path):
        self.path = path
        self.data = json.load(open(path)) if os.path.exists(path) else {}
        self.run = {}

    def stage(self, name):
        timer = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()
                print(f"[run] {name}", flush=True)

            def __exit__(self, *exc):
                dt = time.perf_counter() - self.t
                timer.run[name] = dt
                timer.data.setdefault("stages", {})
                # keep the time of the invocation that did the work (a skipped stage takes ~0 s)
                if dt > timer.data["stages"].get(name, 0.0) or name not in timer.data["stages"]:
                    timer.data["stages"][name] = dt
                write_json_atomic(timer.path, timer.data)

        return _T()


#: Settings that only add work to a run (each stage keys its own results by them), so changing them
#: resumes the run instead of refusing it.
EXTENDABLE = ("num_replicates", "audit_targets", "audit_steps", "audit_ks", "audit_modes", "audit_seed",
              "audit_random_draws", "n_boot",
              "threads", "description")


def _check_config(out: str, cfg: EvalConfig, overwrite: bool) -> None:
    path = RunFolder(out).config_file
    d = cfg.to_dict()
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        defaults = EvalConfig(name=cfg.name).to_dict()
        # a setting added to EvalConfig after the run was made reads as its default
        old = {**{k: defaults[k] for k in d if k not in old}, **old}
        keys = sorted(k for k in set(old) | set(d) if old.get(k) != d.get(k))
        if "methods" in keys and set(old["methods"]) <= set(d["methods"]):  # more methods: computed, the rest kept
            keys.remove("methods")
        if keys and not set(keys) <= set(EXTENDABLE):
            if not overwrite:
                raise ConfigMismatch(f"{out} holds a run of another config (differs in {', '.join(keys)}); "
                                     "use --overwrite to replace it or choose another --out")
            shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    write_json_atomic(path, d)


def apply_overrides(cfg: EvalConfig, overrides: List[str]) -> EvalConfig:
    """``["num_models=16", "lds_mode=masked", "audit_steps=[50]"]`` applied to ``cfg`` (values parsed as
    JSON when they are JSON, else taken as strings); nested settings as ``train.epochs=10``."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set takes key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node, parts = d, key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"unknown setting {key!r} in --set")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"unknown setting {key!r} in --set; see evaluations/configs.py for the names")
        node[parts[-1]] = value
    try:
        return EvalConfig.from_dict(d)
    except TypeError as e:
        raise ConfigError(f"bad --set value: {e}") from None


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------


def _trajectory(cfg: EvalConfig, folder: RunFolder, ckpt):
    """The generated targets' trajectories, sampled once with ``ckpt`` (the final ``(unet, scheduler)``)."""
    from diffusion_trak.pipelines import Trajectory, TrajectoryPipeline

    path = folder.trajectory
    if os.path.exists(path):
        return Trajectory.load(path)
    unet, sched = ckpt
    res = TrajectoryPipeline(unet, sched)(batch_size=cfg.num_generated, seed=cfg.generation_seed,
                                          num_inference_steps=cfg.num_inference_steps, record_steps=None,
                                          show_progress=False)
    res.trajectory.save(path)
    return Trajectory.load(path)


def _score_args(cfg: EvalConfig):
    """The run's scoring settings: with no destination ground truth (``gt_destination_draws = 0``) no
    destination row is scored either."""
    return cfg.score if cfg.gt_destination_draws else dataclasses.replace(cfg.score, destination_draws=0)


def _trak_scores(cfg, out, features, ckpts, train, heldout, traj, steps, device):
    """``({set: (S, B, N)}, {set: (B, N) destination scores or None})``, read back when already on disk."""
    from diffusion_trak.api import Scores, check_dataset, score

    args = _score_args(cfg)
    res, dest = {}, {}
    targets = {"generated": lambda: dict(trajectory=traj, steps=steps),
               "heldout": lambda: dict(images=heldout.images, image_timesteps=[traj.timestep_at(s) for s in steps])}
    for sname, kw in targets.items():
        path = RunFolder(out).scores(sname)
        sc = Scores.load(path) if os.path.exists(os.path.join(path, "scores.json")) else None
        if sc is not None:  # scores of an earlier run, checked against the training set they claim
            check_dataset(sc.meta.get("features", {}), train, f"the scores in {path}")
        if sc is None or (args.destination_draws and sc.destination is None):
            sc = score(features, ckpts, train.indices.numpy(), args, out=path, device=device, dataset=train, **kw())
        res[sname] = np.asarray(sc.values)
        dest[sname] = None if sc.destination is None else np.asarray(sc.destination)
    return res, dest


def _target_sets(traj, heldout, steps):
    """``{set: TargetSet}`` of the scored steps: the generated trajectories and the held-out images."""
    from diffusion_trak.targets import TargetSet

    return {"generated": TargetSet.from_trajectory(traj, steps),
            "heldout": TargetSet.from_images(heldout.images, steps, [traj.timestep_at(s) for s in steps])}


def _target_features(cfg, features, ckpts, heldout, traj, steps, device):
    """``({set: [(S, B, k)] per checkpoint}, {set: [(1, B, k)] per checkpoint} or None)``: the target features
    that ``api.score`` scored (per step, and the destination when the run has one), read from the run's
    target cache (:mod:`diffusion_trak.target_cache`), for the gradient-similarity baselines."""
    from diffusion_trak.target_cache import target_features_of

    args = _score_args(cfg)
    output = args.target_output or features.store.settings["featurize"]["output"]
    steps_f, dest_f = {}, {}
    for sname, ts in _target_sets(traj, heldout, steps).items():
        steps_f[sname], dest = target_features_of(features, ckpts, ts, args.num_noises, args.seed, output, None,
                                                  args.destination_draws, device)
        dest_f[sname] = None if dest is None else [d[None] for d in dest]
    return steps_f, (dest_f if args.destination_draws else None)


def _baseline_scores(cfg, train, queries, tfeats, features, encoder, seed_base: int) -> Dict[str, np.ndarray]:
    """``{method: (S, B, N)}`` of every non-TRAK method for per-step queries ``[(B, C, H, W)] * S`` with
    per-checkpoint target features ``[(S, B, k)] * C``."""
    from . import baselines as bl

    N, B = len(train), queries[0].shape[0]
    train_feats = features.arrays
    res = {}
    for m in cfg.methods:
        if m in ("trak", "ekfac"):  # scored on their own
            continue
        per_step = []
        for si, q in enumerate(queries):
            if m == "random":
                v = bl.random_scores(B, N, seed=1000 * si + seed_base)
            elif m == "pixel_neg_l2":
                v = bl.pixel_similarity(q, train.images, "neg_l2")
            elif m == "pixel_cosine":
                v = bl.pixel_similarity(q, train.images, "cosine")
            elif m == "embedding":
                v = bl.embedding_similarity(encoder, q, train.images)
            elif m == "grad_dot":
                v = bl.gradient_similarity(train_feats, [t[si] for t in tfeats], "dot")
            elif m == "grad_cosine":
                v = bl.gradient_similarity(train_feats, [t[si] for t in tfeats], "cosine")
            per_step.append(v)
        res[m] = np.stack(per_step).astype(np.float32)
    return res


def _destination_baselines(cfg, folder, train, heldout, traj, features, tfeats, encoder) -> Dict[str, Dict[str, np.ndarray]]:
    """``{set: {method: (1, B, N)}}``: the baselines with the final image as the query (``tfeats()``: the
    output of :func:`_target_features`, asked for only when something is computed)."""
    return _cached_by_set(folder.baselines("destination.npz"), lambda: {
        "generated": _baseline_scores(cfg, train, [traj.final.float()], tfeats()[1]["generated"], features, encoder, 7),
        "heldout": _baseline_scores(cfg, train, [heldout.images], tfeats()[1]["heldout"], features, encoder, 8)},
        _own_methods(cfg))


def _cached_by_set(path: str, compute, need: Sequence[str] = ()) -> Dict[str, Dict[str, np.ndarray]]:
    """``{set: {method: array}}`` read from the ``.npz`` at ``path``, or ``compute()``-d and saved there (also when
    the file lacks one of the methods in ``need``: a config that gained methods)."""
    if os.path.exists(path):
        z = np.load(path)
        res = {}
        for key in z.files:
            s, m = key.split("__")
            res.setdefault(s, {})[m] = z[key]
        if all(m in d for d in res.values() for m in need):
            return res
    res = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path + ".tmp.npz", **{f"{s}__{m}": v for s, d in res.items() for m, v in d.items()})
    os.replace(path + ".tmp.npz", path)
    return res


def _baselines(cfg, folder, train, heldout, traj, steps, features, tfeats, encoder) -> Dict[str, Dict[str, np.ndarray]]:
    """``{set: {method: (S, B, N)}}`` for every non-TRAK method (``tfeats`` as in :func:`_destination_baselines`)."""
    queries = {"generated": [traj.x0_pred_at(s).float() for s in steps],
               "heldout": [heldout.images for _ in steps]}
    return _cached_by_set(folder.baselines("scores.npz"), lambda: {
        sname: _baseline_scores(cfg, train, qs, tfeats()[0][sname], features, encoder, 0 if sname == "generated" else 1)
        for sname, qs in queries.items()}, _own_methods(cfg))


def _own_methods(cfg) -> List[str]:
    """The methods :func:`_baseline_scores` computes (TRAK and EK-FAC are scored on their own)."""
    return [m for m in cfg.methods if m not in ("trak", "ekfac")]


def _ekfac(cfg, folder, ckpt, train, heldout, traj, steps, device, progress):
    """``({set: (S, B, N)}, {set: (1, B, N)})``: EK-FAC influence (:mod:`evaluations.ekfac`) on the attributed model
    ``ckpt`` (its final checkpoint), with TRAK's draws; computed once and kept in ``baselines/ekfac*.npz``."""
    from . import ekfac

    dest = bool(cfg.gt_destination_draws)

    def compute():
        res = ekfac.harness_scores(ckpt[0], ckpt[1], train, cfg.featurize, _score_args(cfg),
                                   _target_sets(traj, heldout, steps),
                                   {"generated": traj.final.float(), "heldout": heldout.images} if dest else None,
                                   folder.baselines("ekfac"), device=device, progress=progress)
        return {sname: {"steps": v, **({"destination": res["destination"][sname]} if dest else {})}
                for sname, v in res["steps"].items()}

    got = _cached_by_set(folder.baselines("ekfac.npz"), compute)
    return ({s: d["steps"] for s, d in got.items()}, {s: d["destination"] for s, d in got.items()} if dest else None)


def _subset_seeds(cfg: EvalConfig):
    """Training seeds of the ``M`` subset models and of the ``num_replicates`` replicate models.

    ``masked`` replays one run for every subset (the attributed model's seed); its replicates replay
    another run. ``retrain`` uses :func:`~evaluations.subsets.model_seed`; its replicates draw from the
    next base seed, so they share no seed with the subset models (in ``shared`` mode: one other seed)."""
    from .subsets import model_seed

    base, M, R = cfg.train.seed, cfg.num_models, cfg.num_replicates
    if cfg.lds_mode == "masked":
        return [base] * M, [base + 1] * R
    return ([model_seed(base, m, cfg.seed_mode) for m in range(M)],
            [model_seed(base + 1, m, cfg.seed_mode) for m in range(R)])


def _ceiling_rows(a, b, ceiling, n_boot: int):
    """Per step: the per-target correlation over models of two measurements ``a``, ``b`` (``(M, S, B)``:
    split halves, or two replicate runs) with its two-way CI, and ``ceiling(r)`` averaged over targets."""
    from .metrics import bootstrap_ci, paired_bootstrap_ci, split_half

    rs, cs = [], []
    for si in range(a.shape[1]):
        r = split_half(a[:, si, :], b[:, si, :])
        mean, lo, hi = paired_bootstrap_ci(a[:, si, :], b[:, si, :], n_boot, seed=si)
        rs.append({"mean": mean, "lo": lo, "hi": hi, "values": r.tolist()})
        c = ceiling(r)
        mean, lo, hi = bootstrap_ci(c, n_boot, seed=si)
        cs.append({"mean": mean, "lo": lo, "hi": hi, "values": c.tolist()})
    return rs, cs


def _ground_truth_jobs(cfg, folder, traj, heldout, replicates: bool, rep_seeds, destination: bool) -> dict:
    """``{name: GroundTruthJob}`` of the subset models (or their replicates): per set, the per-step outputs
    at the LDS steps and, with ``destination``, the set's ``*-destination``: the loss of the final image
    averaged over ``gt_destination_draws`` (timestep, noise) pairs per half, timesteps stratified over the
    whole range (``final_loss_le_t`` at the last training timestep), with draws of its own."""
    from diffusion_trak.targets import TargetSet

    from .groundtruth import GroundTruthJob

    settings = {"masks_seed": cfg.subset_seed, "alpha": cfg.alpha, **({"seeds": rep_seeds} if replicates else {})}
    n_by_kind = {"xhat0_loss": cfg.gt_noises, "final_loss_le_t": cfg.gt_final_draws}
    sets = {"generated": TargetSet.from_trajectory(traj, cfg.lds_steps, "generated"),
            "heldout": TargetSet.from_images(heldout.images, cfg.lds_steps, [traj.timestep_at(s) for s in cfg.lds_steps],
                                             "heldout")}
    jobs = {s: GroundTruthJob(ts, cfg.gt_outputs, n_by_kind, cfg.gt_seed, folder.groundtruth(s, replicates), settings)
            for s, ts in sets.items()}
    if destination:
        last_t = int(cfg.train.num_train_timesteps) - 1
        for s, x in (("generated", traj.final.float()), ("heldout", heldout.images)):
            ts = TargetSet(f"{s}-destination", [cfg.num_inference_steps], [last_t], x[None].clone(), x.clone())
            jobs[f"{s}-destination"] = GroundTruthJob(ts, ["final_loss_le_t"],
                                                      {"final_loss_le_t": cfg.gt_destination_draws}, cfg.gt_seed + 1000,
                                                      folder.groundtruth(f"{s}-destination", replicates),
                                                      {**settings, "destination": True})
    return jobs


def _ground_truth(cfg, folder, traj, heldout, ckpts, replicates: bool, rep_seeds, destination: bool, device, progress):
    """``({set: {kind: (M, 2, S, B)}}, {set: {"destination": (M, 2, 1, B)}} or None)`` of the models ``ckpts``
    (subset models, or their replicates), each loaded once for every set."""
    from .groundtruth import measure_all

    jobs = _ground_truth_jobs(cfg, folder, traj, heldout, replicates, rep_seeds, destination)
    res = dict(zip(jobs, measure_all(ckpts, list(jobs.values()), device=device, progress=progress)))
    dest = {s: {"destination": res[f"{s}-destination"]["final_loss_le_t"]} for s in SETS} if destination else None
    return {s: res[s] for s in SETS}, dest


def _lds_tables(cfg, scores, masks, gt, gt_rep=None) -> dict:
    """``{set: {kind: {"methods": {m: [per step {mean, lo, hi, values}]}, "ceiling": [...],
    "split_half": [...], "seed_r": [...], "seed_ceiling": [...]}}}`` (the last two with replicates)."""
    from .metrics import bootstrap_ci, lds, lds_ceiling, lds_ci, replicate_ceiling

    out = {}
    for sname, methods in scores.items():
        out[sname] = {}
        for kind, y in gt[sname].items():  # y: (M, 2, S, B)
            ym = y.mean(1)
            entry = {"methods": {}}
            for m, sc in methods.items():
                rows = []
                for si in range(ym.shape[1]):
                    v = lds(sc[si], masks, ym[:, si, :])
                    mean, lo, hi = lds_ci(sc[si], masks, ym[:, si, :], cfg.n_boot, seed=si)
                    _, tlo, thi = bootstrap_ci(v, cfg.n_boot, seed=si)
                    rows.append({"mean": mean, "lo": lo, "hi": hi, "targets_only_ci": [tlo, thi], "values": v.tolist()})
                entry["methods"][m] = rows
            entry["split_half"], entry["ceiling"] = _ceiling_rows(y[:, 0], y[:, 1], lds_ceiling, cfg.n_boot)
            if gt_rep is not None:
                entry["seed_r"], entry["seed_ceiling"] = _ceiling_rows(ym[:cfg.num_replicates], gt_rep[sname][kind].mean(1),
                                                                       replicate_ceiling, cfg.n_boot)
            out[sname][kind] = entry
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _fmt(e) -> str:
    if not np.isfinite(e["mean"]):
        return "n/a"
    return f"{e['mean']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"


def _write_report(cfg, folder, tables, audit, timing, speedup, traj, N, acceptance) -> str:
    steps = list(cfg.lds_steps)
    ts = [traj.timestep_at(s) for s in steps]
    L = [f"# Counterfactual validation: `{cfg.name}`", "", cfg.description, ""]
    L += [f"- training set: {N} images ({cfg.data.name}), held-out targets: {cfg.num_heldout}, "
          f"generated targets: {cfg.num_generated} ({cfg.num_inference_steps} DDPM steps)",
          f"- LDS harness: M = {cfg.num_models} models, each on an α = {cfg.alpha} subset "
          + ("(masked: the attributed run replayed with the other examples weighted 0), "
             if cfg.lds_mode == "masked" else f"({cfg.seed_mode} training seeds), ")
          + f"same recipe as the attributed model ({cfg.train.epochs} epochs, UNet {tuple(cfg.train.block_out_channels)})",
          f"- TRAK: T = {cfg.featurize.num_timesteps} timesteps/example, k = {cfg.featurize.proj_dim}, "
          f"{cfg.train.num_checkpoints} checkpoints, R = {cfg.score.num_noises} target noises, ridge = {cfg.score.ridge}",
          f"- ground truth: {cfg.gt_noises} noises per half (x̂0 loss), {cfg.gt_final_draws} (timestep, noise) "
          f"pairs per half (final-image loss), common to all models"
          + (f"; destination: {cfg.gt_destination_draws} (timestep, noise) pairs per half over the whole range, "
             f"TRAK's destination target averaged over {cfg.score.destination_draws}" if cfg.gt_destination_draws else ""),
          "- LDS = Spearman over models of (sum of scores in the subset) vs (−measured loss), averaged over "
          f"targets; [95% two-way bootstrap CI resampling models and targets, {cfg.n_boot} resamples; "
          "`lds.json` also has the narrower targets-only interval]", ""]
    if speedup:
        L += ["## Stacked training", "",
              f"Stacking {speedup['models']} models on {speedup['device']}: {speedup['stacked_s']:.3f} s per optimiser "
              f"step of all of them, vs {speedup['sequential_s']:.3f} s one at a time: **speed-up ×{speedup['speedup']:.2f}** "
              "(measured in this run).", ""]
    L += ["## LDS per step", ""]
    for sname, kinds in tables.items():
        for kind, entry in kinds.items():
            L += [f"### {SET_LABELS.get(sname, sname)}: {GT_LABELS.get(kind, kind)}", ""]
            cols = ["final image"] if kind == "destination" else [f"step {s} (t={t})" for s, t in zip(steps, ts)]
            L += ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
            for m, rows in entry["methods"].items():
                L.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(_fmt(r) for r in rows) + " |")
            L.append("| *noise ceiling: split-half r* | " + " | ".join(_fmt(r) for r in entry["split_half"]) + " |")
            L.append("| *max LDS √(2r/(1+r))* | " + " | ".join(_fmt(r) for r in entry["ceiling"]) + " |")
            if entry.get("seed_r"):
                L.append(f"| *seed replicates: r over {cfg.num_replicates} subsets* | "
                         + " | ".join(_fmt(r) for r in entry["seed_r"]) + " |")
                L.append("| *seed ceiling: max LDS √r* | " + " | ".join(_fmt(r) for r in entry["seed_ceiling"]) + " |")
            L += [""] if kind == "destination" else ["", f"![LDS](plots/lds_{sname}_{kind}.png)", ""]
    if acceptance:
        L += ["## TRAK vs pixel similarity at the last step", ""]
        for a in acceptance:
            L.append(f"- {SET_LABELS.get(a['set'], a['set'])}, {GT_LABELS.get(a['kind'], a['kind'])}: TRAK {_fmt(a['trak'])} vs "
                     f"best pixel baseline ({METHOD_LABELS[a['pixel_method']]}) {_fmt(a['pixel'])}: "
                     f"**{a['verdict']}**"
                     + (f"; seed-replicate r {_fmt(a['seed_r'])} (the share of the output's variance the subset "
                        "explains; √r bounds every method's LDS)" if a.get("seed_r") else ""))
        L.append("")
    if audit:
        L += ["## Retrain without the top-k proponents", "",
              "Distance of the regenerated image (restart from x_t of the step, same noise) to the original; "
              "median [quartiles] over targets (random: over targets and random draws). Each random draw is one "
              "model trained without k random examples; it regenerates every target from every step, so all "
              "targets share the draws. `paired` = median over "
              "targets of (top-k distance − the target's mean distance over the random draws); `top wins` = "
              "fraction of targets where removing the top-k moved the image more than that mean; p = one-sided "
              "Wilcoxon signed-rank. Modes: `masked` "
              "replays the attributed model's training run with the removed examples weighted 0 (only the removal "
              "differs); `retrain` trains from scratch on what is left (the removal plus reshuffled batches).", ""]
        for mode, res in audit.items():
            L += [f"### mode `{mode}`", "",
                  f"Restart check (attributed model regenerates the original): max |Δ| = {res['restart_check_max_abs']:.2e}", "",
                  "| step (t) | k | distance | top-k removed | k random removed (draws) | paired | top wins | p |",
                  "|---|---|---|---|---|---|---|---|"]
            for s in res["summary"]:
                tq, rq = s["top_quartiles"], s["random_quartiles"]
                L.append(f"| {s['step']} ({s['timestep']}) | {s['k']} | {s['metric']} | {tq[1]:.3f} [{tq[0]:.3f}, {tq[2]:.3f}] | "
                         f"{rq[1]:.3f} [{rq[0]:.3f}, {rq[2]:.3f}] ({s.get('random_draws', 1)}) | "
                         f"{s['median_difference']:+.3f} | {s['top_wins']:.2f} | {s['wilcoxon_p_greater']:.3g} |")
            L.append("")
            if len({c["k"] for c in res["cases"]}) > 1:
                L += [f"![audit {mode} against k](plots/audit_{mode}_vs_k.png)", ""]
            for s, k in sorted({(c["step"], c["k"]) for c in res["cases"]}):
                L += [f"![audit {mode} step {s} k {k}](plots/audit_{mode}_s{s}_k{k}.png)", ""]
    if timing:
        L += ["## Time", "", "| stage | seconds (the invocation that did the work) |", "|---|---|"]
        for k, v in timing.get("stages", {}).items():
            L.append(f"| {k} | {v:.0f} |")
        L += [f"| **total** | **{sum(timing.get('stages', {}).values()):.0f}** |", ""]
    path = folder.report_file
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(L))
    os.replace(path + ".tmp", path)
    return path


def _acceptance(tables, cfg) -> list:
    res = []
    for sname, kinds in tables.items():
        for kind, e in kinds.items():
            if "trak" not in e["methods"]:
                continue
            last = len(e["methods"]["trak"]) - 1  # the last step, or the destination's one column
            pix = [m for m in ("pixel_neg_l2", "pixel_cosine") if m in e["methods"]]
            if not pix:
                continue
            best = max(pix, key=lambda m: e["methods"][m][last]["mean"])
            t, p = e["methods"]["trak"][last], e["methods"][best][last]
            if t["lo"] > p["hi"]:
                verdict = "TRAK higher, CIs do not overlap"
            elif t["hi"] < p["lo"]:
                verdict = "pixel higher, CIs do not overlap"
            else:
                verdict = "CIs overlap"
            row = {"set": sname, "kind": kind, "trak": t, "pixel": p, "pixel_method": best, "verdict": verdict}
            if e.get("seed_r"):
                row["seed_r"] = e["seed_r"][last]
            res.append(row)
    return res


def _plots(cfg, folder, tables, traj, audit, trajectory_final):
    from diffusion_trak.report import image_grid_png, plot_lines

    from .audit import Case

    os.makedirs(folder.plots, exist_ok=True)
    ts = [traj.timestep_at(s) for s in cfg.lds_steps]
    for sname, kinds in tables.items():
        for kind, e in kinds.items():
            if kind == "destination":  # one column: the report's table says it all
                continue
            series = {METHOD_LABELS.get(m, m): tuple(np.array([r[x] for r in rows]) for x in ("mean", "lo", "hi"))
                      for m, rows in e["methods"].items()}
            series["max LDS (noise ceiling)"] = tuple(np.array([r[x] for r in e["ceiling"]]) for x in ("mean", "lo", "hi"))
            if e.get("seed_ceiling"):
                series["max LDS (seed ceiling)"] = tuple(np.array([r[x] for r in e["seed_ceiling"]])
                                                         for x in ("mean", "lo", "hi"))
            plot_lines(folder.plot(f"lds_{sname}_{kind}.png"), ts, series, xlabel="timestep t of the step",
                       ylabel="LDS (Spearman)", title=f"{cfg.name}: {SET_LABELS.get(sname, sname)}, {GT_LABELS.get(kind, kind)}")
    for mode, res in (audit or {}).items():
        regen = folder.audit.regenerated(mode)
        for s, k in sorted({(c["step"], c["k"]) for c in res["cases"]}):
            targets = sorted({c["target"] for c in res["cases"] if c["step"] == s and c["k"] == k})
            first = {(c["kind"], c["target"]): Case.from_row(c) for c in res["cases"]
                     if c["step"] == s and c["k"] == k and c["draw"] == 0}
            rows = [trajectory_final[targets].clamp(-1, 1)] + [
                torch.from_numpy(np.stack([first[kind, b].image(regen, s, b) for b in targets])) for kind in ("top", "random")]
            image_grid_png(folder.plot(f"audit_{mode}_s{s}_k{k}.png"), rows,
                           ["original", f"−top {k}", f"−random {k}"], [f"target {b}" for b in targets],
                           title=f"{mode}: without top-k vs random k, restart at step {s} (t={traj.timestep_at(s)})")
        ks = sorted({c["k"] for c in res["cases"]})
        if len(ks) > 1:  # how much more top-k removal moves the image than random removal, against k
            series = {}
            for s in sorted({c["step"] for c in res["cases"]}):
                summ = {r["k"]: r for r in res["summary"] if r["step"] == s and r["metric"] == "pixel_l2"}
                q = np.array([summ[k]["difference_quartiles"] if k in summ else [np.nan] * 3 for k in ks])
                series[f"step {s} (t={traj.timestep_at(s)})"] = (q[:, 1], q[:, 0], q[:, 2])
            series["no effect"] = np.zeros(len(ks))
            plot_lines(folder.plot(f"audit_{mode}_vs_k.png"), ks, series, xlabel="k (examples removed)",
                       ylabel="top-k change − random change (pixel L2)",
                       title=f"{cfg.name} ({mode}): median and quartiles over targets")


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def run(cfg: EvalConfig, out: str, overwrite: bool = False, device: str = "cpu", threads: int = 0,
        progress: bool = True, audit: bool = True) -> dict:
    from diffusion_trak.api import as_checkpoints, featurize
    from diffusion_trak.data import load_dataset
    from diffusion_trak.target_cache import attach
    from diffusion_trak.train import train_ddpm

    from .audit import run_audit
    from .baselines import train_encoder
    from .retrain import benchmark_stacked, final_checkpoint, train_models
    from .subsets import subset_masks

    torch.set_num_threads(threads or cfg.threads)
    _check_config(out, cfg, overwrite)
    folder = RunFolder(out, cfg.lds_mode)
    timer = Timer(folder.timing_file)
    t_start = time.perf_counter()
    train = load_dataset(cfg.data)
    heldout = load_dataset(cfg.heldout)
    if len(heldout) < cfg.num_heldout:
        raise UserError(f"the held-out set has {len(heldout)} images, fewer than num_heldout={cfg.num_heldout}")
    heldout = heldout.subset(np.arange(cfg.num_heldout))
    N = len(train)
    steps = sorted(set(cfg.lds_steps) | set(cfg.audit_steps))
    pos = {s: steps.index(s) for s in steps}

    with timer.stage("train attributed model"):
        ckpt_dirs = train_ddpm(train, cfg.train, folder.attributed, progress=progress, device=device)
        final = final_checkpoint(folder.attributed, cfg.train)
        ckpts = as_checkpoints(ckpt_dirs, device)  # loaded once, for sampling, features, scores and baselines
    with timer.stage("generate targets"):
        traj = _trajectory(cfg, folder, ckpts[ckpt_dirs.index(final)])
    with timer.stage("featurize training set"):
        features = featurize(ckpts, train, cfg.featurize, out=folder.features, device=device, progress=progress)
        attach(features, folder.target_features)  # target features: computed once, by scoring, kept for the baselines
    with timer.stage("TRAK scores"):
        trak, trak_dest = _trak_scores(cfg, out, features, ckpts, train, heldout, traj, steps, device)
    with timer.stage("baselines"):
        encoder = train_encoder(train.images, epochs=cfg.encoder_epochs, seed=cfg.train.seed,
                                path=folder.baselines("encoder.pt"))
        tfeats = functools.lru_cache(None)(lambda: _target_features(cfg, features, ckpts, heldout, traj, steps, device))
        lds_idx = [pos[s] for s in cfg.lds_steps]
        base = _baselines(cfg, folder, train, heldout, traj, steps, features, tfeats, encoder)
        dest_scores, ek_dest = None, None
        if "ekfac" in cfg.methods:
            with timer.stage("EK-FAC influence"):
                ek, ek_dest = _ekfac(cfg, folder, ckpts[ckpt_dirs.index(final)], train, heldout, traj, steps, device,
                                     progress)
            for sname in SETS:
                base[sname]["ekfac"] = ek[sname]
        if cfg.gt_destination_draws:
            dbase = _destination_baselines(cfg, folder, train, heldout, traj, features, tfeats, encoder)
            if ek_dest is not None:
                for sname in SETS:
                    dbase[sname]["ekfac"] = ek_dest[sname]
            dest_scores = {sname: {m: (trak_dest[sname][None] if m == "trak" else dbase[sname][m]) for m in cfg.methods}
                           for sname in SETS}
    scores = {}
    for sname in SETS:
        scores[sname] = {}
        for m in cfg.methods:
            v = trak[sname] if m == "trak" else base[sname][m]
            scores[sname][m] = np.asarray(v)[lds_idx]

    masks = subset_masks(N, cfg.num_models, cfg.alpha, cfg.subset_seed)
    masked = cfg.lds_mode == "masked"
    sub_dir = folder.subsets
    os.makedirs(sub_dir, exist_ok=True)
    np.save(folder.masks_file, masks)
    seeds, rep_seeds = _subset_seeds(cfg)
    train_kw = dict(method="stacked" if masked else cfg.train_method, stack_size=cfg.stack_size, device=device,
                    progress=progress, masked=masked)
    speed_path = folder.speedup_file
    speedup = json.load(open(speed_path)) if os.path.exists(speed_path) else None
    with timer.stage("train subset models"):
        if speedup is None:
            k = min(cfg.stack_size, cfg.num_models)
            speedup = benchmark_stacked(train, cfg.train, [np.flatnonzero(masks[m]) for m in range(k)], seeds[:k],
                                        steps=3, device=device)
            write_json_atomic(speed_path, speedup)
        print(f"[retrain] stacked training of {speedup['models']} models on {speedup['device']}: "
              f"{speedup['stacked_s']:.3f} s/step vs {speedup['sequential_s']:.3f} s one at a time "
              f"-> speed-up x{speedup['speedup']:.2f}", flush=True)
        run_dirs = train_models(train, cfg.train, masks, sub_dir, seeds, **train_kw)
        sub_ckpts = [final_checkpoint(d, cfg.train) for d in run_dirs]
    rep_ckpts = []
    if cfg.num_replicates:
        with timer.stage("train replicate models"):
            rep_dirs = train_models(train, cfg.train, masks[:cfg.num_replicates],
                                    folder.replicates, rep_seeds,
                                    **train_kw)
            rep_ckpts = [final_checkpoint(d, cfg.train) for d in rep_dirs]
    with timer.stage("ground truth"):
        dest = dest_scores is not None
        gt, gt_dest = _ground_truth(cfg, folder, traj, heldout, sub_ckpts, False, rep_seeds, dest, device, progress)
        gt_rep, gt_rep_dest = (_ground_truth(cfg, folder, traj, heldout, rep_ckpts, True, rep_seeds, dest, device, progress)
                               if rep_ckpts else (None, None))
    with timer.stage("LDS"):
        tables = _lds_tables(cfg, scores, masks, gt, gt_rep)
        if dest_scores is not None:
            for sname, kinds in _lds_tables(cfg, dest_scores, masks, gt_dest, gt_rep_dest).items():
                tables[sname].update(kinds)
        acceptance = _acceptance(tables, cfg)
        write_json_atomic(folder.lds_file, {"steps": list(cfg.lds_steps),
                                                          "timesteps": [traj.timestep_at(s) for s in cfg.lds_steps],
                                                          "tables": tables, "acceptance": acceptance})
    audit_res = {}
    if audit and cfg.audit_targets > 0 and cfg.audit_steps:
        for mode in cfg.audit_modes:
            with timer.stage(f"retrain without top-k ({mode})"):
                audit_res[mode] = run_audit(train, cfg.train, traj, ckpts[ckpt_dirs.index(final)],
                                            {s: trak["generated"][pos[s]] for s in cfg.audit_steps},
                                            list(range(cfg.audit_targets)), cfg.audit_ks, folder.audit.root,
                                            encoder=encoder, seed=cfg.audit_seed, method=cfg.train_method,
                                            stack_size=cfg.stack_size, device=device, progress=progress, mode=mode,
                                            random_draws=cfg.audit_random_draws)
    with timer.stage("report"):
        _plots(cfg, folder, tables, traj, audit_res, traj.final)
        path = _write_report(cfg, folder, tables, audit_res, timer.data, speedup, traj, N, acceptance)
    total = time.perf_counter() - t_start
    timer.data["last_invocation_s"] = total
    write_json_atomic(timer.path, timer.data)
    _write_report(cfg, folder, tables, audit_res, timer.data, speedup, traj, N, acceptance)
    print(f"[run] done in {total:.0f} s; report: {path}", flush=True)
    return {"tables": tables, "acceptance": acceptance, "audit": audit_res, "speedup": speedup, "report": path}


def run_from_args(ns: argparse.Namespace) -> int:
    """Run the benchmark named by parsed :func:`evaluations.arguments.add_arguments` arguments; a
    user-fixable error prints one line and returns 2."""
    from diffusion_trak.config import check_int
    from diffusion_trak.data import DataError
    from diffusion_trak.store import StoreError

    try:
        from diffusion_trak.cli import _device

        check_int("--threads", ns.threads, 0)  # 0: the config's
        device = _device(ns)
        if ns.config.endswith(".json"):
            with open(ns.config) as f:
                cfg = EvalConfig.from_dict(json.load(f))
        else:
            cfg = get_config(ns.config)
        cfg = apply_overrides(cfg, ns.set)
        run(cfg, ns.out, ns.overwrite, device, ns.threads, not ns.quiet, not ns.no_audit)
    except (UserError, DataError, StoreError) as e:
        print(f"diffusion_trak.evaluations.run: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    from .arguments import add_arguments

    p = argparse.ArgumentParser(prog="python -m diffusion_trak.evaluations.run", description=__doc__.split("\n\n")[0])
    return run_from_args(add_arguments(p).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
