"""Train a DDPM (``UNet2DModel`` + ``DDPMScheduler``) with accelerate, saving checkpoints for ensembling.

A run folder holds ``ckpt-XXXX/{unet,scheduler}`` (diffusers ``save_pretrained`` format) plus
``train_state.pt`` (optimizer state) and ``train_args.json``. Epoch ``e`` shuffles and draws
noise from seeds derived from ``(seed, e)``, so an interrupted run resumed from its last
checkpoint gives the same weights as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import sys
import os
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from .config import TrainArgs, asdict
from .errors import CheckpointError, InputError
from .featurize.featurizer import seed_for
from .models import check_checkpoint, load_checkpoint  # noqa: F401 (loaders live in models; kept importable here)
from .outputs import output_value
from .store import write_json_atomic


def build_unet(args: TrainArgs, image_shape, num_classes: Optional[int] = None):
    from diffusers import UNet2DModel

    C, H, W = image_shape
    levels = len(args.block_out_channels)
    down = tuple("AttnDownBlock2D" if i in args.attention_levels else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if (levels - 1 - i) in args.attention_levels else "UpBlock2D" for i in range(levels))
    return UNet2DModel(sample_size=H, in_channels=C, out_channels=C, block_out_channels=tuple(args.block_out_channels),
                       layers_per_block=args.layers_per_block, down_block_types=down, up_block_types=up,
                       norm_num_groups=args.norm_num_groups, attention_head_dim=None,
                       num_class_embeds=num_classes if args.class_conditional else None)


def build_scheduler(args: TrainArgs):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule)


def checkpoint_epochs(args: TrainArgs) -> List[int]:
    """Epochs (1-based, after which a checkpoint is saved): evenly spaced over the last half."""
    n = args.num_checkpoints
    if n == 1:
        return [args.epochs]
    return sorted({int(round(args.epochs / 2 + (args.epochs / 2) * (i + 1) / n)) for i in range(n)})


def list_checkpoints(run_dir: str) -> List[str]:
    if not os.path.isdir(run_dir):
        return []
    return sorted(os.path.join(run_dir, d) for d in os.listdir(run_dir)
                  if d.startswith("ckpt-") and os.path.exists(os.path.join(run_dir, d, "done")))


def load_train_state(path: str) -> dict:
    """``train_state.pt`` (optimizer and schedule state, epoch), loaded with ``weights_only=True``: a file
    from elsewhere cannot run code. One-line :class:`CheckpointError` if it is damaged or unsafe."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        why = " ".join(str(e).split())[:120]
        raise CheckpointError(f"{path} cannot be loaded safely ({why}); delete that checkpoint folder to retrain from "
                         "the one before, or rerun with --overwrite") from None
    if not isinstance(state, dict) or not {"optimizer", "lr_scheduler", "epoch"} <= set(state):
        raise CheckpointError(f"{path} is not a training state; delete that checkpoint folder or rerun with --overwrite")
    return state


def save_checkpoint(run_dir: str, epoch: int, unet, scheduler, optimizer, lr_scheduler) -> str:
    """Write ``run_dir/ckpt-EPOCH/{unet,scheduler}`` (diffusers format) and ``train_state.pt``, then the
    ``done`` marker last, so a checkpoint cut short by a crash is never listed."""
    ck = os.path.join(run_dir, f"ckpt-{epoch:04d}")
    unet.save_pretrained(os.path.join(ck, "unet"))
    scheduler.save_pretrained(os.path.join(ck, "scheduler"))
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch},
               os.path.join(ck, "train_state.pt"))
    open(os.path.join(ck, "done"), "w").close()
    return ck


# ----------------------------------------------------------------------------------------------
# The training loop shared by the pixel and latent trainers (and whose draws the stacked
# retrainer of evaluations/ replays)
# ----------------------------------------------------------------------------------------------


