"""Loading what diffusers saves, and the one thing that tells model kinds apart: the :class:`Conditioning`.

Two folder layouts are read (local files only, never the Hub; weights are safetensors or ``.bin`` files that
diffusers/transformers read with ``weights_only``):

- a **checkpoint folder** ``unet/`` + ``scheduler/`` (what ``diffusion-trak train`` writes, and the inside of
  a ``DDPMPipeline`` folder): :func:`load_checkpoint`;
- a **pipeline folder** with ``model_index.json`` (``DDPMPipeline``, ``DDIMPipeline``, ``LDMPipeline``,
  ``StableDiffusionPipeline``, ...): :func:`load_pipeline` loads the unet, the scheduler and, when there, the
  VAE, text encoder and tokenizer, each with the class its own saved config names.

The UNet class is read from the saved config (``_class_name``): ``UNet2DModel`` or ``UNet2DConditionModel``.

Unconditional, class-conditional, latent and text-conditional models go through the same featurize and
score code (:mod:`diffusion_trak.api`); they differ only by a :class:`Conditioning`: how training images
become what the unet denoises (pixels, or VAE latents) and which keyword arguments the unet gets
(``class_labels``, ``encoder_hidden_states`` from captions).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import CheckpointError, InputError, LatentError

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
CAPTION_MODES = ("random", "mean", "first")


# ---------------------------------------------------------------------------------------------- folders
def _class_name(config_path: str) -> Optional[str]:
    try:
        with open(config_path) as f:
            return json.load(f).get("_class_name")
    except (ValueError, OSError, AttributeError) as e:
        raise CheckpointError(f"{config_path} cannot be read ({type(e).__name__}); save the model again with "
                              "save_pretrained") from None


def check_checkpoint(path: str, unet_classes: Sequence[str] = UNET_CLASSES) -> str:
    """One-line :class:`CheckpointError` unless ``path`` is a local folder with ``unet/`` (one of
    ``unet_classes``, with weights) and ``scheduler/``, as diffusers' ``save_pretrained`` writes them.
    Reads configs only; returns the unet's class name."""
    fix = "pass checkpoint folders holding unet/ and scheduler/ (e.g. RUN/model/ckpt-0100, or a diffusers pipeline folder)"
    if os.path.isfile(path) and path.endswith((".safetensors", ".ckpt", ".pt", ".pth")):
        raise CheckpointError(f"{path} is a single-file checkpoint (as A1111 and ComfyUI share them); convert it once to "
                              "a diffusers pipeline folder: python -c \"from diffusers import StableDiffusionPipeline; "
                              f"StableDiffusionPipeline.from_single_file('{path}').save_pretrained('my-model')\", "
                              "then pass my-model/ (a LoRA file goes to --lora, lora=)")
    if not os.path.isdir(path):
        what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise CheckpointError(f"checkpoint folder {path} {what}; {fix}")
    configs = {"unet": ("config.json",), "scheduler": ("scheduler_config.json", "config.json")}
    missing = [d for d, names in configs.items() if not any(os.path.isfile(os.path.join(path, d, n)) for n in names)]
    if missing and os.path.isfile(os.path.join(path, "scheduler_config.json")):  # the inside of scheduler/
        raise CheckpointError(f"{path} is a scheduler's folder (scheduler_config.json), not a model; pass the folder "
                              "that holds it as scheduler/ beside unet/ (a checkpoint or pipeline folder)")
    if missing and os.path.isfile(os.path.join(path, "config.json")) and \
            str(_class_name(os.path.join(path, "config.json"))).startswith("UNet"):  # the inside of unet/
        raise CheckpointError(f"{path} is a UNet's folder (config.json), not a whole model; pass the folder that holds "
                              "it as unet/ beside scheduler/ (a checkpoint or pipeline folder)")
    if missing:
        have = sorted(os.listdir(path))[:8]
        raise CheckpointError(f"{path} has no {' and no '.join(m + '/' for m in missing)} with a saved config (it holds "
                              f"{have}); {fix}")
    kind = _class_name(os.path.join(path, "unet", "config.json")) or "UNet2DModel"
    if kind not in unet_classes:
        raise CheckpointError(f"{path}/unet is a {kind}; supported are {' and '.join(unet_classes)}")
    weights = [f for f in os.listdir(os.path.join(path, "unet")) if f.endswith((".safetensors", ".bin"))]
    if not weights:
        raise CheckpointError(f"{path}/unet has no weights (diffusion_pytorch_model.safetensors); save the UNet with "
                              "save_pretrained")
    return kind


