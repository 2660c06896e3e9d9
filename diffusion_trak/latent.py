"""Latent diffusion: a frozen VAE, a UNet in latent space, text or class conditioning.

What is particular to latent models lives here; featurizing, scoring and attributing them is the pixel
path's (:mod:`diffusion_trak.api`, :class:`diffusion_trak.Attributor`) with a
:class:`~diffusion_trak.models.Conditioning` that holds the VAE (and the text model):

1. **VAE** and **latent cache**: :mod:`diffusion_trak.vae` (below the models; its names stay importable here).
2. **Latent UNet** (:func:`train_latent_unet`, or the user's): ``UNet2DConditionModel`` reading text
   through cross-attention (captions dropped to ``""`` with probability ``uncond_prob`` so that
   classifier-free guidance works), or ``UNet2DModel`` unconditional / class-conditional. The loss is
   :func:`diffusion_trak.outputs.output_value`, the one the featurizer differentiates.

Sampling with the trajectory recorded is :class:`pipelines.latent_trajectory.LatentTrajectoryPipeline`;
``diffusion-trak demo --latent`` runs the whole latent path on the embedded digits.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional

import torch

from .config import TrainArgs, asdict
from .errors import InputError, LatentError
from .featurize.featurizer import model_fingerprint
from .models import load_checkpoint, unet_conditioning
from .store import clear_own, write_json_atomic
from .text import CaptionSet, TextConditioner
# the VAE and the latent cache live below the models (diffusion_trak.vae); kept importable from here
from .vae import (LatentDataset, VAEArgs, build_vae, encode_dataset, encode_images, encode_in_memory,  # noqa: F401
                  load_vae, train_vae)

__all__ = ["VAEArgs", "LatentTrainArgs", "LatentDataset", "LatentError", "build_vae", "train_vae", "load_vae",
           "encode_images", "encode_dataset", "encode_in_memory", "build_latent_unet", "train_latent_unet"]

CONDITIONINGS = ("text", "class", "none")


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------

@dataclass
class LatentTrainArgs:
    """How to train the latent UNet.

    Attributes:
        conditioning: ``text`` (``UNet2DConditionModel``, cross-attention on ``encoder_hidden_states``),
            ``class`` (``UNet2DModel`` with ``class_labels``) or ``none``.
        block_out_channels, layers_per_block, attention_levels, norm_num_groups: the UNet (as
            :class:`~diffusion_trak.config.TrainArgs`); with ``text``, the levels in
            ``attention_levels`` are cross-attention blocks.
        attention_head_dim: head width of the (cross-)attention.
        num_train_timesteps, beta_schedule: the ``DDPMScheduler``.
        epochs, batch_size, learning_rate: AdamW, 50 warm-up steps then cosine decay to 10%.
        num_checkpoints: checkpoints saved, evenly spaced over the last half (for ensembling).
        uncond_prob: probability that a training caption is replaced by the empty prompt ``""``
            (what classifier-free guidance's unconditional branch uses).
        seed: seeds initialisation, shuffling, noise and caption draws; epoch ``e`` uses
            ``(seed, e)``, so a resumed run is identical to an uninterrupted one.
        mixed_precision: passed to ``accelerate``.
    """

    conditioning: str = "text"
    block_out_channels: tuple = (32, 64)
    layers_per_block: int = 1
    attention_levels: tuple = (1,)
    norm_num_groups: int = 8
    attention_head_dim: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    epochs: int = 60
    batch_size: int = 64
    learning_rate: float = 2e-3
    num_checkpoints: int = 2
    uncond_prob: float = 0.1
    seed: int = 0
    mixed_precision: str = "no"

    def __post_init__(self):
        if self.conditioning not in CONDITIONINGS:
            raise LatentError(f"conditioning must be one of {', '.join(CONDITIONINGS)}, got {self.conditioning!r}")

    def unet_args(self) -> TrainArgs:
        return TrainArgs(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                         attention_levels=tuple(self.attention_levels), norm_num_groups=self.norm_num_groups,
                         num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                         epochs=self.epochs, batch_size=self.batch_size, learning_rate=self.learning_rate,
                         num_checkpoints=self.num_checkpoints, seed=self.seed,
                         class_conditional=self.conditioning == "class", mixed_precision=self.mixed_precision)


# --------------------------------------------------------------------------------------------
# Latent UNet
# --------------------------------------------------------------------------------------------


def build_latent_unet(args: LatentTrainArgs, latent_shape, num_classes: Optional[int] = None,
                      cross_attention_dim: Optional[int] = None):
    """``UNet2DConditionModel`` for ``text`` (cross-attention width ``cross_attention_dim``), else the
    pixel path's ``UNet2DModel`` (:func:`diffusion_trak.train.build_unet`) on the latent shape."""
    from .train import build_unet

    if args.conditioning != "text":
        return build_unet(args.unet_args(), latent_shape, num_classes if args.conditioning == "class" else None)
    from diffusers import UNet2DConditionModel

    if not cross_attention_dim:
        raise LatentError("text conditioning needs the text encoder's width (cross_attention_dim)")
    c, h, _ = latent_shape
    levels = len(args.block_out_channels)
    down = tuple("CrossAttnDownBlock2D" if i in args.attention_levels else "DownBlock2D" for i in range(levels))
    up = tuple("CrossAttnUpBlock2D" if (levels - 1 - i) in args.attention_levels else "UpBlock2D" for i in range(levels))
    return UNet2DConditionModel(sample_size=h, in_channels=c, out_channels=c, block_out_channels=tuple(args.block_out_channels),
                                layers_per_block=args.layers_per_block, down_block_types=down, up_block_types=up,
                                mid_block_type="UNetMidBlock2DCrossAttn", norm_num_groups=args.norm_num_groups,
                                cross_attention_dim=int(cross_attention_dim), attention_head_dim=args.attention_head_dim)


class _CaptionTable:
    """All distinct captions embedded once; each example's caption ids (row ``len-1`` is ``""``)."""

    def __init__(self, latents: LatentDataset, text: TextConditioner, captions: CaptionSet, device):
        captions.check_covers(latents.indices.tolist())
        texts = sorted({c for i in latents.indices.tolist() for c in captions.of(i)})
        self.texts = texts + [""]
        lookup = {t: j for j, t in enumerate(self.texts)}
        self.embeds = text.encode(self.texts).to(device)
        self.ids = [torch.tensor([lookup[c] for c in captions.of(i)]) for i in latents.indices.tolist()]
        self.empty = len(self.texts) - 1

    def draw(self, rows: torch.Tensor, g: torch.Generator, uncond_prob: float) -> torch.Tensor:
        u = torch.rand(len(rows), generator=g)
        pick = torch.randint(0, 1 << 30, (len(rows),), generator=g)
        ids = [self.empty if u[b] < uncond_prob else int(self.ids[r][pick[b] % len(self.ids[r])]) for b, r in enumerate(rows.tolist())]
        return self.embeds[torch.tensor(ids, device=self.embeds.device)]


def train_latent_unet(latents: LatentDataset, args: LatentTrainArgs, run_dir: str, text: Optional[TextConditioner] = None,
                      unet=None, progress: bool = True, device="cpu", overwrite: bool = False) -> List[str]:
    """Train a latent UNet on cached ``latents``; return the checkpoint folders ``ckpt-XXXX/{unet,scheduler}``.

    ``text`` (with ``latents.captions``) is needed for ``conditioning="text"``. ``unet`` may be the
    user's own (``UNet2DModel`` or ``UNet2DConditionModel``), trained from its current weights instead of
    a new one. Rerunning with the same ``run_dir`` resumes from the last finished checkpoint."""
    from accelerate import Accelerator

    from .train import TRAINED_FILES, build_scheduler, checkpoint_epochs, fit, list_checkpoints, make_optimizer, resume

    if len(latents) == 0:
        raise InputError("cannot train on an empty dataset; check --classes/--limit")
    kind = args.conditioning if unet is None else unet_conditioning(unet)
    if kind == "text" and (text is None or latents.captions is None):
        raise LatentError("text conditioning needs a text model and captions; pass text= and encode the "
                          "dataset with captions=")
    if kind == "class" and latents.labels is None:
        raise LatentError("class conditioning needs a dataset with labels")
    if overwrite:
        clear_own(run_dir, TRAINED_FILES, "training")
    os.makedirs(run_dir, exist_ok=True)
    meta = {"train": asdict(args), "latents": latents.fingerprint(), "num_examples": len(latents),
            "conditioning": kind, "text": text.fingerprint() if kind == "text" else None,
            "captions": latents.captions.fingerprint() if kind == "text" else None,
            "init_unet": model_fingerprint(unet) if unet is not None else None}
    args_path = os.path.join(run_dir, "train_args.json")
    if os.path.exists(args_path):
        with open(args_path) as f:
            if json.load(f) != meta:
                raise LatentError(f"{run_dir} holds a training run with other settings or data; "
                                  "use --overwrite or another --out")
    write_json_atomic(args_path, meta)

    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=(str(device) == "cpu"))
    torch.manual_seed(args.seed)
    num_classes = int(latents.labels.max()) + 1 if kind == "class" else None
    table = _CaptionTable(latents, text, latents.captions, accelerator.device) if kind == "text" else None
    if unet is None:
        unet = build_latent_unet(args, latents.image_shape, num_classes, table.embeds.shape[-1] if table else None)
    scheduler = build_scheduler(args.unet_args())
    opt, lr_sched = make_optimizer(unet.parameters(), args, len(latents))
    start_epoch = resume(run_dir, unet, opt, lr_sched, lambda ck: load_checkpoint(ck)[0])
    unet, opt = accelerator.prepare(unet, opt)
    labels = latents.labels

    def cond_fn(idx, g):
        if kind == "text":
            return {"encoder_hidden_states": table.draw(idx, g, args.uncond_prob)}
        if kind == "class":
            return {"class_labels": labels[idx].to(accelerator.device)}
        return None

    fit(accelerator, unet, scheduler, opt, lr_sched, latents.images, args, checkpoint_epochs(args.unet_args()), run_dir,
        cond_fn, start_epoch, "train latent unet", progress)
    return list_checkpoints(run_dir)
