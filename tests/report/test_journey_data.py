"""The journey page's numbers, checked against a direct computation from the scores, and its HTML
(self-contained, escaped) without a browser."""
import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from report_helpers import HOSTILE, make_run
from diffusion_trak.report import journey_stats as stats
from diffusion_trak.report import plot_from_scores
from diffusion_trak.report.journey import journey_data, trajectory_images

K = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    ds, traj, sc, sdir = make_run(str(root), class_names=HOSTILE + ["three"])
    x0, xt, final = trajectory_images(traj, sc.steps)
    data = journey_data(sc, ds, x0, xt, final, k=K, title=HOSTILE[0], captions=HOSTILE + ["plain"])
    return ds, traj, sc, data


def _direct_top(values, train_indices, k):
    """Top-k proponents of one (step, target) row, by sorting all scores."""
    order = sorted(range(len(values)), key=lambda i: -float(values[i]))
    return [int(train_indices[i]) for i in order[:k]]


def test_chart_numbers_match_a_direct_computation(run):
    ds, traj, sc, data = run
    values, idx = np.asarray(sc.values), sc.train_indices
    label = {int(i): int(l) for i, l in zip(ds.indices, ds.labels)}
    S, B, _ = values.shape
    assert len(data["targets"]) == B
    for b, T in enumerate(data["targets"]):
        top = [_direct_top(values[s, b], idx, K) for s in range(S)]
        assert [[e[0] for e in row] for row in T["pro"]] == top
        for s in range(S):
            assert [e[1] for e in T["pro"][s]] == pytest.approx(sorted(values[s, b].tolist(), reverse=True)[:K])
        # overlap of consecutive top-k sets
        assert T["overlap"] == pytest.approx([len(set(top[s]) & set(top[s + 1])) / K for s in range(S - 1)])
        # label shares among the top-k
        for s in range(S):
            want = [sum(label[i] == c for i in top[s]) / K for c in range(len(data["shareNames"]))]
            assert T["share"][s] == pytest.approx(want)
        # the final image's nearest training images (pixel L2) and the first step each is in the top-k
        final = traj.final[b].clamp(-1, 1).numpy()
        dist = [float(((ds.images[p].numpy() - final) ** 2).sum()) for p in range(len(ds))]
        nearest = [int(idx[p]) for p in sorted(range(len(ds)), key=lambda p: dist[p])[:K]]
        assert [n["index"] for n in T["nearest"]] == nearest
        # the sign rule: a proponent is among the top-k with a score > 0, an opponent among the lowest k with one < 0
        value = {int(i): p for p, i in enumerate(idx)}
        proponents = [[i for i in top[s] if values[s, b, value[i]] > 0] for s in range(S)]
        lowest = [[int(idx[p]) for p in np.argsort(values[s, b], kind="stable")[:K]] for s in range(S)]
        opponents = [[i for i in lowest[s] if values[s, b, value[i]] < 0] for s in range(S)]
        assert [n["entry"] for n in T["nearest"]] == [next((s for s in range(S) if i in proponents[s]), None)
                                                      for i in nearest]
        # steps at which a training image is a proponent / an opponent (what the inspector lists)
        assert T["inTop"] == {str(i): [s for s in range(S) if i in proponents[s]] for i in set(sum(proponents, []))}
        assert T["inBottom"] == {str(i): [s for s in range(S) if i in opponents[s]] for i in set(sum(opponents, []))}
    assert data["shareNames"] == HOSTILE + ["three"] and data["shareKind"] == "label"


def test_stats_edge_cases():
    top = np.array([[1, 2, 3], [3, 2, 1], [4, 5, 6], [4, 5, 6]])
    assert stats.topk_overlap(top).tolist() == [1.0, 0.0, 1.0]
    assert stats.topk_overlap(top[:1]).tolist() == []
    assert stats.first_entry_steps(top, [6, 9, 1]) == [2, None, 0]
    assert stats.steps_in_topk(top)[4] == [2, 3]
    shares = stats.label_shares(top, {i: i % 2 for i in range(7)}, 2)
    assert shares.sum(1).tolist() == [1.0] * 4 and shares[0].tolist() == pytest.approx([1 / 3, 2 / 3])
    assert stats.nearest_training(np.zeros(4), np.array([[3.0] * 4, [1.0] * 4, [-1.0] * 4]), 2).tolist() == [1, 2]


