"""Smoke test of the flow benchmark's demo part: it runs, and each trajectory path is compared with the plain
forward + backward of exactly the pairs it featurizes (steps only, or steps + destination)."""
from diffusion_trak.evaluations.bench_flow import bench_demo


def test_bench_demo_counts_the_same_pairs(tmp_path):
    r = bench_demo(limit=8, repeats=1, workdir=str(tmp_path), k=32)
    S, R, D = len(r["trajectory_steps"]), r["R"], r["destination_draws"]
    assert r["trajectory_rows_per_checkpoint"] == S * R
    assert r["trajectory_rows_with_destination"] == S * R + D
    assert r["new_trajectory_plain"] == "plain_dest" and r["new_steps_trajectory_plain"] == "plain"
    assert r["ref_trajectory_plain"] == "plain"
    for name in ("new", "new_steps", "ref"):
        assert r[f"{name}_trajectory_over_plain"] > 0
    assert r["stages_speedup"] > 0
