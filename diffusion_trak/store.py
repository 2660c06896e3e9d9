"""The one on-disk format: a folder with ``manifest.json`` and ``.npy`` memmaps with done flags.

::

    store/
      manifest.json          {"format", "settings", "arrays": {name: {"shape", "dtype"}}}
      <name>.npy             the rows (np.lib.format, so shape and dtype are in the header)
      <name>.done.npy        one bool per row, set only after the row's data is flushed

Writing order makes every crash safe: rows are written and flushed before their done flags,
and the manifest is written to a temporary file and renamed. A rerun computes only rows whose
flag is unset; rows are deterministic functions of their index, so the result is identical to an
uninterrupted run. Files are fully allocated on creation, so a full disk fails at once with a
clear message instead of in the middle of a write.
"""
from __future__ import annotations

from .errors import UserError

import errno
import json
import os
import shutil
from typing import Optional, Sequence

import numpy as np

FORMAT = "diffusion-trak-store/1"


class StoreError(UserError, RuntimeError):
    """A store cannot be used as asked (one line, names the fix)."""


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _diff(old: dict, new: dict, prefix="") -> list:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, prefix + key + ".")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _allocate(path: str, nbytes: int) -> None:
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, nbytes)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            os.remove(path)
            raise StoreError(f"disk full: {path} needs {nbytes / 2**20:.1f} MiB; free space or choose another --out") from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


class StoredArray:
    """Rows of one array plus their done flags."""

    def __init__(self, store: "Store", name: str, shape: Sequence[int], dtype: str):
        self.name, self.shape, self.dtype = name, tuple(int(s) for s in shape), np.dtype(dtype)
        self.path = os.path.join(store.root, f"{name}.npy")
        self.done_path = os.path.join(store.root, f"{name}.done.npy")
        if not os.path.exists(self.path) or not os.path.exists(self.done_path):
            self._create()
        self.data = self._open(self.path, self.shape, self.dtype)
        self.done = self._open(self.done_path, (self.shape[0],), np.dtype(bool))

    def _create(self):
        for path, shape, dtype in ((self.path, self.shape, self.dtype), (self.done_path, (self.shape[0],), np.dtype(bool))):
            tmp = path + ".tmp"
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            del mm
            _allocate(tmp, os.path.getsize(tmp))
            os.replace(tmp, path)

    def _open(self, path, shape, dtype):
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                hshape, _, hdtype = read_header(f)
                offset = f.tell()
            expected = offset + int(np.prod(hshape)) * np.dtype(hdtype).itemsize
            if os.path.getsize(path) < expected:
                raise ValueError(f"{os.path.getsize(path)} bytes, expected {expected}")
            mm = np.lib.format.open_memmap(path, mode="r+")
        except (ValueError, OSError) as e:
            raise StoreError(f"{path} is truncated or corrupted ({e}); delete the store or rerun with --overwrite") from None
        if tuple(mm.shape) != tuple(shape) or mm.dtype != dtype:
            raise StoreError(f"{path} holds {mm.dtype}{list(mm.shape)}, expected {dtype}{list(shape)}; "
                             "rerun with --overwrite")
        return mm

    def pending(self, rows: Optional[Sequence[int]] = None) -> np.ndarray:
        """Row ids (of ``rows``, default all) whose done flag is unset."""
        rows = np.arange(self.shape[0]) if rows is None else np.asarray(rows)
        return rows[~self.done[rows]]

    def complete(self) -> bool:
        return bool(self.done.all())

    def write(self, rows: Sequence[int], values) -> None:
        """Write rows, flush them, then mark them done (in that order)."""
        rows = np.asarray(rows)
        values = np.asarray(values, dtype=self.dtype)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise StoreError(f"refusing to store NaN/Inf in {self.name} rows {rows[:5].tolist()}...; "
                             "check the inputs and model for NaN (lower the learning rate or fix the data)")
        self.data[rows] = values
        self.data.flush()
        self.done[rows] = True
        self.done.flush()

    def read(self) -> np.ndarray:
        """The whole array; raises if any row is missing."""
        if not self.complete():
            missing = int((~self.done[:]).sum())
            raise StoreError(f"{self.path} is incomplete ({missing} of {self.shape[0]} rows missing); rerun the same command to finish it")
        return self.data


class Store:
    """A folder of arrays made with one set of settings.

    Opening an existing store with different settings raises :class:`StoreError` listing the
    differences, unless ``overwrite=True``, which deletes it first.
    """

    def __init__(self, root: str, settings: dict, overwrite: bool = False):
        self.root = root
        self.manifest_path = os.path.join(root, "manifest.json")
        settings = json.loads(json.dumps(settings))
        if os.path.exists(self.manifest_path):
            try:
                with open(self.manifest_path) as f:
                    manifest = json.load(f)
            except (ValueError, OSError):
                raise StoreError(f"{self.manifest_path} is corrupted; rerun with --overwrite") from None
            if manifest.get("settings") != settings:
                if not overwrite:
                    changes = "; ".join(_diff(manifest.get("settings", {}), settings)[:6])
                    raise StoreError(f"{root} was made with other settings ({changes}); "
                                     "rerun with --overwrite to replace it, or choose another output folder")
                shutil.rmtree(root)
                manifest = None
        else:
            manifest = None
        if manifest is None:
            os.makedirs(root, exist_ok=True)
            manifest = {"format": FORMAT, "settings": settings, "arrays": {}}
            write_json_atomic(self.manifest_path, manifest)
        self.manifest = manifest
        self.settings = settings

    @classmethod
    def open_existing(cls, root: str) -> "Store":
        path = os.path.join(root, "manifest.json")
        if not os.path.exists(path):
            raise StoreError(f"no store at {root}; run the step that creates it first")
        with open(path) as f:
            return cls(root, json.load(f)["settings"])

    def array(self, name: str, shape: Sequence[int], dtype: str = "float32") -> StoredArray:
        spec = {"shape": [int(s) for s in shape], "dtype": np.dtype(dtype).str}
        known = self.manifest["arrays"].get(name)
        if known is not None and known != spec:
            raise StoreError(f"{self.root}/{name} is {known}, asked for {spec}; rerun with --overwrite")
        arr = StoredArray(self, name, shape, dtype)
        if known is None:
            self.manifest["arrays"][name] = spec
            write_json_atomic(self.manifest_path, self.manifest)
        return arr

    def get(self, name: str) -> StoredArray:
        spec = self.manifest["arrays"].get(name)
        if spec is None:
            raise StoreError(f"{self.root} has no array {name!r}; it has {sorted(self.manifest['arrays'])}")
        return StoredArray(self, name, spec["shape"], spec["dtype"])

    def names(self):
        return sorted(self.manifest["arrays"])
