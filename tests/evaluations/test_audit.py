import numpy as np
import pytest

from diffusion_trak.featurize.featurizer import seed_for
from diffusion_trak.evaluations.audit import Case, plan, removed_positions, resolve_k, summarize


def test_resolve_k():
    assert resolve_k(5, 100) == 5
    assert resolve_k(0.1, 600) == 60
    for bad in (0, 100, 0.0001):
        with pytest.raises(ValueError):
            resolve_k(bad, 100)


def test_removed_positions():
    s = np.array([0.1, 5.0, -1.0, 3.0, 2.0])
    assert removed_positions(s, 2, "top", 0).tolist() == [1, 3]
    r = removed_positions(s, 3, "random", 7)
    assert len(set(r.tolist())) == 3 and r.tolist() == removed_positions(s, 3, "random", 7).tolist()


def test_plan_cases():
    rng = np.random.default_rng(0)
    scores = {10: rng.standard_normal((4, 50)), 20: rng.standard_normal((4, 50))}
    cases = plan(scores, targets=[0, 2], ks=[3, 0.1], n=50, seed=0)
    # a top-k case per (step, target, k); one random control per k, shared by every step and target
    assert len(cases) == 2 * 2 * 2 + 2
    assert len({c.name for c in cases}) == len(cases)
    top = [c for c in cases if c.step == 20 and c.target == 2 and c.k == 5 and c.kind == "top"][0]
    assert top.name == "s0020-b002-k5-top"
    assert sorted(top.removed.tolist()) == sorted(np.argsort(-scores[20][2])[:5].tolist())
    rnd = [c for c in cases if c.kind == "random"]
    assert [(c.step, c.target, c.k, len(c.removed)) for c in rnd] == [(None, None, 3, 3), (None, None, 5, 5)]


def test_summarize_paired():
    rows = []
    for b, (t, r) in enumerate([(2.0, 1.0), (3.0, 1.5), (1.0, 2.0), (4.0, 0.5)]):
        rows.append({"step": 5, "timestep": 500, "target": b, "k": 3, "kind": "top", "pixel_l2": t})
        rows.append({"step": 5, "timestep": 500, "target": b, "k": 3, "kind": "random", "pixel_l2": r})
    (s,) = summarize(rows)
    assert s["top_wins"] == 0.75 and s["num_targets"] == 4
    assert s["top_quartiles"][1] == pytest.approx(2.5) and s["random_quartiles"][1] == pytest.approx(1.25)
    assert 0 < s["wilcoxon_p_greater"] < 1


def test_plan_random_draws():
    rng = np.random.default_rng(1)
    scores = {10: rng.standard_normal((3, 40))}
    cases = plan(scores, targets=[1], ks=[4], n=40, seed=3, random_draws=3)
    assert [c.kind for c in cases] == ["top", "random", "random", "random"]
    assert [c.name for c in cases] == ["s0010-b001-k4-top", "k4-random0", "k4-random1", "k4-random2"]
    assert cases[2].removed.tolist() == removed_positions(np.zeros(40), 4, "random", seed_for(3, 4, 47, 1)).tolist()
    assert len({tuple(c.removed.tolist()) for c in cases[1:]}) == 3
    # the controls depend on neither the scores nor the targets, and more draws keep the first ones
    other = plan({30: rng.standard_normal((3, 40))}, [0, 2], [4], 40, 3, random_draws=2)
    assert [(c.name, c.removed.tolist()) for c in other if c.kind == "random"] == \
        [(c.name, c.removed.tolist()) for c in cases[1:3]]
    # a label names the top-k cases only, so estimators audited in one folder share the controls
    assert [c.name for c in plan(scores, [1], [4], 40, 3, "ens", 1)] == ["s0010-b001-k4-top-ens", "k4-random0"]
    with pytest.raises(ValueError):
        plan(scores, [1], [4], 40, 3, random_draws=0)


def test_case_round_trips_through_a_row(tmp_path):
    rng = np.random.default_rng(2)
    cases = plan({10: rng.standard_normal((2, 30))}, [1], [3], 30, 0, "lbl", 2)
    for c in cases:
        row = {"step": 10, "target": 1, "k": c.k, "kind": c.kind, "draw": c.draw, "removed": c.removed.tolist()}
        assert Case.from_row(row, "lbl").name == c.name
    # a top-k case caches its target's image, a random control the whole batch per step
    top, rnd = cases[0], cases[1]
    np.save(top.image_file(str(tmp_path), 10), np.full((1, 2, 2), 7.0))
    batch = rng.standard_normal((2, 1, 2, 2))
    np.save(rnd.image_file(str(tmp_path), 10), batch)
    assert top.image(str(tmp_path), 10, 1)[0, 0, 0] == 7.0
    np.testing.assert_array_equal(rnd.image(str(tmp_path), 10, 1), batch[1])
    assert rnd.image_file(str(tmp_path), 10) != rnd.image_file(str(tmp_path), 20)


def test_summarize_pools_random_draws_and_pairs_with_their_mean():
    rows = []
    # target: (top, [random draws])
    data = {0: (2.0, [1.0, 3.5]), 1: (3.0, [1.5, 2.5]), 2: (1.0, [2.0, 0.0])}
    for b, (t, rs) in data.items():
        rows.append({"step": 5, "timestep": 500, "target": b, "k": 3, "kind": "top", "draw": 0, "pixel_l2": t})
        for d, r in enumerate(rs):
            rows.append({"step": 5, "timestep": 500, "target": b, "k": 3, "kind": "random", "draw": d, "pixel_l2": r})
    (s,) = summarize(rows)
    # paired against each target's mean draw: 2-2.25, 3-2, 1-1 -> one win of three, median difference 0
    assert s["random_draws"] == 2 and s["num_targets"] == 3
    assert s["top_wins"] == pytest.approx(1 / 3) and s["median_difference"] == pytest.approx(0.0)
    # the control's distribution pools the draws: median of [1, 3.5, 1.5, 2.5, 2, 0]
    assert s["random_quartiles"][1] == pytest.approx(1.75) and s["top_quartiles"][1] == pytest.approx(2.0)
    assert s["difference_quartiles"] == pytest.approx([-0.125, 0.0, 0.5])
