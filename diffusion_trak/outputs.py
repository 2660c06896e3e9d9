"""Model outputs on (x0, t, noise): the one place where noising and losses live.

Every function here works on a batch, and under ``torch.func.vmap`` (no ``.item()``,
timesteps looked up with ``index_select``). Training (:mod:`diffusion_trak.train`),
featurization and targets all call :func:`output_value`, so the loss the model was trained
with is the loss whose gradient is attributed.

Output functions ``f(ε̂, target)`` map the network prediction and its regression target to one
scalar per example:

- ``loss``: mean squared error ``mean((ε̂ - target)²)``, the DDPM training loss (journey-TRAK);
- ``sqnorm``: ``mean(ε̂²)``, the squared norm of the prediction (D-TRAK);
- ``mean``: ``mean(ε̂)``;
- ``l1``: ``mean(|ε̂|)``;
- ``l2``: ``sqrt(sum(ε̂²))``;
- ``probe``: ``mean(ε̂ · v)`` with ``v ~ N(0, I)`` a random *probe* drawn with the noise and independent of it.
  Its gradient ``Jᵀv / d`` (``J``: the Jacobian of ε̂ in θ) has ``E[Jᵀv vᵀJ] = JᵀJ``, the Gauss-Newton matrix of
  the squared error at that (x0, t, ε), whatever the prediction type; summed over independent probes, the
  outer products estimate it without the d backward passes of ``J``. The GGN kernel of
  :class:`~diffusion_trak.config.FeaturizeArgs` (``kernel="ggn"``) is built from these features. The probe
  travels in the noise tensor: for this output, ``noise`` has twice the image's channels, ``[ε, v]``
  (:func:`diffusion_trak.featurize.featurizer.example_draws` draws it so).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch


def _alpha_bar(scheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    ac = scheduler.alphas_cumprod.to(device=like.device, dtype=like.dtype)
    a = ac.index_select(0, t.reshape(-1).long())
    return a.reshape(-1, *([1] * (like.dim() - 1)))


def add_noise(scheduler, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε`` (the forward process of any DDPM-style scheduler)."""
    a = _alpha_bar(scheduler, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def regression_target(scheduler, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the network regresses on, following ``scheduler.config.prediction_type``."""
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        a = _alpha_bar(scheduler, t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"unsupported prediction_type {kind!r}; use epsilon, sample or v_prediction")


def _flat_mean(x):
    return x.reshape(x.shape[0], -1).mean(1)


OUTPUTS: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "loss": lambda pred, target: _flat_mean((pred - target) ** 2),
    "sqnorm": lambda pred, target: _flat_mean(pred ** 2),
    "mean": lambda pred, target: _flat_mean(pred),
    "l1": lambda pred, target: _flat_mean(pred.abs()),
    "l2": lambda pred, target: pred.reshape(pred.shape[0], -1).pow(2).sum(1).sqrt(),
    "probe": lambda pred, probe: _flat_mean(pred * probe),
}

#: outputs whose noise tensor carries a probe ``v`` after the noise ``ε`` (channels ``[ε, v]``)
PROBED = ("probe",)


def get_output(name: str):
    if name not in OUTPUTS:
        raise ValueError(f"unknown output function {name!r}; choose one of {sorted(OUTPUTS)}")
    return OUTPUTS[name]


def model_prediction(model, x_t, t, cond=None):
    """Call a diffusers UNet; ``cond`` is a dict of extra keyword arguments
    (``class_labels`` or ``encoder_hidden_states``)."""
    out = model(x_t, t, **(cond or {}))
    return out.sample if hasattr(out, "sample") else out[0]


def output_value(model, scheduler, x0, t, noise, output: str = "loss", cond: Optional[dict] = None) -> torch.Tensor:
    """Per-example output ``f(ε̂_θ(x_t, t), target)`` for a batch: shape ``(B,)``. For a probed output
    (:data:`PROBED`) ``noise`` is ``[ε, v]`` along the channels and ``f`` gets the probe ``v`` as its target."""
    if output in PROBED:
        noise, probe = noise[:, :x0.shape[1]], noise[:, x0.shape[1]:]
        if probe.shape != noise.shape:
            raise ValueError(f"output {output!r} needs noise with twice the image's {x0.shape[1]} channels ([noise, probe])")
    x_t = add_noise(scheduler, x0, t, noise)
    pred = model_prediction(model, x_t, t, cond)
    target = probe if output in PROBED else regression_target(scheduler, x0, t, noise)
    return get_output(output)(pred, target)
