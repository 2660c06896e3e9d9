"""Memory of featurizing a disk-backed image folder: peak resident memory at two data set sizes, 10× apart.

    python -m diffusion_trak.evaluations.bench_data                    # 400 and 4,000 PNGs, 64×64 RGB
    python -m diffusion_trak.evaluations.bench_data --sizes 200 2000 --image-size 32 --compare-in-memory

For each size, a folder of random PNGs is written, then a fresh subprocess loads it with
``load_dataset(DataArgs(name="folder", ...))`` (a :class:`~diffusion_trak.data.DiskImageDataset`: images
decoded batch by batch) and featurizes it with a tiny UNet through :func:`diffusion_trak.api.featurize`
(fingerprint, finiteness check and features: three passes over the files). The child reports its peak
resident memory, ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (imports included), its resident memory before
loading the data, and the time. The acceptance of issue 18: the larger folder's peak is at most 1.2× the
smaller's. Since the imports dominate the peak, the peak above the memory before loading the data is printed
too (and its ratio), which shows what the data set itself costs. ``--compare-in-memory`` repeats each size with the images read whole into memory first
(``dataset.to_memory()``), what the folder loader did before: there the peak grows with the size.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

#: the acceptance of issue 18: peak memory at 10× the images at most this many times the smaller run's
ACCEPT_RATIO = 1.2


def write_folder(root: str, n: int, size: int, seed: int = 0) -> float:
    """``n`` random ``size × size`` RGB PNGs (smooth noise, so they compress like photos); returns MB on disk."""
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        low = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((size, size), Image.BILINEAR)
        path = os.path.join(root, f"{i:06d}.png")
        img.save(path)
        total += os.path.getsize(path)
    return total / 2 ** 20


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(a) -> None:
    """Runs in a fresh process: featurize the folder, print one JSON line."""
    import resource

    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from diffusion_trak import api
    from diffusion_trak.config import FeaturizeArgs
    from diffusion_trak.data import DataArgs, load_dataset

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=a.image_size, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    base_kb = _rss_kb()
    t0 = time.perf_counter()
    dataset = load_dataset(DataArgs(name="folder", path=a.folder))
    if a.in_memory:
        dataset = dataset.to_memory()
    args = FeaturizeArgs(num_timesteps=a.timesteps, proj_dim=a.k, batch_size=a.batch_size)
    fs = api.featurize([(unet, scheduler)], dataset, args, a.out, progress=False)
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    feats = np.asarray(fs.arrays[0])
    print(json.dumps({"n": len(dataset), "kind": type(dataset).__name__, "peak_mb": peak_kb / 1024,
                      "before_data_mb": base_kb / 1024, "seconds": seconds,
                      "features_finite": bool(np.isfinite(feats).all()), "features_nonzero": bool((feats != 0).any(1).all())}))


def run_size(n: int, a, workdir: str, in_memory: bool) -> dict:
    folder = os.path.join(workdir, f"images-{n}")
    if not os.path.isdir(folder):
        mb = write_folder(folder, n, a.image_size)
        print(f"wrote {n} PNGs ({a.image_size}×{a.image_size} RGB, {mb:.1f} MB) to {folder}", flush=True)
    out = os.path.join(workdir, f"features-{n}-{'mem' if in_memory else 'disk'}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "diffusion_trak.evaluations.bench_data", "--child", "--folder", folder, "--out", out,
           "--image-size", str(a.image_size), "--k", str(a.k), "--timesteps", str(a.timesteps),
           "--batch-size", str(a.batch_size), "--threads", str(a.threads)] + (["--in-memory"] if in_memory else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"featurize subprocess failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[400, 4000], help="the two folder sizes (10× apart)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--k", type=int, default=64, help="projected dimension")
    ap.add_argument("--timesteps", type=int, default=1, help="T, (timestep, noise) pairs per image")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary folder, removed)")
    ap.add_argument("--compare-in-memory", action="store_true", help="also featurize each folder read whole into memory")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a)
        return 0
    workdir = a.workdir or tempfile.mkdtemp(prefix="bench_data_")
    print(f"featurize a folder of {a.image_size}×{a.image_size} RGB PNGs, sizes {a.sizes[0]} and {a.sizes[1]}: tiny UNet, "
          f"T = {a.timesteps}, k = {a.k}, batch {a.batch_size}, {a.threads} thread(s); load average {os.getloadavg()[0]:.1f}")
    results = []
    try:
        for in_memory in ([False, True] if a.compare_in_memory else [False]):
            rows = [run_size(n, a, workdir, in_memory) for n in a.sizes]
            ratio = rows[1]["peak_mb"] / rows[0]["peak_mb"]
            # the process's imports (torch, diffusers) dominate the peak; what the data and featurization add:
            above = [r["peak_mb"] - r["before_data_mb"] for r in rows]
            kind = "read whole into memory" if in_memory else "disk-backed (DiskImageDataset)"
            for r in rows:
                print(f"  {kind:<32} n = {r['n']:>6}: peak RSS (ru_maxrss) {r['peak_mb']:7.1f} MB "
                      f"(before loading the data {r['before_data_mb']:6.1f} MB), {r['seconds']:6.1f} s, "
                      f"features finite {r['features_finite']}, every row nonzero {r['features_nonzero']}")
            verdict = "" if in_memory else f"  (acceptance: ≤ {ACCEPT_RATIO}: {'PASS' if ratio <= ACCEPT_RATIO else 'FAIL'})"
            print(f"  {kind}: peak ratio {rows[1]['n']} / {rows[0]['n']} = {ratio:.3f}{verdict}; peak above the "
                  f"memory before loading the data {above[0]:.1f} → {above[1]:.1f} MB (ratio {above[1] / above[0]:.3f})")
            results.append({"in_memory": in_memory, "runs": rows, "ratio": ratio, "above_ratio": above[1] / above[0]})
    finally:
        if not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"settings": {k: v for k, v in vars(a).items() if k not in ("child", "in_memory", "folder", "out")},
                       "results": results}, f, indent=2)
    return 0 if results[0]["ratio"] <= ACCEPT_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
