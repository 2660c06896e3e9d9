"""Every training image named, and honest headings, in a real headless Chromium: on the journey page of a
captioned image folder every proponent and opponent shows its file (relative to the folder) and caption, as
``scores.json`` and ``Scores.top`` name it; no "opponents" heading stands above a positive score (nor
"proponents" above a negative one), on the page or in the PNG, on a run whose scores are all positive and on
one with both signs."""
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny_models import save_image_folder  # noqa: E402

K = 6


def captioned(folder, n=12):
    save_image_folder(folder, n)
    files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
                   if f.endswith(".png"))
    with open(os.path.join(folder, "metadata.jsonl"), "w") as fh:
        for j, f in enumerate(files):
            fh.write(json.dumps({"file_name": f, "text": f"sample {j} of {f.split(os.sep)[0]}"}) + "\n")
    return folder


def run(root, dataset, positive: bool, seed=0):
    """Scores (all positive, or both signs) saved as api.score saves them, a trajectory, and the report."""
    from diffusion_trak.api import Scores
    from diffusion_trak.pipelines import Trajectory
    from diffusion_trak.report import plot_from_scores

    g = torch.Generator().manual_seed(seed)
    record, B, n = [0, 3, 7], 2, len(dataset)
    traj = Trajectory(timesteps=torch.arange(7, -1, -1) * 100, step_indices=torch.tensor(record),
                      x_t=torch.randn(3, B, 1, 8, 8, generator=g), x0_pred=torch.rand(3, B, 1, 8, 8, generator=g) * 2 - 1,
                      noises=torch.zeros(8, B, 1, 8, 8), initial_noise=torch.randn(B, 1, 8, 8, generator=g),
                      final=torch.rand(B, 1, 8, 8, generator=g) * 2 - 1, seed=seed, scheduler_class="DDPMScheduler")
    values = torch.rand(3, B, n, generator=g) + 1e-3 if positive else torch.randn(3, B, n, generator=g)
    dest = torch.rand(B, n, generator=g) + 1e-3 if positive else torch.randn(B, n, generator=g)
    sc = Scores(np.asarray(values, dtype=np.float32), record, [700, 400, 0], dataset.indices.numpy(), {},
                np.asarray(dest, dtype=np.float32), dataset)
    sdir = sc.save(os.path.join(root, "scores"), 8)
    png, html = plot_from_scores(Scores.load(sdir), dataset, traj, os.path.join(root, "report", "r"), k=K)
    return sc, sdir, png, html


SECTIONS = ("pro", "opp", "dest-pro", "dest-opp")


def shown(browser):
    return browser.js("""(function(){
      var out = {};
      ["pro", "opp", "dest-pro", "dest-opp"].forEach(function (id) {
        out[id] = {head: document.getElementById(id + "-head").textContent,
                   cells: Array.from(document.querySelectorAll("#" + id + " .cell")).map(function (c) {
                     var s = c.querySelector(".src"), p = c.querySelector(".cap");
                     return {index: +c.dataset.index, score: +c.dataset.score, src: s ? s.textContent : null,
                             cap: p ? p.textContent : null}; })};
      });
      out.meaning = document.getElementById("meaning").textContent;
      out.destMeaning = document.getElementById("dest-meaning").textContent;
      return out; })()""")


def walk(browser, html, dataset, sj):
    """Every target and step: each cell named as the dataset (and scores.json) names it; honest headings."""
    browser.open(html)
    by_index = {int(dataset.indices[p]): dataset.describe(p) for p in range(len(dataset))}
    heads = []
    for b in range(len(sj["top"][0])):
        browser.js(f"document.querySelectorAll('#targets button')[{b}].click()")
        for s in range(len(sj["steps"])):
            browser.js(f"(function(){{var e=document.getElementById('step'); e.value={s}; "
                       "e.dispatchEvent(new Event('input'));})()")
            page = shown(browser)
            assert page["meaning"] and page["destMeaning"]
            named = {e["index"]: e for e in sj["top"][s][b]["proponents"] + sj["top"][s][b]["lowest"]}
            for sec in SECTIONS:
                head, cells = page[sec]["head"], page[sec]["cells"]
                assert cells, sec
                heads.append(head)
                for c in cells:
                    want = by_index[c["index"]]
                    assert c["src"] == want["source"] and c["cap"] == want["caption"], (sec, c)
                    if sec in ("pro", "opp"):
                        assert named[c["index"]]["source"] == want["source"]
                        assert named[c["index"]]["caption"] == want["caption"]
                if "opponents" in head:
                    assert all(c["score"] < 0 for c in cells), (head, cells)
                if "proponents" in head:
                    assert all(c["score"] > 0 for c in cells), (head, cells)
    assert browser.errors() == []
    return heads


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from diffusion_trak.data import load_dataset

    folder = captioned(str(tmp_path_factory.mktemp("imgs") / "my_images"))
    return load_dataset(name="folder", path=folder)


def test_every_training_image_named_and_no_opponent_above_a_positive_score(browser, data, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    texts = []
    save = Figure.savefig

    def capture(fig, *a, **k):  # the PNG's headings and per-image titles, as drawn
        texts.extend(t.get_text() for t in fig.texts)
        texts.extend(ax.get_title() for ax in fig.axes)
        return save(fig, *a, **k)

    monkeypatch.setattr(Figure, "savefig", capture)
    sc, sdir, png, html = run(str(tmp_path / "positive"), data, positive=True)
    sj = json.load(open(os.path.join(sdir, "scores.json")))
    # scores.json and Scores.top name every image (file relative to the folder, caption); no opponent is positive
    top = sc.top(K)
    ti, tv, bi, bv = top  # still unpacks as the old 4-tuple
    assert np.array_equal(ti, top.indices) and np.array_equal(bv, top.bottom_scores)
    p0 = int(data.positions_of([int(top.indices[0, 0, 0])])[0])
    assert top.sources[0, 0, 0] == data.describe(p0)["source"] and "/" in top.sources[0, 0, 0]
    assert top.captions[0, 0, 0].startswith("sample ") and (top.opponents == -1).all()
    for row in sj["top"]:
        for t in row:
            assert t["opponents"] == [] and all(e["source"] and e["caption"] for e in t["proponents"] + t["lowest"])
    heads = walk(browser, html, data, sj)
    assert not any("opponents" in h for h in heads)
    assert any("none is negative" in h for h in heads)
    assert "all 12 scores are positive" in shown(browser)["meaning"]
    # the PNG: every image titled with its file and caption; its headings say what the scores are
    assert os.path.getsize(png) > 0
    assert not any("opponents" in t for t in texts) and any("lowest 6 scores (none negative)" in t for t in texts)
    assert any(t.startswith("#") and "digit" in t and "sample" in t for t in texts)

    texts.clear()
    sc, sdir, png, html = run(str(tmp_path / "mixed"), data, positive=False, seed=1)
    heads = walk(browser, html, data, json.load(open(os.path.join(sdir, "scores.json"))))
    assert any("opponents (negative scores)" in h for h in heads)
    assert not any(("opponents" in t and "lowest" in t) for t in texts)
