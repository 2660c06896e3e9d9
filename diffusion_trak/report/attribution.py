"""From scores to pictures: the per-step PNG of one target and the journey page of every target."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .html import write_page
from .journey import journey_data, target_captions, trajectory_images
from .plots import plot_attribution


def _meta(scores) -> dict:
    """The settings shown at the top of the page."""
    meta = dict(scores.meta.get("score", {}))
    feats = scores.meta.get("features", {})
    fz = feats.get("featurize", {})
    meta.update({"T": fz.get("num_timesteps"), "k": fz.get("proj_dim"), "output": fz.get("output"),
                 "checkpoints": len(feats.get("checkpoints", [])), "training examples": len(scores.train_indices)})
    return meta


def _names(dataset, positions):
    """``(S, K)`` texts naming the training images at ``positions``: file (or dataset row) and caption; None when
    the dataset cannot say."""
    if not hasattr(dataset, "describe"):
        return None
    pos = np.asarray(positions)
    out = np.empty(pos.shape, dtype=object)
    for j, p in np.ndenumerate(pos):
        d = dataset.describe(int(p))
        out[j] = str(d["source"]) + (f"\n{d['caption']}" if d["caption"] else "")
    return out


def plot_from_scores(scores, dataset, trajectory=None, out_prefix: str = "report/attribution", target: int = 0,
                     k: int = 6, query_images: Optional[torch.Tensor] = None, title: Optional[str] = None,
                     captions: Optional[Sequence[str]] = None, evidence: Optional[dict] = None) -> Tuple[str, str]:
    """Write ``<out_prefix>.png`` (target ``target``: one row per step) and ``<out_prefix>.html``
    (the journey page: every target of ``scores``, step by step).

    The query image of each PNG row is x̂0 at that step (from ``trajectory``) or ``query_images[s]``.
    Without a trajectory the page shows target ``target`` only, with ``query_images`` as its x̂0_t.
    ``captions`` (one per target) default to the trajectory's prompts or class labels; ``evidence``
    is an evaluation run's ``{"lds": ..., "audit": ...}`` (:mod:`~diffusion_trak.report.evidence`).
    A ``.png`` or ``.html`` already there that diffusion-trak did not write is refused before anything is written."""
    from ..store import claim

    for ext in (".png", ".html"):
        claim(out_prefix + ext, "report")
    ti, tv, bi, bv = scores.top(k)
    if trajectory is not None:
        x0, xt, finals = trajectory_images(trajectory, scores.steps)
        targets = None
    elif query_images is not None:
        x0, xt, finals, targets = torch.as_tensor(query_images)[:, None], None, None, [target]
    else:
        raise ValueError("give the trajectory (or query_images) to draw the per-step plot")
    if query_images is None:
        query_images = x0[:, target]
    pos = lambda idx: dataset.positions_of(torch.as_tensor(np.asarray(idx).reshape(-1))).reshape(np.asarray(idx).shape)
    labels = [f"step {s} · t={t}" for s, t in zip(scores.steps, scores.timesteps)]
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    png = plot_attribution(out_prefix + ".png", query_images, labels, dataset.images[pos(ti[:, target])], tv[:, target],
                           ti[:, target], dataset.images[pos(bi[:, target])], bv[:, target], bi[:, target],
                           title=title or f"TRAK attribution per sampling step (target {target})",
                           top_names=_names(dataset, pos(ti[:, target])), bottom_names=_names(dataset, pos(bi[:, target])))
    n = scores.values.shape[1] if targets is None else 1
    if captions is None:
        captions = target_captions(trajectory, dataset, scores.values.shape[1])
        captions = captions if targets is None else [captions[target]]
    data = journey_data(scores, dataset, x0, xt, finals, targets=targets, k=k, title=title or "TRAK attribution per sampling step", captions=captions[:n],
                        meta=_meta(scores), evidence=evidence)
    html = write_page(out_prefix + ".html", data)
    return png, html
