"""The journey page: one self-contained HTML file per run.

No network and no external assets: images are PNG data URIs, the page's data is one JSON block
(:func:`~diffusion_trak.report.journey.journey_data`) and a small script draws it. The script sets
every text from the data with ``textContent`` (never as markup), and the JSON block escapes ``<``,
``>`` and ``&``, so a caption, prompt, class name or file name holding HTML shows as text.
The charts draw numbers computed in Python; the script computes none.
"""
from __future__ import annotations

import base64
import html as _html
import io
import json
import os

import numpy as np
from PIL import Image

from .plots import _prepare_dir

__all__ = ["write_page", "png_data_uri", "script_json"]


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


def script_json(data) -> str:
    """``data`` as JSON that is safe inside ``<script type="application/json">``: no ``</script>``,
    ``<!--`` or ``&`` can appear, and U+2028/U+2029 are escaped."""
    s = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for a, b in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        s = s.replace(a, b)
    return s


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1em 1.4em; color: #1f2328; }
h1 { font-size: 1.3em; margin: 0 0 .5em 0; } h2 { font-size: 1.1em; margin: 1em 0 .4em 0; }
h3 { font-size: .9em; margin: .4em 0 .2em 0; }
table.meta { border-collapse: collapse; font-size: .8em; }
table.meta th, table.meta td { border: 1px solid #d0d7de; padding: 1px 7px; text-align: left; }
table.meta th { background: #f6f8fa; font-weight: 600; }
img { image-rendering: pixelated; image-rendering: crisp-edges; }
.thumb { width: 56px; height: 56px; border: 1px solid #999; display: block; }
.big { width: 168px; height: 168px; border: 2px solid #0969da; display: block; }
.huge { width: 224px; height: 224px; border: 1px solid #999; display: block; }
.gallery { display: flex; flex-wrap: wrap; gap: 6px; }
.gallery button { border: 2px solid transparent; background: #f6f8fa; padding: 3px; cursor: pointer; font-size: .75em;
                  max-width: 120px; }
.gallery button.on { border-color: #0969da; background: #ddf4ff; }
.controls { display: flex; align-items: center; gap: .8em; margin: .3em 0; }
.controls input { width: 22em; }
#step-label { font-weight: 600; font-variant-numeric: tabular-nums; }
.strip { display: flex; gap: 3px; margin: .3em 0 .6em 0; }
.strip img { width: 36px; height: 36px; border: 2px solid transparent; cursor: pointer; }
.strip img.on { border-color: #0969da; }
.row { display: flex; gap: 1.2em; align-items: flex-start; flex-wrap: wrap; }
figure { margin: 0; text-align: center; font-size: .8em; }
.cells { display: flex; gap: 4px; flex-wrap: wrap; }
.cell { text-align: center; font-size: .7em; cursor: pointer; padding: 2px; border: 1px solid transparent;
        min-width: 64px; max-width: 150px; overflow-wrap: normal; word-break: keep-all; }
.cell .src { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.nowrap { white-space: nowrap; }
#about { margin: 0 0 .6em 0; } #about p { margin: .15em 0; }
.question { font-size: 1.15em; font-weight: 600; }
.cell img, .gallery img { margin: 0 auto; }
.cell:hover, .cell.on { border-color: #0969da; }
.idx { font-family: ui-monospace, Menlo, Consolas, monospace; }
.pos { color: #1a7f37; } .neg { color: #cf222e; } .muted { color: #656d76; }
.src { font-family: ui-monospace, Menlo, Consolas, monospace; color: #0969da; }
.cap { font-style: italic; }
.meaning { font-size: .8em; max-width: 34em; margin: .2em 0 .4em 0; } .meaning .flat { color: #9a6700; }
#inspector { border: 1px solid #d0d7de; padding: .5em .8em; background: #f6f8fa; max-width: 28em; }
.steps { display: flex; gap: 2px; margin: .2em 0; }
.steps span { width: 14px; height: 14px; border: 1px solid #bbb; display: inline-block; }
.steps span.in { background: #1a7f37; } .steps span.out { background: #cf222e; }
.steps span.cur { outline: 2px solid #0969da; }
.charts { display: flex; gap: 1.5em; flex-wrap: wrap; align-items: flex-start; }
.chart { font-size: .75em; }
.chart svg text { font-size: 10px; fill: #1f2328; }
.legend { display: flex; flex-wrap: wrap; gap: .2em .8em; max-width: 340px; }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: 3px; }
.nearest td { padding: 1px 6px; font-size: .8em; }
table.audit td, table.audit th { padding: 2px 8px; font-size: .8em; text-align: center; }
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("journey-data").textContent);
  var NS = "http://www.w3.org/2000/svg";
  var COLORS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
                "#9c755f", "#bab0ac"];
  var state = { t: 0, s: 0, inspect: null };
  var $ = function (id) { return document.getElementById(id); };

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function img(src, cls, alt) { var i = el("img", cls); i.alt = alt; i.src = src; return i; }
  function svg(tag, attrs, text) {
    var e = document.createElementNS(NS, tag);
    for (var a in attrs) e.setAttribute(a, attrs[a]);
    if (text !== undefined) e.textContent = String(text);
    return e;
  }
  function color(i) { return i < COLORS.length ? COLORS[i] : "hsl(" + (i * 47 % 360) + ",55%,55%)"; }
  function stepName(s) { return "step " + D.steps[s] + " \u00b7 t=" + D.timesteps[s]; }
  function target() { return D.targets[state.t]; }

  function gallery() {
    var box = $("targets");
    D.targets.forEach(function (T, j) {
      var b = el("button");
      b.type = "button"; b.dataset.target = j; b.title = T.caption;
      b.appendChild(img(T.final, "thumb", "final image of target " + T.id));
      b.appendChild(el("div", null, "target " + T.id));
      if (T.caption) b.appendChild(el("div", "muted", T.caption));
      b.addEventListener("click", function () { state.t = j; state.inspect = null; render(); });
      box.appendChild(b);
    });
  }

  function cell(entry, cls) {
    var i = entry[0], tr = D.train[String(i)];
    var c = el("div", "cell" + (state.inspect === i ? " on" : ""));
    c.dataset.index = i; c.dataset.score = entry[1];
    c.appendChild(img(tr.src, "thumb", "training image #" + i));
    c.appendChild(el("div", "idx", "#" + i));
    c.appendChild(el("div", cls, entry[2]));
    if (tr.name) { var nm = el("div", "src", tr.name); nm.title = tr.name; c.appendChild(nm); }
    if (tr.caption) { var cp = el("div", "cap", tr.caption); cp.title = tr.caption; c.appendChild(cp); }
    if (tr.label !== null && D.shareKind !== "caption" && tr.label !== tr.caption) c.appendChild(el("div", "muted", tr.label));
    c.addEventListener("click", function () { state.inspect = i; render(); });
    return c;
  }

  // a ranked list under an honest heading: proponents are the positive scores among the highest, opponents the
  // negative ones among the lowest; when there are none, the heading says so and the scores are shown as they are
  function ranked(id, entries, high) {
    var box = $(id), head = $(id + "-head"), k = entries.length;
    var named = entries.filter(function (e) { return high ? e[1] > 0 : e[1] < 0; });
    box.replaceChildren();
    if (named.length) {
      head.textContent = (high ? "top-" + named.length + " proponents (positive scores)"
                               : "top-" + named.length + " opponents (negative scores)");
      head.className = high ? "pos" : "neg";
      named.forEach(function (e) { box.appendChild(cell(e, high ? "pos" : "neg")); });
    } else {
      head.textContent = (high ? "highest " + k + " scores: none is positive, no training image supports this"
                               : "lowest " + k + " scores: none is negative, no training image opposes this");
      head.className = "muted";
      entries.forEach(function (e) { box.appendChild(cell(e, e[1] > 0 ? "pos" : e[1] < 0 ? "neg" : "muted")); });
    }
  }

  function stepBoxes(steps, cls) {
    var box = el("div", "steps");
    D.steps.forEach(function (_, s) {
      var b = el("span", (steps.indexOf(s) >= 0 ? cls : "") + (s === state.s ? " cur" : ""));
      b.title = stepName(s);
      box.appendChild(b);
    });
    return box;
  }

  function stepList(steps) {
    return steps.length ? steps.map(function (s) { return D.steps[s]; }).join(", ") : "none";
  }

  function inspector() {
    var box = $("inspector");
    box.replaceChildren();
    if (state.inspect === null) { box.hidden = true; return; }
    var T = target(), i = state.inspect, tr = D.train[String(i)];
    var inTop = T.inTop[String(i)] || [], inBottom = T.inBottom[String(i)] || [];
    box.hidden = false;
    var close = el("button", null, "close"); close.type = "button";
    close.addEventListener("click", function () { state.inspect = null; render(); });
    box.appendChild(close);
    var h = el("h3", null, "training image #" + i);
    if (tr.name) { h.appendChild(document.createTextNode(" \u00b7 ")); h.appendChild(el("span", "src nowrap", tr.name)); }
    if (tr.label !== null && tr.label !== tr.caption)  // a cluster's name says "cluster" itself
      h.appendChild(document.createTextNode(" \u00b7 " + (String(tr.label).indexOf(D.shareKind) === 0 ? tr.label
                                                          : D.shareKind + " " + tr.label)));
    box.appendChild(h);
    if (tr.caption) box.appendChild(el("div", "cap", tr.caption));
    box.appendChild(img(tr.src, "huge", "training image #" + i));
    // the sign rule: the lists hold only the steps where its score has the sign (see journey_data)
    box.appendChild(el("div", null, "a proponent (among the top-" + D.k + ", score > 0) at steps: " + stepList(inTop)));
    box.appendChild(stepBoxes(inTop, "in"));
    box.appendChild(el("div", null, "an opponent (among the lowest " + D.k + ", score < 0) at steps: " +
                       stepList(inBottom)));
    box.appendChild(stepBoxes(inBottom, "out"));
  }

  function lineChart(title, xlabels, series, ymin, ymax, current) {
    var W = 340, H = 170, L = 34, R = 8, Tp = 8, B = 34, n = xlabels.length;
    var x = function (i) { return L + (n > 1 ? i * (W - L - R) / (n - 1) : (W - L - R) / 2); };
    var y = function (v) { return Tp + (ymax - v) * (H - Tp - B) / (ymax - ymin || 1); };
    var box = el("div", "chart"); box.appendChild(el("h3", null, title));
    var g = svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H });
    [ymin, (ymin + ymax) / 2, ymax].forEach(function (v) {
      g.appendChild(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#eaeef2" }));
      g.appendChild(svg("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" }, +v.toFixed(2)));
    });
    xlabels.forEach(function (lab, i) {
      g.appendChild(svg("text", { x: x(i), y: H - B + 13, "text-anchor": "middle" }, lab));
    });
    if (current !== null && current >= 0 && current < n)
      g.appendChild(svg("line", { x1: x(current), x2: x(current), y1: Tp, y2: H - B, stroke: "#0969da",
                                  "stroke-dasharray": "3,2", "class": "current" }));
    series.forEach(function (S, k) {
      var c = S.color || color(k), pts = [];
      if (S.lo && S.hi) {
        var band = [];
        S.lo.forEach(function (v, i) { if (v !== null) band.push(x(i) + "," + y(v)); });
        for (var i = S.hi.length - 1; i >= 0; i--) if (S.hi[i] !== null) band.push(x(i) + "," + y(S.hi[i]));
        g.appendChild(svg("polygon", { points: band.join(" "), fill: c, "fill-opacity": 0.15 }));
      }
      S.values.forEach(function (v, i) {
        if (v === null) return;
        pts.push(x(i) + "," + y(v));
        g.appendChild(svg("circle", { cx: x(i), cy: y(v), r: 2.5, fill: c }));
      });
      g.appendChild(svg("polyline", { points: pts.join(" "), fill: "none", stroke: c, "stroke-width": 1.5 }));
    });
    box.appendChild(g);
    if (series.length > 1) box.appendChild(legend(series.map(function (S) { return S.name; })));
    return box;
  }

  function legend(names) {
    var lg = el("div", "legend");
    names.forEach(function (nm, k) {
      var it = el("span"), sw = el("i"); sw.style.background = color(k);
      it.appendChild(sw); it.appendChild(document.createTextNode(nm)); lg.appendChild(it);
    });
    return lg;
  }

  function shareChart(T) {
    var W = 340, H = 170, L = 34, R = 8, Tp = 8, B = 34, n = D.steps.length, bw = (W - L - R) / n;
    var box = el("div", "chart");
    box.appendChild(el("h3", null, "share of each " + D.shareKind + " among the " + D.k + " highest scores"));
    var g = svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H });
    var used = [];
    T.share.forEach(function (row, s) {
      var acc = 0;
      row.forEach(function (v, c) {
        if (v <= 0) return;
        if (used.indexOf(c) < 0) used.push(c);
        var r = svg("rect", { x: L + s * bw + 1, width: bw - 2, y: Tp + (1 - acc - v) * (H - Tp - B),
                              height: v * (H - Tp - B), fill: D.shareColors[c] });
        r.appendChild(svg("title", {}, D.shareNames[c] + ": " + Math.round(v * 100) + "%"));
        g.appendChild(r);
        acc += v;
      });
      g.appendChild(svg("text", { x: L + (s + 0.5) * bw, y: H - B + 13, "text-anchor": "middle",
                                  "font-weight": s === state.s ? "bold" : "normal" }, D.steps[s]));
    });
    g.appendChild(svg("rect", { x: L + state.s * bw, y: Tp - 1, width: bw, height: H - Tp - B + 2, fill: "none",
                                stroke: "#0969da", "stroke-width": 1.5, "class": "current" }));
    [0, 0.5, 1].forEach(function (v) {
      g.appendChild(svg("text", { x: L - 4, y: Tp + (1 - v) * (H - Tp - B) + 3, "text-anchor": "end" }, v));
    });
    box.appendChild(g);
    used.sort(function (a, b) { return a - b; });
    var lg = el("div", "legend");
    used.forEach(function (c) {
      var it = el("span"), sw = el("i"); sw.style.background = D.shareColors[c];
      it.appendChild(sw); it.appendChild(document.createTextNode(D.shareNames[c])); lg.appendChild(it);
    });
    box.appendChild(lg);
    return box;
  }

  function nearestChart(T) {
    var box = el("div", "chart");
    box.appendChild(el("h3", null, "when the final image's " + T.nearest.length +
                       " nearest training images (pixel L2) become proponents (top-" + D.k + ", score > 0)"));
    var tb = el("table", "nearest");
    T.nearest.forEach(function (nb) {
      var tr = el("tr"), td = el("td"), i = nb.index;
      var t = img(D.train[String(i)].src, "thumb", "training image #" + i);
      t.style.width = t.style.height = "28px"; t.style.cursor = "pointer";
      t.addEventListener("click", function () { state.inspect = i; render(); });
      td.appendChild(t); tr.appendChild(td);
      tr.appendChild(el("td", "idx", "#" + i));
      var steps = el("td"); steps.appendChild(stepBoxes(T.inTop[String(i)] || [], "in")); tr.appendChild(steps);
      tr.appendChild(el("td", null, nb.entry === null ? "never a proponent" : "a proponent from step " +
                        D.steps[nb.entry]));
      tb.appendChild(tr);
    });
    box.appendChild(tb);
    return box;
  }

  function charts(T) {
    var box = $("charts");
    box.replaceChildren();
    var labels = [], cur = null;
    for (var s = 1; s < D.steps.length; s++) labels.push(D.steps[s]);
    if (state.s > 0) cur = state.s - 1;
    box.appendChild(lineChart("top-" + D.k + " overlap with the previous recorded step", labels,
                              [{ name: "overlap", values: T.overlap }], 0, 1, cur));
    box.appendChild(shareChart(T));
    box.appendChild(nearestChart(T));
  }

  function evidence(T) {
    var box = $("evidence");
    box.replaceChildren();
    var has = (T.audit && T.audit.length) || D.lds;
    box.hidden = !has;
    if (!has) return;
    box.appendChild(el("h2", null, "Counterfactual evidence"));
    if (T.audit && T.audit.length) {
      box.appendChild(el("div", "muted", "The model retrained without the top-k proponents of a step, and without k random " +
                         "training images, regenerates the target from that step with the same noise."));
      var tb = el("table", "audit"), hd = el("tr");
      ["audited step", "original", "without top-k", "without random k"].forEach(function (h) { hd.appendChild(el("th", null, h)); });
      tb.appendChild(hd);
      T.audit.forEach(function (a) {
        var tr = el("tr");
        var head = el("td", null, a.mode + " \u00b7 step " + a.step + " (t=" + a.timestep + ") \u00b7 k=" + a.k);
        var at = D.steps.indexOf(a.step);
        if (at >= 0) {  // jump the journey to the audited step
          var go = el("button", null, "show this step"); go.type = "button";
          go.addEventListener("click", function () { state.s = at; render(); window.scrollTo(0, 0); });
          head.appendChild(el("br")); head.appendChild(go);
        }
        tr.appendChild(head);
        [["original", a.original, ""], ["without top-" + a.k, a.without_top, "pixel L2 change " + a.top_l2.toFixed(3)],
         ["without random " + a.k, a.without_random, "pixel L2 change " + a.random_l2.toFixed(3) +
          " (mean of " + a.random_draws + " draws)"]].forEach(function (c) {
          var td = el("td"); td.appendChild(img(c[1], "thumb", c[0])); td.appendChild(el("div", "muted", c[2]));
          tr.appendChild(td);
        });
        tb.appendChild(tr);
      });
      box.appendChild(tb);
    }
    if (D.lds) {
      var labs = D.lds.steps.map(function (s, i) { return s + " (t=" + D.lds.timesteps[i] + ")"; });
      var lo = 0, hi = 0;
      D.lds.series.forEach(function (S) {
        S.mean.concat(S.lo, S.hi).forEach(function (v) { if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); } });
      });
      box.appendChild(lineChart("LDS per step (" + D.lds.set + " targets, " + D.lds.kind + ") of the evaluation run", labs,
                                D.lds.series.map(function (S) { return { name: S.name, values: S.mean, lo: S.lo, hi: S.hi }; }),
                                Math.floor(lo * 10) / 10, Math.ceil(hi * 10) / 10, null));
    }
  }

  function render() {
    var T = target(), s = state.s;
    document.querySelectorAll("#targets button").forEach(function (b, j) { b.classList.toggle("on", j === state.t); });
    $("journey-title").textContent = "Target " + T.id + (T.caption ? ": " + T.caption : "");
    $("step").value = s;
    $("step-label").textContent = stepName(s);
    var strip = $("strip");
    strip.replaceChildren();
    T.x0.forEach(function (src, j) {
      var t = img(src, j === s ? "on" : "", "x\u03020 at " + stepName(j));
      t.title = stepName(j);
      t.addEventListener("click", function () { state.s = j; render(); });
      strip.appendChild(t);
    });
    var figs = $("images");
    figs.replaceChildren();
    [[T.xt, "x_t", "xt"], [T.x0, "x\u03020_t (predicted final image)", "x0"]].forEach(function (f) {
      if (!f[0]) return;
      var fig = el("figure"), im = img(f[0][s], "big", f[1] + " at " + stepName(s));
      im.id = f[2]; im.dataset.step = D.steps[s];
      fig.appendChild(im); fig.appendChild(el("figcaption", null, f[1]));
      figs.appendChild(fig);
    });
    ranked("pro", T.pro[s], true);
    ranked("opp", T.opp[s], false);
    var mb = $("meaning"), m = T.meaning[s];
    mb.replaceChildren(el("div", null, m.sign), el("div", m.flat ? "flat" : null, m.spread));
    var dbox = $("destination");
    dbox.hidden = !T.dest;
    if (T.dest) {
      var dp = $("dest-pro"), dn = $("dest-opp");
      dp.replaceChildren(); dn.replaceChildren();
      $("dest-fig").replaceChildren(img(T.final, "big", "final image"), el("figcaption", null, "final image"));
      $("dest-meaning").replaceChildren(el("div", null, T.dest.meaning.sign),
                                        el("div", T.dest.meaning.flat ? "flat" : null, T.dest.meaning.spread));
      ranked("dest-pro", T.dest.pro, true);
      ranked("dest-opp", T.dest.opp, false);
    }
    inspector();
    charts(T);
    evidence(T);
  }

  var step = $("step");
  step.max = D.steps.length - 1;
  step.addEventListener("input", function () { state.s = parseInt(step.value, 10); render(); });
  gallery();
  render();
  document.body.dataset.ready = "1";
})();
"""


def _about(about: dict) -> str:
    """The page's plain-words header: the question it answers, the model (base + adapter), the parameters
    attributed and the number of training images; "" without a question."""
    esc = _html.escape
    if not about.get("question"):
        return ""
    facts = [(key, label, about[key]) for key, label in (("model", "model"), ("params", "attributed"),
                                                         ("n", "training images")) if about.get(key)]
    line = " \u00b7 ".join(f'<span id="about-{key}">{esc(label)}: {esc(str(v))}</span>' for key, label, v in facts)
    return (f'<header id="about"><p id="question" class="question">{esc(about["question"])}</p>'
            + (f'<p class="muted">{line}</p>' if line else "") + "</header>")


def write_page(out_html, data: dict) -> str:
    """Write the journey page of ``data`` (:func:`~diffusion_trak.report.journey.journey_data`) to
    ``out_html``; returns its path."""
    esc = _html.escape
    title = data.get("title") or "Per-step training-data attribution"
    meta = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in data.get("meta", []))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="generator" content="diffusion-trak">',  # marks the page as ours (diffusion_trak.store.claim)
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # no network: a page that asks for anything outside itself is refused by the browser
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
        f'<h1 id="title">{esc(title)}</h1>',
        _about(data.get("about") or {}),
        f'<details><summary class="muted">settings</summary><table class="meta">{meta}</table></details>' if meta else "",
        '<h2>Targets <span class="muted">(final images; choose one)</span></h2><div id="targets" class="gallery"></div>',
        '<h2 id="journey-title"></h2>',
        # the answer most readers want first: the final image's, then the journey that led there
        '<section id="destination" hidden><h2>Destination: the training images that most made the final image '
        '<span class="muted">(its target averaged over the whole range of timesteps)</span></h2><div class="row">'
        '<figure id="dest-fig"></figure>'
        '<div><div id="dest-meaning" class="meaning"></div><h3 id="dest-pro-head"></h3><div id="dest-pro" class="cells"></div>'
        '<h3 id="dest-opp-head"></h3><div id="dest-opp" class="cells"></div></div></div></section>',
        '<h2 id="journey-head">Journey: when during sampling <span class="muted">(each recorded step: the training '
        'images that most made what the model predicted then)</span></h2>',
        '<div class="controls"><label for="step">sampling step</label>'
        '<input type="range" id="step" min="0" value="0" step="1"><span id="step-label"></span></div>',
        '<div id="strip" class="strip"></div>',
        '<div class="row"><div id="images" class="row"></div>',
        '<div><details class="meaning"><summary>what the scores mean</summary>A training image\'s score at a step '
        'estimates how much training on it lowered the model\'s loss on what it predicts at that step (x\u03020_t, '
        're-noised to t): a positive score (green) pulls the sampling toward that prediction, a negative one (red) '
        'pushes away from it. Only negative scores are opponents, and only positive ones proponents. The scores are '
        'relative to the other training images; when the top-k stand little above the rest (a nearly flat ranking), '
        'their order says little.</details><div id="meaning" class="meaning"></div>',
        '<h3 id="pro-head"></h3><div id="pro" class="cells"></div>',
        '<h3 id="opp-head"></h3><div id="opp" class="cells"></div></div>',
        '<aside id="inspector" hidden></aside></div>',
        '<h2>How the attribution moves</h2><div id="charts" class="charts"></div>',
        '<section id="evidence" hidden></section>',
        f'<script type="application/json" id="journey-data">{script_json(data)}</script>',
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
    ]
    out_html = _prepare_dir(out_html)
    with open(out_html, "w", encoding="utf-8") as f:
        f.write("\n".join(p for p in parts if p) + "\n")
    return os.fspath(out_html)
