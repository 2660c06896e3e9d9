"""The VAE of a latent model and the latents of a dataset: below the models and training (nothing here imports them).

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

Training the latent UNet is :mod:`diffusion_trak.latent`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import asdict
from .data import ImageDataset
from .errors import InputError, LatentError
from .featurize.featurizer import model_fingerprint, seed_for
from .store import Store, StoreError, clear_own, write_json_atomic
from .text import CaptionSet

__all__ = ["VAEArgs", "LatentDataset", "build_vae", "train_vae", "load_vae", "encode_images", "encode_dataset",
           "encode_in_memory"]


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
    clear_own(out_dir, r"vae_args\.json(\.tmp\d+)?|done|config\.json|diffusion_pytorch_model\.(safetensors|bin)",
              "VAE training")
    os.makedirs(out_dir, exist_ok=True)
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
    with store:
        shape = tuple(encode_images(vae, dataset.images[:1], mode, seed, dataset.indices[:1].tolist()).shape[1:])
        arr = store.array("latents", (len(dataset), *shape))
        _encode_rows(dataset, vae, arr.pending(), lambda rows, z: arr.write(rows, z.numpy()), mode, seed, batch_size,
                     progress)
        latents = torch.from_numpy(np.array(arr.read()))
    return _latent_dataset(dataset, latents, vfp, scale, shift, mode, captions)


def encode_in_memory(dataset, vae, mode: str = "mean", seed: int = 0, batch_size: int = 64,
                     captions: Optional[CaptionSet] = None) -> LatentDataset:
    """:func:`encode_dataset` without a cache: the same latents, computed every time."""
    from diffusion_trak.pipelines.latent_trajectory import vae_scale_shift

    vae = vae.eval()
    scale, shift = vae_scale_shift(vae)
    parts = {}
    _encode_rows(dataset, vae, np.arange(len(dataset)), lambda rows, z: parts.update({int(rows[0]): z}), mode, seed,
                 batch_size, False)
    latents = torch.cat([parts[k] for k in sorted(parts)])
    return _latent_dataset(dataset, latents, model_fingerprint(vae), scale, shift, mode, captions)


def _encode_rows(dataset, vae, todo, write, mode, seed, batch_size, progress):
    bar = tqdm(total=len(todo), desc="encode latents", unit="img", disable=not progress or len(todo) == 0)
    for i in range(0, len(todo), batch_size):
        rows = todo[i:i + batch_size]
        pos = torch.as_tensor(rows)
        write(rows, encode_images(vae, dataset.images[pos], mode, seed, dataset.indices[pos].tolist()))
        bar.update(len(rows))
    bar.close()


def _latent_dataset(dataset, latents, vae_fingerprint, scale, shift, mode, captions) -> LatentDataset:
    if captions is None and isinstance(getattr(dataset, "captions", None), CaptionSet):
        captions = dataset.captions
    out = LatentDataset(latents, dataset.labels, dataset.indices, dataset.class_names,
                        f"{getattr(dataset, 'name', 'dataset')}-latents", dataset, None, vae_fingerprint, scale, shift, mode)
    return out.with_captions(captions)
