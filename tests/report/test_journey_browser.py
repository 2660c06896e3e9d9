"""The journey page in a real headless Chromium: it loads without console errors, every image
decodes, the step control and the target gallery show what scores.json and the trajectory hold,
and hostile captions, class names and file names show as text with no script run."""
import base64
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from report_helpers import HOSTILE, make_run

K = 6  # the page's k (plot --top-k default)


def _pixels(uri):
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        return np.asarray(im)


def _set_step(browser, s):
    browser.js(f"(function(){{var e=document.getElementById('step'); e.value={s}; "
               "e.dispatchEvent(new Event('input'));})()")


def _shown(browser):
    return browser.js("""(function(){
      var ids = function(sel){ return Array.from(document.querySelectorAll(sel + ' .cell'))
                                   .map(function(c){ return +c.dataset.index; }); };
      var x0 = document.getElementById('x0'), xt = document.getElementById('xt');
      return {title: document.getElementById('journey-title').textContent, step: document.getElementById('step').value,
              x0: x0.src, xt: xt ? xt.src : null, pro: ids('#pro'), opp: ids('#opp')};
    })()""")


def _images_decoded(browser):
    return browser.js("Array.from(document.images).map(function(i){ return i.complete && i.naturalWidth > 0; })")


def _sign_rule_broken(browser):
    """The headings of the shown lists that say "opponent" above a score >= 0 or "proponent" above a score <= 0."""
    return browser.js("""(function(){
      var bad = [];
      [["pro-head", "pro"], ["opp-head", "opp"], ["dest-pro-head", "dest-pro"], ["dest-opp-head", "dest-opp"]]
        .forEach(function (p) {
          var h = document.getElementById(p[0]);
          if (!h || h.offsetParent === null) return;  // not shown (no destination)
          var v = Array.from(document.querySelectorAll('#' + p[1] + ' .cell')).map(function (c) { return +c.dataset.score; });
          if (/opponent/i.test(h.textContent) && v.some(function (x) { return !(x < 0); })) bad.push(h.textContent);
          if (/proponent/i.test(h.textContent) && v.some(function (x) { return !(x > 0); })) bad.push(h.textContent);
        });
      return bad;
    })()""")


def _broken_names(browser):
    """Training-file names shown on more than one line (a name's text laid out in several line boxes)."""
    return browser.js("""(function(){
      return Array.from(document.querySelectorAll('.src')).filter(function (e) { return e.offsetParent !== null; })
        .map(function (e) { var r = document.createRange(); r.selectNodeContents(e);
                            return [e.textContent, r.getClientRects().length]; })
        .filter(function (x) { return x[1] > 1; });
    })()""")


def _inspector_steps(browser, selector):
    """Click the first cell of ``selector`` and read the inspector: ``(index, proponent steps, opponent steps)``."""
    i = browser.js(f"+document.querySelector('{selector} .cell').dataset.index")
    browser.js(f"document.querySelector('{selector} .cell').click()")
    lines = browser.js("Array.from(document.querySelectorAll('#inspector > div')).map(function (d) { return d.textContent; })")

    def steps(start):
        listed = [line for line in lines if line.startswith(start)][0].split(" at steps: ", 1)[1]
        return [] if listed == "none" else [int(x) for x in listed.split(", ")]
    return i, steps("a proponent (among the top-"), steps("an opponent (among the lowest ")


