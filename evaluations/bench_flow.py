"""The whole flow with the library's defaults, against the reference recipe and plain forward + backward, in one process.

    python -m diffusion_trak.evaluations.bench_flow                              # both parts
    python -m diffusion_trak.evaluations.bench_flow --parts demo                 # the demo's stages and one trajectory only
    python -m diffusion_trak.evaluations.bench_flow --parts train --timesteps 10 100

Parts (every figure of a part comes from the same process and run; paths are interleaved where they repeat):

- ``train``: training featurization of the ~1.1M-parameter UNet of :mod:`evaluations.bench_featurize` at 16×16,
  B = 16, k = 2048, for each T: the library defaults (``FeaturizeArgs(proj_dim=k, batch_size=B)``, i.e.
  ``method="fast"``) against the reference recipe (``vmap`` + dense JL) and against one plain batched forward +
  backward of the same rows, with peak memory (:func:`evaluations.bench_featurize.bench_throughput`).
- ``demo``: the demo's configuration (:func:`diffusion_trak.demo.demo_settings`: the digits data, the demo's
  UNet, 2 checkpoints, T = 10, k = 1024, R = 20), with its new defaults and with its old ones: with
  ``--baseline-code DIR`` the previous version of the package (a checkout, imported in this same process)
  with its own defaults, otherwise the same settings with ``method="vmap"`` (the old default) on this code:

  1. the featurize stage (:func:`diffusion_trak.api.featurize` of the whole training set) and the score stage
     (:func:`diffusion_trak.api.score` of the demo's 8 recorded steps on a fresh feature set, then the
     demo's self-attribution check: 50 training images at timestep 50), side by side;
  2. "attribute one trajectory": ``api.score`` of 10 recorded steps of a 100-step DDPM sampling with R = 20,
     the first call on a freshly opened feature set (it builds the featurizers, the kernels and their
     factorisations) and repeated calls (which reuse them), against plain batched forward + backward of the
     same 10 × 20 (step, noise) pairs on every checkpoint; also this code on the old defaults' store
     (``reference``: vmap + dense JL) and, with ``--baseline-code``, the previous code on it.

The demo's checkpoints are the demo's UNet at two random initialisations unless ``--checkpoints`` names
trained ones: the cost of every path depends on the architecture and the data, not on the weights.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads stall on busy cores

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time

import torch

from .bench_featurize import PeakMemory, _trim, save_results, bench_throughput, print_throughput, small_unet


# --------------------------------------------------------------------------------------------- demo
def demo_checkpoints(paths, train_args, image_shape, n=2):
    """The demo's checkpoints: loaded from ``paths``, or the demo's UNet at ``n`` random initialisations."""
    from diffusion_trak.train import build_scheduler, build_unet, load_checkpoint

    if paths:
        return [load_checkpoint(p) for p in paths]
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append((build_unet(train_args, image_shape).eval(), build_scheduler(train_args)))
    return out


def plain_pairs(ckpts, trajectory, steps, R, seed, destination=0):
    """One plain batched forward + backward of the summed loss over the (step, noise) pairs of the targets, per
    checkpoint: the same rows, timesteps and noises as the targets, no per-sample work. With ``destination`` = D,
    also the D (timestep, noise) pairs of each final image's destination target (what ``api.score`` featurizes
    for its destination row)."""
    from diffusion_trak.outputs import output_value
    from diffusion_trak.targets import destination_draws, target_noises

    x0 = torch.stack([trajectory.x0_pred[trajectory.step_of(s)] for s in steps])  # (S, B, C, H, W)
    S, B = x0.shape[:2]
    shape = x0.shape[2:]
    xs = x0.reshape(S * B, 1, *shape).expand(S * B, R, *shape).reshape(S * B * R, *shape)
    ts = torch.tensor([int(trajectory.timesteps[s]) for s in steps]).repeat_interleave(B * R)
    ns = torch.cat([target_noises(seed, s, b, R, shape) for s in steps for b in range(B)])
    if destination:
        n_t = int(trajectory.scheduler_config.get("num_train_timesteps", 1000))
        draws = [destination_draws(seed, b, destination, n_t, shape) for b in range(B)]
        final = trajectory.final.float()
        xs = torch.cat([xs, final.repeat_interleave(destination, dim=0)])
        ts = torch.cat([ts, torch.cat([d[0] for d in draws])])
        ns = torch.cat([ns, torch.cat([d[1] for d in draws])])

    def run():
        for unet, sched in ckpts:
            unet.zero_grad(set_to_none=True)
            (output_value(unet, sched, xs, ts, ns).sum() / R).backward()
        for unet, _ in ckpts:
            unet.zero_grad(set_to_none=True)
    return run, len(xs)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _measured(fn):
    """(seconds, peak bytes above the resident set before the call, result) of one call."""
    mem = PeakMemory("cpu").start()
    t, out = _timed(fn)
    return t, mem.peak(), out


def load_baseline(code_dir: str):
    """The ``diffusion_trak`` package of another checkout (``code_dir``/diffusion_trak), imported in this process
    under the name ``baseline_trak``: its ``api`` and ``demo`` modules, to run the previous version side by side."""
    import importlib
    import importlib.util

    root = os.path.join(os.path.abspath(code_dir), "diffusion_trak")
    spec = importlib.util.spec_from_file_location("baseline_trak", os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["baseline_trak"] = mod
    spec.loader.exec_module(mod)
    return importlib.import_module("baseline_trak.api"), importlib.import_module("baseline_trak.demo")


def bench_demo(checkpoint_paths=None, limit=None, repeats=3, workdir=None, progress=False, baseline_code=None,
               channels=None, k=None, trajectory=True):
    from diffusion_trak import api
    from diffusion_trak.data import DataArgs, load_dataset
    from diffusion_trak.demo import demo_settings
    from diffusion_trak.pipelines import TrajectoryPipeline

    cfg = demo_settings()
    if channels:  # a variant of the demo: another UNet width and/or k, in the new and the old settings alike
        cfg.train = dataclasses.replace(cfg.train, block_out_channels=tuple(channels))
    if k:
        cfg.featurize = dataclasses.replace(cfg.featurize, proj_dim=k)
    dataset = load_dataset(DataArgs(name="digits", limit=limit if limit is not None else cfg.limit))
    ckpts = demo_checkpoints(checkpoint_paths, cfg.train, tuple(dataset.images.shape[1:]))
    # name -> (api module, the demo's featurize settings, the demo's score settings)
    runs = {"new": (api, cfg.featurize, cfg.score)}
    if baseline_code:  # today's defaults: the previous code with its own demo settings
        base_api, base_demo = load_baseline(baseline_code)
        base_cfg = base_demo.demo_settings()
        if k:
            base_cfg.featurize = dataclasses.replace(base_cfg.featurize, proj_dim=k)
        runs["old"] = (base_api, base_cfg.featurize, base_cfg.score)
    else:  # the old default method on this code
        runs["old"] = (api, dataclasses.replace(cfg.featurize, method="vmap"), cfg.score)
    settings = {name: r[1] for name, r in runs.items()}
    assert settings["new"].method == "fast", "the demo's settings must resolve to the fast path by default"
    demo_steps = sorted({round(i * (cfg.sampling_steps - 1) / (cfg.record - 1)) for i in range(cfg.record)})
    traj_steps = sorted({round(i * (cfg.sampling_steps - 1) / 9) for i in range(10)})
    unet, sched = ckpts[-1]
    traj = TrajectoryPipeline(unet=unet, scheduler=sched)(seed=0, num_inference_steps=cfg.sampling_steps,
                                                          record_steps=sorted(set(demo_steps) | set(traj_steps)),
                                                          show_progress=False).trajectory
    indices = dataset.indices.numpy()
    work = workdir or tempfile.mkdtemp(prefix="bench_flow_")
    res = {"n_train": len(dataset), "checkpoints": len(ckpts), "trained": bool(checkpoint_paths),
           "p": sum(p.numel() for p in ckpts[0][0].parameters()), "T": cfg.featurize.num_timesteps,
           "k": cfg.featurize.proj_dim, "R": cfg.score.num_noises, "demo_steps": demo_steps, "trajectory_steps": traj_steps,
           "method": {name: a.method for name, a in settings.items()},
           "old_code": os.path.abspath(baseline_code) if baseline_code else "this code",
           "variant": (f"UNet {tuple(channels)}" if channels else "") + (f" k = {k}" if k else "")}
    stores = {}
    # 1. the demo's featurize and score stages, new defaults and old defaults side by side
    for name, (mod, fargs, _) in runs.items():
        out = os.path.join(work, f"features_{name}")
        t, peak, fs = _measured(lambda: mod.featurize(ckpts, dataset, fargs, out, overwrite=True, progress=progress))
        stores[name] = out
        res[f"{name}_featurize_s"], res[f"{name}_featurize_peak_mb"] = t, peak / 2 ** 20
        res[f"{name}_projector"] = fs.store.settings["projector"]
        print(f"   featurize ({name} defaults, method {fargs.method}): {t:.1f} s, peak {peak / 2 ** 20:.0f} MB", flush=True)
        _trim()
    for name, (mod, _, sargs) in runs.items():
        fs = mod.FeatureSet.open(stores[name])

        def score_stage():
            mod.score(fs, ckpts, indices, sargs, trajectory=traj, steps=demo_steps, progress=False)
            mod.self_attribution_rate(fs, ckpts, dataset, cfg.self_attribution_images, cfg.self_attribution_timestep,
                                      sargs)
        t, peak, _ = _measured(score_stage)
        res[f"{name}_score_s"], res[f"{name}_score_peak_mb"] = t, peak / 2 ** 20
        print(f"   score stage ({name} defaults): {t:.1f} s, peak {peak / 2 ** 20:.0f} MB", flush=True)
        del fs
        _trim()
    for name in settings:
        res[f"{name}_stages_s"] = res[f"{name}_featurize_s"] + res[f"{name}_score_s"]
    res["stages_speedup"] = res["old_stages_s"] / res["new_stages_s"]
    res["featurize_speedup"] = res["old_featurize_s"] / res["new_featurize_s"]
    res["score_speedup"] = res["old_score_s"] / res["new_score_s"]
    if not trajectory:
        return res

    # 2. attribute one trajectory: 10 recorded steps, R = 20 (the old defaults' store scored by each code).
    # Plain forward + backward runs over exactly the pairs each path featurizes: "steps" paths score the recorded
    # steps only (destination row off) against the steps' pairs; "new" (the defaults, destination row on)
    # against the steps' pairs plus the destination's D pairs per final image.
    D = cfg.score.destination_draws
    steps_only = dataclasses.replace(cfg.score, destination_draws=0)
    sets = {"new": (api, stores["new"], cfg.score), "new_steps": (api, stores["new"], steps_only),
            "ref": (api, stores["old"], steps_only)}
    if baseline_code:
        sets["old"] = (runs["old"][0], stores["old"], runs["old"][2])
    calls = {}
    for name, (mod, path, sargs) in list(sets.items()):
        try:
            fs = mod.FeatureSet.open(path)
        except mod.StoreError as e:  # this code on a store of the previous code's format: not comparable, skipped
            res[f"{name}_trajectory_skipped"] = str(e)
            print(f"   trajectory path {name!r} skipped: {e}", flush=True)
            del sets[name]
            continue
        calls[name] = (lambda mod=mod, fs=fs, sargs=sargs: mod.score(fs, ckpts, indices, sargs, trajectory=traj,
                                                                     steps=traj_steps, progress=False))
    for name, fn in calls.items():  # first call: builds featurizers, kernels and factorisations
        t, peak, _ = _measured(fn)
        res[f"{name}_trajectory_first_s"], res[f"{name}_trajectory_first_peak_mb"] = t, peak / 2 ** 20
    plain, rows = plain_pairs(ckpts, traj, traj_steps, cfg.score.num_noises, cfg.score.seed)
    plain_dest, rows_dest = plain_pairs(ckpts, traj, traj_steps, cfg.score.num_noises, cfg.score.seed, D)
    calls["plain"], calls["plain_dest"] = plain, plain_dest
    res["trajectory_rows_per_checkpoint"], res["trajectory_rows_with_destination"] = rows, rows_dest
    res["destination_draws"] = D
    plain(), plain_dest()  # warm-up
    for name, fn in calls.items():
        _, peak, _ = _measured(fn)
        res[f"{name}_trajectory_peak_mb"] = peak / 2 ** 20
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            times[name].append(_timed(fn)[0])
    for name, v in times.items():
        res[f"{name}_trajectory_s"] = statistics.median(v)
    for name, (_, _, sargs) in sets.items():
        base = "plain_dest" if getattr(sargs, "destination_draws", 0) else "plain"  # the same pairs on both sides
        res[f"{name}_trajectory_plain"] = base
        res[f"{name}_trajectory_over_plain"] = res[f"{name}_trajectory_s"] / res[f"{base}_trajectory_s"]
        res[f"{name}_trajectory_first_over_plain"] = res[f"{name}_trajectory_first_s"] / res[f"{base}_trajectory_s"]
    res["repeats"] = repeats
    return res


def print_demo(r):
    print(f"\n== the demo's configuration{' (variant: ' + r['variant'].strip() + ')' if r.get('variant') else ''}: {r['n_train']} digits 8×8, UNet p = {r['p']:,}, {r['checkpoints']} checkpoints "
          f"({'trained' if r['trained'] else 'random init'}), T = {r['T']}, k = {r['k']}, R = {r['R']}")
    print(f"   new defaults: method {r['method']['new']} ({r['new_projector']}); "
          f"old defaults: method {r['method']['old']} ({r['old_projector']}), run by {r['old_code']}")
    print(f"   {'stage':<44} {'new (s)':>9} {'old (s)':>9} {'old ÷ new':>10} {'new peak MB':>12} {'old peak MB':>12}")
    rows = [("featurize (whole training set)", "featurize"),
            (f"score ({len(r['demo_steps'])} steps + self-attribution of 50)", "score"),
            ("featurize + score", "stages")]
    for label, key in rows:
        peak = ((f"{r[f'new_{key}_peak_mb']:>12.0f} {r[f'old_{key}_peak_mb']:>12.0f}")
                if f"new_{key}_peak_mb" in r else "")
        print(f"   {label:<44} {r[f'new_{key}_s']:>9.1f} {r[f'old_{key}_s']:>9.1f} "
              f"{r[f'old_{key}_s'] / r[f'new_{key}_s']:>9.1f}× {peak}")
    if "plain_trajectory_s" not in r:
        return
    print(f"\n== attribute one trajectory: {len(r['trajectory_steps'])} recorded steps × R = {r['R']} on {r['checkpoints']} "
          f"checkpoints ({r['trajectory_rows_per_checkpoint']} (step, noise) rows each); median of {r['repeats']}")
    print(f"   {'path':<44} {'s':>8} {'÷ plain':>8} {'peak MB':>9}")
    print(f"   {'plain fwd+bwd of the steps pairs':<44} {r['plain_trajectory_s']:>8.3f} {'1.00':>8} "
          f"{r['plain_trajectory_peak_mb']:>9.0f}")
    if "plain_dest_trajectory_s" in r:
        print(f"   {'plain fwd+bwd, steps + destination pairs':<44} {r['plain_dest_trajectory_s']:>8.3f} "
              f"{r['plain_dest_trajectory_s'] / r['plain_trajectory_s']:>8.2f} {r['plain_dest_trajectory_peak_mb']:>9.0f}")
    print(f"   (each path's ÷ plain is against the plain run of the pairs it featurizes; destination D = "
          f"{r.get('destination_draws', 0)} pairs per final image)")
    for name, label in (("new", "default (fast), steps + destination"), ("new_steps", "default (fast), steps only"),
                        ("ref", "reference (vmap + dense JL), steps only"), ("old", "old code, old defaults")):
        if f"{name}_trajectory_s" not in r:
            continue
        print(f"   {label + ', repeated call':<44} {r[f'{name}_trajectory_s']:>8.3f} {r[f'{name}_trajectory_over_plain']:>8.2f} "
              f"{r[f'{name}_trajectory_peak_mb']:>9.0f}")
        print(f"   {label + ', first call':<44} {r[f'{name}_trajectory_first_s']:>8.3f} "
              f"{r[f'{name}_trajectory_first_over_plain']:>8.2f} {r[f'{name}_trajectory_first_peak_mb']:>9.0f}")


# --------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["train", "demo"], choices=["train", "demo"])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--timesteps", type=int, nargs="+", default=[10, 100], help="T values of the train part")
    ap.add_argument("--batch", type=int, default=16, help="examples per batch in the train part")
    ap.add_argument("--ref-batch", type=int, default=4,
                    help="examples per reference (vmap) batch when T > 10: its memory grows with B × T")
    ap.add_argument("--k", type=int, default=2048, help="k of the train part")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each training-featurization path")
    ap.add_argument("--trajectory-repeats", type=int, default=7, help="timed repeats of attributing one trajectory")
    ap.add_argument("--cache-limit-gb", type=float, default=4.0,
                    help="largest reference matrix held in memory (the library's default limit); above it the "
                         "reference projection is timed on a slice of rows")
    ap.add_argument("--checkpoints", nargs="+", default=None, help="trained demo checkpoints (default: random init)")
    ap.add_argument("--limit", type=int, default=None, help="training images of the demo part (default: the demo's)")
    ap.add_argument("--baseline-code", default=None, metavar="DIR",
                    help="a checkout of the previous version (DIR/diffusion_trak): the demo part runs its old defaults "
                         "with that code, in this process (e.g. `git worktree add DIR <commit>`); default: method vmap "
                         "on this code")
    ap.add_argument("--demo-channels", type=int, nargs="+", default=None,
                    help="a variant of the demo part: these UNet widths instead of the demo's")
    ap.add_argument("--demo-k", type=int, default=None, help="a variant of the demo part: this k instead of the demo's")
    ap.add_argument("--no-trajectory", action="store_true", help="skip attributing one trajectory in the demo part")
    ap.add_argument("--workdir", default=None, help="where the demo part's feature stores go (default: a temp folder)")
    ap.add_argument("--json", default=None, help="write all figures to this JSON file")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"device cpu, torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} (other jobs on the machine make figures noisy; ratios within a part are what counts)")
    results = {"threads": torch.get_num_threads(), "argv": sys.argv[1:] if argv is None else list(argv)}
    if "train" in a.parts:
        for T in a.timesteps:
            r = bench_throughput(small_unet(), (1, 16, 16), a.batch, T, a.k, "cpu", a.repeats, a.cache_limit_gb,
                                 ref_batch=a.ref_batch if T > 10 else 0)
            print_throughput(f"training featurization, ~1M UNet 16×16, T = {T}", r)
            results[f"train_T{T}"] = r
            _trim()
    if "demo" in a.parts:
        r = bench_demo(a.checkpoints, a.limit, a.trajectory_repeats, a.workdir, baseline_code=a.baseline_code,
                       channels=a.demo_channels, k=a.demo_k, trajectory=not a.no_trajectory)
        print_demo(r)
        results["demo"] = r
    if a.json:
        save_results(a.json, results)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
