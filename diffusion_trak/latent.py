"""Latent diffusion: a frozen VAE, a UNet in latent space, text or class conditioning.

The path is the pixel DDPM's with the images replaced by cached latents:

1. **VAE** (:func:`train_vae`, or the user's ``AutoencoderKL`` / ``VQModel``): frozen.
2. **Latent cache** (:func:`encode_dataset`): every training image is encoded once, in the unet's
   latent space ``z = (μ(x) − shift_factor) · scaling_factor`` — the **posterior mean** μ by default
   (deterministic, so features do not depend on VAE sampling noise), or one fixed-seed posterior
   sample per example (``mode="sample"``, a function of ``(seed, index)``). The latents live in a
   :class:`~diffusion_trak.store.Store` whose settings hold the VAE's fingerprint, the dataset's
   fingerprint and the scaling/shift factors: a rerun reuses it, a different VAE is refused (one line)
   unless ``overwrite=True``. The result, a :class:`LatentDataset`, has the attributes of an
   :class:`~diffusion_trak.data.ImageDataset` (``images`` = latents, ``labels``, ``indices``,
   ``fingerprint()``, ``image_shape``) so the core featurize/score code runs on it unchanged.
3. **Latent UNet** (:func:`train_latent_unet`, or the user's): ``UNet2DConditionModel`` reading text
   through cross-attention (captions dropped to ``""`` with probability ``uncond_prob`` so that
   classifier-free guidance works), or ``UNet2DModel`` unconditional / class-conditional. The loss is
   :func:`diffusion_trak.outputs.output_value`, the one the featurizer differentiates.
4. **Features** (:func:`featurize_latent`): TRAK features of the latent denoising loss, gradients
   with respect to the UNet only (VAE and text encoder frozen). A store in the same format as
   :func:`diffusion_trak.api.featurize`, so :func:`diffusion_trak.api.score` reads it.
5. **Generation and per-step scores**: :class:`pipelines.latent_trajectory.LatentTrajectoryPipeline`
   records latents x_t, x̂0_t and x̂0_t decoded; :func:`score_latent` scores each recorded step with the
   generation's own conditioning (the prompt's embedding; under guidance, the conditional branch).
6. **Report**: :func:`plot_latent` draws the per-step PNG/HTML with the prompt in the title.

:func:`run_latent_demo` runs it all on the embedded digits (upscaled to 16×16) on CPU.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import FeaturizeArgs, ScoreArgs, TrainArgs, asdict
from .data import ImageDataset
from .errors import InputError, UserError
from .featurize.featurizer import Featurizer, model_fingerprint, seed_for
from .store import Store, StoreError, write_json_atomic
from .text import CAPTION_MODES, CaptionSet, TextConditioner, caption_conditioning

__all__ = ["VAEArgs", "LatentTrainArgs", "LatentDataset", "LatentError", "build_vae", "train_vae", "load_vae",
           "encode_images", "encode_dataset", "build_latent_unet", "train_latent_unet", "load_latent_checkpoint",
           "list_latent_checkpoints", "unet_conditioning", "check_latent_compatible", "featurize_latent", "score_latent",
           "latent_self_attribution_rate", "plot_latent", "run_latent_demo"]

CONDITIONINGS = ("text", "class", "none")


class LatentError(UserError, ValueError):
    """A user-fixable problem on the latent path (one line naming the fix)."""


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class VAEArgs:
    """A small ``AutoencoderKL`` trained on the data (the default VAE when the user brings none).

    Attributes:
        block_out_channels: encoder/decoder widths; each level after the first halves the resolution
            (3 levels: 16×16 images → 4×4 latents).
        latent_channels: channels of the latent.
        layers_per_block: ResNet layers per level.
        norm_num_groups: GroupNorm groups.
        epochs, batch_size, learning_rate: AdamW training of ``MSE(recon, x) + kl_weight · KL``.
        kl_weight: weight of the KL term (per latent element, against the per-pixel MSE).
        seed: seeds initialisation, shuffling and posterior samples.

    After training, ``scaling_factor`` is set to ``1 / std`` of the training latents (the posterior
    means), as Stable Diffusion's VAE does, so the latents the unet sees have unit variance.
    """

    block_out_channels: tuple = (16, 32, 32)
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 8
    epochs: int = 12
    batch_size: int = 64
    learning_rate: float = 3e-3
    kl_weight: float = 1e-4
    seed: int = 0


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
# VAE
# --------------------------------------------------------------------------------------------


def build_vae(args: VAEArgs, image_shape):
    from diffusers import AutoencoderKL

    C, H, W = image_shape
    n = len(args.block_out_channels)
    return AutoencoderKL(in_channels=C, out_channels=C, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(args.block_out_channels),
                         layers_per_block=args.layers_per_block, latent_channels=args.latent_channels,
                         norm_num_groups=args.norm_num_groups, sample_size=H)


def load_vae(path: str, device="cpu"):
    """An ``AutoencoderKL`` or ``VQModel`` saved with ``save_pretrained`` (the class is read from its config)."""
    from diffusers import AutoencoderKL, VQModel

    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise LatentError(f"no VAE at {path} (config.json missing); train one or pass the folder of a saved VAE")
    with open(cfg_path) as f:
        name = json.load(f).get("_class_name", "AutoencoderKL")
    cls = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}.get(name)
    if cls is None:
        raise LatentError(f"{path} holds a {name}; supported VAEs are AutoencoderKL and VQModel")
    return cls.from_pretrained(path).to(device).eval()


def _posterior(vae, x: torch.Tensor):
    """``(mean, std)`` of the VAE posterior (``std`` is ``None`` for a VQModel)."""
    out = vae.encode(x)
    dist = getattr(out, "latent_dist", None)
    if dist is not None:
        return dist.mean, dist.std
    return out.latents, None


def train_vae(dataset, args: VAEArgs = VAEArgs(), out_dir: str = "vae", progress: bool = True, device="cpu",
              overwrite: bool = False):
    """Train a small ``AutoencoderKL`` on ``dataset`` and save it to ``out_dir`` (``save_pretrained``).

    A finished VAE with the same settings and data is loaded instead of retrained; other settings are
    refused unless ``overwrite``."""
    meta = {"vae": asdict(args), "dataset": dataset.fingerprint(), "num_examples": len(dataset)}
    done = os.path.join(out_dir, "done")
    meta_path = os.path.join(out_dir, "vae_args.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old != meta and not overwrite:
            raise LatentError(f"{out_dir} holds a VAE trained with other settings or data; "
                              "use --overwrite or another --out")
        if old == meta and os.path.exists(done) and not overwrite:
            return load_vae(out_dir, device)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    write_json_atomic(meta_path, meta)

    torch.manual_seed(args.seed)
    vae = build_vae(args, dataset.image_shape).to(device)
    images = dataset.images
    n = len(dataset)
    steps = math.ceil(n / args.batch_size)
    total = steps * args.epochs
    opt = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    bar = tqdm(total=total, desc="train vae", disable=not progress)
    vae.train()
    for epoch in range(args.epochs):
        g = torch.Generator().manual_seed(seed_for(args.seed, epoch, 17))
        perm = torch.randperm(n, generator=g)
        for s in range(steps):
            x = images[perm[s * args.batch_size:(s + 1) * args.batch_size]].to(device)
            dist = vae.encode(x).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(device)
            recon = vae.decode(z).sample
            kl = dist.kl().mean() / dist.mean[0].numel()
            loss = torch.nn.functional.mse_loss(recon, x) + args.kl_weight * kl
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    vae.eval()
    with torch.no_grad():
        means = torch.cat([_posterior(vae, images[i:i + 256].to(device))[0].cpu() for i in range(0, n, 256)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    vae.save_pretrained(out_dir)
    open(done, "w").close()
    return vae


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, mode: str = "mean", seed: int = 0,
                  indices: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Pixels ``(B, C, H, W)`` in ``[-1, 1]`` → unet-space latents ``(B, c, h, w)``.

    ``mode="mean"``: the posterior mean (a ``VQModel``'s pre-quantisation latent); ``"sample"``: one
    posterior sample per example drawn from ``(seed, indices[b])``."""
    from diffusion_trak.pipelines.latent_trajectory import vae_scale_shift

    p = next(vae.parameters())
    mean, std = _posterior(vae, images.to(device=p.device, dtype=p.dtype))
    z = mean
    if mode == "sample":
        if std is None:
            raise LatentError(f"{type(vae).__name__} has no posterior to sample; use mode='mean'")
        idx = range(images.shape[0]) if indices is None else indices
        eps = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(seed_for(seed, int(i), 31)))
                           for i in idx]).to(mean)
        z = mean + std * eps
    elif mode != "mean":
        raise LatentError(f"latent mode must be 'mean' or 'sample', got {mode!r}")
    scale, shift = vae_scale_shift(vae)
    return ((z - shift) * scale).float().cpu()


