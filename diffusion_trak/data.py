"""Image datasets for training-data attribution.

Every dataset gives float32 images ``(N, C, H, W)`` scaled to ``[-1, 1]`` (the
range diffusers' UNets are trained on) by one rule for every source (:func:`to_unit_range`:
a stated ``value_range``, else uint8 0..255, 16-bit 0..65535, floats [-1, 1]; anything
outside is refused, never guessed), together with optional integer labels,
optional captions and a *stable index* per example. The bundled sets and
``.npz`` files are held in memory (:class:`ImageDataset`); image folders and
Hugging Face datasets stay on disk and are decoded in batches
(:class:`DiskImageDataset`), so memory does not grow with their size.  The stable
index is the position of the example in the original source ordering (before
``classes``/``limit`` filtering), so attribution scores stored on disk keep
referring to the same training images however the dataset was filtered.

Supported sources (``DataArgs.name``):

``digits``
    scikit-learn's 8x8 handwritten digits (1797 images, bundled with
    scikit-learn, no download).  A fixed-seed permutation splits it into 1500
    ``train`` and 297 ``test`` images.
``fmnist``
    Fashion-MNIST (28x28, 60000 train / 10000 test), read from the IDX files of
    Debian's ``dataset-fashion-mnist`` package, from ``path``, or downloaded by
    torchvision as a last resort.
``folder``
    A directory of image files (png/jpg/jpeg/bmp/webp); first-level
    subfolders, if every image sits in one, are the classes. A
    ``metadata.jsonl`` beside them (the layout of diffusers' text-to-image
    training scripts: lines ``{"file_name": "a.png", "text": "a caption"}``)
    gives the captions (``dataset.captions``, a :class:`~diffusion_trak.text.CaptionSet`).
``hf``
    A Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (a
    ``DatasetDict``'s ``split``), or an image folder read by ``datasets``'
    ``imagefolder`` builder: the ``image`` column (any ``datasets.Image``
    column), ``label`` (a ``ClassLabel`` names the classes) and ``text``
    (captions) when present. Needs ``pip install datasets``.
``npz``
    A NumPy ``.npz`` archive with an ``images`` array and optional ``labels``,
    ``class_names``, ``indices``, ``value_range`` and ``captions`` arrays (see
    :func:`save_npz`). ``captions``: strings, ``(N,)`` (one caption per image)
    or ``(N, K)`` (up to K per image; empty strings pad).
"""
from __future__ import annotations

from .errors import UserError

import dataclasses
import gzip
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DataArgs",
    "DataError",
    "ImageDataset",
    "DiskImageDataset",
    "load_dataset",
    "from_hf",
    "save_npz",
    "to_unit_range",
    "DATASET_NAMES",
    "FMNIST_CLASSES",
    "FMNIST_DEBIAN_DIR",
    "IMAGE_EXTENSIONS",
]

DATASET_NAMES = ("digits", "fmnist", "folder", "npz", "hf")
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

FMNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FMNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CACHE_DIR = os.path.join("~", ".cache", "diffusion_trak")

DIGITS_SEED = 0
DIGITS_NUM_TRAIN = 1500
DIGITS_NUM_TEST = 297

_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


class DataError(UserError, ValueError):
    """A user-fixable problem with the data; the message is one line naming the fix."""


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------


