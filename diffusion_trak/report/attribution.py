"""From scores to pictures: the per-step PNG and HTML page of one target."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np
import torch

from .html import write_html
from .plots import plot_attribution


def plot_from_scores(scores, dataset, trajectory=None, out_prefix: str = "report/attribution", target: int = 0,
                     k: int = 6, query_images: Optional[torch.Tensor] = None, title: Optional[str] = None) -> Tuple[str, str]:
    """Write ``<out_prefix>.png`` and ``<out_prefix>.html`` for target ``target`` of ``scores``.

    The query image of each row is x̂0 at that step (from ``trajectory``) or ``query_images[s]``."""
    ti, tv, bi, bv = scores.top(k)
    ti, tv, bi, bv = ti[:, target], tv[:, target], bi[:, target], bv[:, target]
    if query_images is None:
        if trajectory is None:
            raise ValueError("give the trajectory (or query_images) to draw the per-step plot")
        query_images = torch.stack([trajectory.x0_pred[trajectory.step_of(s)][target] for s in scores.steps])
    pos = lambda idx: dataset.positions_of(torch.as_tensor(np.asarray(idx).reshape(-1))).reshape(np.asarray(idx).shape)
    top_images = dataset.images[pos(ti)]
    bottom_images = dataset.images[pos(bi)]
    labels = [f"step {s} · t={t}" for s, t in zip(scores.steps, scores.timesteps)]
    meta = {k_: v for k_, v in scores.meta.get("score", {}).items()}
    feats = scores.meta.get("features", {})
    meta.update({"T": feats.get("featurize", {}).get("num_timesteps"), "k": feats.get("featurize", {}).get("proj_dim"),
                 "output": feats.get("featurize", {}).get("output"), "checkpoints": len(feats.get("checkpoints", [])),
                 "training examples": len(scores.train_indices)})
    title = title or f"TRAK attribution per sampling step (target {target})"
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    png = plot_attribution(out_prefix + ".png", query_images, labels, top_images, tv, ti, bottom_images, bv, bi, title=title)
    html = write_html(out_prefix + ".html", query_images, labels, top_images, tv, ti, bottom_images, bv, bi,
                      title=title, meta=meta)
    return png, html