def load_checkpoint(path: str, device="cpu"):
    """``(unet, scheduler)`` from a checkpoint folder (or any folder with ``unet/`` and ``scheduler/``); the
    unet's class is read from its config, the scheduler is the ``DDPMScheduler`` of the saved config (the
    training noise schedule, whatever sampler the folder names)."""
    import diffusers

    path = os.fspath(path)
    kind = check_checkpoint(path)
    check_unet_weights(os.path.join(path, "unet"))
    try:
        unet = getattr(diffusers, kind).from_pretrained(os.path.join(path, "unet"), local_files_only=True)
        scheduler = diffusers.DDPMScheduler.from_pretrained(os.path.join(path, "scheduler"), local_files_only=True)
    except (OSError, ValueError) as e:
        msg = " ".join(str(e).split())[:200]
        raise CheckpointError(f"cannot load the checkpoint {path} ({msg}); save it again with save_pretrained") from None
    return unet.to(device), scheduler


def is_pipeline_folder(path) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), "model_index.json"))


# the component classes a pipeline folder may name, by library (nothing else is imported)
_TEXT_CLASSES = ("TinyTextEncoder", "WordTokenizer")


def _component_class(library: str, name: str):
    if library == "diffusers" and (name in UNET_CLASSES or name in ("AutoencoderKL", "VQModel")
                                   or name.endswith("Scheduler")):
        return getattr(importlib.import_module("diffusers"), name, None)
    if library == "transformers" and name.startswith("CLIP") and name.endswith(
            ("TextModel", "TextModelWithProjection", "Tokenizer", "TokenizerFast")):
        try:
            module = importlib.import_module("transformers")
        except ImportError:
            raise CheckpointError(f"this pipeline's text encoder and tokenizer are transformers' ({name}), which is not "
                                  'installed; install it with pip install "diffusion-trak[text]"') from None
        return getattr(module, name, None)
    if library in ("diffusion_trak.text", "text") and name in _TEXT_CLASSES:
        return getattr(importlib.import_module("diffusion_trak.text"), name)
    return None


@contextlib.contextmanager
def _no_progress_bars():
    """diffusers' and transformers' loading progress bars off for a while (as they were after)."""
    import diffusers.utils.logging as dlog

    libs = [dlog]
    try:
        import transformers.utils.logging as tlog

        libs.append(tlog)
    except ImportError:
        pass
    was = [lib.is_progress_bar_enabled() for lib in libs]
    for lib in libs:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, on in zip(libs, was):
            if on:
                lib.enable_progress_bar()


def load_pipeline(path: str, device="cpu") -> Dict[str, object]:
    """The components of a pipeline folder that attribution needs: ``unet``, ``scheduler`` (the class the
    folder names), and where present ``vae`` (``vae/`` or ``vqvae/``), ``text_encoder``, ``tokenizer``;
    plus ``pipeline_class``. Other components (safety checker, feature extractor) are not loaded."""
    path = os.fspath(path)
    try:
        with open(os.path.join(path, "model_index.json")) as f:
            index = json.load(f)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}/model_index.json cannot be read ({type(e).__name__}); save the pipeline again "
                              "with save_pretrained") from None
    out: Dict[str, object] = {"pipeline_class": index.get("_class_name")}
    wanted = {"unet": "unet", "scheduler": "scheduler", "vae": "vae", "vqvae": "vae", "text_encoder": "text_encoder",
              "tokenizer": "tokenizer"}
    for key, role in wanted.items():
        spec = index.get(key)
        if not (isinstance(spec, (list, tuple)) and len(spec) == 2 and spec[1]):
            continue
        cls = _component_class(str(spec[0]), str(spec[1]))
        if cls is None:
            raise CheckpointError(f"{path}: component {key} is a {spec[0]}.{spec[1]}, which diffusion-trak does not "
                                  "load; supported are UNet2DModel/UNet2DConditionModel, AutoencoderKL/VQModel, "
                                  "diffusers schedulers and CLIP text encoders/tokenizers")
        sub = os.path.join(path, key)
        if role == "unet":
            kind = _class_name(os.path.join(sub, "config.json")) or spec[1]
            if kind not in UNET_CLASSES:
                raise CheckpointError(f"{sub} is a {kind}; supported are {' and '.join(UNET_CLASSES)}")
            cls = _component_class("diffusers", kind)
            check_unet_weights(sub)
        try:
            if role == "tokenizer" and cls.__module__.startswith("diffusion_trak"):
                obj = cls.from_pretrained(sub)
            else:
                with _no_progress_bars():  # a few seconds each; a refusal after loading stays one line
                    obj = cls.from_pretrained(sub, local_files_only=True)
        except (OSError, ValueError) as e:
            msg = " ".join(str(e).split())[:200]
            raise CheckpointError(f"cannot load {sub} ({msg}); save the pipeline again with save_pretrained") from None
        if isinstance(obj, torch.nn.Module):
            obj = obj.to(device).eval()
        out[role] = obj
    missing = [k for k in ("unet", "scheduler") if k not in out]
    if missing:
        raise CheckpointError(f"{path}/model_index.json names no {' and no '.join(missing)}; attribution needs a "
                              "diffusion pipeline with a UNet and a scheduler")
    return out


