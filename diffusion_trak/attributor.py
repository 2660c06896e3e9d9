"""The one object: model checkpoint(s) + training data + settings + output folder.

::

    from diffusion_trak import Attributor

    attr = Attributor.from_pretrained("my-ddpm-pipeline/", train_data="my_images/", out="runs/mine")
    attr.featurize()                                   # resumable; other settings over the same folder refuse
    scores = attr.attribute(attr.pipeline(seed=0, num_inference_steps=100, record_steps=[0, 50, 99]))
    scores.top(8)                                      # journey (every recorded step); scores.destination: the final image
    attr.report(scores)                                # per-step PNG + journey page under runs/mine/report/

The same five lines serve a ``DDPMPipeline``/``DDIMPipeline`` folder, an LDM or a Stable-Diffusion-style folder
(VAE + CLIP text encoder + ``UNet2DConditionModel``), checkpoint folders (``unet/`` + ``scheduler/``, several =
an ensemble) and models in memory (:class:`Attributor` itself, :meth:`Attributor.from_pipeline`). The model
kind is a :class:`~diffusion_trak.models.Conditioning`; every computation is :mod:`diffusion_trak.api`'s.

``out`` is a run folder with the CLI's layout (``diffusion-trak ... --run OUT`` reads it)::

    features/            the feature store (settings: FeaturizeArgs, data, checkpoints; checked on rerun)
    latents/             the VAE latents of the training images (latent models)
    trajectories/        trajectories of :meth:`pipeline` (when saved)
    scores/<name>/       scores saved by :meth:`attribute` (``out=attr.scores_dir(name)``; settings: ScoreArgs)
    report/<name>.png/.html
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

from . import api
from .config import FeaturizeArgs, ScoreArgs
from .errors import InputError
from .models import (Conditioning, adapter_of, as_checkpoints, check_compatible, conditioning_of, is_pipeline_folder,
                     load_checkpoint, load_lora, load_pipeline, training_scheduler, unet_conditioning, unet_sample_size)

__all__ = ["Attributor"]

#: samplers whose ``step`` returns ``pred_original_sample`` (what the per-step targets re-noise)
_RECORDING_SAMPLERS = ("DDPMScheduler", "DDIMScheduler")



class Attributor:
    """Attribute what a diffusion model generates to its training images, step by step (journey-TRAK).

    Args:
        checkpoints: ``(unet, scheduler)`` pairs or checkpoint folders; several = an ensemble (the scores are the
            mean of each checkpoint's). The last one is the model :meth:`pipeline` samples from.
        train_data: the training images: a dataset (:class:`~diffusion_trak.data.ImageDataset`), a Hugging Face
            ``datasets.Dataset``/``DatasetDict`` in memory (:func:`~diffusion_trak.data.from_hf`: its image column,
            captions from its ``text`` column; ``from_hf(ds, image_column=..., text_column=...)`` names others), a
            :class:`~diffusion_trak.data.DataArgs` (or dict), an image folder, an ``.npz`` file, or a bundled
            set's name (``digits``); loaded when first needed (None: sampling only). Images are never resized
            unless asked (``DataArgs(image_size=...)``, ``--image-size``): a size the model does not take is refused
            in one line, as the CLI refuses it.
        out: the run folder.
        vae, text_encoder, tokenizer: the frozen parts of a latent / text-conditional model.
        captions, caption_mode: training captions of a text model (default: the data's own, else its class
            names), see :class:`~diffusion_trak.models.Conditioning`.
        conditioning: instead of ``vae`` ... ``caption_mode``.
        sampler: the scheduler :meth:`pipeline` samples with (default: the model's, or DDIM when that one does
            not record x̂0).
        featurize_args, score_args: the settings (saved with the features and the scores; a rerun with other
            settings refuses unless ``overwrite``).
        features_dir, latents_dir: the feature store and the latent cache (default ``out/features``, ``out/latents``).
    """

    def __init__(self, checkpoints, train_data, out: str = "runs/attribution", *, vae=None, text_encoder=None,
                 tokenizer=None, captions=None, caption_mode: str = "random", conditioning: Optional[Conditioning] = None,
                 sampler=None, featurize_args: Optional[FeaturizeArgs] = None, score_args: Optional[ScoreArgs] = None,
                 features_dir: Optional[str] = None, latents_dir: Optional[str] = None, device="cpu",
                 overwrite: bool = False, progress: bool = True):
        if isinstance(checkpoints, (str, os.PathLike)) or (isinstance(checkpoints, tuple) and len(checkpoints) == 2
                                                          and isinstance(checkpoints[0], torch.nn.Module)):
            checkpoints = [checkpoints]
        self.device, self.out, self.overwrite, self.progress = device, os.fspath(out), overwrite, progress
        # the modules live on the device (moved in place, as the text encoder is); data and results on the CPU
        self.checkpoints = [(unet.to(device), sched) for unet, sched in as_checkpoints(checkpoints, device)]
        self.components = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
        self.conditioning = conditioning or conditioning_of(self.components, captions, caption_mode, device)
        if self.conditioning.vae is not None:  # encodes the training images, decodes what pipeline() samples
            self.conditioning.vae.to(device)
        self.sampler = sampler if sampler is not None else self.checkpoints[-1][1]
        # params="auto" (the default, whatever else featurize_args sets): the adapter's parameters when one is
        # loaded (lora=, or into the unet given), else all; params="all" only when asked for
        self.featurize_args = api.resolve_params(self.checkpoints, featurize_args or FeaturizeArgs())
        self.score_args = score_args or ScoreArgs()
        self.features_dir = os.fspath(features_dir) if features_dir else os.path.join(self.out, "features")
        self.latents_dir = os.fspath(latents_dir) if latents_dir else os.path.join(self.out, "latents")
        self.train_data, self._dataset = train_data, None
        #: what messages call the model :meth:`pipeline` samples from (its folder, with :meth:`from_pretrained`)
        self.name = "the model"
        #: the LoRA adapter given to :meth:`from_pretrained` (``lora=``), named in the report's header
        self.lora_path = None
        self._inputs, self._features, self._last = None, None, None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_pretrained(cls, path_or_paths, train_data, out: str = "runs/attribution", lora=None,
                        **kwargs) -> "Attributor":
        """From folders that diffusers saves: a pipeline folder (``model_index.json``: DDPM/DDIM, LDM, Stable
        Diffusion), checkpoint folders (``unet/`` + ``scheduler/``), or a ``diffusion-trak train`` run folder
        (its ``model/ckpt-*``). Several folders = several checkpoints; the VAE and text model come from the
        first pipeline folder unless given as keyword arguments.

        ``lora``: a LoRA adapter as diffusers' LoRA training scripts save it (the folder, or its
        ``pytorch_lora_weights.safetensors``; also their ``checkpoint-N/`` folders, ``unet.save_lora_adapter``'s and
        peft's ``save_pretrained`` folders and kohya-style files), loaded onto every checkpoint
        (:func:`~diffusion_trak.models.load_lora`);
        the features then cover the adapter's parameters only (``FeaturizeArgs.params="auto"``, the default, whatever
        other settings ``featurize_args`` changes) unless it says ``params="all"``, and the feature store records the
        base model's and the adapter's fingerprints."""
        from .train import list_checkpoints

        paths = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
        if not paths:
            raise InputError("no model folder given; pass a pipeline folder or checkpoint folders (unet/ + scheduler/)")
        device = kwargs.get("device", "cpu")
        ckpts, first = [], None
        for p in map(os.fspath, paths):
            if is_pipeline_folder(p):
                comp = load_pipeline(p, device)
                ckpts.append((comp["unet"], training_scheduler(comp["scheduler"])))
                first = first or comp
            elif not os.path.isdir(os.path.join(p, "unet")) and list_checkpoints(os.path.join(p, "model")):
                ckpts += [load_checkpoint(ck, device) for ck in list_checkpoints(os.path.join(p, "model"))]
            else:
                ckpts.append(load_checkpoint(p, device))
        if lora is not None:
            for unet, _ in ckpts:
                load_lora(unet, lora)
        if first is not None:
            for k in ("vae", "text_encoder", "tokenizer"):
                if kwargs.get(k) is None:
                    kwargs[k] = first.get(k)
            if kwargs.get("sampler") is None:
                kwargs["sampler"] = first["scheduler"]
        attr = cls(ckpts, train_data, out, **kwargs)
        attr.name = os.fspath(paths[-1])
        attr.lora_path = None if lora is None else os.fspath(lora)
        return attr

    @classmethod
    def from_pipeline(cls, pipe, train_data, out: str = "runs/attribution", **kwargs) -> "Attributor":
        """From a diffusers pipeline in memory (``DDPMPipeline``, ``StableDiffusionPipeline``, ...)."""
        comp = pipe.components
        for k in ("text_encoder", "tokenizer"):
            kwargs.setdefault(k, comp.get(k))
        kwargs.setdefault("vae", comp.get("vae", comp.get("vqvae")))
        kwargs.setdefault("sampler", comp["scheduler"])
        return cls([(comp["unet"], training_scheduler(comp["scheduler"]))], train_data, out, **kwargs)

    def __repr__(self) -> str:
        return (f"Attributor({len(self.checkpoints)} checkpoint(s) of {type(self.unet).__name__}, {self.conditioning}, "
                f"{self._dataset if self._dataset is not None else self.train_data!r}, out={self.out!r})")

    # ------------------------------------------------------------------ data
    @property
    def unet(self):
        return self.checkpoints[-1][0]

    @property
    def has_adapter(self) -> bool:
        """Whether the unets carry an active peft LoRA adapter (``lora=``, or loaded into the model given)."""
        from .featurize.gradients import lora_parameter_names

        return all(lora_parameter_names(u) for u, _ in self.checkpoints)

    @property
    def dataset(self):
        """The training images (pixels; what reports show)."""
        if self._dataset is None:
            self._dataset = self._load_data(self.train_data)
        return self._dataset

    def _load_data(self, train_data):
        from .data import DataArgs, load_dataset

        if train_data is None:
            raise InputError("this Attributor has no training data; pass train_data= (a dataset, an image folder, "
                             "an .npz file or a bundled set's name)")
        if hasattr(train_data, "images") and hasattr(train_data, "indices"):
            return train_data
        if type(train_data).__module__.startswith("datasets.") and type(train_data).__name__ in ("Dataset", "DatasetDict"):
            from .data import from_hf  # a Hugging Face dataset in memory: image column, text column for captions

            return from_hf(train_data)
        if isinstance(train_data, (str, os.PathLike)):
            path = os.fspath(train_data)
            if os.path.isdir(path):  # read as it is, as the CLI reads --data-path: never resized unless asked
                train_data = DataArgs(name="folder", path=path)
            elif path.endswith(".npz"):
                train_data = DataArgs(name="npz", path=path)
            else:
                train_data = DataArgs(name=path)
        elif isinstance(train_data, dict):
            train_data = DataArgs.from_dict(train_data)
        if not isinstance(train_data, DataArgs):
            raise InputError(f"train_data is a {type(train_data).__module__}.{type(train_data).__name__}; pass an "
                             "ImageDataset, a Hugging Face datasets.Dataset, an image folder, an .npz file, a DataArgs "
                             "or a bundled set's name (digits)")
        return load_dataset(train_data)

    @property
    def inputs(self):
        """The training set in the unet's space: the dataset, or its VAE latents (cached in ``out/latents``)."""
        if self._inputs is None:
            if self.conditioning.vae is not None:  # check on one image before the cache is written
                probe = self.conditioning.encode(self.dataset.subset([0]))
                for unet, _ in self.checkpoints:
                    check_compatible(unet, probe)
                self.conditioning.training(self.unet, probe, 1, 0)
            self._inputs = self.conditioning.encode(self.dataset, self.latents_dir, self.overwrite, self.progress)
        return self._inputs

    # ------------------------------------------------------------------ featurize
    def featurize(self, rows: Optional[Sequence[int]] = None, self_check: bool = True) -> api.FeatureSet:
        """TRAK features of every training image for every checkpoint (:func:`diffusion_trak.api.featurize`);
        a rerun resumes, other settings refuse unless ``overwrite``. Under ``accelerate launch`` each process
        computes its share. Then (with ``progress``, in one process) a quick self-check is printed: a few training
        images scored against themselves, with a warning line when near chance (``self_check=False``: none)."""
        api.check_params(self.checkpoints, self.featurize_args)  # before latents/ is written
        self.featurize_args = api.resolve_params(self.checkpoints, self.featurize_args)
        inputs = self.inputs  # checks the data against the model (captions, sizes) before the line below
        if self.progress:
            from . import distributed

            if distributed.state().is_main_process:  # the start-of-run line: what is attributed, and to how many images
                what = api.describe_parameters(*api.attributed_parameters(self.checkpoints, self.featurize_args))
                print(f"featurizing {len(self.dataset)} training images with {len(self.checkpoints)} checkpoint(s): "
                      f"attributing {what}" + ("; --params all (FeaturizeArgs(params='all')) attributes every one"
                                               if self.featurize_args.params == "lora" else ""), flush=True)
        fs = api.featurize(self.checkpoints, inputs, self.featurize_args, self.features_dir, overwrite=self.overwrite,
                           device=self.device, progress=self.progress, conditioning=self.conditioning, rows=rows)
        self._features = fs
        if self_check and self.progress and rows is None and len(inputs) > 1:
            from . import distributed

            if distributed.state().num_processes == 1:
                self._self_check()
        return fs

    def estimate(self):
        """What :meth:`featurize` would compute and the memory it plans for, computing nothing but one forward of one
        training example and writing nothing: an :class:`~diffusion_trak.featurize.featurizer.Estimate` (pairs,
        kernel rows, cost in forward + backward passes of the model, planned peak memory; ``str()`` says it)."""
        api.check_params(self.checkpoints, self.featurize_args)
        args = api.resolve_params(self.checkpoints, self.featurize_args)
        return api.estimate(self.checkpoints, self.dataset, args, device=self.device, conditioning=self.conditioning)

    @property
    def features(self) -> api.FeatureSet:
        """The features of :meth:`featurize` (or those already in ``out/features``)."""
        if self._features is None:
            if not os.path.isdir(self.features_dir):
                raise InputError(f"no features in {self.features_dir}; call featurize() first")
            self._features = api.FeatureSet.open(self.features_dir)
        return self._features

    # ------------------------------------------------------------------ sample
    def pipeline(self, *args, **kwargs):
        """Sample from the last checkpoint recording the trajectory: :class:`~diffusion_trak.pipelines.TrajectoryPipeline`
        for a pixel model, :class:`~diffusion_trak.pipelines.latent_trajectory.LatentTrajectoryPipeline` (prompts,
        guidance) for a latent or text model; arguments are the pipeline's. Returns its output
        (``.trajectory``), which :meth:`attribute` takes as it is. A prompt a text model lacks, a class label or
        a number of steps the model does not take are refused in one line, as ``diffusion-trak generate`` refuses them."""
        self._check_sampling(args[0] if args else kwargs.get("prompt"), kwargs)
        self._check_sampling_size(kwargs)
        cls = type(self.sampler)
        if cls.__name__ not in _RECORDING_SAMPLERS:
            from diffusers import DDIMScheduler as cls
        sampler = cls.from_config(self.sampler.config)  # a fresh one: sampling sets its timesteps
        if self.conditioning.vae is None and unet_conditioning(self.unet) != "text":
            from diffusion_trak.pipelines import TrajectoryPipeline

            pipe = TrajectoryPipeline(unet=self.unet, scheduler=sampler)
        else:
            from diffusion_trak.pipelines.latent_trajectory import LatentTrajectoryPipeline

            if self.conditioning.vae is None:
                raise InputError("sampling a text-conditional pixel model is not supported; give its vae=, or sample "
                                 "it yourself and pass the trajectory to attribute()")
            text = self.conditioning.text
            pipe = LatentTrajectoryPipeline(vae=self.conditioning.vae, unet=self.unet, scheduler=sampler,
                                            text_encoder=text.text_encoder if text else None,
                                            tokenizer=text.tokenizer if text else None)
        kwargs.setdefault("show_progress", self.progress)
        out = pipe(*args, **kwargs)
        self._mark_generator(out)
        return out

    def _mark_generator(self, out) -> None:
        """Record in the trajectory of a :meth:`pipeline` output the model that generated it (its weights' fingerprint,
        base and adapter): :meth:`attribute` refuses it with checkpoints that do not include that model."""
        from diffusion_trak.pipelines import Trajectory

        from .featurize.featurizer import model_fingerprint

        parts = out if isinstance(out, tuple) else (getattr(out, "trajectory", None),)
        for traj in parts:
            if isinstance(traj, Trajectory):
                traj.generator = {"model": model_fingerprint(self.unet), "adapter": adapter_of(self.unet)}

    def _check_sampling(self, prompt, kwargs) -> None:
        """The one-line refusals of :meth:`pipeline` (and so of ``diffusion-trak generate``), before any sampling."""
        name, cfg = self.name, self.unet.config
        labels = kwargs.get("class_labels")
        n_classes = getattr(cfg, "num_class_embeds", None)
        if labels is not None and not n_classes:
            raise InputError(f"{name} is not class-conditional; drop --class-label (class_labels=)")
        bad = [int(c) for c in torch.as_tensor(labels).reshape(-1) if not 0 <= int(c) < n_classes] if labels is not None else []
        if bad:
            raise InputError(f"--class-label (class_labels=) must be between 0 and {n_classes - 1} for {name}, got {bad[0]}")
        steps, n_t = int(kwargs.get("num_inference_steps", 50)), int(self.sampler.config.num_train_timesteps)
        if not 1 <= steps <= n_t:
            raise InputError(f"--steps (num_inference_steps=) must be between 1 and {n_t} (the scheduler's training "
                             f"timesteps), got {steps}")
        bad = [int(s) for s in kwargs.get("record_steps") or [] if not 0 <= int(s) < steps]
        if bad:
            raise InputError(f"--record-steps {bad} are past the last step {steps - 1} of --steps {steps} "
                             f"(record_steps=, num_inference_steps=); use steps between 0 and {steps - 1}")
        text = prompt is not None or kwargs.get("prompt_embeds") is not None
        if text and getattr(cfg, "cross_attention_dim", None) is None:
            raise InputError(f"{name} takes no text; drop --prompt (the prompt)")
        if not text and unet_conditioning(self.unet) == "text":
            raise InputError(f"{name} is text-conditional; pass --prompt (attr.pipeline(\"a prompt\", ...) in Python)")

    def _check_sampling_size(self, kwargs) -> None:
        """Refuse (one line) a batch whose trajectory would not fit memory, before sampling: ``batch_size`` images
        (latents) × (x_t and x̂0 of every recorded step, plus the sampler's own few)."""
        from .store import check_resources

        cfg = self.unet.config
        size = unet_sample_size(self.unet)
        steps = int(kwargs.get("num_inference_steps", 50))
        recorded = len(kwargs["record_steps"]) if kwargs.get("record_steps") is not None else steps
        batch = int(kwargs.get("batch_size", 1))
        check_resources(f"sampling {batch} images recording {recorded} steps",
                        "use a smaller --num-images (batch_size=) or record fewer steps",
                        memory=batch * int(cfg.in_channels) * int(size or 1) ** 2 * 4 * (2 * recorded + 8), device=self.device)

    # ------------------------------------------------------------------ attribute
    def attribute(self, target=None, steps: Optional[Sequence[int]] = None, *, image_timesteps: Sequence[int] = (10,),
                  prompts: Optional[Sequence[str]] = None, class_labels=None, out: Optional[str] = None,
                  save: bool = True, value_range: Optional[Sequence[float]] = None, latents=None,
                  timesteps: Optional[Sequence[int]] = None) -> api.Scores:
        """Scores of every training image (:func:`diffusion_trak.api.score`).

        ``target``: a trajectory (or the output of :meth:`pipeline`): a row per recorded step (``steps``: some of
        them) with the generation's own conditioning, and the destination row of the final image; or images
        ``(B, C, H, W)`` in ``[-1, 1]`` (pixels; encoded for a latent model), scored at ``image_timesteps`` with
        ``prompts`` / ``class_labels`` for a conditional model. The scores are streamed into a folder of the run and
        saved there (``scores.npy``, ``scores.json``; resumable; other settings refuse unless ``overwrite``), as
        ``diffusion-trak score`` saves them: ``out/scores/<name>``, named by the target (``seed-<seed>-<digest of the
        final images>[-steps-...]`` for a trajectory, ``images-<digest of images, timesteps and conditioning>``),
        or ``out`` (e.g. ``attr.scores_dir("mine")``); ``save=False`` keeps them in memory only.

        ``latents=`` (instead of ``target``): a latent model's latents ``(B, C, h, w)`` as its UNet takes them (already
        encoded and scaled, e.g. x̂0_t from your own diffusers sampling loop), scored at ``timesteps`` (default
        ``image_timesteps``) with ``prompts`` / ``class_labels``; saved as ``out/scores/latents-<digest>``. The same
        scores as :func:`diffusion_trak.api.score` with ``images=latents``."""
        from .targets import digest

        if latents is not None:
            return self._attribute_latents(latents, target, steps, timesteps, image_timesteps, prompts, class_labels,
                                           out, save, value_range)
        if timesteps is not None:
            raise InputError("timesteps= goes with latents=; for images pass image_timesteps=, a trajectory carries "
                             "its own")
        if target is None:
            raise InputError("attribute() needs a target: a trajectory (or the output of pipeline()), images, or "
                             "latents=")
        target = getattr(target, "trajectory", target)
        images = None if hasattr(target, "x0_pred") else self._target_images(target, value_range, prompts, class_labels)
        if images is None and (prompts is not None or class_labels is not None or value_range is not None):
            raise InputError("a trajectory carries its generation's own images, prompt and labels; drop "
                             "prompts=/class_labels=/value_range= (they are for images)")
        if out is None and save:
            if hasattr(target, "x0_pred"):
                name = f"seed-{target.seed}-{digest(torch.as_tensor(target.final).float())[:8]}"
                name += "" if steps is None else "-steps-" + "-".join(str(int(s)) for s in steps)
            else:
                name = "images-" + digest(images, [int(t) for t in image_timesteps],
                                          None if prompts is None else list(prompts),
                                          None if class_labels is None else torch.as_tensor(class_labels).tolist())[:12]
            out = self.scores_dir(name)
        kw = dict(out=out, overwrite=self.overwrite,
                  device=self.device, progress=self.progress, dataset=self.inputs)
        if hasattr(target, "x0_pred"):
            scores = api.score(self.features, self.checkpoints, self.inputs.indices.numpy(), self.score_args,
                               trajectory=target, steps=steps, **kw)
            self._last = ("trajectory", target)
            return scores
        cond = self.conditioning.prompts(self.unet, prompts, class_labels)
        scores = api.score(self.features, self.checkpoints, self.inputs.indices.numpy(), self.score_args,
                           images=self.conditioning.encode_images(images), image_timesteps=image_timesteps, cond=cond, **kw)
        self._last = ("images", images)
        return scores

    def _attribute_latents(self, latents, target, steps, timesteps, image_timesteps, prompts, class_labels, out, save,
                           value_range) -> api.Scores:
        """:meth:`attribute` of latents (one line for each thing that does not fit)."""
        from .targets import digest

        if target is not None or steps is not None or value_range is not None:
            raise InputError("latents= is the target: drop the positional target, steps= and value_range= (latents are "
                             "taken as the UNet takes them)")
        if self.conditioning.vae is None:
            raise InputError("this model has no VAE, so it has no latents; pass the images as the target")
        if not isinstance(latents, (torch.Tensor, np.ndarray)):
            raise InputError(f"latents= takes a (B, C, h, w) tensor or array, got a {type(latents).__name__}")
        z = latents.detach().cpu().float() if isinstance(latents, torch.Tensor) else torch.from_numpy(
            np.asarray(latents, dtype=np.float32))
        z = z[None] if z.ndim == 3 else z
        cfg = self.unet.config
        size = unet_sample_size(self.unet)
        if z.ndim != 4 or z.shape[0] == 0 or z.shape[1] != cfg.in_channels or (size and tuple(z.shape[2:]) != (size, size)):
            raise InputError(f"latents must be a non-empty (B, {cfg.in_channels}, {size}, {size}) batch, what the UNet "
                             f"takes, got shape {tuple(latents.shape)}")
        self._check_conditioning(prompts, class_labels)
        ts = [int(t) for t in (image_timesteps if timesteps is None else
                               ([timesteps] if np.ndim(timesteps) == 0 else timesteps))]
        if out is None and save:
            out = self.scores_dir("latents-" + digest(z, ts, None if prompts is None else list(prompts),
                                                      None if class_labels is None else
                                                      torch.as_tensor(class_labels).tolist())[:12])
        cond = self.conditioning.prompts(self.unet, prompts, class_labels)
        scores = api.score(self.features, self.checkpoints, self.inputs.indices.numpy(), self.score_args, images=z,
                           image_timesteps=ts, cond=cond, out=out, overwrite=self.overwrite, device=self.device,
                           progress=self.progress, dataset=self.inputs)
        self._last = ("latents", z)
        return scores

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the UNet takes them, decoded to pixels in [-1, 1] by the model's VAE (for the report)."""
        vae = self.conditioning.vae
        cfg = vae.config
        z = latents / float(getattr(cfg, "scaling_factor", 1.0) or 1.0) + float(getattr(cfg, "shift_factor", 0.0) or 0.0)
        dev = next(vae.parameters()).device
        with torch.no_grad():
            return vae.decode(z.to(dev)).sample.float().clamp(-1, 1).cpu()

    def _target_images(self, target, value_range, prompts, class_labels) -> torch.Tensor:
        """Images given to :meth:`attribute` as float32 ``(B, C, H, W)`` in [-1, 1], checked against the model as the
        CLI checks a dataset (one line each): a tensor or array of one image or a batch (not empty), the model's
        channels and size, values by the rule of :func:`diffusion_trak.data.to_unit_range` (``value_range``: their
        stated range; uint8 0..255; floats [-1, 1]), and ``prompts``/``class_labels`` only for a model that takes them."""
        from .data import to_unit_range

        if not isinstance(target, (torch.Tensor, np.ndarray)):
            raise InputError(f"attribute() takes a trajectory (or the output of pipeline()) or images as a (B, C, H, W) "
                             f"tensor or array, got a {type(target).__name__}")
        x = target.detach().cpu() if isinstance(target, torch.Tensor) else target
        x = x.float().numpy() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16) else np.asarray(x)
        x = x[None] if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[0] == 0:
            raise InputError(f"images must be a non-empty (B, C, H, W) batch or one (C, H, W) image, got shape "
                             f"{tuple(target.shape)}")
        cfg, vae = self.unet.config, self.conditioning.vae  # the pixels the model takes (before its VAE)
        size = unet_sample_size(self.unet)
        if vae is not None:
            size, channels = size and size * 2 ** (len(vae.config.block_out_channels) - 1), vae.config.in_channels
        else:
            channels = cfg.in_channels
        if x.shape[1] != channels:
            raise InputError(f"the model takes {channels}-channel images but these have {x.shape[1]} (shape "
                             f"{tuple(x.shape)}); give {channels}-channel images")
        if size and tuple(x.shape[2:]) != (size, size):
            raise InputError(f"the model takes {size}×{size} images but these are {x.shape[2]}×{x.shape[3]}; resize "
                             f"them to {size}×{size}")
        self._check_conditioning(prompts, class_labels)
        return torch.from_numpy(to_unit_range(x, value_range, "the images given to attribute()", floats=(-1.0, 1.0)))

    def _check_conditioning(self, prompts, class_labels) -> None:
        """``prompts`` only for a text model, ``class_labels`` only for a class-conditional one (one line each)."""
        kind = unet_conditioning(self.unet)
        if prompts is not None and kind != "text":
            raise InputError("this model takes no text; drop prompts=")
        if class_labels is not None and kind != "class":
            raise InputError("this model is not class-conditional; drop class_labels=")

    def scores_dir(self, name: str) -> str:
        """``out/scores/<name>``, where the CLI keeps the scores of trajectory ``<name>``."""
        return os.path.join(self.out, "scores", name)

    def self_attribution(self, num: int = 50, timestep: int = 10, seed: int = 0) -> api.SelfAttribution:
        """How often a training image, scored as a target at a low-noise ``timestep`` with its own label or caption,
        ranks its own index first (:func:`diffusion_trak.api.self_attribution_rate`), with a progress bar: a
        :class:`~diffusion_trak.api.SelfAttribution` (``rate``, ``positions``, ``chance``, ``near_chance``; prints as
        a sentence), which unpacks as ``(rate, positions)``."""
        return api.self_attribution_rate(self.features, self.checkpoints, self.inputs, num, timestep, self.score_args,
                                         self.device, seed, conditioning=self.conditioning, progress=self.progress)

    #: training images of the self-check after :meth:`featurize` (and the noises per image it scores them with)
    SELF_CHECK_IMAGES, SELF_CHECK_NOISES = 8, 4

    def _self_check(self) -> Optional[api.SelfAttribution]:
        """The quick self-check printed after :meth:`featurize`: a few training images scored against themselves
        (:meth:`self_attribution` with :attr:`SELF_CHECK_IMAGES` images, :attr:`SELF_CHECK_NOISES` noises each), as
        the demo prints its own, and a warning line when the rate is near chance."""
        import dataclasses

        res = api.self_attribution_rate(self.features, self.checkpoints, self.inputs, self.SELF_CHECK_IMAGES, 10,
                                        dataclasses.replace(self.score_args, num_noises=min(
                                            self.score_args.num_noises, self.SELF_CHECK_NOISES)),
                                        self.device, 0, conditioning=self.conditioning)
        print(f"self-check: {res}", flush=True)
        if res.near_chance:
            print(f"warning: the self-check is near chance ({res.rate:.0%}, chance {res.chance:.0%}): these features "
                  "hardly tell the training images apart, so attributions may mean little; check that the model (or "
                  "adapter) was trained on these images with these captions, or use more -T/--num-timesteps and a "
                  "larger -k/--proj-dim", flush=True)
        return res

    # ------------------------------------------------------------------ report
    def report(self, scores: api.Scores, trajectory=None, name: str = "attribution", target: int = 0, k: int = 6,
               title: Optional[str] = None):
        """The per-step PNG of one target and the journey page of all: ``out/report/<name>.{png,html}``.
        ``trajectory`` defaults to the one last given to :meth:`attribute`."""
        from .report import plot_from_scores

        trajectory = getattr(trajectory, "trajectory", trajectory)
        target = scores.check_target(target)
        query = None
        if trajectory is None and self._last is not None:
            kind, last = self._last
            if kind == "trajectory":
                trajectory = last
            else:
                last = self._decode(last) if kind == "latents" else last
                query = last[target].expand(len(scores.steps), *last.shape[1:])
        if trajectory is None and query is None:
            raise InputError("give the trajectory the scores are of: report(scores, trajectory)")
        if trajectory is not None:
            scores.check_trajectory(trajectory)
        if title is None and getattr(trajectory, "prompts", None):
            title = f'prompt: "{trajectory.prompts[target]}" — per-step attribution'
        return plot_from_scores(scores, self.dataset, trajectory, os.path.join(self.out, "report", name), target=target,
                                k=k, query_images=query, title=title,
                                model=None if self.name == "the model" else self.name, adapter=self.lora_path)
