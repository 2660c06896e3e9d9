"""Which estimator predicts counterfactuals best? LDS of TRAK variants on a finished evaluation run.

``python -m diffusion_trak.evaluations.ablations runs/eval-digits`` reuses a run of :mod:`evaluations.run` (its
attributed checkpoints, trajectory, held-out images, subset masks and ground truth) and scores
variants of the estimator: output functions for training features and targets, timestep strategy and
count, feature normalisation, number of checkpoints, and ensembles of independently trained models
(TRAK's recipe; trained into ``ablations/ensemble/``). Results go to ``ablations/`` (resumable: every
variant's features are a store) and ``ablations/ablations.md``. With ``--audit`` each variant's top-k
proponents also go through the run's retrain-without-top-k audit (random controls shared with the run's).

λ is never tuned on the ground truth that is reported: the retrained models are split in two halves
by index; the relative ridge of each variant is picked from a fixed grid by the mean LDS on the
*selection* half (models ``0 … M/2−1``, generated targets, the paper's output), and every reported
LDS uses only the *report* half (models ``M/2 … M−1``). Baselines are evaluated on the same half.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Dict, List, Optional

import numpy as np

from diffusion_trak import api
from diffusion_trak.config import FeaturizeArgs, ScoreArgs, from_dict
from diffusion_trak.score import TRAKScorer
from diffusion_trak.target_cache import attach, target_features_of

from .folder import RunFolder
from .metrics import lds, lds_ci, lds_difference_ci

RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


@dataclasses.dataclass
class Variant:
    name: str
    output: str = "loss"            # training-feature output function
    target_output: str = "loss"     # target output function
    num_timesteps: int = 10
    timestep_strategy: str = "uniform"
    normalize: bool = False          # unit-normalise every feature row before the kernel
    checkpoints: int = 0             # use the last n checkpoints (0 = all)
    window: int = 0                  # >0: timestep-matched features, drawn from t_s ± window for step s
    models: int = 0                  # >0: ensemble of the attributed model's last checkpoint and models-1
                                     # independently trained models (their final checkpoints)
    ridge: Optional[float] = None    # a relative ridge fixed in advance (reported on ALL models); None: picked
                                     # from RIDGES on the selection half, reported on the other half
    num_noises: int = 0              # R, target noises (0: the run's)
    destination_draws: int = 0       # D, (timestep, noise) draws of the destination target (0: the run's)
    proj_dim: int = 0                # k, the projected dimension (0: the run's)
    kernel: str = "features"         # the matrix TRAK inverts: "features" (ΦᵀΦ, the paper's) or "ggn"
    kernel_draws: int = 32           # (timestep, noise, probe) draws per example of the ggn kernel


VARIANTS = [
    Variant("paper (loss/loss, uniform T=10)"),
    Variant("paper, last checkpoint only", checkpoints=1),
    Variant("D-TRAK (sqnorm/sqnorm, stratified T=10)", output="sqnorm", target_output="sqnorm", timestep_strategy="stratified"),
    Variant("D-TRAK, last checkpoint only", output="sqnorm", target_output="sqnorm", timestep_strategy="stratified",
            checkpoints=1),
    Variant("D-TRAK, normalised", output="sqnorm", target_output="sqnorm", timestep_strategy="stratified", normalize=True),
    Variant("sqnorm/loss, stratified T=10", output="sqnorm", target_output="loss", timestep_strategy="stratified"),
    Variant("loss/loss, stratified T=10", timestep_strategy="stratified"),
    Variant("loss/loss stratified, normalised", timestep_strategy="stratified", normalize=True),
    Variant("D-TRAK, stratified T=32", output="sqnorm", target_output="sqnorm", timestep_strategy="stratified", num_timesteps=32),
    Variant("D-TRAK, stratified T=100, last checkpoint", output="sqnorm", target_output="sqnorm",
            timestep_strategy="stratified", num_timesteps=100, checkpoints=1),
    Variant("paper, ensemble of 4 models", models=4),
    Variant("paper, ensemble of 8 models", models=8),
    Variant("paper, ensemble of 16 models", models=16),
    Variant("loss/loss stratified, ensemble of 8 models", timestep_strategy="stratified", models=8),
    Variant("D-TRAK, ensemble of 8 models", output="sqnorm", target_output="sqnorm", timestep_strategy="stratified",
            models=8),
    Variant("D-TRAK, ensemble of 16 models", output="sqnorm", target_output="sqnorm", timestep_strategy="stratified",
            models=16),
    Variant("timestep-matched loss/loss, t±100, stratified T=10", timestep_strategy="stratified", window=100),
    Variant("timestep-matched loss/loss, t±100, last checkpoint", timestep_strategy="stratified", window=100,
            checkpoints=1),
    Variant("timestep-matched sqnorm/sqnorm, t±100, stratified T=10", output="sqnorm", target_output="sqnorm",
            timestep_strategy="stratified", window=100),
]


#: Estimator choices measured on the power benchmarks (``--group choices``), every one with the fast
#: featurizer. Ridges are fixed in advance (the paper's 0.01; 1 for the rest, chosen before these
#: benchmarks were run) and reported on all models; the ``selected`` variant picks its ridge on the
#: selection half and is reported on the other half; the ridge sweep shows sensitivity, not a choice.
CHOICES = [
    Variant("paper: loss/loss, uniform T=10, ridge 0.01", ridge=0.01),
    Variant("loss/loss, stratified T=10, ridge 1", timestep_strategy="stratified", ridge=1.0),
    Variant("loss/loss, stratified T=32, ridge 1", timestep_strategy="stratified", num_timesteps=32, ridge=1.0),
    Variant("loss/loss, stratified T=100, ridge 1", timestep_strategy="stratified", num_timesteps=100, ridge=1.0),
    Variant("loss/loss, uniform T=100, ridge 1", num_timesteps=100, ridge=1.0),
    Variant("loss/loss, stratified T=100, ridge selected", timestep_strategy="stratified", num_timesteps=100),
    Variant("loss/loss, stratified T=100, ridge 0.01", timestep_strategy="stratified", num_timesteps=100, ridge=0.01),
    Variant("loss/loss, stratified T=100, ridge 0.1", timestep_strategy="stratified", num_timesteps=100, ridge=0.1),
    Variant("loss/loss, stratified T=100, ridge 10", timestep_strategy="stratified", num_timesteps=100, ridge=10.0),
    Variant("loss/loss, stratified T=100, ridge 100", timestep_strategy="stratified", num_timesteps=100, ridge=100.0),
    Variant("sqnorm/sqnorm (D-TRAK), stratified T=100, ridge 1", output="sqnorm", target_output="sqnorm",
            timestep_strategy="stratified", num_timesteps=100, ridge=1.0),
    Variant("sqnorm/loss, stratified T=100, ridge 1", output="sqnorm", target_output="loss",
            timestep_strategy="stratified", num_timesteps=100, ridge=1.0),
    Variant("loss/loss, stratified T=100, last checkpoint, ridge 1", timestep_strategy="stratified", num_timesteps=100,
            checkpoints=1, ridge=1.0),
    Variant("loss/loss, stratified T=100, R=5, ridge 1", timestep_strategy="stratified", num_timesteps=100,
            num_noises=5, ridge=1.0),
    Variant("loss/loss, stratified T=100, R=50, ridge 1", timestep_strategy="stratified", num_timesteps=100,
            num_noises=50, ridge=1.0),
    Variant("loss/loss, stratified T=100, ensemble of 4 models, ridge 1", timestep_strategy="stratified",
            num_timesteps=100, models=4, ridge=1.0),
    Variant("loss/loss, stratified T=100, D=400, ridge 1", timestep_strategy="stratified", num_timesteps=100,
            ridge=1.0, destination_draws=400),
    Variant("loss/loss, stratified T=100, k=8192, ridge 1", timestep_strategy="stratified", num_timesteps=100,
            ridge=1.0, proj_dim=8192),
    Variant("timestep-matched loss/loss, t±100, stratified T=32, ridge 1", timestep_strategy="stratified",
            num_timesteps=32, window=100, ridge=1.0),
    # the GGN kernel (FeaturizeArgs.kernel="ggn"): its ridge picked on the selection half, then a sweep
    Variant("loss/loss, stratified T=100, GGN kernel, ridge selected", timestep_strategy="stratified",
            num_timesteps=100, kernel="ggn"),
    *[Variant(f"loss/loss, stratified T=100, GGN kernel, ridge {r:g}", timestep_strategy="stratified", num_timesteps=100,
              kernel="ggn", ridge=r) for r in (0.001, 0.01, 0.1, 1.0)],
    *[Variant(f"loss/loss, stratified T=100, GGN kernel of {d} draws per example, ridge 0.1", timestep_strategy="stratified",
              num_timesteps=100, kernel="ggn", kernel_draws=d, ridge=0.1) for d in (4, 8, 16)],
]
GROUPS = {"all": VARIANTS, "choices": CHOICES}


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def ensemble_checkpoints(run: str, cfg: dict, train, num: int, device="cpu", progress: bool = True,
                         method: str = "sequential") -> List[str]:
    """Final checkpoints of ``num`` models trained independently of the attributed one: the same
    recipe on the full training set, seeds :func:`~evaluations.subsets.model_seed` of base seed
    ``train.seed + 2`` (the subset models use ``+0``, the seed replicates ``+1``). Trained into
    ``RUN/ablations/ensemble/model-XXXX`` (resumable)."""
    from diffusion_trak.config import TrainArgs

    from .retrain import final_checkpoint, train_models
    from .subsets import model_seed

    targs = from_dict(TrainArgs, cfg["train"])
    seeds = [model_seed(targs.seed + 2, m) for m in range(num)]
    dirs = train_models(train, targs, np.ones((num, len(train)), dtype=bool), os.path.join(RunFolder(run).ablations, "ensemble"),
                        seeds, method=method, stack_size=int(cfg.get("stack_size", 16)), device=device, progress=progress)
    return [final_checkpoint(d, targs) for d in dirs]


def _kernels_of(fs) -> list:
    """One entry per checkpoint of a feature set: its GGN kernel, or None (``ΦᵀΦ``)."""
    return fs.kernels or [None] * len(fs.names)


def _kernels(kers):
    """The GGN kernels of a list of feature sets' checkpoints, or None when they use ``ΦᵀΦ``."""
    if all(k is None for k in kers):
        return None
    if any(k is None for k in kers):
        raise ValueError("some checkpoints have a GGN kernel and some do not")
    return kers


