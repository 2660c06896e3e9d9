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