class LatentDataset(ImageDataset):
    """Cached latents with the attributes of an :class:`~diffusion_trak.data.ImageDataset`.

    Attributes:
        images: ``(N, c, h, w)`` unet-space latents (what the featurizer differentiates on).
        labels, indices, class_names, name: those of the pixel dataset.
        pixels: the pixel :class:`~diffusion_trak.data.ImageDataset` (same order), for plots.
        captions: a :class:`~diffusion_trak.text.CaptionSet` or ``None``.
        vae_fingerprint, scaling_factor, shift_factor, mode: how the latents were made.
    """

    def __init__(self, latents, labels=None, indices=None, class_names=None, name="latents", pixels=None,
                 captions: Optional[CaptionSet] = None, vae_fingerprint: str = "", scaling_factor: float = 1.0,
                 shift_factor: float = 0.0, mode: str = "mean"):
        super().__init__(latents, labels, indices, class_names, name)
        self.pixels, self.captions = pixels, captions
        self.vae_fingerprint, self.scaling_factor, self.shift_factor, self.mode = \
            vae_fingerprint, float(scaling_factor), float(shift_factor), mode

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return f"LatentDataset(name={self.name!r}, n={len(self)}, latents=({c},{h},{w}), scaling_factor={self.scaling_factor:.4g})"

    def with_captions(self, captions: Optional[CaptionSet]) -> "LatentDataset":
        if captions is not None:
            captions.check_covers(self.indices.tolist())
        self.captions = captions
        return self

    def subset(self, positions) -> "LatentDataset":
        pos = torch.as_tensor(np.asarray(positions), dtype=torch.long).reshape(-1)
        return LatentDataset(self.images[pos].clone(), None if self.labels is None else self.labels[pos].clone(),
                             self.indices[pos].clone(), self.class_names, self.name,
                             None if self.pixels is None else self.pixels.subset(pos), self.captions,
                             self.vae_fingerprint, self.scaling_factor, self.shift_factor, self.mode)

    def caption(self, i: int) -> str:
        """The first caption of the example at position ``i`` (its class caption without a captions set)."""
        if self.captions is not None:
            return self.captions.of(int(self.indices[i]))[0]
        return super().caption(i)