def training_scheduler(scheduler):
    """The ``DDPMScheduler`` (the forward process the unet was trained on) of any diffusers scheduler's config."""
    from diffusers import DDPMScheduler

    if isinstance(scheduler, DDPMScheduler):
        return scheduler
    return DDPMScheduler.from_config(scheduler.config)


# ---------------------------------------------------------------------------------------------- LoRA adapters
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file diffusers' LoRA training scripts write
#: the fix for a unet folder that holds peft adapter layers (a LoRA-loaded pipeline saved with save_pretrained)
_ADAPTER_IN_UNET_FIX = ("save the adapter alone with pipe.save_lora_weights(DIR) and pass the base model with "
                        "--lora DIR (lora= in Python), or fuse it first: pipe.fuse_lora(); pipe.unload_lora_weights(); "
                        "pipe.save_pretrained(...)")


def check_unet_weights(unet_dir: str) -> None:
    """One-line :class:`CheckpointError` for a unet folder whose weights hold peft adapter layers
    (``...base_layer.weight``, ``...lora_A.<name>.weight``): what ``save_pretrained`` writes for a pipeline with a
    loaded, unfused LoRA, which diffusers cannot load back. Reads the safetensors headers only."""
    files = [f for f in os.listdir(unet_dir) if f.endswith(".safetensors")] if os.path.isdir(unet_dir) else []
    for name in files:
        try:
            from safetensors import safe_open

            with safe_open(os.path.join(unet_dir, name), "pt") as f:
                keys = list(f.keys())
        except Exception:  # noqa: BLE001 - a damaged file is reported by the loader
            continue
        if any(".base_layer." in k or ".lora_A." in k for k in keys):
            raise CheckpointError(f"{unet_dir} holds LoRA adapter layers inside the UNet weights (a LoRA-loaded "
                                  f"pipeline saved with save_pretrained), which cannot be loaded; {_ADAPTER_IN_UNET_FIX}")


PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # what peft's save_pretrained writes


def _checkpoint_step(name: str) -> int:
    return int(name.split("-", 1)[1]) if name.startswith("checkpoint-") and name[11:].isdigit() else -1