def check_journey(browser, html, scores_dir, traj, max_seconds=2.0):
    """Open ``html`` and walk every target and step, checking against ``scores_dir/scores.json`` and
    the trajectory. Returns the load time in seconds."""
    from diffusion_trak.report import to_uint8

    with open(os.path.join(scores_dir, "scores.json")) as f:
        sj = json.load(f)
    seconds = browser.open(html)
    assert seconds < max_seconds
    assert browser.js("document.body.dataset.ready") == "1"
    decoded = _images_decoded(browser)
    assert decoded and all(decoded)
    B = len(sj["top"][0])
    assert browser.js("document.querySelectorAll('#targets button').length") == B
    # the question in plain words first, with the number of training images; the destination before the steps
    n = json.loads(browser.js("document.getElementById('journey-data').textContent"))["about"]["n"]
    assert int(n) == len(np.load(os.path.join(scores_dir, "scores.npy"), mmap_mode="r")[0, 0])
    assert browser.js("document.getElementById('question').textContent") == \
        f"Which of your {n} training images most made this image, and when during sampling?"
    assert browser.js("!!(document.getElementById('about').compareDocumentPosition(document.getElementById('targets'))"
                      " & Node.DOCUMENT_POSITION_FOLLOWING)")
    assert browser.js("!!(document.getElementById('destination').compareDocumentPosition(document.getElementById('step'))"
                      " & Node.DOCUMENT_POSITION_FOLLOWING)")
    for b in range(B):
        browser.js(f"document.querySelectorAll('#targets button')[{b}].click()")
        for s in [len(sj["steps"]) - 1, 0] + list(range(1, len(sj["steps"]) - 1)):
            _set_step(browser, s)
            shown = _shown(browser)
            step = traj.step_of(sj["steps"][s])
            assert np.array_equal(_pixels(shown["x0"]), to_uint8(traj.x0_pred[step, b]).squeeze(-1))
            assert np.array_equal(_pixels(shown["xt"]), to_uint8(traj.x_t[step, b]).squeeze(-1))
            top = sj["top"][s][b]
            # proponents: the positive among the top-K; opponents: the negative among the lowest K (else all of them,
            # under a heading that says none is positive / negative)
            high, low = top["proponents"][:K], top["lowest"][:K]
            assert shown["pro"] == ([e["index"] for e in high if e["score"] > 0] or [e["index"] for e in high])
            assert shown["opp"] == ([e["index"] for e in low if e["score"] < 0] or [e["index"] for e in low])
            assert _sign_rule_broken(browser) == [] and _broken_names(browser) == []
            # the inspector follows the sign rule too: "an opponent" only at steps where the score is < 0
            for sel in ("#pro", "#opp"):
                i, pro_steps, opp_steps = _inspector_steps(browser, sel)
                for t, at in enumerate(sj["steps"]):
                    mine = sj["top"][t][b]
                    pro = [e["score"] for e in mine["proponents"][:K] if e["index"] == i]
                    low = [e["score"] for e in mine["lowest"][:K] if e["index"] == i]
                    assert (at in pro_steps) == bool(pro and pro[0] > 0), (i, at, pro)
                    assert (at in opp_steps) == bool(low and low[0] < 0), (i, at, low)
                assert _broken_names(browser) == []
            browser.js("document.querySelector('#inspector button').click()")
        assert shown["title"].startswith(f"Target {b}")
        assert all(_images_decoded(browser))
        # the destination row (final image, whole range of timesteps) when the scores have one
        dest = browser.js("""(function(){ var d = document.getElementById('destination'); return d.hidden ? null :
            Array.from(d.querySelectorAll('#dest-pro .cell')).map(function(c){ return +c.dataset.index; }); })()""")
        if "destination" in sj:
            assert dest == [e["index"] for e in sj["destination"][b]["proponents"][:K]]
        else:
            assert dest is None
    assert browser.errors() == []
    return seconds


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The quick demo, then three more targets generated, scored and plotted with the CLI."""
    from diffusion_trak.cli import main
    from diffusion_trak.demo import run_demo

    out = str(tmp_path_factory.mktemp("demo") / "demo")
    res = run_demo(out, quick=True)
    tpath = os.path.join(out, "trajectories", "batch.safetensors")
    assert main(["generate", "--run", out, "--steps", "10", "--num-record", "4", "--num-images", "3", "--seed", "1",
                 "--out", tpath]) == 0
    assert main(["score", "--run", out, "--trajectory", tpath, "--out", os.path.join(out, "scores", "batch")]) == 0
    assert main(["plot", "--run", out, "--scores", os.path.join(out, "scores", "batch")]) == 0
    return out, res


def test_demo_pages_in_chromium(browser, demo_run):
    from diffusion_trak.pipelines import Trajectory

    out, res = demo_run
    check_journey(browser, res["html"], res["scores"], Trajectory.load(os.path.join(out, "trajectories", "seed-0.safetensors")))
    traj = Trajectory.load(os.path.join(out, "trajectories", "batch.safetensors"))
    html = os.path.join(out, "report", "batch.html")
    check_journey(browser, html, os.path.join(out, "scores", "batch"), traj)
    assert "destination" in json.load(open(os.path.join(out, "scores", "batch", "scores.json")))  # shown above
    # choosing another target changes the journey
    browser.open(html)
    first = _shown(browser)
    browser.js("document.querySelectorAll('#targets button')[2].click()")
    other = _shown(browser)
    assert other["title"] != first["title"] and other["x0"] != first["x0"] and other["pro"] != first["pro"]


def test_inspector_lists_the_steps_of_a_training_image(browser, demo_run):
    out, _ = demo_run
    with open(os.path.join(out, "scores", "batch", "scores.json")) as f:
        sj = json.load(f)
    browser.open(os.path.join(out, "report", "batch.html"))
    i = browser.js("+document.querySelector('#pro .cell').dataset.index")
    browser.js("document.querySelector('#pro .cell').click()")
    text = browser.js("document.getElementById('inspector').hidden ? null : document.getElementById('inspector').textContent")
    steps = [sj["steps"][s] for s in range(len(sj["steps"]))
             if i in [e["index"] for e in sj["top"][s][0]["proponents"][:K]]]
    steps = [s for s in steps if [e["score"] for e in sj["top"][sj["steps"].index(s)][0]["proponents"][:K]
                                  if e["index"] == i][0] > 0]  # the sign rule: a proponent has a score > 0
    assert f"#{i}" in text and ", score > 0) at steps: " + (", ".join(map(str, steps)) or "none") in text
    assert browser.js("document.querySelector('#inspector img').naturalWidth") > 0
    assert browser.errors() == []


def test_hostile_text_shows_as_text(browser, tmp_path):
    from diffusion_trak.cli import main

    name = 'seed-"><img src=x onerror="window.__pwned = 3">'  # a file name (no slash)
    ds, traj, sc, sdir = make_run(str(tmp_path / "run"), class_names=HOSTILE + ["three"], scores_name=name)
    assert main(["plot", "--run", str(tmp_path / "run"), "--scores", sdir, "--out", str(tmp_path / "page")]) == 0
    check_journey(browser, str(tmp_path / "page.html"), sdir, traj)
    browser.open(str(tmp_path / "page.html"))
    browser.js("document.querySelector('#pro .cell').click()")
    assert browser.js("typeof window.__pwned") == "undefined"
    assert browser.js("document.querySelectorAll('img[onerror], script:not([id=journey-data])').length") == 1  # the page's own script
    text = browser.js("document.body.innerText")
    for h in HOSTILE + [name]:
        assert h in text or h in browser.js("document.title")
    assert browser.errors() == []


def test_evaluation_evidence(browser, tmp_path):
    """A tiny fake evaluation run folder: the page shows the audit images and the per-step LDS."""
    from diffusion_trak.cli import main
    from diffusion_trak.report.evidence import audit_rows
    from diffusion_trak.evaluations.audit import Case

    root = str(tmp_path / "eval")
    ds, traj, sc, _ = make_run(root, scores_name="generated")
    os.replace(os.path.join(root, "trajectories", "generated.safetensors"), os.path.join(root, "trajectory.safetensors"))
    with open(os.path.join(root, "run.json")) as f:
        json.dump({"name": "fake", "data": json.load(f)["data"]}, open(os.path.join(root, "config.json"), "w"))
    os.remove(os.path.join(root, "run.json"))
    steps = sc.steps[1:3]
    lds = {"steps": steps, "timesteps": [int(traj.timesteps[s]) for s in steps],
           "tables": {"generated": {"xhat0_loss": {
               "methods": {"trak": [{"mean": 0.1, "lo": -0.1, "hi": 0.3}, {"mean": 0.2, "lo": 0.0, "hi": 0.4}],
                           HOSTILE[0]: [{"mean": -0.05, "lo": -0.2, "hi": 0.1}, {"mean": float("nan"), "lo": None, "hi": None}]},
               "ceiling": [{"mean": 0.5, "lo": 0.4, "hi": 0.6}, {"mean": 0.6, "lo": 0.5, "hi": 0.7}]}}}}
    json.dump(lds, open(os.path.join(root, "lds.json"), "w"))
    regen = os.path.join(root, "audit", "regenerated-masked")
    os.makedirs(regen)
    rng = np.random.default_rng(0)
    rows = []
    for s in steps:
        for b in (0, 1):
            rows.append({"step": s, "timestep": int(traj.timesteps[s]), "target": b, "k": 5, "kind": "top", "draw": 0,
                         "removed": [1, 2, 3, 4, 5], "pixel_l2": 1.0 + b})
            for d in (0, 1):
                rows.append({"step": s, "timestep": int(traj.timesteps[s]), "target": b, "k": 5, "kind": "random",
                             "draw": d, "removed": [6, 7, 8, 9, 10], "pixel_l2": 0.5 + d})
    for r in rows:
        c = Case.from_row(r)
        path = c.image_file(regen, r["step"])
        if not os.path.exists(path):
            shape = (1, 8, 8) if c.kind == "top" else (traj.batch_size, 1, 8, 8)
            np.save(path, rng.uniform(-1, 1, shape).astype(np.float32))
    json.dump({"mode": "masked", "cases": rows}, open(os.path.join(root, "audit", "audit-masked.json"), "w"))

    audit = audit_rows(root, traj.final)
    assert sorted(audit) == [0, 1] and [a["step"] for a in audit[1]] == steps
    assert audit[1][0]["top_l2"] == 2.0 and audit[1][0]["random_l2"] == 1.0 and audit[1][0]["random_draws"] == 2
    assert np.array_equal(audit[0][0]["without_top"], np.load(os.path.join(regen, f"s{steps[0]:04d}-b000-k5-top.npy")))

    assert main(["plot", "--evaluation", root]) == 0
    html = os.path.join(root, "report", "generated.html")
    check_journey(browser, html, os.path.join(root, "scores", "generated"), traj)
    browser.open(html)
    assert browser.js("document.getElementById('evidence').hidden") is False
    assert browser.js("document.querySelectorAll('#evidence table.audit tr').length") == 1 + len(steps)
    assert browser.js("document.querySelectorAll('#evidence svg polyline').length") == 3  # trak, hostile name, ceiling
    assert HOSTILE[0] in browser.js("document.getElementById('evidence').textContent")
    browser.js("document.querySelectorAll('#evidence table.audit button')[1].click()")  # the second audited step
    assert browser.js("document.getElementById('step-label').textContent").startswith(f"step {steps[1]} ")
    browser.js("document.querySelectorAll('#targets button')[2].click()")  # target 2 was not audited
    assert browser.js("document.querySelectorAll('#evidence table.audit').length") == 0
    assert all(_images_decoded(browser)) and browser.errors() == []