def encode_dataset(dataset, vae, cache_dir: str, mode: str = "mean", seed: int = 0, batch_size: int = 64,
                   overwrite: bool = False, progress: bool = True, captions: Optional[CaptionSet] = None) -> LatentDataset:
    """Encode ``dataset`` with the frozen ``vae`` once, into the store at ``cache_dir`` (resumable).

    The store's settings are the VAE fingerprint and class, the dataset fingerprint, the scaling and
    shift factors, the mode and (for ``"sample"``) the seed; a rerun with the same ones reuses the
    cache, other ones raise :class:`LatentError` unless ``overwrite=True`` (which re-encodes)."""
    from diffusion_trak.pipelines.latent_trajectory import vae_scale_shift

    vae = vae.eval()
    if len(dataset) == 0:
        raise InputError("dataset is empty; check --classes/--limit")
    scale, shift = vae_scale_shift(vae)
    vfp = model_fingerprint(vae)
    settings = {"kind": "latents", "vae": vfp, "vae_class": type(vae).__name__,
                "dataset": {"fingerprint": dataset.fingerprint(), "size": len(dataset), "name": getattr(dataset, "name", "")},
                "scaling_factor": scale, "shift_factor": shift, "mode": mode, "seed": seed if mode == "sample" else None}
    try:
        store = Store(cache_dir, settings, overwrite=overwrite)
    except StoreError as e:
        if "other settings" in str(e):
            raise LatentError(f"latent cache {cache_dir} was encoded with another VAE, data or mode "
                              f"({str(e).split('(', 1)[-1].split(')')[0]}); rerun with --overwrite to re-encode, "
                              "or choose another cache folder") from None
        raise
    shape = tuple(encode_images(vae, dataset.images[:1], mode, seed, dataset.indices[:1].tolist()).shape[1:])
    arr = store.array("latents", (len(dataset), *shape))
    todo = arr.pending()
    bar = tqdm(total=len(todo), desc="encode latents", unit="img", disable=not progress or len(todo) == 0)
    for i in range(0, len(todo), batch_size):
        rows = todo[i:i + batch_size]
        z = encode_images(vae, dataset.images[torch.as_tensor(rows)], mode, seed, dataset.indices[torch.as_tensor(rows)].tolist())
        arr.write(rows, z.numpy())
        bar.update(len(rows))
    bar.close()
    latents = torch.from_numpy(np.array(arr.read()))
    out = LatentDataset(latents, dataset.labels, dataset.indices, dataset.class_names,
                        f"{getattr(dataset, 'name', 'dataset')}-latents", dataset, None, vfp, scale, shift, mode)
    return out.with_captions(captions)


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


