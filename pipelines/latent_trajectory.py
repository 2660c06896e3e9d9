"""Latent diffusion sampling that records the trajectory, with text or class conditioning and CFG.

:class:`LatentTrajectoryPipeline` is a :class:`diffusers.DiffusionPipeline` with the components of
Stable Diffusion (``vae``, ``unet``, ``scheduler``, optional ``text_encoder`` and ``tokenizer``). It
samples in latent space exactly as diffusers' ``StableDiffusionPipeline`` (text, classifier-free
guidance) and ``LDMPipeline`` (unconditional) do — for the same generator the latents and images are
the same — and records for every step:

* ``x_t``: the latent the scheduler fed to the unet,
* ``x0_pred``: the scheduler's ``pred_original_sample`` in latent space (what attribution re-noises),
* ``x0_decoded``: ``x0_pred`` decoded to pixels by the VAE (for plots),
* the noise injected at each step, so sampling can restart from any recorded step with a different
  unet and the same noise (the counterfactual image),
* the prompt, the negative (unconditional) prompt, the guidance scale and both prompt embeddings.

The recording / noise-injection machinery is :class:`pipelines.trajectory.TrajectoryPipeline`'s
(this class subclasses it and only replaces the model call). With classifier-free guidance the
unet sees ``[negative, prompt]`` embeddings in one batch of ``2B`` and the guided prediction is
``ε_u + g (ε_c − ε_u)``, as in ``StableDiffusionPipeline``.

The per-step attribution target uses the same conditioning as the generation: :meth:`LatentTrajectory.conditioning`
returns the *prompt's* embedding, so with guidance the attributed output is the loss of the
conditional prediction on ``x̂0_t`` re-noised (the guided combination is not a model of any training
example; its ``x̂0_t`` is what is explained).

Latents are in the unet's space, ``z = (vae_latent − shift_factor) · scaling_factor``; decoding divides
by the VAE's ``config.scaling_factor`` and adds ``config.shift_factor`` (when set) before
``vae.decode``, as diffusers' pipelines do. ``AutoencoderKL`` and ``VQModel`` both work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from diffusion_trak.pipelines.trajectory import GeneratorArg, Trajectory, TrajectoryPipeline

__all__ = ["LatentTrajectory", "LatentTrajectoryOutput", "LatentTrajectoryPipeline", "decode_latents",
           "vae_scale_shift"]


def vae_scale_shift(vae) -> Tuple[float, float]:
    """``(scaling_factor, shift_factor)`` of a VAE config (shift 0 when unset)."""
    cfg = vae.config
    scale = float(getattr(cfg, "scaling_factor", None) or 1.0)
    shift = getattr(cfg, "shift_factor", None)
    return scale, float(shift or 0.0)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Unet-space latents ``(..., c, h, w)`` → pixels ``(..., C, H, W)`` (raw, roughly ``[-1, 1]``)."""
    scale, shift = vae_scale_shift(vae)
    lead = latents.shape[:-3]
    flat = latents.reshape(-1, *latents.shape[-3:])
    p = next(vae.parameters())
    out = []
    for i in range(0, flat.shape[0], batch_size):
        z = flat[i:i + batch_size].to(device=p.device, dtype=p.dtype) / scale + shift
        out.append(vae.decode(z).sample.float().cpu())
    if not out:
        return torch.empty(0)
    pix = torch.cat(out)
    return pix.reshape(*lead, *pix.shape[1:])