@dataclass
class DataArgs:
    """Which images to load and how to preprocess them.

    Attributes:
        name: Data source, one of ``"digits"`` (scikit-learn 8x8 digits),
            ``"fmnist"`` (Fashion-MNIST 28x28), ``"folder"`` (a directory of
            image files) or ``"npz"`` (a NumPy archive, see :func:`save_npz`).
        path: For ``folder``: the directory holding the images.  For ``hf``: the
            ``save_to_disk`` folder or the image folder.  For ``npz``:
            the ``.npz`` file.  For ``fmnist``: an optional directory holding
            the IDX files (or a torchvision download root); when omitted the
            Debian package directory ``/usr/share/datasets/fashion-mnist`` is
            used, then ``~/.cache/diffusion_trak`` for a torchvision download.
            Unused for ``digits``.
        split: ``"train"`` or ``"test"``.  For ``digits`` a fixed-seed
            permutation of the 1797 images gives 1500 ``train`` and 297
            ``test`` images; for ``fmnist`` the official split; for ``hf`` the
            split of a ``DatasetDict`` (a single split is used whatever its name).
            ``folder`` and ``npz`` have a single split and ignore it.
        image_size: Resize every image to ``image_size x image_size`` with
            bilinear, antialiased interpolation.  ``None`` keeps the native size.
        classes: Keep only examples whose integer label is in this list
            (requires a labelled dataset).  ``None`` keeps all classes.
        limit: Keep only the first ``limit`` examples after class filtering,
            in the stable source order.  ``None`` keeps all.
        channels: Force 1 (grayscale) or 3 (RGB) channels.  ``None`` keeps the
            native channel count (for ``folder``: the majority mode of the files).
        value_range: ``(low, high)`` of the stored pixel values (``--value-range LO HI``), mapped to
            [-1, 1]; ``None`` applies the rule of :func:`to_unit_range` (uint8 0..255, 16-bit 0..65535,
            floats [-1, 1]). Values outside it are refused, never guessed.
    """

    name: str = "digits"
    path: Optional[str] = None
    split: str = "train"
    image_size: Optional[int] = None
    classes: Optional[List[int]] = None
    limit: Optional[int] = None
    channels: Optional[int] = None
    value_range: Optional[Tuple[float, float]] = None

    def __post_init__(self) -> None:
        if self.name not in DATASET_NAMES:
            raise DataError(
                f"unknown dataset {self.name!r}; choose one of {', '.join(DATASET_NAMES)}"
            )
        if self.split not in SPLITS:
            raise DataError(f"unknown split {self.split!r}; use 'train' or 'test'")
        if self.path is not None:
            self.path = str(self.path)
        if self.image_size is not None:
            self.image_size = int(self.image_size)
            if self.image_size <= 0:
                raise DataError(f"--image-size must be positive, got {self.image_size}")
        if self.classes is not None:
            self.classes = [int(c) for c in self.classes]
        if self.limit is not None:
            self.limit = int(self.limit)
            if self.limit <= 0:
                raise DataError(f"--limit must be positive, got {self.limit}")
        if self.channels is not None:
            self.channels = int(self.channels)
            if self.channels not in (1, 3):
                raise DataError(f"--channels must be 1 or 3, got {self.channels}")
        if self.name in ("folder", "npz", "hf") and not self.path:
            raise DataError(f"dataset {self.name!r} needs a path; pass --data-path")
        if self.value_range is not None:
            self.value_range = check_value_range(self.value_range)

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-serialisable dict of the fields."""
        d = dataclasses.asdict(self)
        if d["classes"] is not None:
            d["classes"] = list(d["classes"])
        if d["value_range"] is None:  # left out while unset: run.json files written before it existed still match
            del d["value_range"]
        else:
            d["value_range"] = list(d["value_range"])
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DataArgs":
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(d).items() if k in names})


# --------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------


#: rows per batch when a dataset is read whole (fingerprint, finiteness check): bounds the memory of those reads
READ_BATCH = 256


class _Examples(torch.utils.data.Dataset):
    """What every dataset offers: stable indices, labels, captions, batch reads and the fingerprint.

    Subclasses hold the images (:class:`ImageDataset`: in memory; :class:`DiskImageDataset`: on disk,
    decoded batch by batch) and implement :meth:`read` and :attr:`image_shape`.

    ``dataset[i]`` returns ``{"pixel_values": (C,H,W) tensor, "index": int, "label": int}`` (``label``
    is -1 when unlabelled), which the default DataLoader collate function batches.
    """

    caption_template = "a photo of a {}"
    labels: Optional[torch.Tensor]
    indices: torch.Tensor
    class_names: Optional[List[str]]
    name: str
    #: captions of the examples (a :class:`~diffusion_trak.text.CaptionSet` keyed by stable index) or None
    captions: Any = None

    def read(self, positions) -> torch.Tensor:
        """The images at ``positions`` (positions, not stable indices): float32 ``(B, C, H, W)`` in [-1, 1]."""
        raise NotImplementedError

    @property
    def image_shape(self) -> tuple:
        """``(C, H, W)``."""
        raise NotImplementedError

    def batches(self, size: Optional[int] = None):
        """``(positions, images)`` for consecutive blocks of at most ``size`` (default :data:`READ_BATCH`)
        examples: the whole dataset without ever holding more than one block."""
        size = size or READ_BATCH
        for lo in range(0, len(self), size):
            pos = np.arange(lo, min(lo + size, len(self)))
            yield pos, self.read(pos)

    # -- torch Dataset protocol -------------------------------------------
    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return {
            "pixel_values": self.read([i])[0],
            "index": int(self.indices[i]),
            "label": int(self.labels[i]) if self.labels is not None else -1,
        }

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        lab = "labelled" if self.labels is not None else "unlabelled"
        cap = ", captioned" if self.captions is not None else ""
        return f"{type(self).__name__}(name={self.name!r}, n={len(self)}, shape=({c},{h},{w}), {lab}{cap})"

    # -- properties ---------------------------------------------------------
    @property
    def num_channels(self) -> int:
        return int(self.image_shape[0])

    @property
    def resolution(self) -> int:
        """Image height (images are square for all built-in loaders with ``image_size``)."""
        return int(self.image_shape[1])

    @property
    def num_classes(self) -> Optional[int]:
        if self.class_names is not None:
            return len(self.class_names)
        if self.labels is not None and len(self.labels):
            return int(self.labels.max()) + 1
        return None

    # -- helpers --------------------------------------------------------------
    def fingerprint(self) -> str:
        """Short sha256 hex digest of the image bytes, shape, stable indices and labels, read in batches (the
        same digest whether the images are in memory or on disk)."""
        h = hashlib.sha256()
        h.update(repr((len(self), *self.image_shape)).encode())
        for _, x in self.batches():
            h.update(x.detach().cpu().contiguous().numpy().tobytes())
        h.update(self.indices.detach().cpu().numpy().astype("<i8").tobytes())
        if self.labels is not None:
            h.update(b"labels")
            h.update(self.labels.detach().cpu().numpy().astype("<i8").tobytes())
        return h.hexdigest()[:16]

    def positions_of(self, indices: Union[Sequence[int], np.ndarray, torch.Tensor]) -> torch.Tensor:
        """Positions of the given stable indices (raises ``KeyError`` for unknown ids)."""
        lookup = {int(v): p for p, v in enumerate(self.indices.tolist())}
        out = []
        for v in torch.as_tensor(np.asarray(indices)).reshape(-1).tolist():
            if int(v) not in lookup:
                raise KeyError(f"index {v} is not in dataset {self.name!r}")
            out.append(lookup[int(v)])
        return torch.tensor(out, dtype=torch.long)

    def class_name(self, i: int) -> Optional[str]:
        """Class name of the example at position ``i`` (``None`` if unknown)."""
        if self.labels is None:
            return None
        lab = int(self.labels[i])
        if self.class_names is not None and 0 <= lab < len(self.class_names):
            return self.class_names[lab]
        return str(lab)

    def caption(self, i: int) -> str:
        """Text prompt for example ``i``: its first caption (``captions``), else ``"a photo of a {class name}"``,
        or ``""`` if unlabelled."""
        if self.captions is not None:
            return self.captions.of(int(self.indices[i]))[0]
        cname = self.class_name(i)
        if cname is None:
            return ""
        return self.caption_template.format(cname)

    def describe(self, i: int) -> Dict[str, Any]:
        """Who example ``i`` (a position) is, for people: ``{"index", "source", "caption"}``: its stable index, where
        it comes from (an image folder's file path relative to the folder, a ``datasets`` row, or ``name #index``)
        and its first caption, else its class name, else ``None``."""
        index = int(self.indices[i])
        source = getattr(self, "source", None)
        if source is not None and hasattr(source, "name_of"):
            where = source.name_of(int(self.rows[i]))
        else:
            where = f"{self.name} #{index}"
        if self.captions is not None:
            caption = self.captions.of(index)[0]
        else:
            caption = self.class_name(i)
        return {"index": index, "source": where, "caption": caption}

    def _subset_fields(self, positions):
        pos = torch.as_tensor(np.asarray(positions), dtype=torch.long).reshape(-1)
        return pos, (self.labels[pos].clone() if self.labels is not None else None), self.indices[pos].clone()


class ImageDataset(_Examples):
    """In-memory image dataset with stable example ids.

    Attributes:
        images: float32 tensor ``(N, C, H, W)`` with values in ``[-1, 1]``.
        labels: int64 tensor ``(N,)`` or ``None`` for unlabelled data.
        indices: int64 tensor ``(N,)``: the index of each example in the
            original source ordering (before filtering/limit).
        class_names: names of the label values (``class_names[label]``) or ``None``.
        name: short name of the source (e.g. ``"digits"``).
        captions: a :class:`~diffusion_trak.text.CaptionSet` keyed by stable index, or ``None``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        indices: Optional[torch.Tensor] = None,
        class_names: Optional[Sequence[str]] = None,
        name: str = "dataset",
        captions: Any = None,
    ) -> None:
        images = torch.as_tensor(images)
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        self.images = images.to(torch.float32).contiguous()
        n = self.images.shape[0]
        self.labels, self.indices = _check_labels_indices(labels, indices, n)
        self.class_names = list(class_names) if class_names is not None else None
        self.name = name
        self.captions = captions

    def read(self, positions) -> torch.Tensor:
        return self.images[torch.as_tensor(np.asarray(positions), dtype=torch.long)]

    @property
    def image_shape(self) -> tuple:
        return tuple(int(s) for s in self.images.shape[1:])

    def subset(self, positions: Union[Sequence[int], np.ndarray, torch.Tensor]) -> "ImageDataset":
        """New dataset with the examples at ``positions`` (positions, not stable indices)."""
        pos, labels, indices = self._subset_fields(positions)
        return ImageDataset(self.images[pos].clone(), labels, indices, self.class_names, self.name, self.captions)