def lr_lambda(total: int):
    """The learning-rate schedule: linear warm-up over ``min(50, total/10)`` steps, cosine to 10%."""
    warm = min(50, total // 10)
    return lambda s: min(1.0, (s + 1) / max(1, warm)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))


def make_optimizer(parameters, args, num_examples: int):
    """AdamW (no weight decay) and the :func:`lr_lambda` schedule over ``args.epochs`` epochs."""
    total = math.ceil(num_examples / args.batch_size) * args.epochs
    opt = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total))


def epoch_batches(seed: int, epoch: int, n: int, batch_size: int, num_train_timesteps: int, shape: Sequence[int]
                  ) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]]:
    """``(positions, timesteps, noise, generator)`` for every optimiser step of one epoch.

    One generator seeded by ``(seed, epoch, 11)`` draws the permutation of the ``n`` examples, then for
    every step its timesteps and then its noise. It is yielded too, so a trainer that draws more per
    step (a caption) continues the same stream; a resumed epoch therefore replays exactly."""
    g = torch.Generator().manual_seed(seed_for(seed, epoch, 11))
    perm = torch.randperm(n, generator=g)
    for s in range(math.ceil(n / batch_size)):
        idx = perm[s * batch_size:(s + 1) * batch_size]
        t = torch.randint(0, num_train_timesteps, (len(idx),), generator=g)
        noise = torch.randn((len(idx), *shape), generator=g)
        yield idx, t, noise, g


def resume(run_dir: str, unet, opt, lr_sched, load_unet: Callable[[str], torch.nn.Module]) -> int:
    """Load the last finished checkpoint of ``run_dir`` (weights via ``load_unet(folder)``, optimiser and
    schedule state) into the given objects; return its epoch (0 when there is none)."""
    done = list_checkpoints(run_dir)
    if not done:
        return 0
    state = load_train_state(os.path.join(done[-1], "train_state.pt"))
    unet.load_state_dict(load_unet(done[-1]).state_dict())
    opt.load_state_dict(state["optimizer"])
    lr_sched.load_state_dict(state["lr_scheduler"])
    return int(state["epoch"])


def fit(accelerator, unet, scheduler, opt, lr_sched, images: torch.Tensor, args, saves: Sequence[int], run_dir: str,
        cond_fn: Callable, start_epoch: int = 0, desc: str = "train", progress: bool = True) -> None:
    """Epochs ``start_epoch..args.epochs`` of denoising-loss training on ``images`` (one
    :func:`epoch_batches` stream per epoch; ``cond_fn(positions, generator)`` gives the conditioning),
    with gradient clipping at 1 and a :func:`save_checkpoint` after each epoch in ``saves``."""
    steps_per_epoch = math.ceil(len(images) / args.batch_size)
    dev = accelerator.device
    if dev.type == "cpu" and progress and accelerator.is_main_process:
        from .distributed import cpu_contention

        busy = cpu_contention()
        if busy:
            print(busy, file=sys.stderr, flush=True)
    bar = tqdm(total=steps_per_epoch * args.epochs, initial=start_epoch * steps_per_epoch, desc=desc,
               disable=not progress)
    for epoch in range(start_epoch, args.epochs):
        unet.train()
        for idx, t, noise, g in epoch_batches(args.seed, epoch, len(images), args.batch_size,
                                              args.num_train_timesteps, images.shape[1:]):
            cond = cond_fn(idx, g)
            with accelerator.autocast():
                loss = output_value(unet, scheduler, images[idx].to(dev), t.to(dev), noise.to(dev), "loss", cond).mean()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            lr_sched.step()
            opt.zero_grad()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch + 1)
        if (epoch + 1) in saves and accelerator.is_main_process:
            save_checkpoint(run_dir, epoch + 1, accelerator.unwrap_model(unet), scheduler, opt, lr_sched)
    bar.close()