# --------------------------------------------------------------------------------------------
# Trajectory
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class LatentTrajectory(Trajectory):
    """A :class:`~pipelines.trajectory.Trajectory` in latent space plus what latent diffusion needs.

    ``x_t``, ``x0_pred``, ``noises``, ``initial_noise`` and ``final`` are latents. Extra attributes:

    Attributes:
        prompts: the ``B`` prompts as the text encoder saw them (a prompt longer than the tokenizer's
            ``model_max_length`` is cut there, with a one-line warning), or ``None`` (unconditional / class-conditional).
        prompts_given: the prompts as given when one of them was cut, else ``None``.
        negative_prompts: the ``B`` unconditional prompts used for guidance (``""`` by default), or
            ``None`` without guidance.
        guidance_scale: classifier-free guidance scale (``1`` = no guidance).
        prompt_embeds: ``(B, L, D)`` the prompts' ``encoder_hidden_states``.
        negative_prompt_embeds: ``(B, L, D)`` those of the negative prompts (with guidance).
        x0_decoded: ``(R, B, C, H, W)`` the recorded ``x0_pred`` decoded to pixels.
        final_decoded: ``(B, C, H, W)`` the final image in pixels.

    Saved by :meth:`save` in the same single ``.safetensors`` file; the prompts and guidance scale go
    into the JSON metadata under ``"latent"``.
    """

    prompts: Optional[List[str]] = None
    negative_prompts: Optional[List[str]] = None
    guidance_scale: float = 1.0
    prompt_embeds: Optional[torch.Tensor] = None
    prompts_given: Optional[List[str]] = None
    negative_prompt_embeds: Optional[torch.Tensor] = None
    x0_decoded: Optional[torch.Tensor] = None
    final_decoded: Optional[torch.Tensor] = None

    _EXTRA_TENSORS = ("prompt_embeds", "negative_prompt_embeds", "x0_decoded", "final_decoded")

    @classmethod
    def from_trajectory(cls, traj: Trajectory, **extra) -> "LatentTrajectory":
        base = {f.name: getattr(traj, f.name) for f in dataclasses.fields(Trajectory)}
        return cls(**base, **extra)

    def conditioning(self) -> Optional[Dict[str, torch.Tensor]]:
        """The unet conditioning of the generation, for the per-step targets: the prompts'
        ``encoder_hidden_states`` (the conditional branch under guidance) and/or ``class_labels``."""
        cond = {}
        if self.prompt_embeds is not None:
            cond["encoder_hidden_states"] = self.prompt_embeds
        if self.class_labels is not None:
            cond["class_labels"] = torch.as_tensor(self.class_labels, dtype=torch.long)
        return cond or None

    def x0_decoded_at(self, step_index: int) -> torch.Tensor:
        if self.x0_decoded is None:
            raise ValueError("this trajectory holds no decoded x0 images; generate with decode=True")
        return self.x0_decoded[self.step_of(step_index)]

    def _tensors(self) -> Dict[str, torch.Tensor]:
        tensors = super()._tensors()
        for name in self._EXTRA_TENSORS:
            value = getattr(self, name)
            if value is not None:
                tensors[name] = value
        return tensors

    def _metadata(self) -> Dict[str, Any]:
        meta = super()._metadata()
        meta["latent"] = {"prompts": self.prompts, "negative_prompts": self.negative_prompts,
                          "guidance_scale": float(self.guidance_scale)}
        if self.prompts_given is not None:
            meta["latent"]["prompts_given"] = self.prompts_given
        return meta

    @classmethod
    def _from_saved(cls, tensors, meta) -> "LatentTrajectory":
        traj = super()._from_saved(tensors, meta)
        latent = meta.get("latent", {})
        traj.prompts = latent.get("prompts")
        traj.negative_prompts = latent.get("negative_prompts")
        traj.guidance_scale = float(latent.get("guidance_scale", 1.0))
        traj.prompts_given = latent.get("prompts_given")
        for name in cls._EXTRA_TENSORS:
            setattr(traj, name, tensors.get(name))
        return traj


