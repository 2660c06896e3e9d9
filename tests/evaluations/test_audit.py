import numpy as np
import pytest

from diffusion_trak.featurize.featurizer import seed_for
from evaluations.audit import plan, removed_positions, resolve_k, summarize


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
    assert len(cases) == 2 * 2 * 2 * 2
    assert len({c.name for c in cases}) == len(cases)
    top = [c for c in cases if c.step == 10 and c.target == 2 and c.k == 5 and c.kind == "top"][0]
    assert sorted(top.removed.tolist()) == sorted(np.argsort(-scores[10][2])[:5].tolist())


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
    assert [c.name for c in cases] == ["s0010-b001-k4-top", "s0010-b001-k4-random", "s0010-b001-k4-random2",
                                       "s0010-b001-k4-random3"]
    # draw 0 keeps its seed, so audits made with one draw are reused; later draws remove other examples
    assert cases[1].removed.tolist() == removed_positions(scores[10][1], 4, "random", seed_for(3, 10, 1, 4, 47)).tolist()
    assert len({tuple(c.removed.tolist()) for c in cases[1:]}) == 3
    assert [c.name for c in plan(scores, [1], [4], 40, 3, random_draws=1)] == [c.name for c in cases[:2]]
    with pytest.raises(ValueError):
        plan(scores, [1], [4], 40, 3, random_draws=0)


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
