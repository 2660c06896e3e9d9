"""Matplotlib pictures of per-step attributions (Agg canvas, PNG output).

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, never
through ``pyplot``, so no global backend state is touched and nothing leaks.

All inputs are plain tensors / arrays, independent of the rest of the pipeline:
images are ``(…, C, H, W)`` with values in ``[-1, 1]``.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

try:  # torch is optional for this module
    import torch
except ImportError:  # pragma: no cover
    torch = None

__all__ = [
    "to_uint8",
    "format_score",
    "plot_attribution",
    "image_grid_png",
    "plot_lines",
]

ArrayLike = Union[np.ndarray, "torch.Tensor", Sequence]

_POS_COLOR = "#1a7f37"
_NEG_COLOR = "#cf222e"
_QUERY_COLOR = "#0969da"
_MUTED_COLOR = "#656d76"


def _np(x) -> np.ndarray:
    """Tensor / array / list -> numpy array (float tensors stay float)."""
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def to_uint8(images) -> np.ndarray:
    """``[-1, 1]`` images ``(C,H,W)`` or ``(N,C,H,W)`` -> uint8 ``(H,W,C)`` / ``(N,H,W,C)``.

    Channel count is preserved (1 stays 1).  Values outside ``[-1, 1]`` are clipped.
    """
    a = _np(images)
    if a.ndim not in (3, 4):
        raise ValueError(f"expected (C,H,W) or (N,C,H,W) images, got shape {a.shape}")
    if a.dtype == np.uint8:  # already 0..255, only move the channel axis
        out = a
    else:
        a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
        out = np.round((np.clip(a, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(out, -3, -1))


def format_score(score: float) -> str:
    """Compact signed score, e.g. ``+1.2e-02``."""
    s = float(score)
    if not np.isfinite(s):
        return str(s)
    return f"{s:+.1e}"


def _show(ax, img_hwc: np.ndarray) -> None:
    if img_hwc.shape[-1] == 1:
        ax.imshow(img_hwc[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(img_hwc[..., :3], interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _frame(ax, color: str, width: float) -> None:
    for sp in ax.spines.values():
        sp.set_edgecolor(color)
        sp.set_linewidth(width)


def _figure(size, dpi) -> Figure:
    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


#: the PNG text chunk that marks a picture as ours (:func:`diffusion_trak.store.claim`: a rerun may replace it)
PNG_METADATA = {"Software": "diffusion-trak"}


def _prepare_dir(path: Union[str, os.PathLike]) -> str:
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    return path


def check_attribution_inputs(
    query_images,
    step_labels,
    top_images,
    top_scores,
    top_indices,
    bottom_images=None,
    bottom_scores=None,
    bottom_indices=None,
) -> dict:
    """Validate and convert attribution inputs to numpy (shared by PNG and HTML writers).

    Returns a dict with ``query`` (S,H,W,C uint8), ``labels`` (list[str]),
    ``top`` (S,K,H,W,C uint8), ``top_scores`` (S,K), ``top_indices`` (S,K) and the
    same ``bottom*`` entries (``None`` when not given).
    """
    q = to_uint8(query_images)
    if q.ndim == 3:
        q = q[None]
    S = q.shape[0]
    labels = [str(s) for s in step_labels]
    if len(labels) != S:
        raise ValueError(f"{len(labels)} step labels for {S} query images")

    def group(images, scores, indices, what):
        im = _np(images)
        if im.ndim == 4 and S == 1:
            im = im[None]
        if im.ndim != 5 or im.shape[0] != S:
            raise ValueError(f"{what}_images must be (S={S}, K, C, H, W), got shape {im.shape}")
        K = im.shape[1]
        sc = _np(scores).astype(np.float64).reshape(S, -1)
        ix = _np(indices).astype(np.int64).reshape(S, -1)
        if sc.shape[1] != K or ix.shape[1] != K:
            raise ValueError(
                f"{what}: {K} images per step but scores {sc.shape} / indices {ix.shape}"
            )
        u8 = to_uint8(im.reshape((S * K,) + im.shape[2:])) if K else np.zeros((0,) + q.shape[1:], np.uint8)
        return u8.reshape((S, K) + u8.shape[1:]), sc, ix

    top, tsc, tix = group(top_images, top_scores, top_indices, "top")
    out = dict(query=q, labels=labels, top=top, top_scores=tsc, top_indices=tix,
               bottom=None, bottom_scores=None, bottom_indices=None)
    if bottom_images is not None:
        if bottom_scores is None or bottom_indices is None:
            raise ValueError("bottom_images needs bottom_scores and bottom_indices")
        b, bsc, bix = group(bottom_images, bottom_scores, bottom_indices, "bottom")
        out.update(bottom=b, bottom_scores=bsc, bottom_indices=bix)
    return out


def plot_attribution(
    out_png,
    query_images,
    step_labels: Sequence[str],
    top_images,
    top_scores,
    top_indices,
    bottom_images=None,
    bottom_scores=None,
    bottom_indices=None,
    title: Optional[str] = None,
    query_caption: str = "x̂0_t",
    dpi: int = 100,
    top_names: Optional[Sequence[Sequence[str]]] = None,
    bottom_names: Optional[Sequence[Sequence[str]]] = None,
) -> str:
    """Grid of per-step attributions: one row per denoising step.

    Each row shows the query image (the model's x̂0 prediction at that step,
    labelled ``query_caption`` and ``step_labels[s]``), then the top-K training
    images (proponents), each titled ``#index`` and its score, and optionally,
    after a gap, the K most negative ones (opponents).

    Args:
        out_png: output path (parent folders are created).
        query_images: ``(S, C, H, W)`` in [-1, 1].
        step_labels: S strings, e.g. ``"step 40 · t=199"``.
        top_images: ``(S, K, C, H, W)`` in [-1, 1]; ``top_scores``/``top_indices``: ``(S, K)``.
        bottom_images, bottom_scores, bottom_indices: same shapes (optional).
        title: figure title.
        top_names, bottom_names: ``(S, K)`` short texts naming each training image (its file and caption), shown
            under its index.
    The column headings say "proponents" / "opponents" only when every score under them is positive / negative
    (:func:`ranked_heading`).
    Returns:
        ``out_png``.
    """
    d = check_attribution_inputs(query_images, step_labels, top_images, top_scores, top_indices,
                                 bottom_images, bottom_scores, bottom_indices)
    S = d["query"].shape[0]
    K = d["top"].shape[1]
    KB = d["bottom"].shape[1] if d["bottom"] is not None else 0

    # Manual layout in inches so small images stay readable at any S, K.
    cell = 1.0          # image side
    named = top_names is not None or bottom_names is not None
    tgap = 0.72 if named else 0.42  # room for the title above each image (two lines, four with names)
    hgap = 0.08         # horizontal gap between images
    qgap = 0.30         # gap after the query column
    sep = 0.45 if KB else 0.0  # gap between proponents and opponents
    left, right, bottom_m = 0.15, 0.15, 0.1
    head = 0.30 + (0.35 if title else 0.0)  # column headers (+ title)
    width = left + cell + qgap + K * (cell + hgap) + (sep + KB * (cell + hgap) if KB else 0) + right
    height = head + S * (cell + tgap) + bottom_m
    fig = _figure((width, height), dpi)

    def add_ax(x_in, row):
        y_in = height - head - row * (cell + tgap) - tgap - cell
        return fig.add_axes([x_in / width, y_in / height, cell / width, cell / height])

    fs = 7 if cell <= 1.0 else 8
    x_q = left
    x_top = left + cell + qgap
    x_bot = x_top + K * (cell + hgap) + sep
    for s in range(S):
        ax = add_ax(x_q, s)
        _show(ax, d["query"][s])
        _frame(ax, _QUERY_COLOR, 2.0)
        ax.set_title(f"{query_caption}\n{d['labels'][s]}" if query_caption else d["labels"][s], fontsize=fs,
                     color=_QUERY_COLOR, pad=3)
        for k in range(K):
            ax = add_ax(x_top + k * (cell + hgap), s)
            _show(ax, d["top"][s, k])
            sc = d["top_scores"][s, k]
            _frame(ax, "#888888", 0.6)
            ax.set_title(f"#{d['top_indices'][s, k]}{_name_lines(top_names, s, k)}\n{format_score(sc)}", fontsize=fs, pad=3,
                         color=_POS_COLOR if sc >= 0 else _NEG_COLOR)
        for k in range(KB):
            ax = add_ax(x_bot + k * (cell + hgap), s)
            _show(ax, d["bottom"][s, k])
            sc = d["bottom_scores"][s, k]
            _frame(ax, "#888888", 0.6)
            ax.set_title(f"#{d['bottom_indices'][s, k]}{_name_lines(bottom_names, s, k)}\n{format_score(sc)}", fontsize=fs,
                         pad=3,
                         color=_POS_COLOR if sc >= 0 else _NEG_COLOR)

    # column headers
    y_head = (height - head + 0.08) / height
    fig.text((x_q + cell / 2) / width, y_head, "query", ha="center", va="bottom", fontsize=fs + 1,
             weight="bold", color=_QUERY_COLOR)
    if K:
        xc = x_top + (K * (cell + hgap) - hgap) / 2
        fig.text(xc / width, y_head, ranked_heading(d["top_scores"], True), ha="center", va="bottom", fontsize=fs + 1,
                 weight="bold", color=_POS_COLOR if (d["top_scores"] > 0).all() else _MUTED_COLOR)
    if KB:
        xc = x_bot + (KB * (cell + hgap) - hgap) / 2
        fig.text(xc / width, y_head, ranked_heading(d["bottom_scores"], False), ha="center", va="bottom", fontsize=fs + 1,
                 weight="bold", color=_NEG_COLOR if (d["bottom_scores"] < 0).all() else _MUTED_COLOR)
        xs = (x_bot - sep / 2) / width
        fig.add_artist(Line2D([xs, xs], [bottom_m / height, (height - head) / height],
                                  color="#bbbbbb", lw=1.0, ls="--"))
    if title:
        fig.text(0.5, (height - 0.1) / height, title, ha="center", va="top", fontsize=fs + 3)

    out_png = _prepare_dir(out_png)
    fig.savefig(out_png, dpi=dpi, facecolor="white", metadata=PNG_METADATA)
    return out_png


def ranked_heading(scores, high: bool) -> str:
    """The heading over a column of ranked scores: "top-K proponents" only when all are positive, "top-K
    opponents" only when all are negative; else what they are ("highest K scores", "lowest K scores (no
    opponents: none negative)")."""
    sc = np.asarray(scores, dtype=np.float64)
    K = sc.shape[-1] if sc.ndim else 0
    if high:
        return f"top-{K} proponents" if (sc > 0).all() else f"highest {K} scores (green: positive)"
    if (sc < 0).all():
        return f"top-{K} opponents"
    return f"lowest {K} scores (none negative)" if (sc >= 0).all() else f"lowest {K} scores (red: negative)"