@dataclass
class LatentTrajectoryOutput(BaseOutput):
    """Output of :class:`LatentTrajectoryPipeline`.

    Attributes:
        images: ``(B, C, H, W)`` the decoded final images (raw, roughly ``[-1, 1]``), or the latents
            when sampling with ``decode=False``.
        latents: ``(B, c, h, w)`` the final latents.
        trajectory: the recorded :class:`LatentTrajectory`.
    """

    images: torch.Tensor
    latents: torch.Tensor
    trajectory: LatentTrajectory

    def images_np(self) -> np.ndarray:
        """``(B, H, W, C)`` in ``[0, 1]``, as diffusers' ``output_type="np"``."""
        return (self.images / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()

    def images_pil(self):
        return DiffusionPipeline.numpy_to_pil(self.images_np())


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------


class LatentTrajectoryPipeline(TrajectoryPipeline):
    r"""Latent sampling (text-, class- or un-conditional, with classifier-free guidance) that records
    the trajectory and restarts it.

    Args:
        vae: ``AutoencoderKL`` or ``VQModel`` (only ``decode`` is used here).
        unet: ``UNet2DConditionModel`` (text, ``encoder_hidden_states``) or ``UNet2DModel``
            (unconditional or ``class_labels``).
        scheduler: ``DDPMScheduler``, ``DDIMScheduler`` or another scheduler that
            :class:`~pipelines.trajectory.TrajectoryPipeline` supports.
        text_encoder, tokenizer: called the diffusers way (``tokenizer(prompts, padding="max_length",
            max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")``, then
            ``text_encoder(input_ids)[0]``); e.g. ``CLIPTextModel`` + ``CLIPTokenizer``, or
            :mod:`diffusion_trak.text`'s built-in pair. Optional when prompts are given as embeddings.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["text_encoder", "tokenizer"]

    def __init__(self, vae, unet, scheduler, text_encoder=None, tokenizer=None):
        DiffusionPipeline.__init__(self)
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
        self._text: Optional[Dict[str, Any]] = None

    # ---- conditioning --------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], max_length: Optional[int] = None) -> torch.Tensor:
        """``(B, L, D)`` embeddings, computed exactly as ``StableDiffusionPipeline.encode_prompt`` does."""
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("this pipeline has no tokenizer/text_encoder; pass prompt_embeds, or build the "
                             "pipeline with text_encoder= and tokenizer=")
        device = self._execution_device
        enc = self.tokenizer(list(prompts), padding="max_length",
                             max_length=max_length or self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        cfg = getattr(self.text_encoder, "config", None)
        weight = next(self.text_encoder.parameters(), None)  # the ids go where the text encoder is
        tdev = device if weight is None else weight.device
        mask = enc.attention_mask.to(tdev) if getattr(cfg, "use_attention_mask", False) else None
        emb = self.text_encoder(enc.input_ids.to(tdev), attention_mask=mask)[0]
        return emb.to(dtype=self.text_encoder.dtype, device=device)

    def seen_prompts(self, prompts: Sequence[str]) -> List[str]:
        """``prompts`` as the text encoder sees them: one longer than the tokenizer's ``model_max_length`` tokens is
        cut there (as :meth:`encode_prompt` cuts it), replaced by the text of the tokens kept, with a one-line warning
        (:func:`diffusion_trak.text.seen_prompts`)."""
        if self.tokenizer is None:
            return list(prompts)
        from diffusion_trak.text import seen_prompts

        return seen_prompts(self.tokenizer, prompts, note=" (recorded as the trajectory's prompt)")[0]

    def _uses_guidance(self, guidance_scale: float) -> bool:
        return guidance_scale > 1.0 and getattr(self.unet.config, "time_cond_proj_dim", None) is None

    def _predict(self, x: torch.Tensor, t, scheduler, class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        text = self._text
        if text is None:
            return super()._predict(x, t, scheduler, class_labels)
        emb, neg, g = text["embeds"], text["negative"], text["guidance_scale"]
        extra = {} if class_labels is None else {"class_labels": class_labels}
        if neg is None:
            model_input = scheduler.scale_model_input(x, t)
            return self.unet(model_input, t, encoder_hidden_states=emb, **extra).sample
        model_input = scheduler.scale_model_input(torch.cat([x] * 2), t)
        if class_labels is not None:
            extra = {"class_labels": torch.cat([class_labels] * 2)}
        out = self.unet(model_input, t, encoder_hidden_states=torch.cat([neg, emb]), **extra).sample
        uncond, cond = out.chunk(2)
        return uncond + g * (cond - uncond)

    def _finish(self, x: torch.Tensor, traj: Trajectory, extra: Dict[str, Any], decode: bool, return_dict: bool):
        if decode:
            extra["x0_decoded"] = decode_latents(self.vae, traj.x0_pred)
            extra["final_decoded"] = decode_latents(self.vae, traj.final)
        new = LatentTrajectory.from_trajectory(traj, **extra)
        images = extra["final_decoded"] if decode else x.detach().cpu()
        if not return_dict:
            return images, new
        return LatentTrajectoryOutput(images=images, latents=x, trajectory=new)

    # ---- sampling ------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, Sequence[str], None] = None,
        batch_size: int = 1,
        generator: GeneratorArg = None,
        seed: Optional[int] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        negative_prompt: Union[str, Sequence[str], None] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        class_labels: Optional[Union[int, Sequence[int], torch.Tensor]] = None,
        record_steps: Optional[Sequence[int]] = None,
        eta: float = 0.0,
        start_from: Optional[Trajectory] = None,
        start_step: Optional[int] = None,
        decode: bool = True,
        show_progress: bool = True,
        return_dict: bool = True,
    ) -> Union[LatentTrajectoryOutput, Tuple[torch.Tensor, LatentTrajectory]]:
        r"""Sample and record, or restart a recorded trajectory.

        Args:
            prompt: a prompt or one per image (``batch_size`` is then ``len(prompt)``); needs the
                tokenizer and text encoder unless ``prompt_embeds`` is given.
            batch_size: images per prompt string / for unconditional sampling.
            generator, seed: as for :class:`~pipelines.trajectory.TrajectoryPipeline` (and diffusers'
                pipelines: the same generator gives the same images as ``StableDiffusionPipeline``).
            num_inference_steps: ``S``.
            guidance_scale: classifier-free guidance scale; ``> 1`` runs the unconditional branch on
                ``negative_prompt`` (default ``""``) and records it.
            negative_prompt, prompt_embeds, negative_prompt_embeds: as in ``StableDiffusionPipeline``.
            class_labels: for class-conditional unets.
            record_steps: step indices whose ``x_t``/``x0_pred``/``x0_decoded`` are recorded (all by default).
            eta: DDIM eta.
            start_from, start_step: restart ``start_from`` (a :class:`LatentTrajectory`) at recorded step
                ``start_step`` with its recorded noise, prompts, embeddings and guidance (the other
                arguments are ignored); with another unet this gives the counterfactual image.
            decode: decode ``x0_pred`` and the final latents to pixels (``x0_decoded``, ``images``).
        """
        if start_from is not None:
            return self._restart_latent(start_from, start_step, record_steps, generator, seed, decode,
                                        show_progress, return_dict)

        prompts = None
        if prompt is not None:
            prompts = [prompt] * batch_size if isinstance(prompt, str) else [str(p) for p in prompt]
            batch_size = len(prompts)
        elif prompt_embeds is not None:
            batch_size = int(prompt_embeds.shape[0])
        elif class_labels is not None and torch.as_tensor(class_labels).ndim > 0 and batch_size == 1:
            batch_size = int(torch.as_tensor(class_labels).numel())  # one image per label
        device = self._execution_device
        dtype = self.unet.dtype
        use_text = prompts is not None or prompt_embeds is not None
        guided = self._uses_guidance(guidance_scale)
        if guided and not use_text:
            raise ValueError("classifier-free guidance (guidance_scale > 1) needs a prompt; "
                             "pass prompt= or set guidance_scale=1")
        if use_text and getattr(self.unet.config, "cross_attention_dim", None) is None:
            raise ValueError(f"{type(self.unet).__name__} takes no text; use a UNet2DConditionModel or drop the prompt")
        text = None
        negatives = None
        if use_text:
            emb = prompt_embeds.to(device=device, dtype=dtype) if prompt_embeds is not None else self.encode_prompt(prompts)
            neg = None
            if guided:
                if negative_prompt_embeds is not None:
                    neg = negative_prompt_embeds.to(device=device, dtype=dtype)
                else:
                    if negative_prompt is None:
                        negatives = [""] * batch_size
                    elif isinstance(negative_prompt, str):
                        negatives = [negative_prompt] * batch_size
                    else:
                        negatives = [str(p) for p in negative_prompt]
                    if len(negatives) != batch_size:
                        raise ValueError(f"{len(negatives)} negative prompts for a batch of {batch_size}")
                    neg = self.encode_prompt(negatives, max_length=emb.shape[1])
            text = {"embeds": emb.to(dtype), "negative": None if neg is None else neg.to(dtype),
                    "guidance_scale": float(guidance_scale)}

        self._text = text
        try:
            x, traj = TrajectoryPipeline.__call__(
                self, batch_size=batch_size, generator=generator, seed=seed, num_inference_steps=num_inference_steps,
                record_steps=record_steps, class_labels=class_labels, eta=eta, show_progress=show_progress,
                return_dict=False)
        finally:
            self._text = None
        seen = None if prompts is None or prompt_embeds is not None else self.seen_prompts(prompts)
        extra = dict(prompts=seen if seen is not None else prompts, negative_prompts=negatives,
                     prompts_given=prompts if seen is not None and seen != prompts else None,
                     guidance_scale=float(guidance_scale) if guided else 1.0,
                     prompt_embeds=None if text is None else text["embeds"].detach().float().cpu(),
                     negative_prompt_embeds=None if text is None or text["negative"] is None
                     else text["negative"].detach().float().cpu())
        return self._finish(x, traj, extra, decode, return_dict)

    def _restart_latent(self, traj, start_step, record_steps, generator, seed, decode, show_progress, return_dict):
        device, dtype = self._execution_device, self.unet.dtype
        text = None
        extra: Dict[str, Any] = {}
        if isinstance(traj, LatentTrajectory):
            extra = dict(prompts=traj.prompts, negative_prompts=traj.negative_prompts,
                         guidance_scale=traj.guidance_scale, prompt_embeds=traj.prompt_embeds,
                         negative_prompt_embeds=traj.negative_prompt_embeds)
            if traj.prompt_embeds is not None:
                neg = traj.negative_prompt_embeds
                text = {"embeds": traj.prompt_embeds.to(device=device, dtype=dtype),
                        "negative": None if neg is None else neg.to(device=device, dtype=dtype),
                        "guidance_scale": float(traj.guidance_scale)}
        self._text = text
        try:
            x, new = TrajectoryPipeline.__call__(self, start_from=traj, start_step=start_step, record_steps=record_steps,
                                                 generator=generator, seed=seed, show_progress=show_progress,
                                                 return_dict=False)
        finally:
            self._text = None
        return self._finish(x, new, extra, decode, return_dict)