def _features_and_targets(run: RunFolder, ckpts, fpath, fargs, sargs, v, heldout, traj, steps, train, device):
    """Training features (one array per checkpoint, a store at ``fpath``) and target features ``{set: [(S, B, k)
    per checkpoint]}`` of some loaded checkpoints; target features come from the run's target cache, shared with
    the run's own scoring and baselines. With ``sargs.destination_draws`` the sets ``generated-destination`` and
    ``heldout-destination`` (each (1, B, k)) hold the destination targets."""
    from .run import _target_sets

    fs = api.featurize(ckpts, train, fargs, fpath, device=device)
    attach(fs, run.target_features)
    tf = {}
    for sname, ts in _target_sets(traj, heldout, steps).items():
        tf[sname], dest = target_features_of(fs, ckpts, ts, sargs.num_noises, sargs.seed, v.target_output, None,
                                             sargs.destination_draws, device)
        if dest is not None:
            tf[f"{sname}-destination"] = [d[None] for d in dest]
    return fs, tf


def variant_scores(v: Variant, run: RunFolder, ckpts, train, heldout, traj, steps, device="cpu",
                   ensemble_method: str = "sequential") -> Dict[str, Dict[float, np.ndarray]]:
    """``{set: {ridge: (S, B, N)}}`` for one variant (sets ``*-destination``: S = 1, scored with the
    whole-range features, also for timestep-matched variants); ``ckpts``: the attributed model's loaded
    checkpoints."""
    cfg = run.config
    fargs = from_dict(FeaturizeArgs, {**cfg["featurize"], "output": v.output, "num_timesteps": v.num_timesteps,
                                      "timestep_strategy": v.timestep_strategy, "kernel": v.kernel,
                                      "kernel_draws": v.kernel_draws,
                                      **({"proj_dim": v.proj_dim} if v.proj_dim else {})})
    sargs = from_dict(ScoreArgs, cfg["score"])
    if not cfg.get("gt_destination_draws"):
        sargs = dataclasses.replace(sargs, destination_draws=0)
    if v.num_noises:
        sargs = dataclasses.replace(sargs, num_noises=v.num_noises)
    if v.destination_draws and sargs.destination_draws:
        sargs = dataclasses.replace(sargs, destination_draws=v.destination_draws)
    key = (f"{v.output}-{v.timestep_strategy}-T{v.num_timesteps}" + (f"-k{v.proj_dim}" if v.proj_dim else "")
           + (f"-ggn{v.kernel_draws}" if v.kernel == "ggn" else ""))
    ts = [traj.timestep_at(s) for s in steps]
    n_use = 1 if v.models else (v.checkpoints or len(ckpts))  # the last n_use checkpoints of the attributed run
    fpath = os.path.join(run.ablations, "features", key)
    last = f"-last{n_use}" if n_use < len(ckpts) else ""
    used = ckpts[-n_use:]
    if last and not os.path.exists(os.path.join(fpath, "manifest.json")):
        # featurize only the checkpoints used; a checkpoint's features do not depend on the others
        ckpts, fpath = used, fpath + last
    fs, tf = _features_and_targets(run, ckpts, fpath, fargs, sargs, v, heldout, traj, steps, train, device)
    use = slice(-n_use, None)
    tf = {s: lst[use] for s, lst in tf.items()}
    phis = [np.asarray(a) for a in fs.arrays][use]
    kers = _kernels_of(fs)[use]
    if v.models > 1:  # the attributed model's last checkpoint, then models-1 independently trained ones
        for ck in ensemble_checkpoints(run.root, cfg, train, v.models - 1, device, method=ensemble_method):
            member = os.path.basename(os.path.dirname(ck))
            mfs, mtf = _features_and_targets(run, api.as_checkpoints([ck], device),
                                             os.path.join(run.ablations, "features", "ensemble", member, key),
                                             fargs, sargs, v, heldout, traj, steps, train, device)
            phis += [np.asarray(a) for a in mfs.arrays]
            kers += _kernels_of(mfs)
            for s in tf:
                tf[s] = tf[s] + mtf[s]
    phi_sets, ker_sets = [phis], [kers]
    if v.window:  # one feature set per step, drawn from that step's timestep window
        n_t = int(traj.scheduler_config.get("num_train_timesteps", 1000))
        ranges = [(max(0, t - v.window), min(n_t - 1, t + v.window)) for t in ts]
        windowed = [api.featurize(used, train, dataclasses.replace(fargs, timestep_range=r),
                                  os.path.join(run.ablations, "features", f"{key}-t{r[0]}-{r[1]}{last}"), device=device)
                    for r in ranges]
        phi_sets = [[np.asarray(a) for a in w.arrays] for w in windowed]
        ker_sets = [_kernels_of(w) for w in windowed]
    whole = [_unit(p) for p in phis] if v.normalize else phis  # whole-range features (the destination's)
    if v.normalize:
        phi_sets = [[_unit(p) for p in phis] for phis in phi_sets]
    out = {}
    for sname, per_ckpt in tf.items():
        S, B, k = per_ckpt[0].shape
        targets = [(_unit(p) if v.normalize else p) for p in per_ckpt]  # each (S, B, k)
        out[sname] = {}
        for r in (RIDGES if v.ridge is None else (v.ridge,)):
            if len(phi_sets) == 1 or sname.endswith("-destination"):
                res = TRAKScorer(whole, r, kernels=_kernels(kers)).score([t.reshape(S * B, k) for t in targets]).reshape(S, B, -1)
            else:  # step si is scored with the features of its own window
                res = np.stack([TRAKScorer(phi_sets[si], r, kernels=_kernels(ker_sets[si])).score([t[si] for t in targets])
                                for si in range(S)])
            out[sname][r] = res
    return out