def unet_conditioning(unet) -> str:
    """``text`` for a unet with cross-attention, ``class`` for one with a class embedding, else ``none``."""
    cfg = unet.config
    if getattr(cfg, "cross_attention_dim", None) is not None and hasattr(cfg, "encoder_hid_dim"):
        return "text"
    if getattr(cfg, "num_class_embeds", None) is not None or getattr(cfg, "class_embed_type", None) is not None:
        return "class"
    return "none"


def list_latent_checkpoints(run_dir: str) -> List[str]:
    from .train import list_checkpoints

    return list_checkpoints(run_dir)


def load_latent_checkpoint(path: str, device="cpu"):
    """``(unet, scheduler)`` from ``path/{unet,scheduler}``; the unet class is read from its config."""
    from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

    with open(os.path.join(path, "unet", "config.json")) as f:
        name = json.load(f).get("_class_name", "UNet2DModel")
    cls = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}.get(name)
    if cls is None:
        raise LatentError(f"{path}/unet is a {name}; supported are UNet2DModel and UNet2DConditionModel")
    return cls.from_pretrained(os.path.join(path, "unet")).to(device), DDPMScheduler.from_pretrained(os.path.join(path, "scheduler"))


def check_latent_compatible(unet, latents: LatentDataset) -> None:
    """One-line errors for a unet that cannot take these latents (naming the image size that fits)."""
    cfg = unet.config
    c, h, w = latents.image_shape
    size = cfg.sample_size if isinstance(cfg.sample_size, int) or cfg.sample_size is None else cfg.sample_size[0]
    if cfg.in_channels != c:
        raise LatentError(f"the unet takes {cfg.in_channels}-channel latents but the VAE makes {c}; "
                          "use the VAE the unet was trained with")
    if size is not None and size != h:
        hint = ""
        if latents.pixels is not None:
            hint = f" (use --image-size {latents.pixels.image_shape[1] * size // h})"
        raise LatentError(f"the unet takes {size}×{size} latents but the VAE makes {h}×{w}{hint}")


def _as_checkpoints(checkpoints, device="cpu"):
    out = [load_latent_checkpoint(c, device) if isinstance(c, (str, os.PathLike)) else c for c in checkpoints]
    if not out:
        raise InputError("no checkpoints given; train a latent model first or pass (unet, scheduler) pairs")
    return out


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

    from .train import build_scheduler, checkpoint_epochs, fit, list_checkpoints, make_optimizer, resume

    if len(latents) == 0:
        raise InputError("cannot train on an empty dataset; check --classes/--limit")
    kind = args.conditioning if unet is None else unet_conditioning(unet)
    if kind == "text" and (text is None or latents.captions is None):
        raise LatentError("text conditioning needs a text model and captions; pass text= and encode the "
                          "dataset with captions=")
    if kind == "class" and latents.labels is None:
        raise LatentError("class conditioning needs a dataset with labels")
    if overwrite and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
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
    start_epoch = resume(run_dir, unet, opt, lr_sched, lambda ck: load_latent_checkpoint(ck)[0])
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


