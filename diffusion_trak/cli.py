"""``diffusion-trak``: train | featurize | generate | score | plot | demo.

Every command works on a *run folder* (``--run``, default ``runs/digits``)::

    run.json                    the dataset settings (DataArgs), written by ``train``
    model/ckpt-XXXX/            diffusers checkpoints (unet/, scheduler/)
    features/                   the feature store (one (N, k) array per checkpoint)
    trajectories/<name>.safetensors
    scores/<name>/              scores.npy (steps × targets × N), scores.json (top-k per step)
    report/<name>.png, .html

Rerunning a command resumes it; other settings over existing results refuse unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .config import FeaturizeArgs, ScoreArgs, TrainArgs

DEFAULT_RUN = "runs/digits"


# ---------------------------------------------------------------- helpers
def _data_args(ns):
    from .data import DataArgs

    return DataArgs(name=ns.data, path=ns.data_path, split="train", image_size=ns.image_size,
                    classes=ns.classes, limit=ns.limit, channels=ns.channels)


def _add_data(p):
    g = p.add_argument_group("data (defaults: the run's run.json, else digits)")
    g.add_argument("--data", default=None, help="digits (default), fmnist, folder or npz")
    g.add_argument("--data-path", default=None, help="image folder or .npz file (or Fashion-MNIST root)")
    g.add_argument("--image-size", type=int, default=None, help="resize images to this square size")
    g.add_argument("--classes", type=int, nargs="+", default=None, help="keep only these labels")
    g.add_argument("--limit", type=int, default=None, help="keep the first N examples")
    g.add_argument("--channels", type=int, default=None, choices=[1, 3], help="force 1 or 3 channels")


def _load_run_data(ns):
    """The dataset of a run: command-line flags if given, else the run's run.json."""
    from .data import DataArgs, load_dataset

    path = os.path.join(ns.run, "run.json")
    if ns.data is None and os.path.exists(path):
        with open(path) as f:
            args = DataArgs.from_dict(json.load(f)["data"])
    else:
        ns.data = ns.data or "digits"
        args = _data_args(ns)
    return load_dataset(args), args


def _checkpoints(ns) -> List[str]:
    from .train import list_checkpoints

    if getattr(ns, "checkpoints", None):
        return ns.checkpoints
    ck = list_checkpoints(os.path.join(ns.run, "model"))
    if not ck:
        from .errors import UserError
        raise UserError(f"no checkpoints in {ns.run}/model; run `diffusion-trak train --run {ns.run}` "
                        "or pass --checkpoints DIR [DIR ...] (folders with unet/ and scheduler/)")
    return ck


def _device(ns):
    import torch

    if ns.device:
        return ns.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _say(msg):
    from . import distributed

    if distributed.state().is_main_process:
        print(msg, flush=True)


# ---------------------------------------------------------------- commands
def cmd_train(ns):
    from .store import write_json_atomic
    from .train import train_ddpm

    dataset, dargs = _load_run_data(ns)
    targs = TrainArgs(block_out_channels=tuple(ns.channels_per_level), epochs=ns.epochs, batch_size=ns.batch_size,
                      learning_rate=ns.lr, num_checkpoints=ns.num_checkpoints, seed=ns.seed,
                      class_conditional=ns.class_conditional)
    os.makedirs(ns.run, exist_ok=True)
    write_json_atomic(os.path.join(ns.run, "run.json"), {"data": dargs.to_dict()})
    _say(f"training a DDPM on {dataset} for {ns.epochs} epochs -> {ns.run}/model")
    ck = train_ddpm(dataset, targs, os.path.join(ns.run, "model"), device=_device(ns), overwrite=ns.overwrite)
    _say(f"checkpoints: {', '.join(ck)}")
    return ck


def _featurize_args(ns) -> FeaturizeArgs:
    return FeaturizeArgs(num_timesteps=ns.num_timesteps, timestep_strategy=ns.timestep_strategy, proj_dim=ns.proj_dim,
                         projector=ns.projector, output=ns.output, seed=ns.seed, batch_size=ns.batch_size,
                         method=ns.method, timestep_range=tuple(ns.timestep_range) if ns.timestep_range else None)


def cmd_featurize(ns):
    from . import api

    dataset, _ = _load_run_data(ns)
    out = ns.out or os.path.join(ns.run, "features")
    fs = api.featurize(_checkpoints(ns), dataset, _featurize_args(ns), out, overwrite=ns.overwrite, device=_device(ns))
    _say(f"features: {out} ({len(fs.names)} checkpoints × {len(dataset)} rows × k={ns.proj_dim})")
    return fs


