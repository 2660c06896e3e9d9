"""Counterfactual evidence of an evaluation run (``python -m diffusion_trak.evaluations.run``), for the journey page.

An evaluation run folder holds ``lds.json`` (per-step LDS of every method, with intervals and the
noise ceiling) and, after the audit, ``audit/audit-MODE.json`` with the images regenerated from each
audited step without the top-k proponents and without k random training images
(``audit/regenerated-MODE/``). This module reads them into plain numbers and ``[-1, 1]`` arrays;
it writes nothing and finds the files through :class:`evaluations.folder.RunFolder` (the layout of a
run) and :class:`evaluations.audit.Case` (where a regenerated image lives).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np

__all__ = ["evaluation_run", "load_evidence", "lds_series", "audit_rows"]

_METHOD_NAMES = {"trak": "TRAK", "pixel_neg_l2": "pixel −L2", "pixel_cosine": "pixel cosine", "random": "random",
                 "embedding": "embedding cosine", "grad_dot": "gradient dot", "grad_cosine": "gradient cosine"}


def evaluation_run(eval_dir: str) -> dict:
    """What the journey page of an evaluation run is built from: the training set's ``DataArgs``
    (from ``config.json``), the generated targets' ``scores`` folder and their ``trajectory`` file."""
    from diffusion_trak.data import DataArgs
    from diffusion_trak.evaluations.folder import RunFolder

    run = RunFolder.open(eval_dir)
    return {"data": DataArgs.from_dict(run.config["data"]), "scores": run.scores("generated"), "trajectory": run.trajectory}


def load_evidence(eval_dir: str, final_images) -> dict:
    """``{"lds": lds_series(eval_dir), "audit": audit_rows(eval_dir, final_images)}``."""
    return {"lds": lds_series(eval_dir), "audit": audit_rows(eval_dir, final_images)}


def lds_series(eval_dir: str, target_set: str = "generated", kind: str = "xhat0_loss") -> Optional[dict]:
    """The per-step LDS plot of the run: ``{"steps", "timesteps", "kind", "series": [{"name", "mean",
    "lo", "hi"}]}`` for every method and the noise ceiling, or ``None`` without ``lds.json``."""
    from diffusion_trak.evaluations.folder import RunFolder

    path = RunFolder(eval_dir).lds_file
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        lds = json.load(f)
    kinds = lds["tables"].get(target_set) or {}
    if not kinds:
        return None
    kind = kind if kind in kinds else sorted(kinds)[0]
    entry = kinds[kind]

    def value(v):  # n/a (NaN, e.g. a constant ground truth) is drawn as a gap
        return float(v) if v is not None and np.isfinite(v) else None

    def series(name, rows):
        return {"name": name, **{x: [value(r.get(x)) for r in rows] for x in ("mean", "lo", "hi")}}

    out = [series(_METHOD_NAMES.get(m, m), rows) for m, rows in entry["methods"].items()]
    if entry.get("ceiling"):
        out.append(series("noise ceiling", entry["ceiling"]))
    return {"steps": [int(s) for s in lds["steps"]], "timesteps": [int(t) for t in lds["timesteps"]],
            "set": target_set, "kind": kind, "series": out}


def audit_rows(eval_dir: str, final_images) -> Dict[int, List[dict]]:
    """Per target: one row per audit (mode, step, k) with the ``original`` final image, the images
    regenerated from that step ``without_top`` and ``without_random`` (the first random control),
    and the pixel L2 change of each (the random one averaged over its draws, as the audit reports).
    ``final_images`` is the run's ``trajectory.final`` ``(B, C, H, W)``. Empty without an audit."""
    from diffusion_trak.evaluations.audit import MODES, Case
    from diffusion_trak.evaluations.folder import RunFolder

    audit = RunFolder(eval_dir).audit
    out: Dict[int, List[dict]] = {}
    for mode in MODES:
        path = audit.result(mode)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)["cases"]
        regen = audit.regenerated(mode)
        for r in rows:
            if r["kind"] != "top":
                continue
            s, b, k = r["step"], r["target"], r["k"]
            rnd = [x for x in rows if x["kind"] == "random" and x["step"] == s and x["target"] == b and x["k"] == k]
            first = next((x for x in rnd if x.get("draw", 0) == 0), None)
            if first is None:
                continue
            out.setdefault(int(b), []).append({
                "mode": mode, "step": int(s), "timestep": int(r["timestep"]), "k": int(k),
                "original": np.clip(np.asarray(final_images[b], dtype=np.float32), -1, 1),
                "without_top": Case.from_row(r).image(regen, s, b),
                "without_random": Case.from_row(first).image(regen, s, b),
                "top_l2": float(r["pixel_l2"]),
                "random_l2": float(np.mean([x["pixel_l2"] for x in rnd])),
                "random_draws": len(rnd)})
    for b in out:
        out[b].sort(key=lambda e: (e["mode"], e["step"], e["k"]))
    return out