# --------------------------------------------------------------------------------------------
# Features and scores
# --------------------------------------------------------------------------------------------


class _PerTimestepFeaturizer(Featurizer):
    """The core featurizer, with conditioning given per (example, timestep): ``(B, T, ...)`` tensors."""

    def features(self, x0, timesteps, noises, cond=None, output=None, cond_per_timestep=True):
        return super().features(x0, timesteps, noises, cond, output, cond_per_timestep=True)


def _training_cond_fn(latents: LatentDataset, kind: str, text: Optional[TextConditioner], caption_mode: str, args: FeaturizeArgs):
    """``rows -> cond dict`` for training examples, and whether it is per timestep."""
    if kind == "text":
        if text is None or latents.captions is None:
            raise LatentError("this unet reads text: pass text= (a TextConditioner) and a dataset encoded with captions=")
        if caption_mode not in CAPTION_MODES:
            raise LatentError(f"unknown caption mode {caption_mode!r}; choose one of {', '.join(CAPTION_MODES)}")
        latents.captions.check_covers(latents.indices.tolist())

        def fn(rows):
            idx = latents.indices[torch.as_tensor(np.asarray(rows))].tolist()
            return caption_conditioning(text, latents.captions, idx, caption_mode, args.num_timesteps, args.seed)
        return fn, caption_mode == "random"
    if kind == "class":
        if latents.labels is None:
            raise LatentError("this unet is class-conditional but the dataset has no labels")
        return (lambda rows: {"class_labels": latents.labels[torch.as_tensor(np.asarray(rows))]}), False
    return None, False


def featurize_latent(checkpoints: Sequence, latents: LatentDataset, args: FeaturizeArgs = FeaturizeArgs(),
                     out: str = "features", text: Optional[TextConditioner] = None, caption_mode: str = "random",
                     overwrite: bool = False, device="cpu", progress: bool = True,
                     rows: Optional[Sequence[int]] = None):
    """TRAK features of the latent denoising loss for every checkpoint (resumable store at ``out``).

    Checkpoints are folders (:func:`load_latent_checkpoint`) or ``(unet, scheduler)`` pairs. Gradients
    are taken with respect to the UNet only. Text unets get ``encoder_hidden_states`` from ``text`` and
    ``latents.captions`` (``caption_mode``: ``random`` — default, one caption per timestep —, ``mean``
    or ``first``, see :mod:`diffusion_trak.text`); class unets get ``class_labels``. Returns an
    :class:`~diffusion_trak.api.FeatureSet` that :func:`diffusion_trak.api.score` reads."""
    from .api import FeatureSet

    ckpts = _as_checkpoints(checkpoints, device)
    if len(latents) == 0:
        raise InputError("dataset is empty; check --classes/--limit")
    kinds = {unet_conditioning(u) for u, _ in ckpts}
    if len(kinds) != 1:
        raise LatentError(f"checkpoints mix conditionings {sorted(kinds)}; featurize them separately")
    kind = kinds.pop()
    for unet, _ in ckpts:
        check_latent_compatible(unet, latents)
    cond_fn, per_t = _training_cond_fn(latents, kind, text, caption_mode, args)
    cls = _PerTimestepFeaturizer if per_t else Featurizer
    # Featurizers are made one at a time: each holds its own (possibly cached) projection matrix.
    make = lambda c: cls(ckpts[c][0], ckpts[c][1], args, device)
    f = make(0)
    settings = {
        "featurize": asdict(args),
        "projector": f.projector.name,
        "num_params": f.num_params,
        "dataset": {"fingerprint": latents.fingerprint(), "size": len(latents), "name": getattr(latents, "name", "")},
        "checkpoints": [model_fingerprint(u) for u, _ in ckpts],
        "num_train_timesteps": [int(s.config.num_train_timesteps) for _, s in ckpts],
        "latent": {"vae": latents.vae_fingerprint, "scaling_factor": latents.scaling_factor,
                   "shift_factor": latents.shift_factor, "mode": latents.mode, "conditioning": kind,
                   "caption_mode": caption_mode if kind == "text" else None,
                   "captions": latents.captions.fingerprint() if kind == "text" else None,
                   "text": text.fingerprint() if kind == "text" else None},
    }
    store = Store(out, settings, overwrite=overwrite)
    names = []
    for c in range(len(ckpts)):
        name = f"features_{c:02d}"
        arr = store.array(name, (len(latents), args.proj_dim))
        if len(arr.pending(rows)):
            f = f if f is not None else make(c)
            f.featurize_dataset(latents, arr, cond_fn=cond_fn, progress=progress, rows=rows,
                                desc=f"featurize ckpt {c + 1}/{len(ckpts)}")
        f = None
        names.append(name)
    return FeatureSet(store, names)