def test_clusters_stand_in_for_missing_labels(tmp_path):
    from diffusion_trak.data import ImageDataset

    ds, traj, sc, _ = make_run(str(tmp_path))
    unlabelled = ImageDataset(ds.images, None, ds.indices)
    x0, xt, final = trajectory_images(traj, sc.steps)
    data = journey_data(sc, unlabelled, x0, xt, final, k=K)
    assert data["shareKind"] == "cluster" and data["shareNames"][0] == "cluster 0"
    clusters = stats.pixel_clusters(ds.images.numpy())
    label = {int(i): int(c) for i, c in zip(ds.indices, clusters)}
    T = data["targets"][0]
    for s, row in enumerate(T["pro"]):
        want = [sum(label[e[0]] == c for e in row) / K for c in range(len(data["shareNames"]))]
        assert T["share"][s] == pytest.approx(want)


def test_page_is_self_contained_and_escaped(run, tmp_path):
    ds, traj, sc, _ = run
    png, html = plot_from_scores(sc, ds, traj, str(tmp_path / "r"), k=K, title=HOSTILE[1])
    text = open(html, encoding="utf-8").read()
    with Image.open(png) as im:
        assert im.format == "PNG"
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
    for h in HOSTILE:  # never as markup: escaped in the page, \u003c-escaped in the data block
        assert h not in text
    assert "&lt;img src=x onerror=" in text  # the title, as text
    data = json.loads(re.search(r'<script type="application/json" id="journey-data">(.*?)</script>', text, re.S).group(1))
    assert data["title"] == HOSTILE[1] and data["shareNames"][:2] == HOSTILE
    assert len(data["targets"]) == traj.batch_size and data["steps"] == sc.steps
    uri = data["targets"][0]["x0"][1]
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        shown = np.asarray(im)
    from diffusion_trak.report import to_uint8
    assert np.array_equal(shown, to_uint8(traj.x0_pred[1, 0])[..., 0])


def test_page_without_trajectory_shows_the_given_target(run, tmp_path):
    ds, traj, sc, _ = run
    query = traj.x0_pred[:, 2]
    _, html = plot_from_scores(sc, ds, None, str(tmp_path / "q"), target=2, k=K, query_images=query)
    text = open(html, encoding="utf-8").read()
    data = json.loads(re.search(r'id="journey-data">(.*?)</script>', text, re.S).group(1))
    assert [T["id"] for T in data["targets"]] == [2] and data["targets"][0]["xt"] is None
    with pytest.raises(ValueError):
        plot_from_scores(sc, ds, None, str(tmp_path / "x"))


def test_header_destination_row_in_the_png_top_k_shown_and_caption_colours(run, tmp_path):
    """The page's plain-words header (question, model + adapter, parameters, N), the settings' top-k is the one
    shown, the PNG's first row is the destination's, and a caption naming a colour is drawn in that colour."""
    from diffusion_trak.api import Scores
    from diffusion_trak.report.journey import share_colours

    ds, traj, sc, _ = run
    feats = {"featurize": {"params": "lora", "num_timesteps": 2}, "num_params": 5504, "checkpoints": ["abc"],
             "lora": [{"base": "b0", "adapter": "a1"}]}
    plain = Scores(sc.values, sc.steps, sc.timesteps, sc.train_indices, {"score": {"top_k": 8}, "features": feats})
    dest = Scores(sc.values, sc.steps, sc.timesteps, sc.train_indices, plain.meta,
                  np.asarray(sc.values[-1]) * 0.5)
    heights = {}
    for name, scores in (("plain", plain), ("dest", dest)):
        png, html = plot_from_scores(scores, ds, traj, str(tmp_path / name), k=K, model="my-sd-base/",
                                     adapter="my-lora/")
        with Image.open(png) as im:
            heights[name] = im.size[1]
        page = open(html, encoding="utf-8").read()
        data = json.loads(re.search(r'id="journey-data">(.*?)</script>', page, re.S).group(1))
        assert data["about"] == {"question": f"Which of your {len(ds)} training images most made this image, and "
                                             "when during sampling?", "model": "my-sd-base/ + LoRA adapter my-lora/",
                                 "params": "the LoRA adapter's 5,504 parameters", "n": str(len(ds))}
        assert 'id="question"' in page and "the LoRA adapter&#x27;s 5,504 parameters" in page
        meta = dict(data["meta"])
        assert meta["top-k shown"] == str(K) and "top_k" not in meta
    rows = len(sc.steps)
    assert heights["dest"] > heights["plain"] and abs(heights["dest"] / heights["plain"] - 1 - 1 / rows) < 0.1
    # the adapter unnamed: its fingerprint; no adapter: the model alone
    from diffusion_trak.report.attribution import about

    assert about(plain)["model"] == "fingerprint abc + LoRA adapter (fingerprint a1)"
    assert share_colours(["a red circle", "a green square", "a photo", "red or blue"])[:2] == ["#d62728", "#2ca02c"]
    other = share_colours(["a red circle", "a photo", "a dog"])
    assert other[0] == "#d62728" and "#2ca02c" not in other and len(set(other)) == 3
