"""Smoke test of the training-featurization benchmark: the default's figures include the GGN kernel's work."""
from diffusion_trak.evaluations.bench_featurize import bench_throughput


def test_throughput_reports_features_and_the_kernel(tiny_unet):
    r = bench_throughput(tiny_unet, (1, 8, 8), B=2, T=2, k=16, device="cpu", repeats=1, cache_limit_gb=1,
                         paths=("plain", "fast"))
    assert r["kernel_draws"] == 32
    # the default featurization (features + kernel) costs more than the features alone, and both are reported
    assert r["fast_with_kernel_s_per_batch"] > r["fast_s_per_batch"] > 0
    assert 0 < r["fast_with_kernel_fraction_of_plain"] < r["fast_fraction_of_plain"]
    # the kernel's references: its rows against plain passes of the same pairs, and the floor below both
    assert r["kernel_over_plain"] > r["kernel_floor_over_plain"] > 0
    assert r["fast_with_kernel_fraction_of_plain"] < r["fast_with_kernel_floor_fraction_of_plain"] < r["fast_fraction_of_plain"]


def test_a_path_out_of_memory_is_reported_and_the_others_go_on(tiny_unet, monkeypatch):
    """A path whose call runs out of memory (here the reference's, as on a GPU at T = 100) is reported as "out of
    memory"; the other paths' figures are still there. Any other error is raised."""
    import pytest
    import torch

    from diffusion_trak.evaluations import bench_featurize as bf

    def boom(*a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 139.00 GiB")

    monkeypatch.setattr(bf.Featurizer, "gradients", boom)  # the reference path's per-example gradients (vmap)
    r = bf.bench_throughput(tiny_unet, (1, 8, 8), B=2, T=2, k=16, device="cpu", repeats=1, cache_limit_gb=1)
    assert r["failed"] == {"reference": "out of memory"}
    assert r["fast_throughput"] > 0 and r["plain_throughput"] > 0 and "reference_throughput" not in r
    bf.print_throughput("tiny", r)  # prints the failure instead of crashing
    monkeypatch.setattr(bf.Featurizer, "gradients", lambda *a, **kw: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        bf.bench_throughput(tiny_unet, (1, 8, 8), B=2, T=2, k=16, device="cpu", repeats=1, cache_limit_gb=1)


def test_op_counts_per_call(tiny_unet):
    from diffusion_trak.evaluations.bench_featurize import bench_ops

    r = bench_ops(tiny_unet, (1, 8, 8), "cpu", cases=((1, 4, 2),), k=16)
    (case,) = r["cases"]
    assert case["B"] == [1, 4] and min(case["ops"]) > 100 and case["growth"] <= 1.25


def test_sd_structure_benchmark_and_the_memory_rule():
    """bench_featurize --sd15's code on a narrow model of Stable Diffusion 1.5's layer structure: every figure is
    there, the default featurizer runs on the caller's model (no copy) and its state is the sketch's bounded cache and
    one layer's buckets, not a table per parameter: the same bound at 546k parameters as at 860M."""
    import pytest

    from diffusion_trak.evaluations import bench_featurize as bf
    from diffusion_trak.featurize.sketch import CACHE_BYTES

    r = bf.bench_sd(bf.SD15_NARROW, size=8, B=2, repeats=1)
    assert r["p"] == r["p_model"] > 500_000
    assert r["state_mb"] * 2 ** 20 <= CACHE_BYTES + 8 * r["largest_layer"]
    for name in ("plain", "features", "kernel"):
        assert r[f"{name}_s_per_pair"] > 0 and r[f"{name}_peak_mb"] > 0
    assert r["ops_per_call"] > 1000 and r["passes_per_call"] == 1 and r["rows_per_pass"] == 4
    assert r["planned_peak_mb"] > r["state_mb"]
    bf.print_sd("narrow", r)
    pytest.importorskip("peft")
    lora = bf.bench_sd(bf.SD15_NARROW, size=8, B=2, repeats=1, lora_rank=4, ops=False)
    assert 0 < lora["p"] < r["p"] // 10 and lora["p_model"] > r["p_model"]