def _lora_file(path) -> Tuple[str, str]:
    """``(file, layout)`` of ``--lora PATH``: ``peft`` (``adapter_model.safetensors`` beside ``adapter_config.json``,
    as peft's ``save_pretrained`` writes them, also in a ``unet/`` subfolder) or ``diffusers`` (one ``.safetensors``
    file: ``save_lora_weights``, ``unet.save_lora_adapter``, the LoRA training scripts' output folder and its
    ``checkpoint-N/`` folders, kohya-style files). Anything else is refused in one line naming what to pass."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for d in (path, os.path.join(path, "unet")):
            if os.path.isfile(os.path.join(d, PEFT_CONFIG)):
                if os.path.isfile(os.path.join(d, PEFT_WEIGHTS)):
                    return os.path.join(d, PEFT_WEIGHTS), "peft"
                raise CheckpointError(f"--lora {d} is a peft adapter folder ({PEFT_CONFIG}) without {PEFT_WEIGHTS}; "
                                      "save it with save_pretrained(DIR, safe_serialization=True)")
        found = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
        if LORA_WEIGHTS in found:
            return os.path.join(path, LORA_WEIGHTS), "diffusers"
        if len(found) == 1:
            return os.path.join(path, found[0]), "diffusers"
        steps = sorted((_checkpoint_step(d), d) for d in os.listdir(path) if _checkpoint_step(d) >= 0
                       and os.path.isfile(os.path.join(path, d, LORA_WEIGHTS)))
        if not found and steps:  # a training run's output folder before its final save
            raise CheckpointError(f"--lora {path} holds the training checkpoints {', '.join(d for _, d in steps[-3:])} "
                                  f"but no final {LORA_WEIGHTS}; pass one of them, e.g. "
                                  f"--lora {os.path.join(path, steps[-1][1])}")
        what = f"several .safetensors files ({', '.join(found[:4])})" if found else "no .safetensors file"
        raise CheckpointError(f"--lora {path} holds {what}; pass the adapter file itself "
                              f"(e.g. {os.path.join(path, LORA_WEIGHTS)})")
    if not os.path.isfile(path):
        raise CheckpointError(f"--lora {path} does not exist; pass the folder or the {LORA_WEIGHTS} that "
                              "pipe.save_lora_weights (diffusers' LoRA training scripts) writes")
    if os.path.basename(path) == PEFT_WEIGHTS and os.path.isfile(os.path.join(os.path.dirname(path), PEFT_CONFIG)):
        return path, "peft"
    return path, "diffusers"


def _digest(tensors: Dict[str, torch.Tensor]) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


_LIBRARY_LOGGERS = ("diffusers", "peft", "transformers")


@contextlib.contextmanager
def _library_messages():
    """Hold what diffusers, peft and transformers log or warn (WARNING and up) while a model part loads, instead of
    printing it: yields the list their messages are kept in, for the caller to check. A refusal is then one line,
    with none of their output before it."""
    import logging
    import warnings

    kept: List[str] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            kept.append(record.getMessage())

    saved = []
    for name in _LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, lg.handlers[:], lg.propagate, lg.level))
        lg.handlers, lg.propagate = [_Keep(logging.WARNING)], False
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield kept
        kept.extend(str(w.message) for w in caught)
    finally:
        for lg, handlers, propagate, level in saved:
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)


def _why(e: Exception) -> str:
    """A loader's error as a short clause, never cut mid-word: a shape mismatch names the layer and both shapes."""
    import re

    text = " ".join(str(e).split())
    m = re.search(r"size mismatch for ([\w.]+): copying a param with shape torch.Size\((\[[\d, ]*\])\) from "
                  r"checkpoint, the shape in current model is torch.Size\((\[[\d, ]*\])\)", text)
    if m:
        name = m.group(1).replace(".default.", ".")
        return f"{name} is {m.group(2)} in the adapter but {m.group(3)} in this model"
    first = re.split(r"(?<=[.:;])\s", text, maxsplit=1)[0]
    return first if len(first) <= 160 else first[:160].rsplit(" ", 1)[0] + " ..."


