"""From scores to pictures: the per-step PNG of one target and the journey page of every target."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .html import write_page
from .journey import journey_data, target_captions, trajectory_images
from .plots import plot_attribution


def _meta(scores, k: int) -> dict:
    """The settings shown at the top of the page; ``top-k shown``: the ``k`` of the page and PNG (the scores'
    own ``top_k``, what ``scores.json`` lists, is another number and is left out)."""
    meta = dict(scores.meta.get("score", {}))
    meta.pop("top_k", None)
    feats = scores.meta.get("features", {})
    fz = feats.get("featurize", {})
    meta.update({"top-k shown": int(k), "T": fz.get("num_timesteps"), "k": fz.get("proj_dim"),
                 "output": fz.get("output"), "params": fz.get("params", "all") if fz else None,
                 "checkpoints": len(feats.get("checkpoints", [])), "training examples": len(scores.train_indices)})
    return meta


def about(scores, model: Optional[str] = None, adapter: Optional[str] = None) -> dict:
    """The page's plain-words header: the question (with the number of training images), the model (``model``,
    its folder, + the LoRA adapter when the features were made with one: ``adapter``, else its fingerprint) and
    which parameters were attributed, how many (from the feature store's settings the scores record)."""
    from ..api import describe_parameters

    n = len(scores.train_indices)
    feats = scores.meta.get("features", {}) or {}
    lora = feats.get("lora")
    ckpts = feats.get("checkpoints") or []
    name = model or (f"fingerprint {ckpts[-1]}" if ckpts else "unnamed")
    if lora:
        name += " + LoRA adapter " + (adapter or f"(fingerprint {lora[-1].get('adapter')})")
    count = feats.get("num_params")
    params = None if count is None else describe_parameters((feats.get("featurize") or {}).get("params", "all"),
                                                             int(count))
    return {"question": f"Which of your {n} training images most made this image, and when during sampling?",
            "model": name, "params": params, "n": n}


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
                     captions: Optional[Sequence[str]] = None, evidence: Optional[dict] = None,
                     model: Optional[str] = None, adapter: Optional[str] = None) -> Tuple[str, str]:
    """Write ``<out_prefix>.png`` (target ``target``: one row per step) and ``<out_prefix>.html``
    (the journey page: every target of ``scores``, step by step).

    The query image of each PNG row is x̂0 at that step (from ``trajectory``) or ``query_images[s]``.
    Without a trajectory the page shows target ``target`` only, with ``query_images`` as its x̂0_t.
    ``captions`` (one per target) default to the trajectory's prompts or class labels; ``evidence``
    is an evaluation run's ``{"lds": ..., "audit": ...}`` (:mod:`~diffusion_trak.report.evidence`); ``model`` and
    ``adapter`` name the model (folder) and LoRA adapter in the page's header (:func:`about`). With a destination
    row, the PNG's first row is the final image's (the answer first), then one row per step.
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
    labels = [f"x̂0_t\nstep {s} · t={t}" for s, t in zip(scores.steps, scores.timesteps)]
    rows_q, rows_ti, rows_tv = torch.as_tensor(query_images), ti[:, target], tv[:, target]
    rows_bi, rows_bv = bi[:, target], bv[:, target]
    dest = scores.top_destination(k) if getattr(scores, "destination", None) is not None else None
    if dest is not None:  # the destination first: the final image's answer, then the journey
        final = torch.as_tensor(finals[target] if finals is not None else rows_q[-1]).reshape(1, *rows_q.shape[1:])
        rows_q = torch.cat([final.to(rows_q.dtype), rows_q])
        labels = ["final image\ndestination (all t)"] + labels
        rows_ti, rows_tv = np.concatenate([dest[0][target][None], rows_ti]), np.concatenate([dest[1][target][None], rows_tv])
        rows_bi, rows_bv = np.concatenate([dest[2][target][None], rows_bi]), np.concatenate([dest[3][target][None], rows_bv])
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    png = plot_attribution(out_prefix + ".png", rows_q, labels, dataset.images[pos(rows_ti)], rows_tv, rows_ti,
                           dataset.images[pos(rows_bi)], rows_bv, rows_bi, query_caption="",
                           title=title or f"TRAK attribution per sampling step (target {target})",
                           top_names=_names(dataset, pos(rows_ti)), bottom_names=_names(dataset, pos(rows_bi)))
    n = scores.values.shape[1] if targets is None else 1
    if captions is None:
        captions = target_captions(trajectory, dataset, scores.values.shape[1])
        captions = captions if targets is None else [captions[target]]
    data = journey_data(scores, dataset, x0, xt, finals, targets=targets, k=k, title=title or "TRAK attribution per sampling step", captions=captions[:n],
                        meta=_meta(scores, k), evidence=evidence, about=about(scores, model, adapter))
    html = write_page(out_prefix + ".html", data)
    return png, html