def _audit_variant(v: Variant, run: RunFolder, train, traj, final_ckpt, gen_scores, steps, device,
                   run_missing: bool = True) -> List[dict]:
    """The run's retrain-without-top-k audit (its steps, targets, k and modes) with this variant's scores
    ``gen_scores`` (S, B, N), in the run's ``audit/`` folder, so the random controls are shared.
    ``run_missing=False``: only report an audit already on disk whose top-k sets are these scores'."""
    import re

    from diffusion_trak.config import TrainArgs

    from .audit import plan, run_audit
    from .baselines import train_encoder

    cfg = run.config
    missing = [s for s in cfg["audit_steps"] if s not in steps]
    if missing:
        if not run_missing:
            return []
        raise SystemExit(f"audit steps {missing} are not LDS steps of this run; the ablations score only {steps}")
    label = re.sub(r"[^a-z0-9]+", "-", v.name.lower()).strip("-")
    by_step = {s: gen_scores[steps.index(s)] for s in cfg["audit_steps"]}
    targets = list(range(cfg["audit_targets"]))
    from .configs import EvalConfig

    draws = cfg.get("audit_random_draws", EvalConfig.audit_random_draws)
    want = {c.name: c.removed.tolist()
            for c in plan(by_step, targets, cfg["audit_ks"], len(train), cfg["audit_seed"], label, draws)}
    encoder = train_encoder(train.images, epochs=cfg["encoder_epochs"], seed=cfg["train"]["seed"],
                            path=run.baselines("encoder.pt")) if run_missing else None
    rows = []
    for mode in cfg.get("audit_modes", ["masked"]):
        if run_missing:
            res = run_audit(train, from_dict(TrainArgs, cfg["train"]), traj, final_ckpt, by_step, targets,
                            cfg["audit_ks"], run.audit.root, encoder=encoder, seed=cfg["audit_seed"],
                            method=cfg["train_method"], stack_size=cfg["stack_size"], device=device, mode=mode,
                            label=label, random_draws=draws)
        else:
            res = _audit_on_disk(run.audit.result(mode, label), want, label)
            if res is None:
                continue
        rows += [{"method": v.name, "mode": mode, **r} for r in res["summary"] if r["metric"] == "pixel_l2"]
    return rows