def score_latent(features, checkpoints: Sequence, latents: LatentDataset, trajectory, steps: Optional[Sequence[int]] = None,
                 args: ScoreArgs = ScoreArgs(), out: Optional[str] = None, overwrite: bool = False, device="cpu",
                 progress: bool = True):
    """Per-step TRAK scores of a recorded latent trajectory, with the generation's own conditioning
    (``trajectory.conditioning()``: the prompt embedding, i.e. the conditional branch under guidance)."""
    from .api import score

    cond = trajectory.conditioning() if hasattr(trajectory, "conditioning") else None
    return score(features, _as_checkpoints(checkpoints, device), latents.indices.numpy(), args, trajectory=trajectory,
                 steps=steps, out=out, overwrite=overwrite, device=device, progress=progress, cond=cond)


def own_conditioning(latents: LatentDataset, positions, kind: str, text: Optional[TextConditioner] = None) -> Optional[dict]:
    """The conditioning of training examples as targets: their first caption's embedding, or their label."""
    pos = torch.as_tensor(np.asarray(positions), dtype=torch.long)
    if kind == "text":
        return {"encoder_hidden_states": text.encode([latents.caption(int(p)) for p in pos])}
    if kind == "class":
        return {"class_labels": latents.labels[pos]}
    return None


def latent_self_attribution_rate(features, checkpoints: Sequence, latents: LatentDataset, text: Optional[TextConditioner] = None,
                                 num: int = 50, timestep: int = 50, args: ScoreArgs = ScoreArgs(), device="cpu",
                                 seed: int = 0) -> Tuple[float, np.ndarray]:
    """Score ``num`` training latents as targets at a low-noise ``timestep``, each with its own caption
    (or label); return how often each ranks its own index first among all training examples, and the
    positions used."""
    from .api import score

    ckpts = _as_checkpoints(checkpoints, device)
    g = np.random.default_rng(seed)
    pos = np.sort(g.choice(len(latents), size=min(num, len(latents)), replace=False))
    cond = own_conditioning(latents, pos, unet_conditioning(ckpts[0][0]), text)
    sc = score(features, ckpts, latents.indices.numpy(), args, images=latents.images[pos], image_timesteps=[timestep],
               device=device, progress=False, cond=cond)
    best = sc.values[0].argmax(axis=1)
    return float((best == pos).mean()), pos


def plot_latent(scores, latents: LatentDataset, trajectory, out_prefix: str, target: int = 0, k: int = 6,
                title: Optional[str] = None) -> Tuple[str, str]:
    """Per-step PNG and HTML of one target of a latent trajectory: the query of each row is x̂0_t decoded
    to pixels, the training examples are shown in pixels, and the title shows the prompt."""
    from .report import plot_from_scores

    if latents.pixels is None:
        raise LatentError("the latent dataset has no pixel images to show; build it with encode_dataset")
    if getattr(trajectory, "x0_decoded", None) is None:
        raise LatentError("the trajectory holds no decoded x̂0; generate it with decode=True")
    query = torch.stack([trajectory.x0_decoded[trajectory.step_of(s)][target] for s in scores.steps])
    if title is None:
        prompt = (trajectory.prompts or [None])[target] if getattr(trajectory, "prompts", None) else None
        if prompt is not None:
            g = getattr(trajectory, "guidance_scale", 1.0)
            neg = (trajectory.negative_prompts or [None])[target] if trajectory.negative_prompts else None
            title = f'prompt: "{prompt}"' + (f' · guidance {g:g} (unconditional: "{neg}")' if g > 1 else "")
        elif trajectory.class_labels is not None:
            title = f"class {int(trajectory.class_labels[target])}"
        title = f"{title} — per-step attribution" if title else None
    return plot_from_scores(scores, latents.pixels, trajectory, out_prefix, target=target, k=k, query_images=query,
                            title=title)