def _check_labels_indices(labels, indices, n: int):
    if labels is not None:
        labels = torch.as_tensor(labels).to(torch.long).reshape(-1)
        if labels.shape[0] != n:
            raise ValueError(f"{labels.shape[0]} labels for {n} images")
    if indices is None:
        indices = torch.arange(n, dtype=torch.long)
    indices = torch.as_tensor(indices).to(torch.long).reshape(-1)
    if indices.shape[0] != n:
        raise ValueError(f"{indices.shape[0]} indices for {n} images")
    return labels, indices


class DiskImageDataset(_Examples):
    """Images kept on disk and decoded batch by batch: memory does not grow with the number of images.

    The same interface as :class:`ImageDataset` (``len``, ``dataset[i]``, :meth:`read`, :meth:`batches`,
    :meth:`fingerprint`, labels, stable indices, captions), and the same pixels: an image folder read this
    way gives bit-identical images (and so the same fingerprint) as one read whole. :attr:`images` reads
    every image into one tensor, for code that needs them all (training, plots); featurization reads
    batches only.

    Args:
        source: where the images are: an object with ``load(rows) -> [item, ...]`` (cheap: paths, encoded
            bytes), ``image(item)`` (opens one as a PIL image) and ``describe(row) -> str``: an image folder's
            files (``_FileSource``) or a Hugging Face dataset's image column (``_HFSource``).
        rows: the source rows of the examples, in order.
        mode: ``"L"`` or ``"RGB"``: every image is converted to it.
        image_size: resize to this square size (bilinear, antialiased) or ``None``.
        shape: ``(C, H, W)`` of the decoded images.
    """

    def __init__(self, source, rows, mode: str, image_size: Optional[int], shape: tuple,
                 labels: Optional[torch.Tensor] = None, indices: Optional[torch.Tensor] = None,
                 class_names: Optional[Sequence[str]] = None, name: str = "dataset", captions: Any = None,
                 value_range: Optional[Sequence[float]] = None) -> None:
        self.value_range = value_range  # the stated range of the stored values (None: the rule, see to_unit_range)
        self.source, self.rows = source, np.asarray(rows, dtype=np.int64).reshape(-1)
        self.mode, self.image_size, self._shape = mode, image_size, tuple(int(s) for s in shape)
        self.labels, self.indices = _check_labels_indices(labels, indices, len(self.rows))
        self.class_names = list(class_names) if class_names is not None else None
        self.name = name
        self.captions = captions
        self._fingerprint: Optional[str] = None

    @property
    def image_shape(self) -> tuple:
        return self._shape

    def read(self, positions) -> torch.Tensor:
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        out = torch.empty(len(pos), *self._shape, dtype=torch.float32)
        rows = self.rows[pos]
        for j, (row, item) in enumerate(zip(rows, self.source.load(rows))):
            try:
                with self.source.image(item) as im:
                    x = _decode(im, self.mode, self.image_size, self.value_range, f"image {self.source.describe(row)}")
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001
                raise DataError(f"cannot read image {self.source.describe(row)} ({e}); remove or fix it") from None
            if tuple(x.shape) != self._shape:
                raise DataError(f"image {self.source.describe(row)} is {x.shape[1]}x{x.shape[2]}, not "
                                f"{self._shape[1]}x{self._shape[2]} like the others; pass --image-size to resize them all")
            out[j] = x
        return out

    @property
    def images(self) -> torch.Tensor:
        """Every image in one ``(N, C, H, W)`` tensor (read now; not kept)."""
        return self.read(np.arange(len(self)))

    def fingerprint(self) -> str:
        """As :meth:`ImageDataset.fingerprint` (the same digest for the same pixels), computed once."""
        if self._fingerprint is None:
            self._fingerprint = super().fingerprint()
        return self._fingerprint

    def subset(self, positions: Union[Sequence[int], np.ndarray, torch.Tensor]) -> "DiskImageDataset":
        """New dataset with the examples at ``positions`` (positions, not stable indices); nothing is read."""
        pos, labels, indices = self._subset_fields(positions)
        return DiskImageDataset(self.source, self.rows[pos.numpy()], self.mode, self.image_size, self._shape, labels,
                                indices, self.class_names, self.name, self.captions, self.value_range)

    def to_memory(self) -> ImageDataset:
        """The same dataset held in memory."""
        return ImageDataset(self.images, self.labels, self.indices, self.class_names, self.name, self.captions)


