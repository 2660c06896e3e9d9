"""``diffusion-trak``: train | featurize | generate | score | plot | demo.

Every command works on a *run folder* (``--run``, default ``runs/digits``)::

    run.json                    the dataset settings (DataArgs), written by ``train``
    model/ckpt-XXXX/            diffusers checkpoints (unet/, scheduler/)
    features/                   the feature store (one (N, k) array per checkpoint)
    trajectories/<name>.safetensors
    scores/<name>/              scores.npy (steps × targets × N), scores.json (top-k per step)
    report/<name>.png, .html

Rerunning a command resumes it; other settings over existing results refuse unless ``--overwrite``. A path that
diffusion-trak did not write (a folder of your own files, a file that is not a trajectory or a report of ours) is
refused even with ``--overwrite`` (:func:`diffusion_trak.store.claim`, the one rule).
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
from typing import List, Optional

from .config import KERNELS, PARAM_SELECTIONS, PRESETS, SEED_MAX, FeaturizeArgs, ScoreArgs, TrainArgs, preset
from .run_folder import check_run_json, read_run_json, write_run_json

DEFAULT_RUN = "runs/digits"


# ---------------------------------------------------------------- checks at the edge
class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``PROG: error: ...; see PROG --help``) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _int(lo: int, hi: Optional[int] = None):
    """An argparse type: an integer in ``lo..hi``, else an error naming the valid range."""
    def parse(text):
        rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {rng}, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {rng}, got {v}")
        return v
    parse.__name__ = "int"
    return parse


def _memory_size(text):
    """An argparse type: a memory size in bytes, or with a unit: 8G, 8GB, 8GiB, 500M, 500MiB (powers of 1024)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"must be a memory size such as 8G, 500M or a number of bytes, got {text!r}")
    return int(float(m.group(1)) * 1024 ** "BKMGT".index((m.group(2) or "B").upper()))


def _positive_float(text):
    """An argparse type: a finite number > 0."""
    import math

    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


def _check_out(path: str, flag: str, folder: bool = True) -> None:
    """Refuse (one line naming ``flag``) an output ``path`` that cannot be created, before any work is done:
    an ancestor that is a file, a folder without write permission, or (for a ``folder``) an existing file."""
    from .errors import UserError

    path = os.path.abspath(path)
    if os.path.exists(path):
        if folder and not os.path.isdir(path):
            raise UserError(f"{flag} {path} is a file, not a folder; choose another {flag}")
        if not folder and os.path.isdir(path):
            raise UserError(f"{flag} {path} is a folder, not a file; choose another {flag}")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"cannot create {path}: {parent} is a file; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot create {path}: no permission to write in {parent}; choose another {flag}")


# ---------------------------------------------------------------- helpers
def _data_args(ns):
    from .data import DataArgs

    return DataArgs(name=ns.data, path=ns.data_path, split="train", image_size=ns.image_size,
                    classes=ns.classes, limit=ns.limit, channels=ns.channels, value_range=ns.value_range)


def _add_data(p):
    g = p.add_argument_group("data (defaults: the run's run.json, else digits)")
    g.add_argument("--data", default=None, help="digits (default), fmnist, folder (captions from metadata.jsonl), npz or "
                   "hf (a datasets save_to_disk folder or an imagefolder)")
    g.add_argument("--data-path", default=None, help="image folder, .npz file or datasets folder (or Fashion-MNIST root)")
    g.add_argument("--image-size", type=_int(1, 4096), default=None, help="resize images to this square size")
    g.add_argument("--classes", type=_int(0), nargs="+", default=None, help="keep only these labels")
    g.add_argument("--limit", type=_int(1), default=None, help="keep the first N examples")
    g.add_argument("--channels", type=int, default=None, choices=[1, 3], help="force 1 or 3 channels")
    g.add_argument("--value-range", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="the range of the stored pixel values, mapped to [-1, 1] (default: the rule: 8-bit 0..255, "
                        "16-bit 0..65535, floats -1..1; values outside are refused)")


