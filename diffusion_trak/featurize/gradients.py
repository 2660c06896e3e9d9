"""Per-example gradients of an output function, with ``torch.func`` (``vmap(grad(...))``).

For example ``i`` with T (timestep, noise) pairs, :func:`per_sample_gradients` returns the
flattened gradient of ``(1/T) Σ_j f(θ; x0_i, t_ij, ε_ij)`` with respect to every trainable
parameter of the UNet. Inside the vmap each example runs one forward over its T noised copies.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch.func import functional_call, grad, vmap

from ..errors import InputError
from ..outputs import output_value


def use_vmap_friendly_attention(model: torch.nn.Module) -> None:
    """Switch diffusers ``Attention`` modules to the classic ``AttnProcessor``: SDPA falls back to a
    slow path under vmap. Results are the same up to float error."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    for m in model.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor())


def lora_parameter_names(model: torch.nn.Module) -> List[str]:
    """Names of the parameters of the active ``peft`` adapters injected in ``model`` (``lora_A``/``lora_B``,
    LoRA embeddings, DoRA magnitudes: each tuner layer's ``adapter_layer_names``), in ``named_parameters``
    order; ``[]`` without peft or without adapters."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    ids = set()
    for m in model.modules():
        if not isinstance(m, BaseTunerLayer):
            continue
        for attr in m.adapter_layer_names:
            holder = getattr(m, attr, None)
            for adapter in m.active_adapters:
                if holder is None or adapter not in holder:
                    continue
                part = holder[adapter]
                ids.update(id(p) for p in (part.parameters() if isinstance(part, torch.nn.Module) else [part]))
    return [n for n, p in model.named_parameters() if id(p) in ids]


def select_parameters(model: torch.nn.Module, params: str = "all") -> List[str]:
    """Make ``params`` the parameters that gradients cover, by setting ``requires_grad`` on ``model`` (the
    featurizer's private copy): ``auto`` the active peft adapter's when there is one, else every parameter;
    ``all`` every parameter, ``lora`` only the active peft adapter's, ``trainable``
    those that already have ``requires_grad``. Both featurization paths differentiate exactly the parameters
    with ``requires_grad`` (:func:`trainable_parameters`, :class:`~diffusion_trak.featurize.fast.FastGradientSketch`).
    Returns the selected names in ``named_parameters`` order."""
    named = list(model.named_parameters())
    if params == "auto":  # the adapter when there is one, else every parameter (FeaturizeArgs' default)
        params = "lora" if lora_parameter_names(model) else "all"
    if params == "all":
        chosen = {n for n, _ in named}
    elif params == "trainable":
        chosen = {n for n, p in named if p.requires_grad}
    elif params == "lora":
        chosen = set(lora_parameter_names(model))
        if not chosen:
            raise InputError("the model has no active peft LoRA adapter (e.g. unet.add_adapter(LoraConfig(...)) or "
                             "pipe.load_lora_weights(...)); load the adapter or use --params all")
    else:
        raise InputError(f"params must be one of auto, all, lora, trainable, got {params!r}")
    if not chosen:
        raise InputError("the model has no parameter with requires_grad; use --params all")
    for n, p in named:
        p.requires_grad_(n in chosen)
    return [n for n, _ in named if n in chosen]


def trainable_parameters(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def per_sample_gradients(model, scheduler, x0: torch.Tensor, timesteps: torch.Tensor, noises: torch.Tensor,
                         output: str = "loss", cond: Optional[dict] = None,
                         cond_per_timestep: bool = False) -> torch.Tensor:
    """Flattened per-example gradients, shape ``(B, p)``.

    Args:
        x0: ``(B, C, H, W)`` clean inputs (pixels, or latents for latent diffusion).
        timesteps: ``(B, T)`` integer training timesteps.
        noises: ``(B, T, C, H, W)`` noises.
        cond: optional dict of conditioning tensors with leading dim B (``class_labels`` ``(B,)``,
            ``encoder_hidden_states`` ``(B, L, D)``); with ``cond_per_timestep`` they are
            ``(B, T, ...)``: one conditioning per (example, timestep), e.g. a caption drawn per timestep.
    """
    params = trainable_parameters(model)
    rest = {n: b.detach() for n, b in model.named_buffers()}
    rest.update({n: p.detach() for n, p in model.named_parameters() if not p.requires_grad})
    cond = cond or {}
    T = timesteps.shape[1]

    def loss_one(params, x0_i, t_i, eps_i, cond_i):
        xs = x0_i.unsqueeze(0).expand(T, *x0_i.shape)
        c = {k: v if cond_per_timestep else v.unsqueeze(0).expand(T, *v.shape) for k, v in cond_i.items()}
        bound = _Bound(model, {**params, **rest})
        return output_value(bound, scheduler, xs, t_i, eps_i, output, c).mean()

    g = vmap(grad(loss_one), in_dims=(None, 0, 0, 0, 0))(params, x0, timesteps, noises, cond)
    return torch.cat([g[n].reshape(x0.shape[0], -1) for n in params], dim=1)


class _Bound:
    """Calls ``model`` with the given parameter/buffer dict (``torch.func.functional_call``)."""

    def __init__(self, model, tensors):
        self.model, self.tensors = model, tensors

    def __call__(self, *args, **kwargs):
        return functional_call(self.model, self.tensors, args, kwargs)
