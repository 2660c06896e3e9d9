"""Train a DDPM (``UNet2DModel`` + ``DDPMScheduler``) with accelerate, saving checkpoints for ensembling.

A run folder holds ``ckpt-XXXX/{unet,scheduler}`` (diffusers ``save_pretrained`` format) plus
``train_state.pt`` (optimizer state) and ``train_args.json``. Epoch ``e`` shuffles and draws
noise from seeds derived from ``(seed, e)``, so an interrupted run resumed from its last
checkpoint gives the same weights as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
from typing import List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import TrainArgs, asdict
from .errors import InputError
from .featurize.featurizer import seed_for
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


def load_checkpoint(path: str, device="cpu"):
    """``(unet, scheduler)`` from a checkpoint folder (or any folder with ``unet/`` and ``scheduler/``)."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(os.path.join(path, "unet")).to(device)
    scheduler = DDPMScheduler.from_pretrained(os.path.join(path, "scheduler"))
    return unet, scheduler


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


def train_ddpm(dataset, args: TrainArgs, run_dir: str, progress: bool = True, device=None,
               overwrite: bool = False) -> List[str]:
    """Train on ``dataset`` (an :class:`~diffusion_trak.data.ImageDataset`) and return checkpoint folders.

    Rerunning with the same ``run_dir`` resumes from the last finished checkpoint; other settings
    or data refuse unless ``overwrite``."""
    from accelerate import Accelerator

    if len(dataset) == 0:
        raise InputError("cannot train on an empty dataset; check --classes/--limit")
    if overwrite and os.path.isdir(run_dir):
        import shutil
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    args_path = os.path.join(run_dir, "train_args.json")
    meta = {"train": asdict(args), "dataset": dataset.fingerprint(), "num_examples": len(dataset)}
    if os.path.exists(args_path):
        with open(args_path) as f:
            old = json.load(f)
        if old != meta:
            raise InputError(f"{run_dir} holds a training run with other settings or data; "
                             "use --overwrite or another --out")
    write_json_atomic(args_path, meta)

    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=(device == "cpu"))
    torch.manual_seed(args.seed)
    num_classes = None
    if args.class_conditional:
        if dataset.labels is None:
            raise InputError("class_conditional training needs a dataset with labels")
        num_classes = int(dataset.labels.max()) + 1
    unet = build_unet(args, dataset.image_shape, num_classes)
    scheduler = build_scheduler(args)
    steps_per_epoch = math.ceil(len(dataset) / args.batch_size)
    total = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=0.0)
    warm = min(50, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warm)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))))

    saves = checkpoint_epochs(args)
    done = list_checkpoints(run_dir)
    start_epoch = 0
    if done:
        last = done[-1]
        state = torch.load(os.path.join(last, "train_state.pt"), weights_only=False)
        from diffusers import UNet2DModel
        unet.load_state_dict(UNet2DModel.from_pretrained(os.path.join(last, "unet")).state_dict())
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
        start_epoch = state["epoch"]
    unet, opt = accelerator.prepare(unet, opt)
    images = dataset.images
    labels = dataset.labels
    bar = tqdm(total=total, initial=start_epoch * steps_per_epoch, desc="train", disable=not progress)
    for epoch in range(start_epoch, args.epochs):
        g = torch.Generator().manual_seed(seed_for(args.seed, epoch, 11))
        perm = torch.randperm(len(dataset), generator=g)
        unet.train()
        for s in range(steps_per_epoch):
            idx = perm[s * args.batch_size:(s + 1) * args.batch_size]
            x0 = images[idx].to(accelerator.device)
            t = torch.randint(0, args.num_train_timesteps, (len(idx),), generator=g).to(accelerator.device)
            noise = torch.randn(x0.shape, generator=g).to(accelerator.device)
            cond = {"class_labels": labels[idx].to(accelerator.device)} if num_classes else None
            with accelerator.autocast():
                loss = output_value(unet, scheduler, x0, t, noise, "loss", cond).mean()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch + 1)
        if (epoch + 1) in saves and accelerator.is_main_process:
            save_checkpoint(run_dir, epoch + 1, accelerator.unwrap_model(unet), scheduler, opt, sched)
    bar.close()
    return list_checkpoints(run_dir)
