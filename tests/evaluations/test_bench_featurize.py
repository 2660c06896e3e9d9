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