# --------------------------------------------------------------------------------------------
# Demo
# --------------------------------------------------------------------------------------------


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEMO_TEMPLATES = ("a photo of a {}", "a handwritten {}", "the digit {}")


@dataclass
class LatentDemoSettings:
    limit: Optional[int] = 500
    image_size: int = 16
    vae: VAEArgs = field(default_factory=lambda: VAEArgs(epochs=20))
    train: LatentTrainArgs = field(default_factory=lambda: LatentTrainArgs(block_out_channels=(16, 32), epochs=80))
    featurize: FeaturizeArgs = field(default_factory=lambda: FeaturizeArgs(
        num_timesteps=20, timestep_strategy="stratified", proj_dim=1024, batch_size=32))
    score: ScoreArgs = field(default_factory=lambda: ScoreArgs(num_noises=20))
    caption_mode: str = "random"
    prompt_class: int = 3
    guidance_scale: float = 2.0
    sampling_steps: int = 100
    record: int = 8
    self_attribution_images: int = 50
    self_attribution_timestep: int = 50
    text_hidden_size: int = 32


def latent_demo_settings(quick: bool = False) -> LatentDemoSettings:
    if quick:  # for tests: seconds, not minutes
        return LatentDemoSettings(limit=48, vae=VAEArgs(block_out_channels=(8, 16, 16), norm_num_groups=4, epochs=2),
                                  train=LatentTrainArgs(block_out_channels=(16, 16), norm_num_groups=4, epochs=3,
                                                        batch_size=16, num_checkpoints=2),
                                  featurize=FeaturizeArgs(num_timesteps=2, proj_dim=64, batch_size=16),
                                  score=ScoreArgs(num_noises=2), sampling_steps=8, record=3, self_attribution_images=8,
                                  text_hidden_size=16)
    return LatentDemoSettings()