def _name_lines(names, s: int, k: int) -> str:
    """``names[s][k]`` as short lines under an image's index (file name, caption), or ""."""
    if names is None:
        return ""
    text = str(names[s][k])
    return "".join("\n" + (part if len(part) <= 16 else part[:15] + "…") for part in text.split("\n")[:2])


def image_grid_png(
    out_png,
    rows: List,
    row_labels: Sequence[str],
    col_labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    dpi: int = 100,
) -> str:
    """Generic labelled image grid.

    Args:
        out_png: output path.
        rows: list of ``(N_r, C, H, W)`` image batches in [-1, 1] (rows may differ in N).
        row_labels: one label per row (written left of the row).
        col_labels: optional column titles (shown above the first row).
        title: figure title.
    Returns:
        ``out_png``.
    """
    arrs = []
    for r in rows:
        a = to_uint8(r)
        arrs.append(a[None] if a.ndim == 3 else a)
    R = len(arrs)
    if R == 0:
        raise ValueError("image_grid_png needs at least one row")
    labels = [str(x) for x in row_labels]
    if len(labels) != R:
        raise ValueError(f"{len(labels)} row labels for {R} rows")
    C = max(a.shape[0] for a in arrs)
    if C == 0:
        raise ValueError("image_grid_png: all rows are empty")
    if col_labels is not None and len(col_labels) > C:
        raise ValueError(f"{len(col_labels)} column labels for {C} columns")

    cell, gap = 1.0, 0.08
    label_w = min(2.5, max(0.6, 0.075 * max(len(s) for s in labels) + 0.3))
    top = (0.3 if col_labels is not None else 0.05) + (0.4 if title else 0.0)
    width = label_w + C * (cell + gap) + 0.1
    height = top + R * (cell + gap) + 0.1
    fig = _figure((width, height), dpi)
    for r, a in enumerate(arrs):
        y = height - top - r * (cell + gap) - cell
        fig.text((label_w - 0.1) / width, (y + cell / 2) / height, labels[r], ha="right", va="center",
                 fontsize=8)
        for c in range(a.shape[0]):
            x = label_w + c * (cell + gap)
            ax = fig.add_axes([x / width, y / height, cell / width, cell / height])
            _show(ax, a[c])
            _frame(ax, "#888888", 0.6)
            if r == 0 and col_labels is not None and c < len(col_labels):
                ax.set_title(str(col_labels[c]), fontsize=7, pad=3)
    if title:
        fig.text(0.5, (height - 0.08) / height, title, ha="center", va="top", fontsize=10)
    out_png = _prepare_dir(out_png)
    fig.savefig(out_png, dpi=dpi, facecolor="white", metadata=PNG_METADATA)
    return out_png


