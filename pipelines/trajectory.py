"""Sampling pipelines that record the full sampling trajectory (journey) of a diffusion model.

journey-TRAK attributes each *step* of a generated image's sampling trajectory to the
training data.  That needs, for every step ``s`` (an index into ``scheduler.timesteps``):

* the sample ``x_t`` the scheduler fed to the unet at that step,
* the scheduler's prediction of the clean image ``x0_pred`` (``pred_original_sample``),
* the noise the scheduler injected at that step,

plus the ability to *restart* sampling from a recorded step with exactly the same injected
noise but (possibly) a different unet, e.g. one retrained without some training images, to
obtain the counterfactual image.

:class:`TrajectoryPipeline` is a :class:`diffusers.DiffusionPipeline` for ``UNet2DModel`` plus a
scheduler such as ``DDPMScheduler`` or ``DDIMScheduler`` (any scheduler whose ``step`` returns
``prev_sample`` and ``pred_original_sample`` and draws its noise with diffusers'
``randn_tensor``).  For the same generator it reproduces diffusers' own ``DDPMPipeline`` /
``DDIMPipeline`` samples exactly.

How the per-step noise is recorded and re-injected
--------------------------------------------------
*Recording.*  The scheduler's ``step`` is called exactly as diffusers' pipelines call it (with
the caller's generator), so samples match those pipelines bit for bit.  The generator state is
saved before each step; if the step consumed random numbers, the same ``randn_tensor`` draw is
replayed from the saved state on a copy of the generator, which yields the identical noise
tensor.  The copy must then end in the same state as the real generator (one draw of the
sample's shape), otherwise the scheduler is rejected as unsupported.  Steps that draw nothing
(DDIM with ``eta=0``, DDPM's last step) record zeros.

*Re-injection (restart).*  If ``scheduler.step`` accepts ``variance_noise`` (``DDIMScheduler``)
the recorded noise is passed that way.  Otherwise (``DDPMScheduler`` has no such argument) the
``randn_tensor`` name that the scheduler's module uses is temporarily replaced, for the
duration of that single ``step`` call, by a function that returns the recorded noise; the step
then computes ``mean + sigma_t * z`` with its own code, so the result is bit-identical to the
original run.  That replacement is module-global while it lasts: do not run another sampler
on the same scheduler class in another thread at the same moment.

This file imports only torch, diffusers and safetensors (no relative imports), so it can also be
loaded as a diffusers community pipeline::

    DiffusionPipeline.from_pretrained(model_dir, custom_pipeline="path/to/pipelines/trajectory.py")
"""

from __future__ import annotations

import inspect
import json
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

import diffusers
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["Trajectory", "TrajectoryOutput", "TrajectoryPipeline"]

TRAJECTORY_FORMAT = "diffusion_trak.trajectory"
TRAJECTORY_FORMAT_VERSION = 1
_METADATA_KEY = "diffusion_trak.trajectory"

GeneratorArg = Union[torch.Generator, List[torch.Generator], None]

_PATCH_LOCK = threading.RLock()


