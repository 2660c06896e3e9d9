"""The journey page's content: every target of a run, step by step, as one JSON-ready dict.

:func:`journey_data` gathers what the page shows (images as PNG data URIs, top-k lists, the chart
numbers of :mod:`~diffusion_trak.report.journey_stats`, the counterfactual evidence of
:mod:`~diffusion_trak.report.evidence`); :func:`~diffusion_trak.report.html.write_page` draws it.
Text in the dict (titles, captions, class names) is raw: the page sets it as text, never as markup.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from . import journey_stats as stats
from .html import png_data_uri
from .plots import format_score, to_uint8

__all__ = ["journey_data", "trajectory_images", "target_captions"]


def _uri(image) -> str:
    """``(C, H, W)`` image in ``[-1, 1]`` -> PNG data URI."""
    return png_data_uri(to_uint8(image))


def trajectory_images(trajectory, steps: Sequence[int]):
    """``(x0, xt, final)`` to show for ``steps``: x̂0_t ``(S, B, C, H, W)``, x_t (``None`` for a latent
    trajectory, whose x_t is not an image) and the final images ``(B, C, H, W)``, all in pixels."""
    pos = [trajectory.step_of(s) for s in steps]
    decoded = getattr(trajectory, "x0_decoded", None)
    if decoded is not None:  # latent diffusion: show the VAE-decoded predictions and the decoded final image
        final = getattr(trajectory, "final_decoded", None)
        return decoded[pos], None, final if final is not None else decoded[pos[-1]]
    return trajectory.x0_pred[pos], trajectory.x_t[pos], trajectory.final


def target_captions(trajectory, dataset, num_targets: int) -> List[str]:
    """One caption per target: its prompt, else its class name, else ``""``."""
    prompts = getattr(trajectory, "prompts", None) if trajectory is not None else None
    if prompts:
        return [str(p) for p in prompts]
    labels = getattr(trajectory, "class_labels", None) if trajectory is not None else None
    if labels is not None:
        names = getattr(dataset, "class_names", None)
        return [f"class {names[int(c)] if names and 0 <= int(c) < len(names) else int(c)}" for c in labels]
    return [""] * num_targets


#: captions shown as their own category in the label chart; the rest are "other captions"
MAX_CAPTION_CATEGORIES = 9


def _label_names(dataset, needed: Sequence[int]):
    """``(kind, names, label_of)``: labels of the training data when it has them, else its captions (the most
    frequent first captions, the rest as one "other captions"), else pixel clusters."""
    idx = dataset.indices.numpy()
    captions = getattr(dataset, "captions", None)
    if dataset.labels is None and captions is not None:
        from collections import Counter

        first = [captions.of(int(i))[0] for i in idx]
        common = [c for c, _ in Counter(first).most_common()]
        names = common if len(common) <= MAX_CAPTION_CATEGORIES + 1 else common[:MAX_CAPTION_CATEGORIES] + ["other captions"]
        code = {c: j for j, c in enumerate(names)}
        labels = np.array([code.get(c, len(names) - 1) for c in first], dtype=np.int64)
        kind = "caption"
    elif dataset.labels is not None:
        labels = dataset.labels.numpy()
        num = int(max(labels.max() + 1, len(dataset.class_names or [])))
        names = [str(dataset.class_names[c]) if dataset.class_names and c < len(dataset.class_names) else str(c)
                 for c in range(num)]
        kind = "label"
    else:
        import torch.nn.functional as F  # cluster thumbnails of at most 16×16: cheap for large images, same for small ones

        side = min(16, dataset.images.shape[-1])
        labels = stats.pixel_clusters(F.interpolate(dataset.images, size=(side, side), mode="area").numpy())
        num = int(labels.max()) + 1
        names = [f"cluster {c}" for c in range(num)]
        kind = "cluster"
    pos = dataset.positions_of(np.asarray(list(needed), dtype=np.int64)).numpy()
    return kind, names, {int(idx[p]): int(labels[p]) for p in pos}


#: colour words a caption may name, and the colour the caption chart then draws it in
_COLOUR_WORDS = {"red": "#d62728", "green": "#2ca02c", "blue": "#1f77b4", "yellow": "#e6c700", "orange": "#ff7f0e",
                 "purple": "#9467bd", "pink": "#e377c2", "brown": "#8c564b", "gray": "#7f7f7f", "grey": "#7f7f7f",
                 "black": "#222222", "white": "#dddddd", "cyan": "#17becf", "magenta": "#c2185b", "violet": "#8a2be2"}
#: the other categories' colours: none of them close to a colour word's
_PALETTE = ["#76b7b2", "#b07aa1", "#9c755f", "#bab0ac", "#4e79a7", "#86bcb6", "#d4a6c8", "#a0cbe8", "#79706e",
            "#d7b5a6"]


def share_colours(names: Sequence[str]) -> List[str]:
    """A colour per chart category, the same everywhere on the page: a category whose name holds exactly one colour
    word ("a red circle") is drawn in that colour (when no other category claims it), the others in palette colours
    that are none of those words' (so "a red circle" is never drawn green)."""
    import re

    words = [[w for w in re.findall(r"[a-z]+", str(n).lower()) if w in _COLOUR_WORDS] for n in names]
    claimed = {}
    for j, ws in enumerate(words):
        if len(set(ws)) == 1:
            claimed.setdefault(_COLOUR_WORDS[ws[0]], []).append(j)
    out, palette = [None] * len(names), iter(_PALETTE)
    for colour, js in claimed.items():
        if len(js) == 1:
            out[js[0]] = colour
    for j in range(len(names)):
        if out[j] is None:
            out[j] = next(palette, None) or f"hsl({(j * 47) % 360},25%,60%)"
    return out