def cmd_generate(ns):
    from diffusers import DDIMScheduler

    from pipelines import TrajectoryPipeline

    from .train import load_checkpoint

    ckpt = ns.checkpoint or _checkpoints(ns)[-1]
    unet, sched = load_checkpoint(ckpt, _device(ns))
    if ns.scheduler == "ddim":
        sched = DDIMScheduler.from_config(sched.config)
    pipe = TrajectoryPipeline(unet=unet, scheduler=sched)
    record = ns.record_steps
    if record is None and ns.num_record:
        record = sorted({int(round(i * (ns.steps - 1) / max(1, ns.num_record - 1))) for i in range(ns.num_record)})
    out = pipe(batch_size=ns.num_images, seed=ns.seed, num_inference_steps=ns.steps, record_steps=record,
               class_labels=ns.class_label)
    path = ns.out or os.path.join(ns.run, "trajectories", f"seed-{ns.seed}.safetensors")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    out.trajectory.save(path)
    _say(f"trajectory: {path} (steps recorded: {out.trajectory.step_indices.tolist()})")
    return path


def _score_args(ns) -> ScoreArgs:
    return ScoreArgs(num_noises=ns.num_noises, ridge=ns.ridge, target_output=ns.target_output, top_k=ns.top_k)


def cmd_score(ns):
    from pipelines import Trajectory

    from . import api

    dataset, _ = _load_run_data(ns)
    features = api.FeatureSet.open(ns.features or os.path.join(ns.run, "features"))
    tpath = ns.trajectory or os.path.join(ns.run, "trajectories", "seed-0.safetensors")
    if ns.images:
        from .data import DataArgs, load_dataset

        targets = load_dataset(DataArgs(name="npz" if ns.images.endswith(".npz") else "folder", path=ns.images,
                                        image_size=dataset.resolution, channels=dataset.num_channels))
        out = ns.out or os.path.join(ns.run, "scores", "images")
        sc = api.score(features, _checkpoints(ns), dataset.indices.numpy(), _score_args(ns), images=targets.images,
                       image_timesteps=ns.image_timesteps, out=out, overwrite=ns.overwrite, device=_device(ns))
    else:
        if not os.path.exists(tpath):
            from .errors import UserError
            raise UserError(f"no trajectory at {tpath}; run `diffusion-trak generate --run {ns.run}` or pass --trajectory")
        traj = Trajectory.load(tpath)
        name = os.path.splitext(os.path.basename(tpath))[0]
        out = ns.out or os.path.join(ns.run, "scores", name)
        cond = None
        if traj.class_labels is not None:
            cond = {"class_labels": traj.class_labels}
        sc = api.score(features, _checkpoints(ns), dataset.indices.numpy(), _score_args(ns), trajectory=traj,
                       steps=ns.steps, out=out, overwrite=ns.overwrite, device=_device(ns), cond=cond)
    _say(f"scores: {out}/scores.npy {list(sc.values.shape)} (steps × targets × training examples); "
         f"top-{ns.top_k} per step: {out}/scores.json")
    return out


def cmd_plot(ns):
    from . import api
    from .report import plot_from_scores

    dataset, _ = _load_run_data(ns)
    sdir = ns.scores or os.path.join(ns.run, "scores", "seed-0")
    sc = api.Scores.load(sdir)
    traj = None
    tpath = ns.trajectory or os.path.join(ns.run, "trajectories", os.path.basename(sdir.rstrip("/")) + ".safetensors")
    if os.path.exists(tpath):
        from pipelines import Trajectory
        traj = Trajectory.load(tpath)
    name = os.path.basename(sdir.rstrip("/"))
    png, html = plot_from_scores(sc, dataset, traj, ns.out or os.path.join(ns.run, "report", name), target=ns.target,
                                 k=ns.top_k)
    _say(f"per-step plot: {png}\nhtml page: {html}")
    return png, html


def cmd_demo(ns):
    from .demo import run_demo

    if ns.latent:
        from .latent import run_latent_demo
        kw = {"prompt": ns.prompt} if ns.prompt else {}
        return run_latent_demo(ns.out or "runs/demo-latent", quick=ns.quick, device=_device(ns), overwrite=ns.overwrite, **kw)
    return run_demo(ns.out or "runs/demo", quick=ns.quick, device=_device(ns), overwrite=ns.overwrite)