# --------------------------------------------------------------------------
# Conversion helpers
# --------------------------------------------------------------------------


#: integer image types and the range of their values under the rule (bool: 0/1, 8-bit: 0..255, 16-bit: 0..65535)
INTEGER_RANGES = {np.dtype(bool): (0.0, 1.0), np.dtype(np.uint8): (0.0, 255.0), np.dtype(np.uint16): (0.0, 65535.0)}


def check_value_range(value_range) -> Tuple[float, float]:
    """``(low, high)`` as two finite floats with ``low < high``, else a one-line :class:`DataError`."""
    try:
        lo, hi = (float(v) for v in np.asarray(value_range, dtype=np.float64).reshape(-1))
    except (TypeError, ValueError):
        raise DataError(f"value_range must be two numbers (low, high), got {value_range!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise DataError(f"value_range must be two finite numbers with low < high, got {value_range!r}")
    return lo, hi


def to_unit_range(arr, value_range: Optional[Sequence[float]] = None, what: str = "the images",
                  floats: Optional[Tuple[float, float]] = None) -> np.ndarray:
    """Images as float32 in [-1, 1], by the one rule for image values of every source (``.npz``, image files,
    Hugging Face datasets, tensors given to the API):

    - a stated range ``value_range=(low, high)`` (``--value-range LO HI``, an ``.npz``'s ``value_range``) is mapped
      linearly onto [-1, 1];
    - otherwise integers are read by their type: ``uint8`` (8-bit files) 0..255, ``uint16`` (16-bit files)
      0..65535, ``bool`` 0/1 (other integer types need a stated range);
    - otherwise floats need a stated range, except where the caller documents one (``floats``): tensors given to
      the Python API are [-1, 1], the model's own range (what datasets and trajectories hold); there, floats with
      positive but no negative values are refused, as they look like [0, 1] data.

    Values outside the range (by more than a millionth of it), NaN and Inf are refused in one line naming what
    was seen: nothing is clipped, rescaled from the extremes or guessed.
    """
    a = np.asarray(arr)
    if a.dtype.kind not in "biuf":
        raise DataError(f"{what} hold values of type {a.dtype}, not numbers; give uint8 0..255, uint16 or float images")
    stated = value_range is not None
    if stated:
        lo, hi = check_value_range(value_range)
    elif a.dtype in INTEGER_RANGES:
        lo, hi = INTEGER_RANGES[a.dtype]
    elif a.dtype.kind in "iu":
        raise DataError(f"{what} are integers of type {a.dtype}, whose range the rule does not fix (uint8: 0..255, "
                        "uint16: 0..65535); state it with --value-range LO HI (value_range=(lo, hi)), e.g. 0 255")
    elif floats is None:
        seen = f" (they span [{float(np.nanmin(a)):g}, {float(np.nanmax(a)):g}])" if a.size else ""
        raise DataError(f"{what} are floats{seen} and state no range; state it with --value-range LO HI "
                        "(value_range=(lo, hi), or an .npz's value_range array), e.g. 0 1 or -1 1")
    else:
        lo, hi = floats
    kind, a = a.dtype.kind, a.astype(np.float32)
    if a.size == 0:
        return a
    if not np.isfinite(a).all():
        raise DataError(f"{what} contain NaN or Inf values; clean the data before loading")
    seen_lo, seen_hi = float(a.min()), float(a.max())
    tol = 1e-6 * (hi - lo)
    if seen_lo < lo - tol or seen_hi > hi + tol:
        rule = "the stated range" if stated else ("the range floats are read as" if kind == "f" else "their type's range")
        raise DataError(f"{what} have values in [{seen_lo:g}, {seen_hi:g}], outside {rule} [{lo:g}, {hi:g}]; "
                        "state their range with --value-range LO HI (value_range=(lo, hi))")
    if not stated and kind == "f" and seen_lo >= 0 and seen_hi > 0:
        raise DataError(f"{what} are floats without a negative value (in [{seen_lo:g}, {seen_hi:g}]): that looks like "
                        f"[0, 1] data, but floats are read as [{lo:g}, {hi:g}]; state the range: value_range=(0, 1), "
                        "or (-1, 1) if they are [-1, 1] images")
    return np.clip((a - lo) / ((hi - lo) / 2.0) - 1.0, -1.0, 1.0).astype(np.float32)


def _convert_channels(images: torch.Tensor, channels: Optional[int]) -> torch.Tensor:
    c = images.shape[1]
    if c == 4:  # drop alpha
        images = images[:, :3]
        c = 3
    if c == 2:  # gray + alpha
        images = images[:, :1]
        c = 1
    if channels is None or channels == c:
        return images
    if channels == 3 and c == 1:
        return images.repeat(1, 3, 1, 1)
    if channels == 1 and c == 3:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
        return (images * w).sum(dim=1, keepdim=True)
    raise DataError(f"cannot convert {c}-channel images to {channels} channels; use --channels 1 or 3")


def _resize(images: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    if size is None or (images.shape[-2] == size and images.shape[-1] == size):
        return images
    out = []
    for chunk in torch.split(images, 4096):
        out.append(
            F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        )
    return torch.cat(out).clamp_(-1.0, 1.0)


def _select(
    labels: Optional[np.ndarray], n: int, args: DataArgs, source: str
) -> np.ndarray:
    """Positions kept by ``classes`` then ``limit`` (stable order)."""
    keep = np.arange(n)
    if args.classes is not None:
        if labels is None:
            raise DataError(f"--classes needs labels but {source} is unlabelled; drop --classes")
        keep = keep[np.isin(labels, np.asarray(args.classes, dtype=np.int64))]
    if args.limit is not None:
        keep = keep[: args.limit]
    if keep.size == 0:
        raise DataError(
            f"dataset is empty after filtering ({source}, classes={args.classes}, "
            f"limit={args.limit}); check --classes/--limit"
        )
    return keep


def _finish(
    images: np.ndarray,
    labels: Optional[np.ndarray],
    indices: np.ndarray,
    class_names: Optional[Sequence[str]],
    args: DataArgs,
    value_range: Optional[Sequence[float]] = None,
    what: str = "the images",
) -> ImageDataset:
    """uint8/float (N,C,H,W) -> scaled (:func:`to_unit_range`), channel-converted, resized dataset."""
    t = torch.from_numpy(np.ascontiguousarray(to_unit_range(images, value_range, what)))
    t = _convert_channels(t, args.channels)
    t = _resize(t, args.image_size)
    lab = torch.from_numpy(labels.astype(np.int64)) if labels is not None else None
    return ImageDataset(t, lab, torch.from_numpy(indices.astype(np.int64)), class_names, args.name)


# --------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------


def _load_digits(args: DataArgs) -> ImageDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.asarray(d.images, dtype=np.float32)  # (1797, 8, 8) in 0..16
    targets = np.asarray(d.target, dtype=np.int64)
    perm = np.random.RandomState(DIGITS_SEED).permutation(len(imgs))
    assert len(perm) == DIGITS_NUM_TRAIN + DIGITS_NUM_TEST
    split = perm[:DIGITS_NUM_TRAIN] if args.split == "train" else perm[DIGITS_NUM_TRAIN:]
    imgs, targets = imgs[split], targets[split]
    keep = _select(targets, len(imgs), args, "digits")
    x = imgs[keep][:, None] / 16.0  # [0, 1]
    return _finish(x, targets[keep], keep, [str(i) for i in range(10)], args, value_range=(0.0, 1.0))


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file; reinstall dataset-fashion-mnist or delete it")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = data[2], data[3]
    if code not in dtypes:
        raise DataError(f"{path}: unsupported IDX type code {code:#x}")
    dims = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dt = np.dtype(dtypes[code])
    count = int(np.prod(dims)) if dims else 0
    offset = 4 + 4 * ndim
    if len(data) < offset + count * dt.itemsize:
        raise DataError(f"{path} is truncated; reinstall dataset-fashion-mnist or delete it")
    arr = np.frombuffer(data, dtype=dt, count=count, offset=offset).reshape(dims)
    return arr.astype(dt.newbyteorder("="), copy=False)


def _find_idx_pair(root: Path, prefix: str) -> Optional[tuple]:
    for d in (root, root / "FashionMNIST" / "raw", root / "raw"):
        for ext in (".gz", ""):
            img = d / f"{prefix}-images-idx3-ubyte{ext}"
            lab = d / f"{prefix}-labels-idx1-ubyte{ext}"
            if img.is_file() and lab.is_file():
                return img, lab
    return None


def _load_fmnist(args: DataArgs) -> ImageDataset:
    prefix = "train" if args.split == "train" else "t10k"
    roots = []
    if args.path:
        roots.append(Path(args.path).expanduser())
    roots.append(Path(FMNIST_DEBIAN_DIR))
    pair = None
    for r in roots:
        pair = _find_idx_pair(r, prefix)
        if pair is not None:
            break
    if pair is not None:
        images = _read_idx(pair[0])
        labels = _read_idx(pair[1]).astype(np.int64)
    else:
        root = os.path.expanduser(args.path or FMNIST_CACHE_DIR)
        try:
            from torchvision.datasets import FashionMNIST

            ds = FashionMNIST(root=root, train=(args.split == "train"), download=True)
            images = ds.data.numpy()
            labels = ds.targets.numpy().astype(np.int64)
        except Exception as e:  # noqa: BLE001 - any failure means "no data"
            raise DataError(
                "Fashion-MNIST not found: install Debian's dataset-fashion-mnist "
                "(apt-get install -y dataset-fashion-mnist) or let torchvision download "
                f"Fashion-MNIST to {root} (needs internet; error: {type(e).__name__}: {e})".replace("\n", " ")
            ) from None
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise DataError(f"Fashion-MNIST files look corrupt (images {images.shape}, labels {labels.shape})")
    keep = _select(labels, len(images), args, "fmnist")
    return _finish(images[keep][:, None], labels[keep], keep, FMNIST_CLASSES, args)


def _list_images(root: Path) -> List[Path]:
    files = [
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not any(
            part.startswith(".") for part in p.relative_to(root).parts
        )
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


#: PIL modes of 16-bit (``I;16*``, ``I``) and float (``F``) grayscale images: their values are read as stored
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "F")


def _decode(im, mode: str, image_size: Optional[int], value_range: Optional[Sequence[float]] = None,
            what: str = "the image") -> torch.Tensor:
    """One PIL image as a float32 ``(C, H, W)`` tensor in [-1, 1] by the rule of :func:`to_unit_range`: 8-bit images
    0..255, 16-bit ones 0..65535, float ones as floats, or ``value_range`` when stated; with the channels of
    ``mode`` (``L`` or ``RGB``), resized to ``image_size`` (bilinear, antialiased)."""
    if im.mode in _WIDE_MODES:
        if im.mode != "F" and value_range is None:
            value_range = INTEGER_RANGES[np.dtype(np.uint16)]
        a = to_unit_range(np.asarray(im), value_range, what)
        a = a[:, :, None] if a.ndim == 2 else a
        a = np.repeat(a, 3, axis=2) if mode == "RGB" else a
    else:
        a = to_unit_range(np.asarray(im.convert(mode), dtype=np.uint8), value_range, what)
        a = a[:, :, None] if a.ndim == 2 else a
    t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]
    return _resize(t, image_size)[0]


class _FileSource:
    """Image files, opened one at a time (``DiskImageDataset.source``)."""

    def __init__(self, files: Sequence[Path], root: Optional[Path] = None):
        self.files, self.root = list(files), root

    def load(self, rows) -> list:
        return [self.files[int(r)] for r in rows]

    @staticmethod
    def image(item):
        from PIL import Image

        return Image.open(item)

    def describe(self, row) -> str:
        return str(self.files[int(row)])

    def name_of(self, row) -> str:
        """The file's path relative to the image folder (what a person knows it by)."""
        f = self.files[int(row)]
        return f.relative_to(self.root).as_posix() if self.root is not None else str(f)


class _HFSource:
    """The image column of a Hugging Face ``datasets.Dataset`` (memory-mapped Arrow; read without decoding,
    as ``{"bytes", "path"}``), a batch of rows at a time."""

    def __init__(self, ds, column: str, where: str):
        import datasets

        self.ds = ds.cast_column(column, datasets.Image(decode=False))
        self.column, self.where = column, where

    def load(self, rows) -> list:
        return self.ds[[int(r) for r in rows]][self.column]

    @staticmethod
    def image(item):
        import io

        from PIL import Image

        if item.get("bytes") is not None:
            return Image.open(io.BytesIO(item["bytes"]))
        return Image.open(item["path"])

    def describe(self, row) -> str:
        return f"row {int(row)} of {self.where}"

    def name_of(self, row) -> str:
        return f"row {int(row)}"


def _probe(source, rows: np.ndarray, args: DataArgs, where: str) -> tuple:
    """``(mode, (C, H, W))`` of the images at ``rows`` of ``source``: the forced or majority mode (``L`` or
    ``RGB``) and the common size, from the image headers only (nothing is decoded); none is opened when
    ``--channels`` and ``--image-size`` are both given."""
    modes, sizes, first_of = Counter(), Counter(), {}
    if args.channels is None or args.image_size is None:
        for lo in range(0, len(rows), READ_BATCH):
            chunk = rows[lo:lo + READ_BATCH]
            for row, item in zip(chunk, source.load(chunk)):
                try:
                    with source.image(item) as im:
                        modes["L" if im.mode in _GRAY_MODES else "RGB"] += 1
                        size = (im.size[1], im.size[0])
                except Exception as e:  # noqa: BLE001
                    raise DataError(f"cannot read image {source.describe(row)} ({e}); remove or fix it") from None
                sizes[size] += 1
                first_of.setdefault(size, row)
    if args.channels is not None:
        mode = "L" if args.channels == 1 else "RGB"
    else:
        mode = "L" if modes["L"] > modes["RGB"] else "RGB"
    if args.image_size is not None:
        hw = (args.image_size, args.image_size)
    else:
        (hw, _), *rest = sizes.most_common()
        if rest:
            odd = next(first_of[s] for s in sizes if s != hw)
            raise DataError(
                f"images under {where} have different sizes ({', '.join(f'{h}x{w}' for h, w in sizes)}, "
                f"e.g. {source.describe(odd)}); pass --image-size to resize them all"
            )
    return mode, (1 if mode == "L" else 3, *hw)


def _read_metadata(root: Path, rel: List[Path]) -> Optional[Dict[int, List[str]]]:
    """Captions from ``root/metadata.jsonl`` (diffusers' text-to-image layout: one line
    ``{"file_name": "a.png", "text": "a caption"}`` per image; ``text`` may be a list of captions), keyed by
    each file's position in ``rel``; ``None`` without the file."""
    path = root / "metadata.jsonl"
    if not path.is_file():
        return None
    by_name: Dict[str, List[str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path} line {lineno} is not JSON; write one JSON object per line") from None
            if not isinstance(rec, dict) or "file_name" not in rec or "text" not in rec:
                raise DataError(f'{path} line {lineno} needs "file_name" and "text"; write lines like '
                                '{"file_name": "a.png", "text": "a caption"}')
            text = rec["text"]
            captions = [text] if isinstance(text, str) else text
            if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
                raise DataError(f'{path} line {lineno}: "text" must be a caption or a list of captions')
            by_name[Path(rec["file_name"]).as_posix()] = captions
    names = [r.as_posix() for r in rel]
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DataError(f"{len(missing)} images under {root} have no line in metadata.jsonl (e.g. {missing[0]}); "
                        "add their captions or remove the images")
    unknown = sorted(set(by_name) - set(names))
    if unknown:
        raise DataError(f"metadata.jsonl names {len(unknown)} files that are not images under {root} "
                        f"(e.g. {unknown[0]}); fix their file_name or remove the lines")
    return {i: by_name[n] for i, n in enumerate(names)}


def _captions(by_index: Optional[Dict[int, List[str]]], indices: np.ndarray):
    """The :class:`~diffusion_trak.text.CaptionSet` of the kept examples (``None`` without captions)."""
    if by_index is None:
        return None
    from .text import CaptionSet

    return CaptionSet({int(i): by_index[int(i)] for i in indices})


def _disk_dataset(source, labels, keep, class_names, captions, args: DataArgs, where: str) -> DiskImageDataset:
    mode, shape = _probe(source, keep, args, where)
    return DiskImageDataset(source, keep, mode, args.image_size, shape,
                            torch.from_numpy(labels[keep]) if labels is not None else None,
                            torch.from_numpy(keep.astype(np.int64)), class_names, args.name,
                            _captions(captions, keep), args.value_range)


def _load_folder(args: DataArgs) -> DiskImageDataset:
    root = Path(args.path).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; check --data-path")
    files = _list_images(root)
    if not files:
        raise DataError(
            f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) found under {root}; check --data-path"
        )
    rel = [f.relative_to(root) for f in files]
    labels = None
    class_names = None
    if all(len(r.parts) >= 2 for r in rel):
        class_names = sorted({r.parts[0] for r in rel})
        cid = {c: i for i, c in enumerate(class_names)}
        labels = np.array([cid[r.parts[0]] for r in rel], dtype=np.int64)
    captions = _read_metadata(root, rel)
    keep = _select(labels, len(files), args, f"folder {root}")
    return _disk_dataset(_FileSource(files, root), labels, keep, class_names, captions, args, str(root))


def _datasets_module():
    try:
        import datasets
    except ImportError:
        raise DataError("--data hf needs the Hugging Face datasets package; pip install datasets") from None
    return datasets


def _load_hf(args: DataArgs) -> DiskImageDataset:
    """A ``datasets`` dataset saved with ``save_to_disk``, or an image folder read by ``datasets``'
    ``imagefolder`` builder (subfolder labels, ``metadata.jsonl`` columns)."""
    datasets = _datasets_module()
    root = Path(args.path).expanduser()
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        ds, where = datasets.load_from_disk(str(root)), f"the saved dataset {root}"
    elif root.is_dir():
        ds, where = datasets.load_dataset("imagefolder", data_dir=str(root)), f"the imagefolder {root}"
    else:
        raise DataError(f"{root} is neither a dataset saved with save_to_disk nor an image folder; check --data-path")
    return _hf_dataset(ds, args, where)


def _hf_dataset(ds, args: DataArgs, where: str, image_column: Optional[str] = None,
                text_column: Optional[str] = None, label_column: str = "label") -> DiskImageDataset:
    """A ``datasets.Dataset`` (or a ``DatasetDict``: its ``args.split``, or its only split) as a dataset: images
    from ``image_column`` (default: ``image``, else the first ``datasets.Image`` column), captions from
    ``text_column`` (default: ``text``, the caption column of diffusers' text-to-image scripts, else ``caption``),
    labels and class names from ``label_column`` when present."""
    datasets = _datasets_module()
    if isinstance(ds, datasets.DatasetDict):
        if args.split in ds:
            ds = ds[args.split]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DataError(f"{where} has splits {', '.join(ds)} but no {args.split!r}; "
                            "save the training split alone (ds['...'].save_to_disk), or pass it alone (ds['...'])")
    images = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    if image_column is not None and image_column not in images:
        what = "is not a datasets.Image column" if image_column in ds.column_names else "is not a column"
        raise DataError(f"image_column {image_column!r} of {where} {what} (columns: {', '.join(ds.column_names)}); "
                        "name the column that holds the images")
    if not images:
        raise DataError(f"{where} has no image column (columns: {', '.join(ds.column_names)}); "
                        "store the images in a datasets.Image column")
    column = image_column or ("image" if "image" in images else images[0])
    labels, class_names = None, None
    if label_column in ds.features:
        labels = np.asarray(ds[label_column], dtype=np.int64)
        class_names = getattr(ds.features[label_column], "names", None)
    if text_column is not None and text_column not in ds.column_names:
        raise DataError(f"text_column {text_column!r} is not a column of {where} (columns: {', '.join(ds.column_names)}); "
                        "name the column that holds the captions")
    text = text_column or next((c for c in ("text", "caption") if c in ds.column_names), None)
    captions = None
    if text is not None:
        captions = {}
        for i, t in enumerate(ds[text]):
            c = [t] if isinstance(t, str) else t
            if not isinstance(c, (list, tuple)) or not c or not all(isinstance(x, str) for x in c):
                raise DataError(f"row {i} of the {text!r} column of {where} holds {t!r}, not a caption (a string or "
                                "a list of strings); fill in or drop the rows without captions, or name another "
                                "column with text_column=")
            captions[i] = list(c)
    keep = _select(labels, len(ds), args, where)
    return _disk_dataset(_HFSource(ds, column, where), labels, keep, class_names, captions, args, where)


def from_hf(ds, image_column: Optional[str] = None, text_column: Optional[str] = None, label_column: str = "label",
            split: str = "train", image_size: Optional[int] = None, channels: Optional[int] = None,
            classes: Optional[List[int]] = None, limit: Optional[int] = None) -> DiskImageDataset:
    """An in-memory Hugging Face ``datasets.Dataset`` or ``DatasetDict`` (its ``split``, or its only one) as a
    training set, as ``--data hf`` reads a saved one: images from ``image_column``, captions from ``text_column``
    (defaults: ``image``/the first image column, and ``text`` else ``caption``), labels from ``label_column``;
    the stable index of an example is its row. ``Attributor(train_data=ds)`` calls this with the defaults."""
    datasets = _datasets_module()
    if not isinstance(ds, (datasets.Dataset, datasets.DatasetDict)):
        raise DataError(f"from_hf takes a datasets.Dataset or DatasetDict, got a {type(ds).__name__}")
    args = DataArgs(name="hf", path="<in memory>", split=split, image_size=image_size, classes=classes, limit=limit,
                    channels=channels)
    return _hf_dataset(ds, args, "the datasets.Dataset in memory", image_column, text_column, label_column)


def _load_npz(args: DataArgs) -> ImageDataset:
    path = Path(args.path).expanduser()
    if not path.is_file():
        raise DataError(f"npz file {path} does not exist; check --data-path")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read {path} as .npz ({e}); check --data-path") from None
    with z:
        if "images" not in z.files:
            raise DataError(f"{path} has no 'images' array (found: {', '.join(z.files) or 'none'}); "
                            "save images under the key 'images'")
        try:  # object arrays (which only a pickle could load) and damaged members end here
            images = np.asarray(z["images"])
            labels = np.asarray(z["labels"]).astype(np.int64).reshape(-1) if "labels" in z.files else None
            class_names = [str(s) for s in np.asarray(z["class_names"]).reshape(-1)] if "class_names" in z.files else None
            src_idx = np.asarray(z["indices"]).astype(np.int64).reshape(-1) if "indices" in z.files else None
            value_range = np.asarray(z["value_range"], dtype=np.float64).reshape(-1) if "value_range" in z.files else None
            caption_array = np.asarray(z["captions"]) if "captions" in z.files else None
        except Exception as e:  # noqa: BLE001
            why = " ".join(str(e).split())[:100]
            raise DataError(f"cannot read the arrays of {path} ({type(e).__name__}: {why}); save plain numeric arrays "
                            "(no object arrays) with np.savez") from None
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        if images.shape[-1] in (1, 2, 3, 4) and images.shape[1] not in (1, 2, 3, 4):
            images = images.transpose(0, 3, 1, 2)
        elif images.shape[1] not in (1, 2, 3, 4):
            raise DataError(f"{path}: cannot find the channel axis of images {images.shape}; "
                            "save as (N,H,W), (N,H,W,C) or (N,C,H,W) with C in 1..4")
    else:
        raise DataError(f"{path}: images must be (N,H,W), (N,H,W,C) or (N,C,H,W), got {images.shape}")
    n = images.shape[0]
    if labels is not None and labels.shape[0] != n:
        raise DataError(f"{path}: {labels.shape[0]} labels for {n} images; fix the 'labels' array")
    if src_idx is not None and src_idx.shape[0] != n:
        raise DataError(f"{path}: {src_idx.shape[0]} indices for {n} images; fix the 'indices' array")
    if value_range is not None and value_range.shape[0] != 2:
        raise DataError(f"{path}: value_range must hold 2 numbers (low, high)")
    if value_range is not None and args.value_range is not None and tuple(value_range) != tuple(args.value_range):
        raise DataError(f"{path} states value_range {value_range.tolist()} but --value-range is "
                        f"{list(args.value_range)}; drop --value-range or fix the file's value_range")
    by_index = None if caption_array is None else _npz_captions(caption_array, n, path)
    keep = _select(labels, n, args, f"npz {path}")
    indices = src_idx[keep] if src_idx is not None else keep
    ds = _finish(images[keep], labels[keep] if labels is not None else None, indices, class_names,
                 args, value_range=value_range if value_range is not None else args.value_range,
                 what=f"the images of {path}")
    if by_index is not None:  # captions by position in the file, re-keyed by the kept examples' stable indices
        ds.captions = _captions({int(i): by_index[int(p)] for p, i in zip(keep, indices)}, indices)
    return ds


def _npz_captions(a: np.ndarray, n: int, path) -> Dict[int, List[str]]:
    """An ``.npz``'s ``captions`` array as ``{position: [captions]}``: strings ``(N,)`` or ``(N, K)`` (empty strings
    pad a row); one line for anything else."""
    if a.dtype.kind not in "US":
        raise DataError(f"{path}: captions must be an array of strings, got dtype {a.dtype}; save them with "
                        "np.array(list_of_str)")
    if a.ndim not in (1, 2) or a.shape[0] != n:
        raise DataError(f"{path}: captions must be (N,) or (N, K) strings for the {n} images, got shape {a.shape}; "
                        "give one caption (or a row of captions) per image")
    rows = a.reshape(n, -1)
    out = {}
    for p in range(n):
        caps = [str(c.decode() if isinstance(c, bytes) else c) for c in rows[p]]
        caps = [c for c in caps if c.strip()]
        if not caps:
            raise DataError(f"{path}: image {p} has no caption (empty string); give every image a caption")
        out[p] = caps
    return out


_LOADERS = {
    "digits": _load_digits,
    "fmnist": _load_fmnist,
    "folder": _load_folder,
    "npz": _load_npz,
    "hf": _load_hf,
}


def load_dataset(args: Union[DataArgs, Dict[str, Any], None] = None, **overrides: Any):
    """Load the dataset described by ``args`` (a :class:`DataArgs` or dict): an :class:`ImageDataset`
    (``digits``, ``fmnist``, ``npz``) or a :class:`DiskImageDataset` (``folder``, ``hf``).

    Keyword ``overrides`` replace fields of ``args`` (``load_dataset(name="digits", limit=10)``).
    Raises :class:`DataError` with a one-line, actionable message on user errors.
    """
    if args is None:
        args = DataArgs(**overrides)
    else:
        if isinstance(args, dict):
            args = DataArgs.from_dict(args)
        if overrides:
            args = dataclasses.replace(args, **overrides)
    return _LOADERS[args.name](args)


def save_npz(dataset: ImageDataset, path: Union[str, os.PathLike], dtype: str = "float32") -> str:
    """Export ``dataset`` to a ``.npz`` readable by ``DataArgs(name="npz", path=...)``.

    Keys: ``images`` (N,C,H,W), ``indices`` (stable ids), ``labels`` and
    ``class_names`` and ``captions`` when present, and ``value_range``.  ``dtype="float32"``
    stores the exact [-1, 1] values (``value_range=[-1, 1]``); ``dtype="uint8"``
    stores 0..255 (smaller, quantised; ``value_range=[0, 255]``).
    Returns the path written.
    """
    path = str(path)
    if not path.endswith(".npz"):
        path += ".npz"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    x = dataset.images.detach().cpu().numpy()
    if dtype == "uint8":
        images = np.round((np.clip(x, -1, 1) + 1.0) * 127.5).astype(np.uint8)
        value_range = np.array([0.0, 255.0])
    elif dtype == "float32":
        images = x.astype(np.float32)
        value_range = np.array([-1.0, 1.0])
    else:
        raise ValueError(f"dtype must be 'float32' or 'uint8', got {dtype!r}")
    arrays: Dict[str, np.ndarray] = {
        "images": images,
        "indices": dataset.indices.cpu().numpy().astype(np.int64),
        "value_range": value_range,
    }
    if dataset.labels is not None:
        arrays["labels"] = dataset.labels.cpu().numpy().astype(np.int64)
    if dataset.class_names is not None:
        arrays["class_names"] = np.array([str(c) for c in dataset.class_names])
    if dataset.captions is not None:
        rows = [dataset.captions.of(int(i)) for i in dataset.indices.tolist()]
        k = max(len(r) for r in rows)
        arrays["captions"] = np.array([list(r) + [""] * (k - len(r)) for r in rows], dtype=str)
    np.savez_compressed(path, **arrays)
    return path
