"""Self-contained HTML report of per-step attributions.

One file, no external assets and no JavaScript: images are embedded as base64
PNG data URIs and upscaled by the browser with ``image-rendering: pixelated``.
"""
from __future__ import annotations

import base64
import html as _html
import io
import os
from typing import Any, Dict, Optional, Sequence

import numpy as np
from PIL import Image

from .plots import _prepare_dir, check_attribution_inputs, format_score

__all__ = ["write_html", "png_data_uri"]

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.2em; color: #1f2328; }
h1 { font-size: 1.3em; margin: 0 0 .6em 0; }
table.meta { border-collapse: collapse; margin-bottom: 1em; font-size: .85em; }
table.meta th, table.meta td { border: 1px solid #d0d7de; padding: 2px 8px; text-align: left; }
table.meta th { background: #f6f8fa; font-weight: 600; }
table.attr { border-collapse: collapse; }
table.attr th { font-size: .8em; padding: 2px 6px; background: #f6f8fa; }
table.attr th.pro { color: #1a7f37; }
table.attr th.opp { color: #cf222e; }
table.attr td { padding: 3px; text-align: center; vertical-align: top; font-size: .75em; }
table.attr td.step { text-align: right; white-space: nowrap; font-weight: 600; padding-right: 8px; vertical-align: middle; }
table.attr td.sep { border-left: 2px dashed #bbb; padding: 0 4px; }
table.attr tr.step { border-bottom: 1px solid #eaeef2; }
img.px { width: var(--px, 72px); height: auto; image-rendering: pixelated; image-rendering: crisp-edges;
         display: block; margin: 0 auto 2px auto; border: 1px solid #999; }
td.query img.px { border: 2px solid #0969da; }
.idx { font-family: ui-monospace, Menlo, Consolas, monospace; }
.pos { color: #1a7f37; }
.neg { color: #cf222e; }
"""


def png_data_uri(img_hwc: np.ndarray) -> str:
    """uint8 ``(H, W, C)`` image (C = 1 or 3) -> ``data:image/png;base64,...``."""
    a = np.asarray(img_hwc, dtype=np.uint8)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    elif a.ndim == 3 and a.shape[-1] > 3:
        a = a[..., :3]
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(img_hwc: np.ndarray, alt: str) -> str:
    return f'<img class="px" src="{png_data_uri(img_hwc)}" alt="{_html.escape(alt, quote=True)}">'


def _cell(img_hwc: np.ndarray, index: int, score: float) -> str:
    cls = "pos" if score >= 0 else "neg"
    return (
        f'<td class="train">{_img(img_hwc, f"train #{index}")}'
        f'<span class="idx">#{int(index)}</span><br>'
        f'<span class="{cls}" title="{float(score)!r}">{_html.escape(format_score(score))}</span></td>'
    )


def write_html(
    out_html,
    query_images,
    step_labels: Sequence[str],
    top_images,
    top_scores,
    top_indices,
    bottom_images=None,
    bottom_scores=None,
    bottom_indices=None,
    title: Optional[str] = None,
    meta: Optional[Dict[str, Any]] = None,
    query_caption: str = "x̂0_t",
    pixel_width: Optional[int] = None,
) -> str:
    """Write a self-contained HTML table of per-step attributions.

    One ``<tr class="step">`` per step: the step label, the query image (x̂0 at
    that step), the K proponents (index and score each), then the opponents
    when given.  ``meta`` (e.g. model, k, T, λ) is shown as a small table at the
    top.  Inputs are as for :func:`~diffusion_trak.report.plots.plot_attribution`.
    ``pixel_width`` sets the displayed image width in CSS pixels (default: about
    72 px, at least 4x the native width for tiny images).  Returns ``out_html``.
    """
    d = check_attribution_inputs(query_images, step_labels, top_images, top_scores, top_indices,
                                 bottom_images, bottom_scores, bottom_indices)
    S = d["query"].shape[0]
    K = d["top"].shape[1]
    KB = d["bottom"].shape[1] if d["bottom"] is not None else 0
    w_native = d["query"].shape[2]
    if pixel_width is None:
        pixel_width = max(72, min(4 * w_native, 128)) if w_native < 72 else w_native
    esc = _html.escape
    title_txt = title or "Per-step training-data attribution"

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title_txt)}</title>",
        f"<style>{_CSS}:root {{ --px: {int(pixel_width)}px; }}</style>",
        "</head><body>",
        f"<h1>{esc(title_txt)}</h1>",
    ]
    if meta:
        parts.append('<table class="meta">')
        for k, v in meta.items():
            parts.append(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>")
        parts.append("</table>")

    head = ['<tr><th>step</th><th>query</th>']
    head += [f'<th class="pro">+{k + 1}</th>' for k in range(K)]
    if KB:
        head.append('<th class="sep"></th>')
        head += [f'<th class="opp">&minus;{k + 1}</th>' for k in range(KB)]
    head.append("</tr>")
    parts.append('<table class="attr"><thead>')
    if K or KB:
        group = ['<tr><th></th><th></th>']
        if K:
            group.append(f'<th class="pro" colspan="{K}">proponents (most positive)</th>')
        if KB:
            group.append('<th class="sep"></th>')
            group.append(f'<th class="opp" colspan="{KB}">opponents (most negative)</th>')
        group.append("</tr>")
        parts.append("".join(group))
    parts.append("".join(head))
    parts.append("</thead><tbody>")
    for s in range(S):
        row = [f'<tr class="step"><td class="step">{esc(d["labels"][s])}</td>']
        row.append(
            f'<td class="query">{_img(d["query"][s], query_caption)}{esc(query_caption)}</td>'
        )
        for k in range(K):
            row.append(_cell(d["top"][s, k], d["top_indices"][s, k], d["top_scores"][s, k]))
        if KB:
            row.append('<td class="sep"></td>')
            for k in range(KB):
                row.append(_cell(d["bottom"][s, k], d["bottom_indices"][s, k], d["bottom_scores"][s, k]))
        row.append("</tr>")
        parts.append("".join(row))
    parts.append("</tbody></table>")
    parts.append("</body></html>")

    out_html = _prepare_dir(out_html)
    with open(out_html, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")
    return os.fspath(out_html)
