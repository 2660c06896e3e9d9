"""Memory-bounded scoring: peak resident memory of ``TRAKScorer.score_into`` against the number of training rows.

    python -m diffusion_trak.evaluations.bench_scoring                       # n = 25k, 100k, 400k, 1M; 50 targets × 4 steps; k = 256
    python -m diffusion_trak.evaluations.bench_scoring --sizes 10000 40000 --targets 20 --steps 2 --compare-no-release

A scaled-down version of scoring 1,000,000 training rows × 10,000 targets × 20 steps. For each n, random
training features (C checkpoints of n × k float32) are written to ``.npy`` memmaps, like a feature store,
then a fresh subprocess opens them, builds the scorer (k × k kernels, read in blocks) and streams the
(steps·targets) × n scores into a :class:`~diffusion_trak.store.StoredArray` memmap. The subprocess
reports its peak resident set (``VmHWM``, reset after imports) above its resident set before scoring,
and the time. The figure should not grow with n. ``--compare-no-release`` repeats each size with the
page release disabled: file pages of the memmaps that were read or written then count in the resident set
(reclaimable by the kernel, but they inflate the figure in proportion to n). Afterwards a few target rows are
checked against ``TRAKScorer.score`` (the in-memory path).
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


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def prepare(workdir, n, m, k, C, seed=0, block=65536):
    """C training-feature memmaps (n × k) and target features (m × k), written in blocks."""
    rng = np.random.default_rng(seed)
    paths = []
    for c in range(C):
        path = os.path.join(workdir, f"train{c}.npy")
        a = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, k))
        for i in range(0, n, block):
            a[i:i + block] = rng.standard_normal((min(block, n - i), k), dtype=np.float32)
        a.flush()
        del a
        paths.append(path)
    tpath = os.path.join(workdir, "targets.npy")
    np.save(tpath, rng.standard_normal((C, m, k), dtype=np.float32))
    return paths, tpath


def child(args):
    """Runs in a fresh process: score and report peak memory."""
    import torch

    torch.set_num_threads(args.threads)
    import diffusion_trak.score as score_mod
    from diffusion_trak.store import Store

    if args.no_release:
        score_mod.release_pages = lambda array: None
    train = [np.lib.format.open_memmap(p, mode="r") for p in args.train]
    targets = list(np.load(args.targets_path))
    out = os.path.join(args.workdir, "scores_store")
    shutil.rmtree(out, ignore_errors=True)
    base = _status("VmRSS")
    ok = _reset_peak()
    t0 = time.perf_counter()
    scorer = score_mod.TRAKScorer(train, ridge=0.01, block_size=args.block_size)
    t_kernel = time.perf_counter() - t0
    arr = Store(out, {"bench": True}).array("scores", (targets[0].shape[0], train[0].shape[0]))
    scorer.score_into(targets, arr, target_block=args.target_block, progress=False)
    elapsed = time.perf_counter() - t0
    peak = _status("VmHWM")
    # correctness spot check against the in-memory path on a few target rows (after the measurement)
    rows = np.array([0, targets[0].shape[0] // 2, targets[0].shape[0] - 1])
    want = scorer.score([t[rows] for t in targets])
    err = float(np.abs(arr.read()[rows] - want).max() / np.abs(want).max())
    print(json.dumps({"n": int(train[0].shape[0]), "m": int(targets[0].shape[0]), "base_mb": base / 2 ** 20,
                      "peak_mb": peak / 2 ** 20, "peak_above_base_mb": (peak - base) / 2 ** 20, "reset_ok": ok,
                      "seconds": elapsed, "kernel_seconds": t_kernel, "spot_check_rel_err": err,
                      "scores_gb": arr.data.nbytes / 2 ** 30, "no_release": bool(args.no_release)}))


def run_size(n, a, workdir, no_release=False):
    paths, tpath = prepare(workdir, n, a.targets * a.steps, a.k, a.checkpoints)
    cmd = [sys.executable, "-m", "diffusion_trak.evaluations.bench_scoring", "--child", "--workdir", workdir, "--targets-path", tpath,
           "--block-size", str(a.block_size), "--target-block", str(a.target_block), "--threads", str(a.threads),
           "--train", *paths] + (["--no-release"] if no_release else [])
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if res.returncode != 0:
        raise RuntimeError(f"scoring subprocess failed:\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r["train_gb"] = n * a.k * 4 * a.checkpoints / 2 ** 30
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[25_000, 100_000, 400_000, 1_000_000], help="training rows n")
    ap.add_argument("--targets", type=int, default=50, help="targets per step")
    ap.add_argument("--steps", type=int, default=4, help="trajectory steps (score rows = targets × steps)")
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--checkpoints", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=4096, help="training rows per block (ScoreArgs.block_size)")
    ap.add_argument("--target-block", type=int, default=0, help="target rows per block (0: min(m, 2048))")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary folder, removed)")
    ap.add_argument("--compare-no-release", action="store_true", help="also run each size without releasing memmap pages")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-release", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--train", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--targets-path", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a) or 0
    workdir = a.workdir or tempfile.mkdtemp(prefix="bench_scoring_")
    os.makedirs(workdir, exist_ok=True)
    m = a.targets * a.steps
    print(f"scores: {a.steps} steps × {a.targets} targets = {m} rows × n training rows, k = {a.k}, "
          f"{a.checkpoints} checkpoint(s), training block {a.block_size}, target block {a.target_block or min(m, 2048)}, "
          f"{a.threads} thread(s); load average {os.getloadavg()[0]:.1f}")
    print(f"{'n':>9} {'train GB':>9} {'scores GB':>10} {'release':>8} {'peak above base MB':>19} {'peak RSS MB':>12} "
          f"{'seconds':>8} {'Mscores/s':>10} {'spot err':>9}")
    results = []
    try:
        for n in a.sizes:
            for no_release in ([False, True] if a.compare_no_release else [False]):
                r = run_size(n, a, workdir, no_release)
                results.append(r)
                print(f"{n:>9} {r['train_gb']:>9.2f} {r['scores_gb']:>10.2f} {'no' if no_release else 'yes':>8} "
                      f"{r['peak_above_base_mb']:>19.0f} {r['peak_mb']:>12.0f} {r['seconds']:>8.1f} "
                      f"{m * n / r['seconds'] / 1e6:>10.1f} {r['spot_check_rel_err']:>9.1e}")
    finally:
        if not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    k, tb, bs, C = 2048, 2048, a.block_size, a.checkpoints
    est = (tb * (bs + C * k) + bs * k + C * k * k * 2) * 8 / 2 ** 20
    print(f"full scale (1,000,000 × 10,000 targets × 20 steps, k = 2048): bounded working set ≈ {est:.0f} MB "
          f"(target block {tb} × (training block {bs} + C·k) + one training block + C k×k factors, float64), "
          f"independent of n; the score memmap itself is {1e6 * 2e5 * 4 / 2 ** 40:.2f} TiB on disk.")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