# --------------------------------------------------------------------------------------------
# Trajectory
# --------------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """Make a scheduler-config value JSON serialisable (tuples, numpy and torch values)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@dataclass(eq=False)
class Trajectory:
    """A recorded sampling trajectory of a batch of ``B`` images.

    Steps are indexed ``0..S-1`` in sampling order (step ``s`` uses timestep
    ``scheduler.timesteps[s]``); ``R`` is the number of recorded steps.  All tensors live on the
    CPU.

    Attributes:
        timesteps: ``(S,)`` the scheduler timestep of every step (int64 for DDPM/DDIM).
        step_indices: ``(R,)`` int64, sorted, the recorded step indices.
        x_t: ``(R, B, C, H, W)`` the sample at each recorded step, i.e. the scheduler state fed to
            the unet (through ``scheduler.scale_model_input``, the identity for DDPM/DDIM).
        x0_pred: ``(R, B, C, H, W)`` the scheduler's ``pred_original_sample`` at each recorded step.
        noises: ``(S, B, C, H, W)`` the noise the scheduler injected at *every* step (zeros where
            the step is deterministic, e.g. DDIM with ``eta=0`` or DDPM's last step).  Always
            complete because restarting needs it.
        initial_noise: ``(B, C, H, W)`` the initial Gaussian draw (before ``init_noise_sigma``).
        final: ``(B, C, H, W)`` the final sample (raw, in roughly ``[-1, 1]``, not clamped).
        seed: the integer seed of the generator used, or ``None`` when a caller-supplied
            generator was used.
        scheduler_class: name of the scheduler class, e.g. ``"DDPMScheduler"``.
        scheduler_config: the scheduler's config as a plain dict.
        num_inference_steps: ``S``.
        eta: DDIM's eta (0.0 for schedulers that have none).
        class_labels: ``(B,)`` int64 class labels passed to the unet, or ``None``.
        start_step: the step the sampling started at (0, or the restart step for a
            counterfactual trajectory produced by ``pipe(start_from=..., start_step=...)``).
        generator: the model that generated it, ``{"model": fingerprint of the unet's weights (base and
            adapter), "adapter": {"base", "adapter"} fingerprints of a LoRA adapter or None}``, or ``None``
            (not recorded); scoring it with checkpoints that do not include that model is refused.

    Saved format (:meth:`save`): one ``.safetensors`` file.  Its tensors are ``timesteps``,
    ``step_indices``, ``x_t``, ``x0_pred``, ``noises``, ``initial_noise``, ``final`` and, if
    present, ``class_labels``; the other fields are stored as a JSON string under the key
    ``"diffusion_trak.trajectory"`` in the safetensors header metadata.
    """

    timesteps: torch.Tensor
    step_indices: torch.Tensor
    x_t: torch.Tensor
    x0_pred: torch.Tensor
    noises: torch.Tensor
    initial_noise: torch.Tensor
    final: torch.Tensor
    seed: Optional[int] = None
    scheduler_class: str = ""
    scheduler_config: Dict[str, Any] = field(default_factory=dict)
    num_inference_steps: int = 0
    eta: float = 0.0
    class_labels: Optional[torch.Tensor] = None
    start_step: int = 0
    generator: Optional[Dict[str, Any]] = None

    def __post_init__(self) -> None:
        self.step_indices = torch.as_tensor(self.step_indices, dtype=torch.long).reshape(-1)
        S = int(self.timesteps.shape[0])
        if self.num_inference_steps == 0:
            self.num_inference_steps = S
        if self.noises.shape[0] != S:
            raise ValueError(f"noises has {self.noises.shape[0]} steps but timesteps has {S}")
        R = int(self.step_indices.numel())
        if self.x_t.shape[0] != R or self.x0_pred.shape[0] != R:
            raise ValueError(
                f"x_t/x0_pred have {self.x_t.shape[0]}/{self.x0_pred.shape[0]} entries but "
                f"{R} steps are recorded"
            )
        if R > 1 and not bool((self.step_indices[1:] > self.step_indices[:-1]).all()):
            raise ValueError("step_indices must be sorted and unique")

    # ---- queries ---------------------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        """``S``, the number of sampling steps."""
        return int(self.timesteps.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.final.shape[0])

    @property
    def recorded_steps(self) -> List[int]:
        return [int(s) for s in self.step_indices.tolist()]

    def step_of(self, step_index: int) -> int:
        """Position of ``step_index`` in the recorded arrays (``x_t``, ``x0_pred``).

        Raises:
            ValueError: if the step was not recorded.
        """
        step_index = int(step_index)
        hits = (self.step_indices == step_index).nonzero()
        if hits.numel() == 0:
            raise ValueError(
                f"trajectory lacks step {step_index}; recorded steps are {self.recorded_steps}; "
                f"regenerate with record_steps including {step_index}"
            )
        return int(hits[0, 0])

    def timestep_at(self, step_index: int) -> int:
        """The scheduler timestep used at step ``step_index`` (any step, recorded or not)."""
        step_index = int(step_index)
        if not 0 <= step_index < self.num_steps:
            raise ValueError(f"step {step_index} out of range: the trajectory has steps 0..{self.num_steps - 1}")
        t = self.timesteps[step_index]
        return int(t) if not t.is_floating_point() else float(t)

    def x_t_at(self, step_index: int) -> torch.Tensor:
        """``x_t`` at a recorded step, shape ``(B, C, H, W)``."""
        return self.x_t[self.step_of(step_index)]

    def x0_pred_at(self, step_index: int) -> torch.Tensor:
        """``x0_pred`` at a recorded step, shape ``(B, C, H, W)``."""
        return self.x0_pred[self.step_of(step_index)]

    # ---- persistence -----------------------------------------------------------------------

    def _metadata(self) -> Dict[str, Any]:
        return {
            "format": TRAJECTORY_FORMAT,
            "version": TRAJECTORY_FORMAT_VERSION,
            "seed": self.seed,
            "scheduler_class": self.scheduler_class,
            "scheduler_config": _json_safe(dict(self.scheduler_config)),
            "num_inference_steps": int(self.num_inference_steps),
            "eta": float(self.eta),
            "start_step": int(self.start_step),
            "has_class_labels": self.class_labels is not None,
            "generator": _json_safe(self.generator) if self.generator is not None else None,
        }

    def _tensors(self) -> Dict[str, torch.Tensor]:
        """The tensors :meth:`save` writes (subclasses add theirs)."""
        tensors = {
            "timesteps": self.timesteps,
            "step_indices": self.step_indices,
            "x_t": self.x_t,
            "x0_pred": self.x0_pred,
            "noises": self.noises,
            "initial_noise": self.initial_noise,
            "final": self.final,
        }
        if self.class_labels is not None:
            tensors["class_labels"] = torch.as_tensor(self.class_labels)
        return tensors

    def same_as(self, other: "Trajectory") -> bool:
        """Whether ``other`` is the same generation: the same model, seed, schedule, recorded steps and images."""
        mine, theirs = self._tensors(), other._tensors()
        return (self._metadata() == other._metadata() and mine.keys() == theirs.keys()
                and all(torch.equal(mine[k].cpu(), theirs[k].cpu()) for k in mine))

    def save(self, path: Union[str, Path], overwrite: bool = False) -> Path:
        """Write the trajectory to a single ``.safetensors`` file (see the class docstring), whole or not at all.

        A file there that is not a trajectory is refused (``overwrite`` or not: it is not ours); another
        trajectory there (one that may have been scored) is replaced only with ``overwrite``; the same
        trajectory is left as it is (:func:`diffusion_trak.store.claim`, one line each)."""
        from safetensors.torch import save_file

        from diffusion_trak.store import StoreError, claim, staged

        path = Path(path)
        if claim(str(path), "trajectory") and not overwrite:
            old = type(self).load(path)
            if self.same_as(old):
                return path
            raise StoreError(f"{path} already holds another trajectory (seed {old.seed}, {old.num_inference_steps} "
                             f"steps, recorded {old.recorded_steps}; its scores would no longer match it); nothing was "
                             "changed: rerun with --overwrite (overwrite=True) to replace it, or choose another --out")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self._tensors().items()}
        meta = {_METADATA_KEY: json.dumps(self._metadata())}
        tmp = staged(str(path), lambda f: None)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Trajectory":
        """Read a trajectory written by :meth:`save` (``Trajectory.load`` of a latent trajectory's file gives a
        :class:`~pipelines.latent_trajectory.LatentTrajectory`, with its prompts and embeddings)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            if _METADATA_KEY not in header:
                raise ValueError(f"{path} is not a diffusion_trak trajectory file (no '{_METADATA_KEY}' metadata)")
            meta = json.loads(header[_METADATA_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("version", 0) > TRAJECTORY_FORMAT_VERSION:
            raise ValueError(
                f"{path} has trajectory format version {meta['version']}; this code reads up to "
                f"{TRAJECTORY_FORMAT_VERSION}"
            )
        if cls is Trajectory and "latent" in meta:
            from .latent_trajectory import LatentTrajectory

            cls = LatentTrajectory
        return cls._from_saved(tensors, meta)

    @classmethod
    def _from_saved(cls, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> "Trajectory":
        """Build from the tensors and metadata of a saved file (subclasses read their extra fields)."""
        return cls(
            timesteps=tensors["timesteps"],
            step_indices=tensors["step_indices"],
            x_t=tensors["x_t"],
            x0_pred=tensors["x0_pred"],
            noises=tensors["noises"],
            initial_noise=tensors["initial_noise"],
            final=tensors["final"],
            seed=meta.get("seed"),
            scheduler_class=meta.get("scheduler_class", ""),
            scheduler_config=meta.get("scheduler_config", {}),
            num_inference_steps=int(meta.get("num_inference_steps", 0)),
            eta=float(meta.get("eta", 0.0)),
            class_labels=tensors.get("class_labels"),
            start_step=int(meta.get("start_step", 0)),
            generator=meta.get("generator"),
        )


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


@dataclass
class TrajectoryOutput(BaseOutput):
    """Output of :class:`TrajectoryPipeline`.

    Attributes:
        images: ``(B, C, H, W)`` the raw final sample (model space, roughly ``[-1, 1]``, not
            clamped), on the pipeline's execution device.
        trajectory: the recorded :class:`Trajectory`.
    """

    images: torch.Tensor
    trajectory: Trajectory

    @property
    def sample(self) -> torch.Tensor:
        """Alias of :attr:`images` (the raw final sample)."""
        return self.images

    def images_np(self) -> np.ndarray:
        """``(B, H, W, C)`` float array in ``[0, 1]``, exactly as diffusers' ``output_type="np"``."""
        image = (self.images / 2 + 0.5).clamp(0, 1)
        return image.cpu().permute(0, 2, 3, 1).float().numpy()

    def images_pil(self):
        """List of ``PIL.Image`` as diffusers' ``output_type="pil"`` produces them."""
        return DiffusionPipeline.numpy_to_pil(self.images_np())