def _add_pipeline(p, captions: bool = False):
    p.add_argument("--pipeline", nargs="+", default=None, metavar="DIR",
                   help="a diffusers pipeline folder (model_index.json: DDPM/DDIM, LDM, Stable Diffusion) or checkpoint "
                        "folders, instead of --checkpoints; a VAE and text encoder in it are used")
    p.add_argument("--lora", default=None, metavar="PATH",
                   help="a LoRA adapter, loaded onto the model: a folder or file as diffusers' LoRA training scripts "
                        "(and their checkpoint-N/ folders), unet.save_lora_adapter or peft's save_pretrained write "
                        "it, or a kohya-style .safetensors; features then cover the adapter only (--params auto)")
    if captions:
        p.add_argument("--captions", default=None, help="training captions of a text-conditional model (.json "
                       "{index: [caption, ...]} or .csv index,caption; default: the class names)")
        p.add_argument("--caption-mode", default=None, choices=["random", "mean", "first"],
                       help="with several captions per image: one drawn per timestep (random, default), their mean "
                            "embedding, or the first")


def _load_run_data(ns):
    """The dataset of a run: with ``--data``, the command-line flags; else the run's run.json, with the data
    flags that were given (``--limit``, ``--classes``, ...) replacing its fields, never silently ignored."""
    from .data import DataArgs, load_dataset

    path = os.path.join(ns.run, "run.json")
    if ns.data is None and os.path.exists(path):
        given = {"path": ns.data_path, "image_size": ns.image_size, "classes": ns.classes, "limit": ns.limit,
                 "channels": ns.channels, "value_range": ns.value_range}
        args = DataArgs.from_dict({**read_run_json(path), **{k: v for k, v in given.items() if v is not None}})
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
    """``--device``, checked (a device type torch knows, and a CUDA device that exists), else cuda if available."""
    import torch

    from . import distributed
    from .errors import UserError

    distributed.state()  # under accelerate launch: from here on "cuda" names this process's GPU (accelerate sets it)
    if not ns.device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(ns.device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {ns.device!r} is not a device; use cpu or cuda (cuda:N for the N-th GPU)")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f"--device {ns.device} asks for a GPU, but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise UserError(f"--device {ns.device}: this machine has {n} GPU(s), cuda:0..cuda:{n - 1}")
    return ns.device


def _say(msg):
    from . import distributed

    if distributed.state().is_main_process:
        print(msg, flush=True)


# ---------------------------------------------------------------- commands
def _remember_data(ns, dargs) -> None:
    """After a command on a run folder without ``run.json`` succeeded: record its data settings there, so that
    later commands on the run (score, plot) need no --data/--data-path again."""
    from . import distributed

    if not os.path.exists(os.path.join(ns.run, "run.json")) and distributed.state().is_main_process:
        write_run_json(ns.run, dargs)


def cmd_train(ns):
    from .train import check_training, train_ddpm

    from .errors import UserError
    from .store import claim

    _check_out(ns.run, "--run")
    claim(ns.run, "run", "--run")  # a folder with files not ours (a home folder): refused, --overwrite or not
    if ns.num_checkpoints is None:  # the default: 3, or one per epoch when there are fewer
        ns.num_checkpoints = min(TrainArgs().num_checkpoints, ns.epochs)
    elif ns.num_checkpoints > ns.epochs:
        raise UserError(f"--num-checkpoints {ns.num_checkpoints} is more than --epochs {ns.epochs} (at most one "
                        f"checkpoint per epoch); pass --num-checkpoints {ns.epochs} or fewer, or more --epochs")
    dataset, dargs = _load_run_data(ns)
    targs = TrainArgs(block_out_channels=tuple(ns.channels_per_level), epochs=ns.epochs, batch_size=ns.batch_size,
                      learning_rate=ns.lr, num_checkpoints=ns.num_checkpoints, seed=ns.seed,
                      class_conditional=ns.class_conditional)
    model = os.path.join(ns.run, "model")
    check_run_json(ns.run, dargs, ns.overwrite)  # every check before anything is written
    check_training(dataset, targs, model, ns.overwrite, "use --overwrite or another --run")
    device = _device(ns)
    write_run_json(ns.run, dargs)
    _say(f"training a DDPM on {dataset} for {ns.epochs} epochs -> {ns.run}/model")
    ck = train_ddpm(dataset, targs, model, device=device, overwrite=ns.overwrite)
    _say(f"checkpoints: {', '.join(ck)}")
    return ck


def _given(ns, **fields) -> dict:
    """The flags the user gave (not None), under their settings' field names."""
    return {k: v for k, v in fields.items() if v is not None}


def _featurize_args(ns) -> FeaturizeArgs:
    """The preset's settings, with every flag given on the command line in place of the preset's value."""
    base, _ = preset(ns.preset)  # params "auto": the adapter's with --lora, else all (resolved by the Attributor)
    return dataclasses.replace(base, proj_dim=ns.proj_dim, projector=ns.projector, seed=ns.seed, batch_size=ns.batch_size,
                               method=ns.method, timestep_range=tuple(ns.timestep_range) if ns.timestep_range else None,
                               **_given(ns, num_timesteps=ns.num_timesteps, timestep_strategy=ns.timestep_strategy,
                                        output=ns.output, params=ns.params, kernel=ns.kernel,
                                        kernel_draws=ns.kernel_draws, max_memory=getattr(ns, "max_memory", None)))


def _models(ns) -> List[str]:
    """The model folders: ``--pipeline`` (pipeline or checkpoint folders), else ``--checkpoints`` / the run's."""
    return ns.pipeline or _checkpoints(ns)


def _attributor(ns, dataset, **kwargs):
    """The :class:`~diffusion_trak.Attributor` of the command's model folders, training data and run folder."""
    from .attributor import Attributor

    return Attributor.from_pretrained(_models(ns), dataset, ns.run, lora=ns.lora, captions=getattr(ns, "captions", None),
                                      caption_mode=getattr(ns, "caption_mode", None) or "random", device=_device(ns),
                                      overwrite=ns.overwrite, **kwargs)


def cmd_featurize(ns):
    from .store import claim

    out = ns.out or os.path.join(ns.run, "features")
    _check_out(out, "--out")
    claim(ns.run, "run", "--run")  # run.json is written there
    args = _featurize_args(ns)
    dataset, dargs = _load_run_data(ns)
    if ns.dry_run:  # the plan only: nothing computed but one forward of one example, nothing written
        est = _attributor(ns, dataset, featurize_args=args, features_dir=out,
                          latents_dir=os.path.join(os.path.dirname(os.path.abspath(out)), "latents")).estimate()
        print(str(est) + "; --dry-run: nothing computed or written", flush=True)
        return est
    fs = _attributor(ns, dataset, featurize_args=args, features_dir=out,
                     latents_dir=os.path.join(os.path.dirname(os.path.abspath(out)), "latents")).featurize()
    _remember_data(ns, dargs)
    _say(f"features: {out} ({len(fs.names)} checkpoints × {len(dataset)} rows × k={ns.proj_dim}"
         + (f"; GGN kernel of {args.kernel_draws} draws per example" if fs.kernel_names else "; kernel ΦᵀΦ") + ")")
    return fs


def cmd_generate(ns):
    from diffusers import DDIMScheduler

    from .attributor import Attributor
    from .errors import UserError
    from .store import claim, make_dirs

    path = ns.out or os.path.join(ns.run, "trajectories", f"seed-{ns.seed}.safetensors")
    _check_out(path, "--out", folder=False)
    flag = "--out" if ns.out else "--run"
    exists = claim(path, "trajectory", flag)  # a file that is not a trajectory of ours: refused before anything
    if not ns.out:
        claim(ns.run, "run", "--run")
    ckpt = ns.checkpoint or (ns.pipeline[-1] if ns.pipeline else _checkpoints(ns)[-1])
    attr = Attributor.from_pretrained(ckpt, None, ns.run, lora=ns.lora, device=_device(ns))
    sched = attr.sampler
    text = {} if ns.prompt is None else {"prompt": ns.prompt, "guidance_scale": ns.guidance_scale}
    if ns.scheduler == "ddim":
        attr.sampler = DDIMScheduler.from_config(sched.config)
    record = ns.record_steps
    if record is None and ns.num_record:
        record = sorted({int(round(i * (ns.steps - 1) / max(1, ns.num_record - 1))) for i in range(ns.num_record)})
    if exists and not ns.overwrite:  # another trajectory there is refused before sampling; the same one is kept
        attr._check_sampling(ns.prompt, dict(num_inference_steps=ns.steps, record_steps=record,
                                             class_labels=ns.class_label))  # the settings' own refusals first
        same = _same_generation(_load_trajectory(path), attr, ns, record)
        if same is True:
            _say(f"trajectory: {path} is already there with these settings; nothing to do (--overwrite samples it again)")
            return path
        raise UserError(f"{path} already holds another trajectory ({same}; scores of it would no longer match); "
                        f"nothing was changed: rerun with --overwrite to replace it, or choose another {flag}")
    out = attr.pipeline(batch_size=ns.num_images, seed=ns.seed, num_inference_steps=ns.steps, record_steps=record,
                        class_labels=ns.class_label, **text)  # checks prompt, class label and steps first
    make_dirs(os.path.dirname(os.path.abspath(path)))
    out.trajectory.save(path, overwrite=ns.overwrite)
    _say(f"trajectory: {path} (steps recorded: {out.trajectory.step_indices.tolist()})")
    return path


def _same_generation(old, attr, ns, record):
    """True when the trajectory ``old`` was generated with the settings of this ``generate`` command (``ns``, the
    model of ``attr``, the recorded steps ``record``); else what differs (for the one-line refusal)."""
    import torch

    from .featurize.featurizer import model_fingerprint

    labels = None if ns.class_label is None else [ns.class_label] * ns.num_images
    prompts = getattr(old, "prompts_given", None) or getattr(old, "prompts", None)  # as given (before any cut)
    checks = [("seed", old.seed, ns.seed), ("--steps", old.num_inference_steps, ns.steps),
              ("recorded steps", old.recorded_steps, list(record) if record is not None else list(range(ns.steps))),
              ("--num-images", old.batch_size, ns.num_images),
              ("--class-label", None if old.class_labels is None else torch.as_tensor(old.class_labels).tolist(), labels),
              ("--prompt", prompts, None if ns.prompt is None else [ns.prompt] * ns.num_images),
              ("model", (old.generator or {}).get("model"), model_fingerprint(attr.unet))]
    from .attributor import _RECORDING_SAMPLERS

    sampler = type(attr.sampler).__name__  # what Attributor.pipeline samples with
    checks.append(("--scheduler", old.scheduler_class, sampler if sampler in _RECORDING_SAMPLERS else "DDIMScheduler"))
    if ns.prompt is not None:
        checks.append(("--guidance-scale", float(getattr(old, "guidance_scale", 1.0)), float(ns.guidance_scale)))
    diff = [f"{name} {a!r} there, {b!r} now" for name, a, b in checks if a != b]
    return True if not diff else "; ".join(diff[:3])


def _score_args(ns) -> ScoreArgs:
    """The preset's settings, with every flag given on the command line in place of the preset's value."""
    _, base = preset(ns.preset)
    return dataclasses.replace(base, target_output=ns.target_output, top_k=ns.top_k,
                               **_given(ns, num_noises=ns.num_noises, ridge=ns.ridge,
                                        destination_draws=ns.destination_draws))


def _load_trajectory(path: str):
    """A saved trajectory (safetensors); one line naming the fix if the file is damaged."""
    from diffusion_trak.pipelines import Trajectory

    from .errors import UserError

    try:
        return Trajectory.load(path)
    except Exception as e:  # safetensors raises its own error types for damaged files
        if isinstance(e, (KeyboardInterrupt, MemoryError)):
            raise
        why = " ".join(str(e).split())[:120]
        raise UserError(f"{path} is not a readable trajectory ({type(e).__name__}: {why}); "
                        "regenerate it with `diffusion-trak generate`") from None


def cmd_score(ns):
    from . import api
    from .errors import UserError
    from .store import claim

    args = _score_args(ns)
    tpath = ns.trajectory or os.path.join(ns.run, "trajectories", "seed-0.safetensors")
    name = "images" if ns.images else os.path.splitext(os.path.basename(tpath))[0]
    out = ns.out or os.path.join(ns.run, "scores", name)
    _check_out(out, "--out")
    claim(out, "scores", "--out" if ns.out else "--run")  # not a scores folder of ours: refused, overwrite or not
    if not ns.out:
        claim(ns.run, "run", "--run")
    images_range, ns.value_range = (ns.value_range, None) if ns.images else (None, ns.value_range)
    dataset, _ = _load_run_data(ns)  # with --images, --value-range is the images' (the training set's is in run.json)
    features = api.FeatureSet.open(ns.features or os.path.join(ns.run, "features"))
    root = features.store.root
    attr = _attributor(ns, dataset, score_args=args, features_dir=root,
                       latents_dir=os.path.join(os.path.dirname(os.path.abspath(root)), "latents"))
    api.check_dataset(features.store.settings, dataset, f"the features in {root}")
    if ns.images:
        from .data import DataArgs, load_dataset

        targets = load_dataset(DataArgs(name="npz" if ns.images.endswith(".npz") else "folder", path=ns.images,
                                        image_size=dataset.resolution, channels=dataset.num_channels,
                                        value_range=images_range))
        prompts = [ns.prompt] * len(targets) if ns.prompt is not None else None
        labels = [ns.class_label] * len(targets) if ns.class_label is not None else None
        sc = attr.attribute(targets.images, image_timesteps=ns.image_timesteps, prompts=prompts, class_labels=labels,
                            out=out, value_range=(-1, 1))  # load_dataset read them by the rule already
    else:
        if ns.class_label is not None or ns.prompt is not None:
            raise UserError("--class-label and --prompt go with --images; a trajectory carries its generation's own "
                            "label and prompt (drop them, or give --images)")
        if not os.path.isfile(tpath):
            raise UserError(f"no trajectory at {tpath}; run `diffusion-trak generate --run {ns.run}` or pass --trajectory")
        sc = attr.attribute(_load_trajectory(tpath), steps=ns.steps, out=out)
    _say(f"scores: {out}/scores.npy {list(sc.values.shape)} (steps × targets × training examples); "
         f"top-{ns.top_k} per step: {out}/scores.json")
    return out


def _report_prefix(out, default_dir: str, name: str) -> str:
    """The path (without extension) of a report: ``--out`` as given, less a ``.png``/``.html`` it ends with; an
    ``--out`` that names a folder (an existing one, or one ending in /) holds ``NAME.png``/``NAME.html``."""
    if out is None:
        return os.path.join(default_dir, name)
    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        return os.path.join(out, name)
    root, ext = os.path.splitext(out)
    return root if ext.lower() in (".png", ".html") else out


def _trajectory_of(sc, folder: str, sdir: str) -> str:
    """The trajectory in ``folder`` whose final images are the target of the scores ``sc`` (scores named otherwise
    than their trajectory, e.g. an ensemble's); one line naming ``--trajectory`` if there is none."""
    import glob

    import torch

    from .errors import UserError
    from .targets import digest

    want = sc.meta.get("target")
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        try:
            traj = _load_trajectory(path)
        except UserError:
            continue
        if want is not None and digest(torch.as_tensor(traj.final).float()) == want:
            return path
    raise UserError(f"no trajectory in {folder} is the one the scores in {sdir} were computed on; pass "
                    "--trajectory FILE (the trajectory you scored)")


def cmd_plot(ns):
    from . import api
    from .errors import UserError
    from .report import plot_from_scores
    from .report.evidence import evaluation_run, load_evidence
    from .store import claim, make_dirs

    sdir = ns.scores or (evaluation_run(ns.evaluation)["scores"] if ns.evaluation else os.path.join(ns.run, "scores", "seed-0"))
    name = os.path.basename(os.path.normpath(sdir))
    run = ns.evaluation or ns.run
    prefix = _report_prefix(ns.out, os.path.join(run, "report"), name)
    _check_out(os.path.dirname(os.path.abspath(prefix)), "--out")
    for ext in (".png", ".html"):  # files there that are not reports of ours: refused before anything
        claim(prefix + ext, "report", "--out" if ns.out else "--run")
    if ns.evaluation:  # an evaluation run: its generated targets, with the counterfactual evidence
        from .data import load_dataset
        ev = evaluation_run(ns.evaluation)
        dataset, tpath = load_dataset(ev["data"]), ns.trajectory or ev["trajectory"]
    else:
        dataset, _ = _load_run_data(ns)
        tpath = ns.trajectory or os.path.join(ns.run, "trajectories", name + ".safetensors")
    sc = api.Scores.load(sdir)
    if "features" in sc.meta:  # scores that api.score saved record their training set (hand-made ones may not)
        api.check_dataset(sc.meta["features"], dataset, f"the scores in {sdir}")
    if ns.target >= sc.values.shape[1]:
        raise UserError(f"--target must be between 0 and {sc.values.shape[1] - 1} ({sdir} scores "
                        f"{sc.values.shape[1]} generated images), got {ns.target}")
    traj = None
    if ns.trajectory and not os.path.isfile(tpath):
        raise UserError(f"no trajectory at {tpath}; pass the --trajectory the scores were computed for")
    if not ns.trajectory and not ns.evaluation and not os.path.isfile(tpath):  # e.g. an ensemble's scores
        tpath = _trajectory_of(sc, os.path.join(ns.run, "trajectories"), sdir)
    if os.path.isfile(tpath):
        traj = _load_trajectory(tpath)
        if not ns.evaluation:
            sc.check_trajectory(traj, f"the scores in {sdir}")
    make_dirs(os.path.dirname(os.path.abspath(prefix)))  # every check has passed
    prompts = getattr(traj, "prompts", None) if traj is not None else None
    about = f' · prompt "{prompts[ns.target]}"' if prompts else ""
    png, html = plot_from_scores(sc, dataset, traj, prefix, target=ns.target, k=ns.top_k,
                                 title=f"{os.path.basename(os.path.abspath(run))} · {name}{about}: "
                                 "training-data attribution per sampling step",
                                 evidence=load_evidence(ns.evaluation, traj.final) if ns.evaluation and traj else None)
    _say(f"per-step plot: {png}\nhtml page (every target, step by step): {html}")
    return png, html


def cmd_demo(ns):
    from .demo import run_demo

    out = ns.out or ("runs/demo-latent" if ns.latent else "runs/demo")
    _check_out(out, "--out")
    return run_demo(out, quick=ns.quick, device=_device(ns), overwrite=ns.overwrite, latent=ns.latent, prompt=ns.prompt)


def cmd_evaluate(ns):
    from diffusion_trak.evaluations.run import run_from_args

    rc = run_from_args(ns)  # checks its flags (--threads, --device, --set) before anything runs
    if rc:
        raise SystemExit(rc)


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="diffusion-trak", description="Per-step training-data attribution (journey-TRAK) "
                                "for diffusers models: which training images made this image, and at which step.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--run", default=DEFAULT_RUN, help=f"run folder (default {DEFAULT_RUN})")
        sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        sp.add_argument("--overwrite", action="store_true", help="replace results made with other settings")

    sp = sub.add_parser("train", help="train a DDPM on a dataset, saving checkpoints")
    common(sp); _add_data(sp)
    d = TrainArgs()
    sp.add_argument("--epochs", type=_int(1), default=d.epochs)
    sp.add_argument("--batch-size", type=_int(1), default=d.batch_size)
    sp.add_argument("--lr", type=_positive_float, default=d.learning_rate)
    sp.add_argument("--channels-per-level", type=_int(1), nargs="+", default=list(d.block_out_channels),
                    help="UNet block_out_channels")
    sp.add_argument("--num-checkpoints", type=_int(1), default=None,
                    help=f"at most --epochs (default {d.num_checkpoints}, or --epochs when fewer)")
    sp.add_argument("--class-conditional", action="store_true")
    sp.add_argument("--seed", type=_int(0, SEED_MAX), default=d.seed)
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("featurize", help="projected per-example gradients for every checkpoint (resumable)")
    common(sp); _add_data(sp)
    f = FeaturizeArgs()
    sp.add_argument("--checkpoints", nargs="+", default=None, help="checkpoint folders (unet/, scheduler/); "
                    "default: the run's model/ckpt-*")
    _add_pipeline(sp, captions=True)
    sp.add_argument("--preset", default="default", choices=PRESETS,
                    help="named estimator: default (T=100 stratified, the loss, the GGN kernel) or paper (journey-TRAK: "
                         "T=10 uniform, ΦᵀΦ); "
                         "the flags below change single settings of it")
    sp.add_argument("-T", "--num-timesteps", type=_int(1), default=None, help=f"default {f.num_timesteps}")
    sp.add_argument("--timestep-strategy", default=None, choices=["uniform", "evenly_spaced", "stratified"],
                    help=f"default {f.timestep_strategy}")
    sp.add_argument("--timestep-range", type=_int(0), nargs=2, metavar=("LO", "HI"), default=None,
                    help="draw training timesteps from LO..HI only (timestep-matched features for one step)")
    sp.add_argument("-k", "--proj-dim", type=_int(1), default=f.proj_dim)
    sp.add_argument("--projector", default=f.projector, choices=["auto", "torch", "fast_jl", "countsketch"])
    sp.add_argument("--output", default=None, help=f"output function: loss, sqnorm, mean, l1, l2 (default {f.output})")
    sp.add_argument("--method", default="auto", choices=["vmap", "fast", "fast_tf32", "fast_bf16"],
                    help="vmap: per-sample gradients + dense JL (reference); fast: per-layer hooks + CountSketch, "
                         "never forms a whole per-sample gradient (about 2.6× faster on CPU)")
    sp.add_argument("--params", default=None, choices=list(PARAM_SELECTIONS),
                    help="parameters the gradients cover: auto (default: the LoRA adapter's with --lora, else all), "
                         "all (every UNet parameter, also with --lora), lora (the adapter only) or trainable (those "
                         "with requires_grad)")
    sp.add_argument("--kernel", default=None, choices=list(KERNELS),
                    help="the matrix TRAK inverts: ggn (default: the Gauss-Newton matrix of the loss, from single-draw "
                         "probe gradients) or features (the paper's ΦᵀΦ of the training features)")
    sp.add_argument("--kernel-draws", type=_int(1), default=None,
                    help=f"(timestep, noise) draws per example for the ggn kernel (default {f.kernel_draws})")
    sp.add_argument("--batch-size", type=_int(1), default=f.batch_size)
    sp.add_argument("--seed", type=_int(0, SEED_MAX), default=f.seed)
    sp.add_argument("--out", default=None, help="feature store folder (default RUN/features; a latent model's "
                    "training latents are cached beside it, in latents/)")
    sp.add_argument("--max-memory", type=_memory_size, default=None,
                    help="memory the featurizer may hold at its peak, model included (e.g. 8G); rows per pass follow "
                         "it (default: what is free when the run starts)")
    sp.add_argument("--dry-run", action="store_true",
                    help="print the plan (pairs, kernel rows, cost, planned peak memory) and stop: nothing is computed "
                         "but one forward of one example, nothing is written")
    sp.set_defaults(func=cmd_featurize)

    sp = sub.add_parser("generate", help="sample images, recording the trajectory (x_t, x̂0_t, noise)")
    common(sp)
    sp.add_argument("--checkpoint", default=None, help="checkpoint or pipeline folder (default: the run's last)")
    sp.add_argument("--checkpoints", nargs="+", default=None, help=argparse.SUPPRESS)
    _add_pipeline(sp)
    sp.add_argument("--prompt", default=None, help="the prompt (text-conditional models)")
    sp.add_argument("--guidance-scale", type=_positive_float, default=1.0,
                    help="classifier-free guidance scale with --prompt (default 1: none)")
    sp.add_argument("--scheduler", default="ddpm", choices=["ddpm", "ddim"])
    sp.add_argument("--steps", type=_int(1), default=100, help="sampling steps")
    sp.add_argument("--num-record", type=_int(1), default=10, help="record this many evenly spaced steps")
    sp.add_argument("--record-steps", type=_int(0), nargs="+", default=None, help="record exactly these step indices")
    sp.add_argument("--num-images", type=_int(1), default=1)
    sp.add_argument("--class-label", type=_int(0), default=None)
    sp.add_argument("--seed", type=_int(0, SEED_MAX), default=0)
    sp.add_argument("--out", default=None, help="trajectory file (default RUN/trajectories/seed-SEED.safetensors)")
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser("score", help="TRAK scores of every training example at every recorded step")
    common(sp); _add_data(sp)
    s = ScoreArgs()
    sp.add_argument("--checkpoints", nargs="+", default=None)
    _add_pipeline(sp, captions=True)
    sp.add_argument("--prompt", default=None, help="with --images on a text-conditional model: their prompt")
    sp.add_argument("--class-label", type=_int(0), default=None,
                    help="with --images on a class-conditional model: their class label (class_labels= in Python)")
    sp.add_argument("--features", default=None, help="feature store (default RUN/features)")
    sp.add_argument("--trajectory", default=None, help="trajectory file (default RUN/trajectories/seed-0.safetensors)")
    sp.add_argument("--steps", type=_int(0), nargs="+", default=None, help="steps to score (default: all recorded)")
    sp.add_argument("--images", default=None, help="score real images instead (.npz or folder; --value-range LO HI "
                    "then states the range of their values, not the training set's)")
    sp.add_argument("--image-timesteps", type=_int(0), nargs="+", default=[10, 100, 500])
    sp.add_argument("--preset", default="default", choices=PRESETS,
                    help="named estimator: default (ridge 0.1) or paper (ridge 0.01); the flags below change single settings")
    sp.add_argument("-R", "--num-noises", type=_int(1), default=None, help=f"target noises per step (default {s.num_noises})")
    sp.add_argument("--ridge", type=_positive_float, default=None,
                    help=f"relative ridge: λ = ridge·tr(K)/k, K the kernel (GGN, or ΦᵀΦ) (default {s.ridge})")
    sp.add_argument("--destination-draws", type=_int(0), default=None,
                    help=f"(timestep, noise) pairs over the whole range for the final image's row (0 = none; "
                         f"default {s.destination_draws})")
    sp.add_argument("--target-output", default=None, help="output function for targets (default: the features')")
    sp.add_argument("--top-k", type=_int(1), default=s.top_k)
    sp.add_argument("--out", default=None)
    sp.set_defaults(func=cmd_score)

    sp = sub.add_parser("plot", help="per-step attribution PNG and the journey page (self-contained HTML)")
    common(sp); _add_data(sp)
    sp.add_argument("--scores", default=None, help="scores folder (default RUN/scores/seed-0)")
    sp.add_argument("--trajectory", default=None)
    sp.add_argument("--target", type=_int(0), default=0, help="which generated image of the batch")
    sp.add_argument("--top-k", type=_int(1), default=6)
    sp.add_argument("--evaluation", default=None, metavar="EVAL_DIR", help="plot an evaluation run's generated "
                    "targets with its counterfactual evidence (audit images, per-step LDS)")
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

    from diffusion_trak.evaluations.arguments import add_arguments as add_evaluate_arguments

    sp = sub.add_parser("evaluate", help="counterfactual validation: per-step LDS against baselines and the "
                        "retrain-without-top-k audit (same as python -m diffusion_trak.evaluations.run)")
    add_evaluate_arguments(sp)
    sp.set_defaults(func=cmd_evaluate)
    return p


#: errors of the file system that a user fixes (a path, a permission, space), reported in one line
_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                errno.ENAMETOOLONG}


def _close_progress_bars() -> None:
    """End the lines of progress bars cut short, so that a message after them starts on its own line."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", [])):
        try:
            bar.close()
        except Exception:
            pass


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command. User errors, file-system errors on a path and Ctrl-C end with one line on stderr
    (exit 2, 2 and 130); anything else is a bug and keeps its traceback."""
    from .errors import UserError

    where = "diffusion-trak"
    try:
        ns = build_parser().parse_args(argv)
        where = f"diffusion-trak {ns.command}"
        ns.func(ns)
    except UserError as e:
        print(f"{where}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        if int(os.environ.get("RANK", "0") or 0) == 0:  # one line per launch, not one per process
            print(f"{where}: interrupted; the work done so far is kept, and rerunning the same command resumes it",
                  file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in _USER_ERRNOS or not e.filename:
            raise
        print(f"{where}: error: cannot use {e.filename}: {e.strerror}; check the path and its permissions, "
              "or choose another --out/--run", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