def _signed(idx, val, positive: bool):
    """``idx`` where the score has the sign of a proponent (> 0) or of an opponent (< 0), -1 elsewhere."""
    val = np.asarray(val)
    return np.where(val > 0 if positive else val < 0, np.asarray(idx), -1)


def _named(dataset, p: int) -> dict:
    """``{"name", "caption"}`` of the training image at position ``p``: its source (file path relative to the
    image folder, dataset row, or ``name #index``) and caption or class name (None without one)."""
    if not hasattr(dataset, "describe"):
        return {"name": f"#{int(dataset.indices[p])}", "caption": None}
    d = dataset.describe(int(p))
    return {"name": str(d["source"]), "caption": None if d["caption"] is None else str(d["caption"])}


def score_meaning(values, k: int, what: str = "this step's prediction") -> dict:
    """What the scores of one target at one step say, as text the page shows: their sign (how many training
    images pull toward the step's prediction, how many push away) and how flat the ranking is: the gap between the
    mean of the top-k and the median, in standard deviations of all scores (``flat`` below 1)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    n, neg = v.size, int((v < 0).sum())
    k = max(1, min(int(k), n))
    top = np.sort(v)[::-1][:k]
    sd, med = float(v.std()), float(np.median(v))
    gap = (float(top.mean()) - med) / sd if sd > 0 else 0.0
    kind = "nearly flat" if gap < 1 else "moderately peaked" if gap < 3 else "peaked"
    sign = (f"all {n} scores are positive: every training image pulls toward {what}, none opposes it"
            if neg == 0 else f"{neg} of {n} scores are negative (opponents: they push away from {what}), "
            f"{n - neg} positive (proponents pull toward it)")
    spread = (f"scores from {format_score(v.min())} to {format_score(v.max())}, median {format_score(med)}, standard "
              f"deviation {sd:.1e}; the top-{k} stand {gap:.1f} standard deviations above the median: a {kind} ranking")
    return {"sign": sign, "spread": spread, "negative": neg, "gap": round(gap, 3), "flat": bool(gap < 1)}


def journey_data(scores, dataset, x0, xt=None, finals=None, targets: Optional[Sequence[int]] = None, k: int = 6,
                 title: str = "", captions: Optional[Sequence[str]] = None, meta: Optional[Dict[str, Any]] = None,
                 evidence: Optional[dict] = None, about: Optional[Dict[str, Any]] = None) -> dict:
    """Everything the journey page shows, as a JSON-ready dict.

    Args:
        scores: :class:`~diffusion_trak.api.Scores` ``(S, B, N)``.
        dataset: the training :class:`~diffusion_trak.data.ImageDataset` of the scores.
        x0: x̂0_t ``(S, T, C, H, W)`` for the ``T`` shown targets, in ``[-1, 1]``.
        xt: x_t, same shape, or ``None``.
        finals: the final images ``(T, C, H, W)`` (default: x̂0 at the last step).
        targets: which targets of ``scores`` are shown (default all ``B``).
        k: proponents and opponents per step.
        title, captions (one per shown target), meta: text shown as is (escaped by the page).
        evidence: ``{"lds": lds_series(...), "audit": audit_rows(...)}`` of an evaluation run, or ``None``.
        about: the page's plain-words header: ``{"question", "model", "params", "n"}`` (text, shown as is).
    ``inTop`` / ``inBottom`` (what the image inspector lists) hold the steps where an image is among the top-k with a
    positive score (a proponent) / among the lowest k with a negative score (an opponent): never a non-negative
    score called an opponent."""
    S, B = scores.values.shape[:2]
    targets = list(range(B)) if targets is None else [int(b) for b in targets]
    x0 = np.asarray(x0)
    if x0.shape[:2] != (S, len(targets)):
        raise ValueError(f"x0 must be (steps={S}, targets={len(targets)}, C, H, W), got {x0.shape}")
    finals = np.asarray(finals) if finals is not None else x0[-1]
    captions = list(captions) if captions is not None else [""] * len(targets)
    ti, tv, bi, bv = scores.top(k)
    dest = scores.top_destination(k) if getattr(scores, "destination", None) is not None else None
    images = dataset.images.numpy()
    idx = dataset.indices.numpy()
    nearest = {b: idx[stats.nearest_training(np.clip(finals[j], -1, 1), images, k)] for j, b in enumerate(targets)}
    needed = set(np.concatenate([ti[:, targets].ravel(), bi[:, targets].ravel()] + list(nearest.values())
                                + ([dest[0][targets].ravel(), dest[2][targets].ravel()] if dest else [])).tolist())
    kind, names, label_of = _label_names(dataset, needed)
    pos = dataset.positions_of(np.asarray(sorted(needed), dtype=np.int64)).numpy()
    train = {str(int(idx[p])): {"src": _uri(images[p]), "label": names[label_of[int(idx[p])]], **_named(dataset, p)}
             for p in pos}

    audit = (evidence or {}).get("audit") or {}
    shown = []
    for j, b in enumerate(targets):
        pro, opp = ti[:, b], bi[:, b]
        # the sign rule: a proponent has a score > 0, an opponent a score < 0, whatever its rank
        pro_signed, opp_signed = _signed(pro, tv[:, b], True), _signed(opp, bv[:, b], False)
        shown.append({
            "id": b, "caption": captions[j], "final": _uri(finals[j]),
            "x0": [_uri(x0[s, j]) for s in range(S)],
            "xt": [_uri(xt[s, j]) for s in range(S)] if xt is not None else None,
            "pro": [[[int(i), float(v), format_score(v)] for i, v in zip(ti[s, b], tv[s, b])] for s in range(S)],
            "opp": [[[int(i), float(v), format_score(v)] for i, v in zip(bi[s, b], bv[s, b])] for s in range(S)],
            "meaning": [score_meaning(scores.values[s, b], k) for s in range(S)],
            # the destination: the final image attributed with its target over the whole range of timesteps
            "dest": None if dest is None else {
                "pro": [[int(i), float(v), format_score(v)] for i, v in zip(dest[0][b], dest[1][b])],
                "opp": [[int(i), float(v), format_score(v)] for i, v in zip(dest[2][b], dest[3][b])],
                "meaning": score_meaning(scores.destination[b], k, "the final image")},
            "overlap": stats.topk_overlap(pro).tolist(),
            "share": stats.label_shares(pro, label_of, len(names)).tolist(),
            "nearest": [{"index": int(i), "entry": e}
                        for i, e in zip(nearest[b], stats.first_entry_steps(pro_signed, nearest[b]))],
            "inTop": {str(i): s for i, s in stats.steps_in_topk(pro_signed).items() if i >= 0},
            "inBottom": {str(i): s for i, s in stats.steps_in_topk(opp_signed).items() if i >= 0},
            "audit": [{**{x: e[x] for x in ("mode", "step", "timestep", "k", "top_l2", "random_l2", "random_draws")},
                       **{x: _uri(e[x]) for x in ("original", "without_top", "without_random")}}
                      for e in audit.get(b, [])],
        })
    return {"title": str(title), "meta": [[str(a), str(v)] for a, v in (meta or {}).items() if v is not None],
            "k": int(k), "steps": [int(s) for s in scores.steps], "timesteps": [int(t) for t in scores.timesteps],
            "shareKind": kind, "shareNames": names, "shareColors": share_colours(names), "train": train,
            "targets": shown, "lds": (evidence or {}).get("lds"),
            "about": {str(a): str(v) for a, v in (about or {}).items() if v is not None}}