# --------------------------------------------------------------------------------------------
# Noise capture / injection
# --------------------------------------------------------------------------------------------


def _as_generator_list(generator: GeneratorArg) -> List[torch.Generator]:
    if generator is None:
        return []
    return list(generator) if isinstance(generator, (list, tuple)) else [generator]


def _clone_generator(g: torch.Generator, state: torch.Tensor) -> torch.Generator:
    clone = torch.Generator(device=g.device)
    clone.set_state(state)
    return clone


def _states_equal(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@contextmanager
def _injected_randn(step_fn, noise: torch.Tensor):
    """Make ``randn_tensor`` as seen by ``step_fn``'s module return ``noise`` (one call)."""
    module_globals = getattr(step_fn, "__globals__", None)
    if module_globals is None or "randn_tensor" not in module_globals:
        raise NotImplementedError(
            f"cannot inject noise into {getattr(step_fn, '__qualname__', step_fn)}: it neither accepts "
            "`variance_noise` nor draws noise with diffusers' randn_tensor"
        )
    calls = []

    def replay(shape, generator=None, device=None, dtype=None, layout=None):
        if tuple(shape) != tuple(noise.shape):
            raise RuntimeError(
                f"scheduler asked for noise of shape {tuple(shape)}, recorded noise has shape {tuple(noise.shape)}"
            )
        if calls:
            raise RuntimeError("scheduler drew noise more than once in a single step; cannot inject recorded noise")
        calls.append(1)
        return noise.to(device=device if device is not None else noise.device, dtype=dtype or noise.dtype)

    with _PATCH_LOCK:
        original = module_globals["randn_tensor"]
        module_globals["randn_tensor"] = replay
        try:
            yield
        finally:
            module_globals["randn_tensor"] = original


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------


class TrajectoryPipeline(DiffusionPipeline):
    r"""Unconditional (optionally class-conditional) image sampling that records the trajectory.

    Args:
        unet: a ``UNet2DModel`` (anything called as ``unet(x, t[, class_labels=...]).sample``).
        scheduler: ``DDPMScheduler``, ``DDIMScheduler`` or any scheduler whose ``step`` returns
            ``prev_sample`` and ``pred_original_sample``.

    See the module docstring for how noise is recorded and re-injected.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    # ---- helpers ---------------------------------------------------------------------------

    def _sample_shape(self, batch_size: int) -> Tuple[int, ...]:
        size = self.unet.config.sample_size
        if isinstance(size, int):
            return (batch_size, self.unet.config.in_channels, size, size)
        return (batch_size, self.unet.config.in_channels, *size)

    @staticmethod
    def _step_params(scheduler) -> set:
        return set(inspect.signature(scheduler.step).parameters)

    def _scheduler_from_trajectory(self, traj: Trajectory):
        """A fresh scheduler with the trajectory's class and config (``self.scheduler`` untouched)."""
        cls = type(self.scheduler)
        if traj.scheduler_class and traj.scheduler_class != cls.__name__:
            cls = getattr(diffusers, traj.scheduler_class, None)
            if cls is None:
                raise ValueError(f"unknown scheduler class {traj.scheduler_class!r} in trajectory")
        if not traj.scheduler_config:
            return cls.from_config(self.scheduler.config)
        return cls.from_config(traj.scheduler_config)

    def _prepare_class_labels(self, class_labels, batch_size: int, device) -> Optional[torch.Tensor]:
        if class_labels is None:
            return None
        labels = torch.as_tensor(class_labels, dtype=torch.long)
        if labels.ndim == 0:
            labels = labels.expand(batch_size)
        labels = labels.reshape(-1)
        if labels.numel() != batch_size:
            raise ValueError(f"got {labels.numel()} class labels for a batch of {batch_size}")
        return labels.to(device)

    def _predict(self, x: torch.Tensor, t, scheduler, class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        model_input = scheduler.scale_model_input(x, t)
        if class_labels is None:
            return self.unet(model_input, t).sample
        return self.unet(model_input, t, class_labels=class_labels).sample

    def _step_recording(self, scheduler, model_output, t, x, step_kwargs, generators: List[torch.Generator]):
        """Run ``scheduler.step`` with the caller's generator(s); return (output, noise drawn)."""
        before = [g.get_state() for g in generators]
        gen_arg: GeneratorArg = None
        if generators:
            gen_arg = generators if len(generators) > 1 else generators[0]
        out = scheduler.step(model_output, t, x, generator=gen_arg, **step_kwargs)
        after = [g.get_state() for g in generators]
        if not generators or _states_equal(before, after):
            return out, torch.zeros_like(x)
        clones = [_clone_generator(g, s) for g, s in zip(generators, before)]
        replay_arg = clones if len(clones) > 1 else clones[0]
        noise = randn_tensor(tuple(x.shape), generator=replay_arg, device=model_output.device, dtype=model_output.dtype)
        if not _states_equal([c.get_state() for c in clones], after):
            raise NotImplementedError(
                f"{type(scheduler).__name__}.step consumed random numbers in a way that is not one "
                f"randn_tensor draw of the sample's shape {tuple(x.shape)}; its noise cannot be recorded"
            )
        return out, noise

    def _step_injecting(self, scheduler, model_output, t, x, step_kwargs, noise: torch.Tensor, accepts_variance_noise):
        """Run ``scheduler.step`` with a recorded noise tensor instead of a generator."""
        noise = noise.to(device=model_output.device, dtype=model_output.dtype)
        if accepts_variance_noise:
            return scheduler.step(model_output, t, x, variance_noise=noise, **step_kwargs)
        # Any draw that bypasses randn_tensor would advance this sentinel (or the global RNG).
        sentinel = torch.Generator(device="cpu").manual_seed(0)
        sentinel_state = sentinel.get_state()
        with _injected_randn(type(scheduler).step, noise):
            out = scheduler.step(model_output, t, x, generator=sentinel, **step_kwargs)
        if not torch.equal(sentinel.get_state(), sentinel_state):
            raise NotImplementedError(
                f"{type(scheduler).__name__}.step draws noise without randn_tensor; cannot inject recorded noise"
            )
        return out

    # ---- sampling --------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: GeneratorArg = None,
        seed: Optional[int] = None,
        num_inference_steps: int = 50,
        record_steps: Optional[Sequence[int]] = None,
        class_labels: Optional[Union[int, Sequence[int], torch.Tensor]] = None,
        eta: float = 0.0,
        start_from: Optional[Trajectory] = None,
        start_step: Optional[int] = None,
        show_progress: bool = True,
        return_dict: bool = True,
    ) -> Union[TrajectoryOutput, Tuple[torch.Tensor, Trajectory]]:
        r"""Sample images and record their trajectory, or restart a recorded trajectory.

        Args:
            batch_size: number of images (ignored on restart: the trajectory's batch is used).
            generator: a ``torch.Generator`` (or one per image), exactly as for diffusers'
                ``DDPMPipeline``/``DDIMPipeline``; with the same generator the samples are identical
                to theirs.
            seed: alternative to ``generator``: use ``torch.Generator("cpu").manual_seed(seed)``.
                If neither is given a seed is drawn from torch's global RNG and recorded, so every
                trajectory can be regenerated.
            num_inference_steps: ``S``.
            record_steps: step indices (``0..S-1``, positions in ``scheduler.timesteps``) whose
                ``x_t``/``x0_pred`` are recorded; ``None`` records all.  Noise is always recorded for
                every step.
            class_labels: optional int / sequence / tensor of class labels passed to the unet.
            eta: DDIM's eta (0 = deterministic DDIM, 1 = DDPM-like); only for schedulers whose
                ``step`` takes ``eta``.
            start_from, start_step: restart ``start_from`` at its recorded step ``start_step``: the
                sample ``start_from.x_t`` at that step is denoised through steps
                ``start_step..S-1`` with the trajectory's own recorded noise, scheduler
                class/config, ``num_inference_steps``, ``eta`` and ``class_labels`` (the
                corresponding arguments of this call are ignored).  With the unet that produced the
                trajectory the result equals ``start_from.final``; with another unet it is the
                counterfactual image.  ``generator``/``seed`` must not be given.
            show_progress: show diffusers' progress bar.
            return_dict: return a :class:`TrajectoryOutput` (else a tuple ``(images, trajectory)``).

        Returns:
            :class:`TrajectoryOutput` with ``images`` (the raw final sample, ``(B, C, H, W)``) and
            ``trajectory``.
        """
        device = self._execution_device
        dtype = self.unet.dtype

        if start_from is not None:
            return self._restart(start_from, start_step, record_steps, generator, seed, show_progress, return_dict)
        if start_step is not None:
            raise ValueError("start_step requires start_from (the trajectory to restart)")

        if generator is not None and seed is not None:
            raise ValueError("pass either `generator` or `seed`, not both")
        gen_list = _as_generator_list(generator)
        if gen_list and len(gen_list) > 1 and len(gen_list) != batch_size:
            raise ValueError(f"got {len(gen_list)} generators for a batch of {batch_size}")
        if not gen_list:
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()).item())
            gen_list = [torch.Generator(device="cpu").manual_seed(int(seed))]
        gen_arg = gen_list if len(gen_list) > 1 else gen_list[0]

        scheduler = self.scheduler
        step_params = self._step_params(scheduler)
        step_kwargs: Dict[str, Any] = {}
        if "eta" in step_params:
            step_kwargs["eta"] = eta
        elif eta != 0.0:
            raise ValueError(f"eta={eta} given but {type(scheduler).__name__}.step has no eta")

        labels = self._prepare_class_labels(class_labels, batch_size, device)

        # Same initial draw as diffusers' DDPMPipeline / DDIMPipeline.
        shape = self._sample_shape(batch_size)
        if device.type == "mps":
            initial_noise = randn_tensor(shape, generator=gen_arg, dtype=dtype).to(device)
        else:
            initial_noise = randn_tensor(shape, generator=gen_arg, device=device, dtype=dtype)

        scheduler.set_timesteps(num_inference_steps)
        timesteps = scheduler.timesteps
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        S = len(timesteps)
        record = self._record_set(record_steps, S, 0)

        x = initial_noise * scheduler.init_noise_sigma
        x_ts, x0s, noises = [], [], []
        iterator = self.progress_bar(range(S)) if show_progress else range(S)
        for i in iterator:
            t = timesteps[i]
            model_output = self._predict(x, t, scheduler, labels)
            out, noise = self._step_recording(scheduler, model_output, t, x, step_kwargs, gen_list)
            x0 = self._pred_original(out, scheduler)
            if i in record:
                x_ts.append(x.detach().cpu())
                x0s.append(x0.detach().cpu())
            noises.append(noise.detach().cpu())
            x = out.prev_sample

        self.maybe_free_model_hooks()
        traj = Trajectory(
            timesteps=timesteps.detach().cpu().clone(),
            step_indices=torch.tensor(sorted(record), dtype=torch.long),
            x_t=self._stack(x_ts, x),
            x0_pred=self._stack(x0s, x),
            noises=self._stack(noises, x),
            initial_noise=initial_noise.detach().cpu(),
            final=x.detach().cpu(),
            seed=None if generator is not None else int(seed),
            scheduler_class=type(scheduler).__name__,
            scheduler_config=_json_safe(dict(scheduler.config)),
            num_inference_steps=int(num_inference_steps),
            eta=float(eta),
            class_labels=None if labels is None else labels.detach().cpu(),
            start_step=0,
        )
        if not return_dict:
            return x, traj
        return TrajectoryOutput(images=x, trajectory=traj)

    def _restart(self, traj, start_step, record_steps, generator, seed, show_progress, return_dict):
        if start_step is None:
            raise ValueError("start_from requires start_step (a recorded step index of the trajectory)")
        if generator is not None or seed is not None:
            raise ValueError("a restart re-uses the trajectory's recorded noise; do not pass generator or seed")
        device = self._execution_device
        dtype = self.unet.dtype
        start_step = int(start_step)
        pos = traj.step_of(start_step)

        scheduler = self._scheduler_from_trajectory(traj)
        scheduler.set_timesteps(traj.num_inference_steps)
        timesteps = scheduler.timesteps
        if len(timesteps) != traj.num_steps or not torch.equal(
            timesteps.detach().cpu().to(traj.timesteps.dtype), traj.timesteps
        ):
            raise ValueError(
                "the scheduler rebuilt from the trajectory's config gives timesteps "
                f"{timesteps.tolist()} but the trajectory recorded {traj.timesteps.tolist()}"
            )
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start_step)
        step_params = self._step_params(scheduler)
        step_kwargs: Dict[str, Any] = {}
        if "eta" in step_params:
            step_kwargs["eta"] = traj.eta
        accepts_variance_noise = "variance_noise" in step_params

        labels = None if traj.class_labels is None else traj.class_labels.to(device=device, dtype=torch.long)
        S = traj.num_steps
        record = self._record_set(record_steps, S, start_step)

        x = traj.x_t[pos].to(device=device, dtype=dtype)
        x_ts, x0s = [], []
        steps = range(start_step, S)
        iterator = self.progress_bar(steps) if show_progress else steps
        for i in iterator:
            t = timesteps[i]
            model_output = self._predict(x, t, scheduler, labels)
            out = self._step_injecting(
                scheduler, model_output, t, x, step_kwargs, traj.noises[i], accepts_variance_noise
            )
            x0 = self._pred_original(out, scheduler)
            if i in record:
                x_ts.append(x.detach().cpu())
                x0s.append(x0.detach().cpu())
            x = out.prev_sample

        self.maybe_free_model_hooks()
        new = Trajectory(
            timesteps=traj.timesteps.clone(),
            step_indices=torch.tensor(sorted(record), dtype=torch.long),
            x_t=self._stack(x_ts, x),
            x0_pred=self._stack(x0s, x),
            noises=traj.noises.clone(),
            initial_noise=traj.initial_noise.clone(),
            final=x.detach().cpu(),
            seed=traj.seed,
            scheduler_class=traj.scheduler_class or type(scheduler).__name__,
            scheduler_config=dict(traj.scheduler_config) or _json_safe(dict(scheduler.config)),
            num_inference_steps=traj.num_inference_steps,
            eta=traj.eta,
            class_labels=None if traj.class_labels is None else traj.class_labels.clone(),
            start_step=start_step,
        )
        if not return_dict:
            return x, new
        return TrajectoryOutput(images=x, trajectory=new)

    # ---- small utilities ------------------------------------------------------------------

    @staticmethod
    def _record_set(record_steps, num_steps: int, first: int) -> set:
        if record_steps is None:
            return set(range(first, num_steps))
        steps = set()
        for s in record_steps:
            s = int(s)
            if not 0 <= s < num_steps:
                raise ValueError(f"record_steps contains {s}; steps are 0..{num_steps - 1}")
            if s < first:
                raise ValueError(f"record_steps contains {s}, before the restart step {first}")
            steps.add(s)
        return steps

    @staticmethod
    def _pred_original(out, scheduler) -> torch.Tensor:
        x0 = getattr(out, "pred_original_sample", None)
        if x0 is None:
            raise NotImplementedError(
                f"{type(scheduler).__name__}.step does not return pred_original_sample; "
                "TrajectoryPipeline needs it to record x0_pred"
            )
        return x0

    @staticmethod
    def _stack(items: List[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        if items:
            return torch.stack(items)
        return torch.empty((0, *like.shape), dtype=like.dtype)