def plot_lines(
    out_png,
    x,
    series: Dict[str, Union[Tuple, Sequence]],
    xlabel: str = "",
    ylabel: str = "",
    title: Optional[str] = None,
    dpi: int = 100,
) -> str:
    """Line plot with shaded confidence bands.

    Args:
        out_png: output path.
        x: shared x values (length T).
        series: ``name -> (mean, lo, hi)`` arrays of length T; ``lo``/``hi`` may be
            ``None`` (no band), or the value may be just the mean array.
        xlabel, ylabel, title: axis labels and title.
    Returns:
        ``out_png``.
    """
    xs = _np(x).astype(np.float64).reshape(-1)
    fig = _figure((6.0, 4.0), dpi)
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^v<>ph*"
    for i, (name, val) in enumerate(series.items()):
        if isinstance(val, (tuple, list)) and len(val) == 3 and not np.isscalar(val[0]):
            mean, lo, hi = val
        else:
            mean, lo, hi = val, None, None
        m = _np(mean).astype(np.float64).reshape(-1)
        if m.shape[0] != xs.shape[0]:
            raise ValueError(f"series {name!r}: {m.shape[0]} values for {xs.shape[0]} x positions")
        line, = ax.plot(xs, m, marker=markers[i % len(markers)], ms=4, lw=1.5, label=str(name))
        if lo is not None and hi is not None:
            l = _np(lo).astype(np.float64).reshape(-1)
            h = _np(hi).astype(np.float64).reshape(-1)
            ax.fill_between(xs, l, h, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    out_png = _prepare_dir(out_png)
    fig.savefig(out_png, dpi=dpi, facecolor="white", metadata=PNG_METADATA)
    return out_png