def run_meta(dataset, args: TrainArgs) -> dict:
    """What a run folder was trained with: the recipe and the data (``train_args.json``)."""
    return {"train": asdict(args), "dataset": dataset.fingerprint(), "num_examples": len(dataset)}


def _read_run_meta(run_dir: str, fix: str):
    """``run_dir/train_args.json`` (None if absent); a damaged one is a one-line error ending in ``fix``."""
    path = os.path.join(run_dir, "train_args.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, OSError):
        raise InputError(f"{path} is corrupted; {fix}") from None


def check_run_meta(run_dir: str, meta: dict, fix: str = "use --overwrite or another --out", write: bool = True) -> None:
    """Refuse (one line ending in ``fix``) if ``run_dir`` holds another recipe or data; else write
    ``run_dir/train_args.json`` (with ``write``). An equal file is left as it is."""
    old = _read_run_meta(run_dir, fix)
    if old is not None and old != meta:
        raise InputError(f"{run_dir} holds a training run with other settings or data; {fix}")
    if old is None and write:
        from .store import make_dirs

        make_dirs(run_dir, "--run")
        write_json_atomic(os.path.join(run_dir, "train_args.json"), meta)


#: what training writes in its folder (``ckpt-XXXX/``, ``train_args.json`` and its temporary names): all that
#: ``--overwrite`` deletes there
TRAINED_FILES = r"ckpt-\d+|train_args\.json(\.tmp\d+)?"


def check_training(dataset, args: TrainArgs, run_dir: str, overwrite: bool = False,
                   fix: str = "use --overwrite or another --out") -> None:
    """Every check of :func:`train_ddpm`, writing nothing: call it before writing anything of a run."""
    if len(dataset) == 0:
        raise InputError("cannot train on an empty dataset; check --classes/--limit")
    if args.class_conditional and dataset.labels is None:
        raise InputError("class_conditional training needs a dataset with labels")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise InputError(f"{run_dir} is a file, not a folder; choose another --run")
    if not overwrite:
        check_run_meta(run_dir, run_meta(dataset, args), fix, write=False)
    else:  # --overwrite deletes what training wrote there, and nothing else
        from .store import clear_own

        clear_own(run_dir, TRAINED_FILES, "training", delete=False)


def train_ddpm(dataset, args: TrainArgs, run_dir: str, progress: bool = True, device=None,
               overwrite: bool = False) -> List[str]:
    """Train on ``dataset`` (an :class:`~diffusion_trak.data.ImageDataset`) and return checkpoint folders.

    Rerunning with the same ``run_dir`` resumes from the last finished checkpoint; other settings
    or data refuse unless ``overwrite``."""
    from accelerate import Accelerator

    check_training(dataset, args, run_dir, overwrite)
    if overwrite:
        from .store import clear_own

        clear_own(run_dir, TRAINED_FILES, "training")
    check_run_meta(run_dir, run_meta(dataset, args))

    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=(str(device) == "cpu"))
    torch.manual_seed(args.initial_seed())
    num_classes = None
    if args.class_conditional:
        num_classes = int(dataset.labels.max()) + 1
    unet = build_unet(args, dataset.image_shape, num_classes)
    scheduler = build_scheduler(args)
    opt, lr_sched = make_optimizer(unet.parameters(), args, len(dataset))

    def load_unet(ck):
        from diffusers import UNet2DModel
        return UNet2DModel.from_pretrained(os.path.join(ck, "unet"), local_files_only=True)

    start_epoch = resume(run_dir, unet, opt, lr_sched, load_unet)
    unet, opt = accelerator.prepare(unet, opt)
    labels = dataset.labels
    cond_fn = (lambda idx, g: {"class_labels": labels[idx].to(accelerator.device)}) if num_classes else (lambda idx, g: None)
    fit(accelerator, unet, scheduler, opt, lr_sched, dataset.images, args, checkpoint_epochs(args), run_dir, cond_fn,
        start_epoch, "train", progress)
    return list_checkpoints(run_dir)