def _peft_state(file: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """A peft ``save_pretrained`` adapter as diffusers' UNet LoRA state (``unet.<module>.lora_A.weight``) and the
    ``LoraConfig`` of its ``adapter_config.json`` (rank, alpha, patterns: as the adapter was trained), keyed
    ``unet.<field>`` as diffusers keeps a LoRA's metadata."""
    import dataclasses

    from peft import LoraConfig
    from safetensors.torch import load_file

    with open(os.path.join(os.path.dirname(file), PEFT_CONFIG)) as f:
        cfg = json.load(f)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(f"the peft adapter {file} is a {cfg.get('peft_type')} adapter; diffusion-trak loads LoRA "
                              "adapters (peft_type LORA)")
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    meta = {f"unet.{k}": v for k, v in cfg.items() if k in fields and k not in ("peft_type", "task_type",
                                                                                "base_model_name_or_path", "revision",
                                                                                "inference_mode")}
    state = load_file(file)
    prefix = "base_model.model."
    return {"unet." + (k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}, meta


def _unprefixed_state(file: str) -> Tuple[Optional[Dict[str, torch.Tensor]], Optional[dict]]:
    """``unet.save_lora_adapter``'s file (peft keys without the ``unet.`` prefix, its ``LoraConfig`` in the header)
    as diffusers' UNet LoRA state and metadata; ``(None, None)`` for a file of another layout."""
    from safetensors import safe_open

    try:
        with safe_open(file, "pt") as f:
            keys, header = list(f.keys()), f.metadata() or {}
    except Exception:  # noqa: BLE001 - not a safetensors file: diffusers' reader says what it is
        return None, None
    if not keys or any(k.startswith(("unet.", "text_encoder", "lora_unet_", "lora_te", "base_model.")) for k in keys) \
            or not any(".lora_A." in k or ".lora_B." in k for k in keys):
        return None, None
    from safetensors.torch import load_file

    meta = json.loads(header["lora_adapter_metadata"]) if "lora_adapter_metadata" in header else None
    return ({"unet." + k: v for k, v in load_file(file).items()},
            None if meta is None else {f"unet.{k}": v for k, v in meta.items()})


def _check_holds_lora(file: str) -> None:
    """One line when a ``.safetensors`` file given as ``--lora`` holds no LoRA layer at all (e.g. a whole model's
    single-file checkpoint, which goes to ``--pipeline`` once converted). Reads the header only."""
    from safetensors import safe_open

    try:
        with safe_open(file, "pt") as f:
            keys = list(f.keys())
    except Exception:  # noqa: BLE001 - not a safetensors file: the reader below says what it is
        return
    if keys and not any("lora" in k.lower() or k.endswith(".alpha") for k in keys):
        whole = any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys)
        raise CheckpointError(f"--lora {file} holds no LoRA layers (keys like {keys[0]!r})" + (
            "; it is a whole model's single-file checkpoint: convert it once with StableDiffusionPipeline."
            f"from_single_file('{file}').save_pretrained('my-model') and pass --pipeline my-model/" if whole else
            "; pass a LoRA adapter (pytorch_lora_weights.safetensors, adapter_model.safetensors or a kohya file)"))


def load_lora(unet, path) -> dict:
    """Load a LoRA adapter into ``unet`` as peft layers, which :class:`~diffusion_trak.config.FeaturizeArgs`
    ``params="auto"`` (the default) and ``"lora"`` select. Read as diffusers and peft write them: ``pipe.save_lora_weights``
    (what diffusers' LoRA training scripts write, in their output folder and its ``checkpoint-N/`` folders),
    ``unet.save_lora_adapter`` (keys without the ``unet.`` prefix), peft's ``save_pretrained``
    (``adapter_model.safetensors`` + ``adapter_config.json``) and kohya-style files (``lora_unet_*`` keys). An adapter
    with text-encoder layers too is refused in one line (they would change the model but are not loaded), as is one
    that does not fit the model, with nothing the libraries log printed before it. Returns (and keeps on ``unet``, see
    :func:`adapter_of`) the base model's and the adapter's fingerprints, which feature stores record and check."""
    try:
        import peft  # noqa: F401 - diffusers loads adapters as peft layers
    except ImportError:
        raise CheckpointError('--lora (lora=) needs peft, which is not installed; install it with '
                              'pip install "diffusion-trak[lora]"') from None
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    from .featurize.featurizer import model_fingerprint

    file, layout = _lora_file(path)
    if not hasattr(unet, "load_lora_adapter"):
        raise CheckpointError(f"--lora needs a UNet2DConditionModel (Stable-Diffusion-style); this model's unet is a "
                              f"{type(unet).__name__}, which diffusers' LoRA loader does not take")
    if adapter_of(unet) is not None or getattr(unet, "peft_config", None):
        raise CheckpointError("the model already has a LoRA adapter; give one --lora, to the base model")
    base = model_fingerprint(unet)
    _check_holds_lora(file)
    alphas, meta = None, None
    try:
        with _library_messages():
            if layout == "peft":
                state, meta = _peft_state(file)
            else:
                state, meta = _unprefixed_state(file)
                if state is None:
                    state, alphas, meta = Loader.lora_state_dict(os.path.dirname(file) or ".", local_files_only=True,
                                                                 weight_name=os.path.basename(file),
                                                                 return_lora_metadata=True)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors and the format converters raise their own types
        if isinstance(e, (KeyboardInterrupt, MemoryError)):
            raise
        raise CheckpointError(f"cannot read the LoRA adapter {file} ({_why(e)}); save it with pipe.save_lora_weights, "
                              "unet.save_lora_adapter or peft's save_pretrained") from None
    if any(k.startswith("base_model.model.") for k in state):
        raise CheckpointError(f"the LoRA adapter {file} is in peft's save_pretrained layout without its {PEFT_CONFIG}; "
                              f"pass the folder that holds both {PEFT_WEIGHTS} and {PEFT_CONFIG}")
    unet_keys = [k for k in state if k.startswith("unet.")]
    if not unet_keys:
        raise CheckpointError(f"the LoRA adapter {file} has no UNet LoRA layers (its keys start "
                              f"{sorted({k.split('.')[0] for k in state})[:3]}); save it with "
                              "pipe.save_lora_weights(DIR, unet_lora_layers=get_peft_model_state_dict(unet)), "
                              "unet.save_lora_adapter(DIR) or peft's save_pretrained")
    if any(not k.startswith("unet.") for k in state):  # e.g. text_encoder.*: not loaded, so refused, never ignored
        other = sorted({k.split(".")[0] for k in state if not k.startswith("unet.")})
        raise CheckpointError(f"the LoRA adapter {file} also has {', '.join(other)} layers, which diffusion-trak does not "
                              "load (it attributes the UNet's adapter); save the UNet's layers alone: "
                              "save_lora_weights(DIR, unet_lora_layers=get_peft_model_state_dict(unet))")
    try:
        with _library_messages() as said:
            Loader.load_lora_into_unet(state, alphas or None, unet, adapter_name="default",
                                       metadata=meta or None)
    except Exception as e:  # noqa: BLE001 - diffusers and peft raise ValueError, RuntimeError, TypeError, ...
        if isinstance(e, (KeyboardInterrupt, MemoryError)):
            raise
        _unload(unet)
        raise CheckpointError(f"the LoRA adapter {file} does not fit this model ({_why(e)}); pass the base model it "
                              "was trained on") from None
    unfit = [m for m in said if "unexpected keys" in m or "missing keys" in m]
    if unfit:  # layers the model lacks: loading the rest would attribute another adapter
        _unload(unet)
        layers = sorted({k.split(".lora_")[0] for k in unfit[0].split(":", 1)[-1].replace(",", " ").split()
                         if ".lora_" in k})
        raise CheckpointError(f"the LoRA adapter {file} does not fit this model ({len(layers)} of its layers, e.g. "
                              f"{layers[0] if layers else '?'}, are not in it); pass the base model it was trained on")
    info = {"base": base, "adapter": _digest(state)}
    unet.diffusion_trak_lora = info
    return info


def _unload(unet) -> None:
    """Take a partly loaded adapter out of ``unet`` again: every peft layer replaced by the layer it wraps, so that
    after a refusal the model is as it was (its parameters, their names and its fingerprint)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(n, m) for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in wrapped:
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent) if parent else unet, child, module.get_base_layer())
    if hasattr(unet, "peft_config"):
        del unet.peft_config
    if getattr(unet, "_hf_peft_config_loaded", False):
        unet._hf_peft_config_loaded = False


def adapter_of(unet) -> Optional[dict]:
    """``{"base", "adapter"}`` fingerprints of the LoRA adapter :func:`load_lora` loaded into ``unet``, or None."""
    return getattr(unet, "diffusion_trak_lora", None)


# ---------------------------------------------------------------------------------------------- model kinds
def unet_sample_size(unet) -> Optional[int]:
    """The side of the square inputs the UNet takes (its config's ``sample_size``, an int or the first of a pair);
    ``None`` when the config does not say."""
    size = unet.config.sample_size
    return size if isinstance(size, int) or size is None else size[0]


def unet_conditioning(unet) -> str:
    """``text`` for a unet with cross-attention, ``class`` for one with a class embedding, else ``none``."""
    cfg = unet.config
    if getattr(cfg, "cross_attention_dim", None) is not None and hasattr(cfg, "encoder_hid_dim"):
        return "text"
    if getattr(cfg, "num_class_embeds", None) is not None or getattr(cfg, "class_embed_type", None) is not None:
        return "class"
    return "none"


def check_compatible(unet, dataset) -> None:
    """One-line errors for a unet that cannot take this dataset's images (or latents)."""
    cfg = unet.config
    C, H, W = dataset.image_shape
    size = unet_sample_size(unet)
    pixels = getattr(dataset, "pixels", None)
    if getattr(dataset, "vae_fingerprint", None) is not None:  # latents of a VAE
        if cfg.in_channels != C:
            raise LatentError(f"the unet takes {cfg.in_channels}-channel latents but the VAE makes {C}; "
                              "use the VAE the unet was trained with")
        if size is not None and size != H:
            hint = f" (use --image-size {pixels.image_shape[1] * size // H})" if pixels is not None else ""
            raise LatentError(f"the unet takes {size}×{size} latents but the VAE makes {H}×{W}{hint}")
        return
    if cfg.in_channels != C:
        raise InputError(f"model expects {cfg.in_channels} channels but the dataset has {C}; "
                         f"use --channels {cfg.in_channels}")
    if size is not None and size != H:
        distort = "" if H == W else " (a resize that changes their aspect ratio: crop them first to keep it)"
        raise InputError(f"model expects {size}×{size} images but the dataset has {H}×{W}; use --image-size {size} "
                         f"(DataArgs(image_size={size}) in Python){distort}")


def dataset_captions(dataset, captions=None):
    """The :class:`~diffusion_trak.text.CaptionSet` of a training set: ``captions`` (a CaptionSet, a JSON/CSV
    file, or a list with one caption or list of captions per position), else the dataset's ``captions``
    attribute, else one caption per example from its class names; ``None`` if there is none of these."""
    from .text import CaptionSet

    captions = captions if captions is not None else getattr(dataset, "captions", None)
    if isinstance(captions, CaptionSet):
        return captions
    if isinstance(captions, (str, os.PathLike)):
        return CaptionSet.from_file(os.fspath(captions))
    if captions is not None:
        caps = list(captions)
        if len(caps) != len(dataset):
            raise LatentError(f"{len(caps)} captions for {len(dataset)} training images; give one caption (or a list "
                              "of captions) per image")
        return CaptionSet({int(i): [c] if isinstance(c, str) else list(c) for i, c in zip(dataset.indices.tolist(), caps)})
    if dataset.labels is not None:
        return CaptionSet.from_class_names(dataset)
    return None


class Conditioning:
    """What a model kind adds to the pixel path; the default (nothing) is an unconditional or class-conditional
    pixel model.

    Args:
        vae: ``AutoencoderKL`` / ``VQModel`` of a latent model: training and target images are encoded to the
            unet's latents (:meth:`encode`), the posterior mean by default (``latent_mode="sample"``: one
            fixed-seed posterior sample per example).
        text: a :class:`~diffusion_trak.text.TextConditioner` (tokenizer + frozen text encoder) of a
            text-conditional unet.
        captions: the training captions (see :func:`dataset_captions`); default: the dataset's own, else its
            class names.
        caption_mode: with several captions per example, ``random`` (one drawn per (example, timestep), a
            function of ``(seed, index)``), ``mean`` (mean embedding) or ``first``.

    Class-conditional unets get ``class_labels`` from the dataset's labels, text unets ``encoder_hidden_states``
    from the captions, in featurization (:meth:`training`), for training images scored as targets
    (:meth:`examples`) and for generated trajectories (:meth:`of_trajectory`: the generation's own prompt
    embedding or class labels)."""

    def __init__(self, vae=None, text=None, captions=None, caption_mode: str = "random", latent_mode: str = "mean",
                 latent_seed: int = 0):
        if caption_mode not in CAPTION_MODES:
            raise LatentError(f"unknown caption mode {caption_mode!r}; choose one of {', '.join(CAPTION_MODES)}")
        self.vae, self.text, self.captions = vae, text, captions
        self.caption_mode, self.latent_mode, self.latent_seed = caption_mode, latent_mode, int(latent_seed)

    def __repr__(self) -> str:
        parts = [f"vae={type(self.vae).__name__}"] if self.vae is not None else []
        if self.text is not None:
            parts.append(f"text={type(self.text.text_encoder).__name__}, caption_mode={self.caption_mode!r}")
        return f"Conditioning({', '.join(parts)})"

    # ---- inputs -----------------------------------------------------------------------------------
    def encode(self, dataset, cache_dir: Optional[str] = None, overwrite: bool = False, progress: bool = True):
        """``dataset`` in the unet's space: itself without a VAE or when already encoded, else its latents
        (:func:`~diffusion_trak.latent.encode_dataset`, cached in the store at ``cache_dir`` when given)."""
        if self.vae is None or getattr(dataset, "vae_fingerprint", None) is not None:
            return dataset
        from . import distributed
        from .vae import encode_dataset, encode_in_memory

        if cache_dir is None:
            return encode_in_memory(dataset, self.vae, self.latent_mode, self.latent_seed)
        with distributed.main_process_first():  # the main process encodes, the others read its cache
            return encode_dataset(dataset, self.vae, cache_dir, self.latent_mode, self.latent_seed, overwrite=overwrite,
                                  progress=progress and distributed.state().is_main_process)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Target images ``(B, C, H, W)`` in ``[-1, 1]`` in the unet's space (latents with a VAE)."""
        if self.vae is None:
            return images
        from .vae import encode_images

        return encode_images(self.vae, images, self.latent_mode, self.latent_seed)

    def _captions(self, dataset):
        caps = dataset_captions(dataset, self.captions)
        if caps is None:
            raise LatentError("this unet reads text but the training images have no captions; pass --captions FILE "
                              "(a .json {index: [caption, ...]} or .csv index,caption file; captions= in Python, which "
                              "also takes a CaptionSet or one caption per image) or a folder with metadata.jsonl")
        caps.check_covers(dataset.indices.tolist())
        return caps

    def _need_text(self):
        if self.text is None:
            raise LatentError("this unet reads text: pass text= (a TextConditioner of the tokenizer and text encoder "
                              "it was trained with), or load the model from its pipeline folder (--pipeline DIR)")

    # ---- conditioning -----------------------------------------------------------------------------
    def training(self, unet, dataset, num_timesteps: int, seed: int):
        """``(cond_fn, per_timestep)``: ``cond_fn(rows)`` gives the unet's keyword arguments for training rows
        (dataset positions); with ``per_timestep`` its tensors are ``(B, T, ...)``: one per (example, timestep)."""
        kind = unet_conditioning(unet)
        if kind == "text":
            self._need_text()
            from .text import caption_conditioning

            caps = self._captions(dataset)

            def fn(rows):
                idx = dataset.indices[torch.as_tensor(np.asarray(rows))].tolist()
                return caption_conditioning(self.text, caps, idx, self.caption_mode, num_timesteps, seed)
            return fn, self.caption_mode == "random"
        if kind == "class":
            if dataset.labels is None:
                raise InputError("the model is class-conditional but the dataset has no labels; use a labelled dataset")
            return (lambda rows: {"class_labels": dataset.labels[torch.as_tensor(np.asarray(rows))]}), False
        return None, False

    def examples(self, unet, dataset, positions) -> Optional[dict]:
        """The conditioning of training examples scored as targets: their first caption's embedding, or their label."""
        pos = torch.as_tensor(np.asarray(positions), dtype=torch.long).reshape(-1)
        kind = unet_conditioning(unet)
        if kind == "text":
            self._need_text()
            caps = self._captions(dataset)
            return {"encoder_hidden_states": self.text.encode([caps.of(int(dataset.indices[p]))[0] for p in pos])}
        if kind == "class" and dataset.labels is not None:
            return {"class_labels": dataset.labels[pos]}
        return None

    def prompts(self, unet, prompts: Optional[Sequence[str]] = None, class_labels=None) -> Optional[dict]:
        """The conditioning of target images given as prompts (text unets) or class labels (class unets)."""
        kind = unet_conditioning(unet)
        if kind == "text":
            self._need_text()
            if prompts is None:
                raise LatentError("this unet reads text: pass --prompt (prompts= in Python, one per target image)")
            return {"encoder_hidden_states": self.text.encode(list(prompts))}
        if kind == "class":
            if class_labels is None:
                raise InputError("this unet is class-conditional: pass class_labels= (one per target image)")
            return {"class_labels": torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)}
        return None

    @staticmethod
    def of_trajectory(trajectory) -> Optional[dict]:
        """The generation's own conditioning (the prompt's embedding under guidance, and/or its class labels)."""
        if hasattr(trajectory, "conditioning"):
            return trajectory.conditioning()
        if getattr(trajectory, "class_labels", None) is not None:
            return {"class_labels": torch.as_tensor(trajectory.class_labels, dtype=torch.long)}
        return None

    def settings(self, unet, dataset) -> dict:
        """What a feature store records about the conditioning: ``{}`` for a pixel model without text (so pixel
        stores are as they always were), else the VAE, caption and text-model fingerprints."""
        kind = unet_conditioning(unet)
        vae_fp = getattr(dataset, "vae_fingerprint", None)
        if vae_fp is None and kind != "text":
            return {}
        out = {"kind": kind}
        if vae_fp is not None:
            out["vae"] = {"fingerprint": vae_fp, "scaling_factor": dataset.scaling_factor,
                          "shift_factor": dataset.shift_factor, "mode": dataset.mode}
            pixels = getattr(dataset, "pixels", None)
            if pixels is not None:  # the training images the latents are of (checked by api.check_dataset too)
                out["pixels"] = {"fingerprint": pixels.fingerprint(), "size": len(pixels),
                                 "name": getattr(pixels, "name", "")}
        if kind == "text":
            self._need_text()
            out.update(caption_mode=self.caption_mode, captions=self._captions(dataset).fingerprint(),
                       text=self.text.fingerprint())
        return {"conditioning": out}


def conditioning_of(components: Dict[str, object], captions=None, caption_mode: str = "random", device="cpu"):
    """The :class:`Conditioning` of loaded pipeline components (a VAE and/or a tokenizer + text encoder)."""
    text = None
    if components.get("text_encoder") is not None and components.get("tokenizer") is not None:
        from .text import TextConditioner

        text = TextConditioner(components["tokenizer"], components["text_encoder"], device)
    return Conditioning(vae=components.get("vae"), text=text, captions=captions, caption_mode=caption_mode)


def as_checkpoints(checkpoints, device="cpu") -> List[Tuple[torch.nn.Module, object]]:
    """Checkpoint folders, pipeline folders or ``(unet, scheduler)`` pairs as ``(unet, scheduler)`` pairs."""
    out = []
    for c in checkpoints:
        if isinstance(c, (str, os.PathLike)):
            if is_pipeline_folder(c):
                comp = load_pipeline(c, device)
                out.append((comp["unet"], training_scheduler(comp["scheduler"])))
            else:
                out.append(load_checkpoint(c, device))
        else:
            out.append(c)
    if not out:
        raise InputError("no checkpoints given; train a model first (diffusion-trak train) or pass --checkpoints")
    return out
