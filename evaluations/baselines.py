"""Attribution baselines scored on the same harness as TRAK.

Every baseline returns a ``(targets, n)`` array with TRAK's sign convention (higher = stronger
proponent, i.e. an example whose inclusion is predicted to lower the target's loss):

- :func:`random_scores`: i.i.d. normal scores (a method that knows nothing; LDS ≈ 0);
- :func:`pixel_similarity`: ``−‖q − x_i‖₂`` or cosine similarity in pixel space between the query
  (``x̂0_t`` of a generated target at step t, or the real target image) and each training image;
- :func:`embedding_similarity`: cosine similarity in the bottleneck of a small convolutional
  autoencoder trained here, on the training set only, in seconds (:func:`train_encoder`; no
  pretrained weights, no hub);
- :func:`gradient_similarity`: TracIn-like dot product or cosine of the *same* projected gradient
  features TRAK uses (training features from ``diffusion_trak.api.featurize``, target features from
  ``diffusion_trak.targets``), averaged over checkpoints, i.e. TRAK without the ``(ΦᵀΦ + λI)⁻¹``.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch import nn

from diffusion_trak.featurize.featurizer import seed_for

from .metrics import cosine_similarity, neg_l2_similarity


def random_scores(num_targets: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed_for(seed, 41)).standard_normal((num_targets, n))


def pixel_similarity(queries, train_images, kind: str = "neg_l2") -> np.ndarray:
    """``(Q, N)`` pixel-space similarity, ``kind`` ``neg_l2`` or ``cosine``."""
    if kind == "neg_l2":
        return neg_l2_similarity(queries, train_images)
    if kind == "cosine":
        return cosine_similarity(queries, train_images)
    raise ValueError(f"unknown similarity {kind!r}; use neg_l2 or cosine")


def gradient_similarity(train_features: Sequence, target_features: Sequence, kind: str = "dot") -> np.ndarray:
    """``(m, n)``: mean over checkpoints of ``ψ·φ`` (``dot``) or ``cos(ψ, φ)`` (``cosine``)."""
    if len(train_features) != len(target_features):
        raise ValueError("one target-feature array per checkpoint is needed")
    acc = None
    for phi, psi in zip(train_features, target_features):
        phi = np.asarray(phi, dtype=np.float64)
        psi = np.asarray(psi, dtype=np.float64)
        s = psi @ phi.T if kind == "dot" else cosine_similarity(psi, phi) if kind == "cosine" else None
        if s is None:
            raise ValueError(f"unknown gradient similarity {kind!r}; use dot or cosine")
        acc = s if acc is None else acc + s
    return acc / len(train_features)


# ----------------------------------------------------------------------------------------------
# A small autoencoder, trained from scratch on the training images
# ----------------------------------------------------------------------------------------------


class AutoEncoder(nn.Module):
    """Conv encoder (two stride-2 convolutions, then a linear bottleneck of ``dim``) and a mirrored
    decoder. Any ``C×H×W`` input whose sides are divisible by 4."""

    def __init__(self, image_shape, dim: int = 32, width: int = 32):
        super().__init__()
        C, H, W = image_shape
        if H % 4 or W % 4:
            raise ValueError(f"the encoder needs image sides divisible by 4, got {H}×{W}")
        self.image_shape, self.dim, self.width = tuple(image_shape), dim, width
        self.inner = (2 * width, H // 4, W // 4)
        self.enc = nn.Sequential(
            nn.Conv2d(C, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 4, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(int(np.prod(self.inner)), dim))
        self.dec = nn.Sequential(
            nn.Linear(dim, int(np.prod(self.inner))), nn.SiLU(), nn.Unflatten(1, self.inner),
            nn.ConvTranspose2d(2 * width, 2 * width, 4, stride=2, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, C, 3, padding=1))

    def forward(self, x):
        return self.dec(self.enc(x))

    @torch.no_grad()
    def embed(self, images, batch_size: int = 1024) -> np.ndarray:
        self.eval()
        x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
        return torch.cat([self.enc(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


def train_encoder(images: torch.Tensor, epochs: int = 30, batch_size: int = 64, dim: int = 32, lr: float = 2e-3,
                  noise: float = 0.1, seed: int = 0, path: str = None, progress: bool = False) -> AutoEncoder:
    """Train a denoising autoencoder on ``images`` (N, C, H, W) in [-1, 1]. With ``path``, a saved encoder
    is loaded instead of retrained (and the new one is saved there)."""
    images = torch.as_tensor(images, dtype=torch.float32)
    if path and os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=True)  # a file from elsewhere cannot run code
        ae = AutoEncoder(state["image_shape"], state["dim"], state["width"])
        ae.load_state_dict(state["state_dict"])
        return ae.eval()
    torch.manual_seed(seed)
    ae = AutoEncoder(tuple(images.shape[1:]), dim)
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed_for(seed, 43))
    n = images.shape[0]
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            x = images[perm[i:i + batch_size]]
            xin = x + noise * torch.randn(x.shape, generator=g)
            loss = ((ae(xin) - x) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if progress:
            print(f"[encoder] epoch {epoch + 1}/{epochs} loss {loss.item():.4f}", flush=True)
    ae.eval()
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        torch.save({"image_shape": ae.image_shape, "dim": ae.dim, "width": ae.width, "state_dict": ae.state_dict(),
                    "final_loss": float(loss.item())}, path)
    return ae


def embedding_similarity(encoder: AutoEncoder, queries, train_images) -> np.ndarray:
    """``(Q, N)`` cosine similarity of encoder embeddings."""
    return cosine_similarity(encoder.embed(queries), encoder.embed(train_images))


def embedding_distance(encoder: AutoEncoder, a, b) -> np.ndarray:
    """Row-wise Euclidean distance of the embeddings of two equally shaped batches: ``(B,)``."""
    ea, eb = encoder.embed(a), encoder.embed(b)
    return np.sqrt(((ea - eb) ** 2).sum(1))