def _audit_on_disk(path: str, want: Dict[str, list], label: str):
    """The audit result at ``path`` if it exists and its cases removed exactly ``want`` (case name →
    removed positions), i.e. it was made with the same scores; else None."""
    from .audit import Case

    if not os.path.exists(path):
        return None
    with open(path) as f:
        res = json.load(f)
    have = {Case.from_row(c, label).name: c["removed"] for c in res["cases"]}
    return res if have == want else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a finished `python -m diffusion_trak.evaluations.run` folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", nargs="*", default=None, help="names (default: all of the group)")
    p.add_argument("--ensemble-method", default="sequential", choices=("sequential", "stacked"),
                   help="how ensemble members are trained (stacked: vmap over members, faster for small models)")
    p.add_argument("--group", default="all", choices=sorted(GROUPS),
                   help="which list of variants: all (the original ablations) or choices (the power benchmarks')")
    p.add_argument("--audit", action="store_true",
                   help="also run the retrain-without-top-k audit with each variant's scores (the run's audit "
                        "settings; random controls are shared with the run's own audit)")
    ns = p.parse_args(argv)
    run = RunFolder.open(ns.run)
    cfg = run.config
    train, heldout = run.datasets()
    traj = run.load_trajectory()
    steps = list(cfg["lds_steps"])
    ckpts = api.as_checkpoints(run.checkpoints(), ns.device)  # loaded once for every variant and audit
    masks = run.masks()
    M = masks.shape[0]
    sel, rep, everyone = np.arange(M // 2), np.arange(M // 2, M), np.arange(M)
    sets = ["generated", "heldout"]
    if cfg.get("gt_destination_draws"):
        sets += ["generated-destination", "heldout-destination"]
    gt = {s: run.ground_truth(s) for s in sets}
    base = dict(np.load(run.baselines("scores.npz")))
    if cfg.get("gt_destination_draws"):
        base.update({k.replace("__", "-destination__"): v for k, v in np.load(run.baselines("destination.npz")).items()})
    rows: List[dict] = []
    audits: List[dict] = []

    def evaluate(name, scores_by_set, ridge=None, models=rep):
        for sname, sc in scores_by_set.items():
            for kind, y in gt[sname].items():
                cells = [lds_ci(sc[si], masks[models], y[models, si, :], 1000, seed=si) for si in range(sc.shape[0])]
                rows.append({"method": name, "set": sname, "gt": kind, "ridge": ridge, "cells": cells,
                             "models": "all" if len(models) == M else "report half"})

    fixed = ns.group == "choices" or any(v.ridge is not None for v in GROUPS[ns.group])
    for key in base:
        sname, m = key.split("__")
        if m in ("pixel_neg_l2", "pixel_cosine", "random", "embedding"):
            evaluate(f"baseline: {m}", {sname: base[key]})
            if fixed:
                evaluate(f"baseline: {m}", {sname: base[key]}, models=everyone)
    pool = GROUPS[ns.group]
    unknown = sorted(set(ns.variants or ()) - {v.name for v in pool})
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from: " + "; ".join(repr(v.name) for v in pool))
    variants = [v for v in pool if ns.variants is None or v.name in ns.variants]
    paper, diffs = None, []  # the paper's scores (the group's first variant) and paired differences against it
    for v in variants:
        print(f"variant: {v.name}", flush=True)
        by_ridge = variant_scores(v, run, ckpts, train, heldout, traj, steps, ns.device, ns.ensemble_method)
        if v.ridge is not None:  # fixed in advance: every model reports
            best = v.ridge
            evaluate(v.name, {s: d[best] for s, d in by_ridge.items()}, best, models=everyone)
        else:
            sel_lds = {r: np.nanmean([np.nanmean(lds(by_ridge["generated"][r][si], masks[sel],
                                                     gt["generated"]["xhat0_loss"][sel, si, :]))
                                      for si in range(len(steps))]) for r in RIDGES}
            best = max(sel_lds, key=lambda r: sel_lds[r])
            evaluate(v.name, {s: d[best] for s, d in by_ridge.items()}, best)
        if v.ridge is not None and ns.group == "choices":  # paired difference against the paper's estimator
            if paper is None:
                paper = (by_ridge if v is pool[0] else
                         variant_scores(pool[0], run, ckpts, train, heldout, traj, steps, ns.device, ns.ensemble_method))
                paper = {sname: d[pool[0].ridge] for sname, d in paper.items()}
            if v is not pool[0]:
                for sname, d in by_ridge.items():
                    for kind, y in gt[sname].items():
                        diffs.append({"method": v.name, "set": sname, "gt": kind, "cells": [
                            lds_difference_ci(d[best][si], paper[sname][si], masks, y[:, si, :], 1000, seed=si)
                            for si in range(d[best].shape[0])]})
        audits += _audit_variant(v, run, train, traj, ckpts[-1], by_ridge["generated"][best], steps, ns.device,
                                 run_missing=ns.audit)
    out = run.ablations
    os.makedirs(out, exist_ok=True)
    suffix = "" if ns.group == "all" else f"-{ns.group}"
    jpath = os.path.join(out, f"ablations{suffix}.json")
    if ns.variants is not None and os.path.exists(jpath):  # keep the rows of the group's other variants
        with open(jpath) as f:
            old = json.load(f)
        mine = {v.name for v in variants}
        rows = [r for r in old["rows"] if r["method"] not in mine and not r["method"].startswith("baseline")] + rows
        order = {v.name: i for i, v in enumerate(pool)}
        rows.sort(key=lambda r: (not r["method"].startswith("baseline"), order.get(r["method"], -1)))
    with open(jpath, "w") as f:
        json.dump({"steps": steps, "timesteps": [traj.timestep_at(s) for s in steps], "rows": rows, "audits": audits,
                   "differences_from_paper": diffs,
                   "selection_models": sel.tolist(), "report_models": rep.tolist()}, f, indent=1)
    lines = [f"# Estimator ablations on `{cfg['name']}`", "",
             f"LDS (Spearman, mean over targets [95% two-way bootstrap CI over models and targets]). A variant whose "
             f"ridge was fixed in advance is reported on all {M} retrained models; a variant without one had its "
             f"ridge chosen on the selection half (models 0…{M // 2 - 1}; generated targets, paper output) and is "
             f"reported on the other half ({len(rep)} models). Baselines are given on both.", ""]
    ts = [traj.timestep_at(s) for s in steps]
    for sname in sets:
        for kind in gt[sname]:
            cols = ["final image"] if sname.endswith("-destination") else [f"step {s} (t={t})" for s, t in zip(steps, ts)]
            lines += [f"## {sname} targets, ground truth `{kind}`", "",
                      "| method | ridge | models | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
            for r in rows:
                if r["set"] == sname and r["gt"] == kind:
                    lines.append(f"| {r['method']} | {r['ridge'] if r['ridge'] is not None else ''} | "
                                 f"{r.get('models', 'report half')} | " +
                                 " | ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in r["cells"]) + " |")
            lines.append("")
    if diffs:
        lines += [f"## Paired difference from `{pool[0].name}` (this invocation's variants, all models)", "",
                  "LDS(variant) − LDS(paper) with the same resampled models and targets for both (two-way bootstrap, "
                  "95%): an interval containing 0 means the two are not distinguishable.", ""]
        for sname in sets:
            for kind in gt[sname]:
                mine = [d for d in diffs if d["set"] == sname and d["gt"] == kind]
                if not mine:
                    continue
                cols = ["final image"] if sname.endswith("-destination") else [f"step {s} (t={t})" for s, t in zip(steps, ts)]
                lines += [f"### {sname} targets, ground truth `{kind}`", "", "| method | " + " | ".join(cols) + " |",
                          "|---|" + "---|" * len(cols)]
                lines += [f"| {d['method']} | " + " | ".join(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for m, lo, hi in d["cells"])
                          + " |" for d in mine]
                lines.append("")
    if audits:
        lines += ["## Retrain without top-k, per variant (generated targets)", "",
                  "Median image change over targets (pixel L2) after removing the variant's top-k proponents of "
                  "the step, vs the same number of random examples (shared controls, all draws pooled); paired: "
                  "median over targets of (top-k change − mean change of the target's random draws); `top wins`: "
                  "fraction of targets where top-k moved the image more than that mean; p: one-sided Wilcoxon "
                  "signed-rank.", "",
                  "| method | mode | step | k | targets | random draws | top-k median | random median | paired | top wins | p |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for a in audits:
            lines.append(f"| {a['method']} | {a['mode']} | {a['step']} | {a['k']} | {a['num_targets']} | "
                         f"{a.get('random_draws', 1)} | {a['top_quartiles'][1]:.3f} | {a['random_quartiles'][1]:.3f} | "
                         f"{a['median_difference']:+.3f} | {a['top_wins']:.2f} | {a['wilcoxon_p_greater']:.2g} |")
        lines.append("")
    with open(os.path.join(out, f"ablations{suffix}.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