def cmd_evaluate(ns):
    from evaluations.run import run_from_args

    rc = run_from_args(ns)
    if rc:
        raise SystemExit(rc)


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffusion-trak", description="Per-step training-data attribution (journey-TRAK) "
                                "for diffusers models: which training images made this image, and at which step.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--run", default=DEFAULT_RUN, help=f"run folder (default {DEFAULT_RUN})")
        sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        sp.add_argument("--overwrite", action="store_true", help="replace results made with other settings")

    sp = sub.add_parser("train", help="train a DDPM on a dataset, saving checkpoints")
    common(sp); _add_data(sp)
    d = TrainArgs()
    sp.add_argument("--epochs", type=int, default=d.epochs)
    sp.add_argument("--batch-size", type=int, default=d.batch_size)
    sp.add_argument("--lr", type=float, default=d.learning_rate)
    sp.add_argument("--channels-per-level", type=int, nargs="+", default=list(d.block_out_channels),
                    help="UNet block_out_channels")
    sp.add_argument("--num-checkpoints", type=int, default=d.num_checkpoints)
    sp.add_argument("--class-conditional", action="store_true")
    sp.add_argument("--seed", type=int, default=d.seed)
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("featurize", help="projected per-example gradients for every checkpoint (resumable)")
    common(sp); _add_data(sp)
    f = FeaturizeArgs()
    sp.add_argument("--checkpoints", nargs="+", default=None, help="checkpoint folders (unet/, scheduler/); "
                    "default: the run's model/ckpt-*")
    sp.add_argument("-T", "--num-timesteps", type=int, default=f.num_timesteps)
    sp.add_argument("--timestep-strategy", default=f.timestep_strategy, choices=["uniform", "evenly_spaced", "stratified"])
    sp.add_argument("--timestep-range", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                    help="draw training timesteps from LO..HI only (timestep-matched features for one step)")
    sp.add_argument("-k", "--proj-dim", type=int, default=f.proj_dim)
    sp.add_argument("--projector", default=f.projector, choices=["auto", "torch", "fast_jl", "countsketch"])
    sp.add_argument("--output", default=f.output, help="output function: loss, sqnorm, mean, l1, l2")
    sp.add_argument("--method", default="auto", choices=["vmap", "fast", "fast_tf32", "fast_bf16"],
                    help="vmap: per-sample gradients + dense JL (reference); fast: per-layer hooks + CountSketch, "
                         "never forms a whole per-sample gradient (about 2.6× faster on CPU)")
    sp.add_argument("--batch-size", type=int, default=f.batch_size)
    sp.add_argument("--seed", type=int, default=f.seed)
    sp.add_argument("--out", default=None, help="feature store folder (default RUN/features)")
    sp.set_defaults(func=cmd_featurize)

    sp = sub.add_parser("generate", help="sample images, recording the trajectory (x_t, x̂0_t, noise)")
    common(sp)
    sp.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the run's last)")
    sp.add_argument("--checkpoints", nargs="+", default=None, help=argparse.SUPPRESS)
    sp.add_argument("--scheduler", default="ddpm", choices=["ddpm", "ddim"])
    sp.add_argument("--steps", type=int, default=100, help="sampling steps")
    sp.add_argument("--num-record", type=int, default=10, help="record this many evenly spaced steps")
    sp.add_argument("--record-steps", type=int, nargs="+", default=None, help="record exactly these step indices")
    sp.add_argument("--num-images", type=int, default=1)
    sp.add_argument("--class-label", type=int, default=None)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", default=None, help="trajectory file (default RUN/trajectories/seed-SEED.safetensors)")
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser("score", help="TRAK scores of every training example at every recorded step")
    common(sp); _add_data(sp)
    s = ScoreArgs()
    sp.add_argument("--checkpoints", nargs="+", default=None)
    sp.add_argument("--features", default=None, help="feature store (default RUN/features)")
    sp.add_argument("--trajectory", default=None, help="trajectory file (default RUN/trajectories/seed-0.safetensors)")
    sp.add_argument("--steps", type=int, nargs="+", default=None, help="steps to score (default: all recorded)")
    sp.add_argument("--images", default=None, help="score real images instead (.npz or folder)")
    sp.add_argument("--image-timesteps", type=int, nargs="+", default=[10, 100, 500])
    sp.add_argument("-R", "--num-noises", type=int, default=s.num_noises)
    sp.add_argument("--ridge", type=float, default=s.ridge, help="relative ridge: λ = ridge·tr(ΦᵀΦ)/k")
    sp.add_argument("--target-output", default=None, help="output function for targets (default: the features')")
    sp.add_argument("--top-k", type=int, default=s.top_k)
    sp.add_argument("--out", default=None)
    sp.set_defaults(func=cmd_score)

    sp = sub.add_parser("plot", help="per-step attribution PNG and a self-contained HTML page")
    common(sp); _add_data(sp)
    sp.add_argument("--scores", default=None, help="scores folder (default RUN/scores/seed-0)")
    sp.add_argument("--trajectory", default=None)
    sp.add_argument("--target", type=int, default=0, help="which generated image of the batch")
    sp.add_argument("--top-k", type=int, default=6)
    sp.add_argument("--out", default=None, help="output prefix (default RUN/report/NAME)")
    sp.set_defaults(func=cmd_plot)

    sp = sub.add_parser("demo", help="the whole path on digits: train, featurize, generate, score, plot")
    sp.add_argument("--out", default=None, help="run folder (default runs/demo)")
    sp.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
    sp.add_argument("--latent", action="store_true", help="latent diffusion with text prompts")
    sp.add_argument("--prompt", default=None, help="prompt of the latent demo (e.g. 'a photo of a three')")
    sp.add_argument("--device", default=None)
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=cmd_demo)

    from evaluations.arguments import add_arguments as add_evaluate_arguments

    sp = sub.add_parser("evaluate", help="counterfactual validation: per-step LDS against baselines and the "
                        "retrain-without-top-k audit (same as python -m evaluations.run)")
    add_evaluate_arguments(sp)
    sp.set_defaults(func=cmd_evaluate)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from .errors import UserError

    ns = build_parser().parse_args(argv)
    try:
        ns.func(ns)
    except UserError as e:
        print(f"diffusion-trak {ns.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