def run_latent_demo(out_dir: str = "runs/latent-demo", quick: bool = False, device: str = "cpu", overwrite: bool = False,
                    prompt: Optional[str] = None, settings: Optional[LatentDemoSettings] = None) -> dict:
    """The whole latent path on the embedded digits (16×16), on CPU: train a VAE, cache latents, train a
    text-conditional latent UNet (2 checkpoints), featurize, generate ``prompt`` with guidance recording
    the trajectory, score every recorded step, write the per-step PNG/HTML, and run the self-attribution
    check (training latents as targets with their own caption at a low-noise timestep).

    Prints the prompt, the PNG, the scores file and the self-attribution rate; returns them in a dict.
    Rerunning the same ``out_dir`` reuses every finished stage."""
    from diffusion_trak.pipelines.latent_trajectory import LatentTrajectoryPipeline

    from .data import DataArgs, load_dataset
    from .text import default_text_model

    cfg = settings or latent_demo_settings(quick)
    t0 = time.time()
    say = lambda m: print(f"[{time.time() - t0:6.1f}s] {m}", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    data_args = DataArgs(name="digits", image_size=cfg.image_size, limit=cfg.limit)
    pixels = load_dataset(data_args)
    pixels.class_names = list(DIGIT_NAMES)
    captions = CaptionSet.from_class_names(pixels, DEMO_TEMPLATES)
    write_json_atomic(os.path.join(out_dir, "run.json"), {"data": data_args.to_dict(), "templates": list(DEMO_TEMPLATES),
                                                          "settings": asdict(cfg)})
    say(f"data: {pixels}, {len(DEMO_TEMPLATES)} captions per image, e.g. {captions.of(int(pixels.indices[0]))}")

    vae = train_vae(pixels, cfg.vae, os.path.join(out_dir, "vae"), device=device, overwrite=overwrite)
    latents = encode_dataset(pixels, vae, os.path.join(out_dir, "latents"), overwrite=overwrite, captions=captions)
    with torch.no_grad():
        recon = torch.cat([vae.decode(latents.images[i:i + 256] / latents.scaling_factor).sample for i in range(0, len(latents), 256)])
    say(f"VAE {out_dir}/vae: latents {latents.image_shape}, scaling_factor {latents.scaling_factor:.3f}, "
        f"reconstruction MSE {float(((recon - pixels.images) ** 2).mean()):.4f}")

    tok, enc = default_text_model(captions.all_texts(), hidden_size=cfg.text_hidden_size, seed=cfg.train.seed)
    tok.save_pretrained(os.path.join(out_dir, "text", "tokenizer"))
    enc.save_pretrained(os.path.join(out_dir, "text", "text_encoder"))
    text = TextConditioner(tok, enc, device)
    ckpts = train_latent_unet(latents, cfg.train, os.path.join(out_dir, "model"), text=text, device=device, overwrite=overwrite)
    say(f"trained {len(ckpts)} latent UNet checkpoints in {out_dir}/model")

    pairs = _as_checkpoints(ckpts, device)
    features = featurize_latent(pairs, latents, cfg.featurize, os.path.join(out_dir, "features"), text=text,
                                caption_mode=cfg.caption_mode, overwrite=overwrite, device=device)
    say(f"featurized {len(latents)} latents × {len(ckpts)} checkpoints (T={cfg.featurize.num_timesteps}, "
        f"k={cfg.featurize.proj_dim}, captions: {cfg.caption_mode}) in {out_dir}/features")

    prompt = prompt or DEMO_TEMPLATES[0].format(DIGIT_NAMES[cfg.prompt_class])
    # A fresh copy for sampling: featurizers switch the attention processors of the models they are given
    # (vmap-friendly, equal up to float error), which would make the trajectory depend on what ran before.
    unet, sched = load_latent_checkpoint(ckpts[-1], device)
    pipe = LatentTrajectoryPipeline(vae=vae, unet=unet, scheduler=sched, text_encoder=enc, tokenizer=tok)
    record = sorted({round(i * (cfg.sampling_steps - 1) / (cfg.record - 1)) for i in range(cfg.record)})
    gen = pipe(prompt, seed=0, num_inference_steps=cfg.sampling_steps, guidance_scale=cfg.guidance_scale,
               record_steps=record, show_progress=False)
    tpath = os.path.join(out_dir, "trajectories", "seed-0.safetensors")
    gen.trajectory.save(tpath)
    say(f'generated "{prompt}" (guidance {cfg.guidance_scale:g}, {cfg.sampling_steps} DDPM steps); trajectory: {tpath}')

    sdir = os.path.join(out_dir, "scores", "seed-0")
    scores = score_latent(features, pairs, latents, gen.trajectory, args=cfg.score, out=sdir, overwrite=overwrite, device=device)
    png, html = plot_latent(scores, latents, gen.trajectory, os.path.join(out_dir, "report", "seed-0"))
    say(f"scored {len(latents)} training examples at {len(scores.steps)} steps")

    rate, _ = latent_self_attribution_rate(features, pairs, latents, text, cfg.self_attribution_images,
                                           cfg.self_attribution_timestep, cfg.score, device=device)
    n = min(cfg.self_attribution_images, len(latents))
    say(f"self-attribution: {rate:.0%} of {n} training images (own caption) rank their own index first "
        f"(of {len(latents)}) at timestep {cfg.self_attribution_timestep}")
    seconds = time.time() - t0
    summary = {"prompt": prompt, "png": png, "html": html, "scores": os.path.join(sdir, "scores.npy"),
               "trajectory": tpath, "self_attribution": rate, "self_attribution_images": n,
               "self_attribution_timestep": cfg.self_attribution_timestep, "seconds": seconds}
    write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    print(f"\nprompt:           \"{prompt}\"\nper-step plot:    {png}\nhtml page:        {html}\n"
          f"scores:           {sdir}/scores.npy (+ top-k per step in {sdir}/scores.json)\n"
          f"self-attribution: {rate:.0%} of {n}\ntotal time:       {seconds:.0f} s", flush=True)
    return summary
