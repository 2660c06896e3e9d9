"""The one on-disk format: a folder with ``manifest.json`` and ``.npy`` memmaps with done flags.

::

    store/
      manifest.json          {"format", "settings", "arrays": {name: {"shape", "dtype"}}}
      <name>.npy             the rows (np.lib.format, so shape and dtype are in the header)
      <name>.crc.npy         one uint32 per row: the zlib.crc32 of the row's bytes, written with the row
      <name>.done.npy        one bool per row, set only after the row's data and checksum are flushed

Writing order makes every crash safe: rows are written and flushed before their checksums, and those
before their done flags; the manifest is written to a temporary file and renamed. A rerun computes only rows whose
flag is unset; rows are deterministic functions of their index, so the result is identical to an
uninterrupted run. Files are fully allocated on creation, so a full disk fails at once with a
clear message instead of in the middle of a write.

These rules keep what is stored safe:

- **Reads never write.** :meth:`Store.open_existing` (and every store after :meth:`Store.close`) opens
  files read-only; a missing or damaged file is an error naming ``--overwrite``, never recreated.
- **One writer.** A writer holds an exclusive ``fcntl.flock`` on the store's folder while it is open;
  a second writer is refused with one line naming the process that holds it. The processes of one
  ``accelerate launch`` share the store: only rank 0 takes the lock, the others write their own rows.
- **``overwrite`` always gets past damage.** A writer opened with ``overwrite=True`` replaces the store
  when its settings differ *or* any of its files is missing or damaged, and otherwise resumes it.
- **A store owns only what it made.** It deletes or overwrites only files with its own names (the manifest,
  ``<name>.npy``/``.crc.npy``/``.done.npy`` of the arrays its manifest lists, their temporary names
  ``<file>.tmp`` and ``manifest.json.tmpPID``); a folder holding anything else, or a ``manifest.json`` that
  is not a store's, is refused (with or without ``overwrite``) naming what it holds.
- **Checksums.** Every done row carries its crc32; :meth:`StoredArray.read` checks them all, and a writer
  that resumes a store recomputes the rows whose checksum does not match.

The same rule holds for every other file a command or the Python API writes (:func:`claim`): a trajectory, a
scores folder, a report page or picture, a run folder. A path that diffusion-trak did not write (no manifest or
marker of ours: a trajectory's header, ``scores.json``'s checksums, the report's generator mark, ``run.json``) is
refused in one line before anything is written, with or without ``overwrite``; ``overwrite`` replaces only files of
ours; a result already there (a trajectory, scores) is never replaced by another one without ``overwrite``.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import weakref
import zlib
from typing import Optional, Sequence

import numpy as np

from .errors import UserError

FORMAT = "diffusion-trak-store/2"
MANIFEST = "manifest.json"
#: the files of an array (``<name><suffix>``)
ARRAY_SUFFIXES = (".npy", ".crc.npy", ".done.npy")
#: a name a store gives its files: an array's files and their temporary names, the manifest and its temporary names
_STORE_NAME = re.compile(r"(?:[A-Za-z0-9_]+(?:\.crc|\.done)?\.npy(?:\.tmp)?|manifest\.json(?:\.tmp\d+)?)")


class StoreError(UserError, RuntimeError):
    """A store cannot be used as asked (one line, names the fix)."""


def staged(path: str, write, mode: str = "wb") -> str:
    """Write a file's whole content (``write(f)``) under its temporary name ``PATH.tmpPID``, flushed to disk; return
    that name (``os.replace`` it onto ``path`` to commit). On failure the temporary file is removed."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def is_staged(name: str, of) -> bool:
    """Whether ``name`` is the temporary name that :func:`staged` gives one of the file names ``of``
    (``NAME.tmpPID``): what an interrupted write leaves, and the only such names a writer may remove."""
    return any(re.fullmatch(re.escape(f) + r"\.tmp\d+", name) for f in of)


def write_json_atomic(path: str, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename (never half-written)."""
    os.replace(staged(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True), "w"), path)


def make_dirs(path: str, flag: str = "--out") -> str:
    """``os.makedirs(path, exist_ok=True)``, or a one-line error naming ``flag`` when it cannot be made."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create the folder {path}: {e.strerror or e}; choose another {flag}") from None
    if not os.path.isdir(path):
        raise StoreError(f"cannot create the folder {path}: a file has that name; choose another {flag}")
    return path


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:,.1f} MiB"


def free_memory(device="cpu") -> Optional[int]:
    """Bytes of memory free for a job on ``device``: the GPU's free memory, else the host's ``MemAvailable``."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_resources(what: str, fix: str, memory: int = 0, disk: int = 0, folder: Optional[str] = None,
                    device="cpu") -> None:
    """Refuse (one line: ``what`` needs so much, so much is free; ``fix``) a job whose estimated ``memory`` (bytes,
    on ``device``) or ``disk`` (bytes, written under ``folder``) is more than is free, before anything is allocated
    or written. Files of that size already in ``folder`` (a store being resumed) count as free."""
    free = free_memory(device)
    if memory and free is not None and memory > free:
        raise StoreError(f"{what} needs about {_gib(memory)} of memory, {_gib(free)} is free; {fix}")
    if disk and folder is not None:
        probe = os.path.abspath(folder)
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        usage = shutil.disk_usage(probe)
        if usage.total == 0:  # a pseudo file system (/proc): creating the folder will fail, with its own message
            return
        have = usage.free
        if os.path.isdir(folder):
            have += sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
                        if _STORE_NAME.fullmatch(n) and os.path.isfile(os.path.join(folder, n)))
        if disk > have:
            raise StoreError(f"{what} needs about {_gib(disk)} of disk in {folder}, {_gib(have)} is free; {fix}")


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


# ---------------------------------------------------------------------------------------------- the lock
_HELD: dict = {}  # (st_dev, st_ino) of a locked folder -> [fd, number of Store objects using it, pid of the holder]


def _holder(st) -> str:
    """``process PID (command)`` holding a flock on the file with ``os.stat`` result ``st`` (Linux /proc/locks)."""
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        if parts[5].rsplit(":", 1)[-1] != str(st.st_ino):
            continue
        pid = parts[4]
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = ""
        cmd = " ".join(cmd.split())
        cmd = cmd if len(cmd) <= 100 else cmd[:97] + "..."
        return f"process {pid}" + (f" ({cmd})" if cmd else "")
    return "another process"


def _lock(root: str):
    """Take (or share, within this process) the exclusive lock of the folder ``root``; return its key."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    if key in _HELD and _HELD[key][2] == os.getpid():
        os.close(fd)
        _HELD[key][1] += 1
        return key
    _HELD.pop(key, None)  # inherited through fork: the lock is the parent's, not ours
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        raise StoreError(f"{root} is being written by {_holder(st)}; wait for it to finish or stop it, "
                         "or choose another --out") from None
    _HELD[key] = [fd, 1, os.getpid()]
    return key


def _unlock(key) -> None:
    held = _HELD.get(key)
    if held is None or held[2] != os.getpid():
        return
    held[1] -= 1
    if held[1] <= 0:
        del _HELD[key]
        os.close(held[0])  # closing the last descriptor releases the flock


def _is_lock_owner() -> bool:
    """Rank 0 of a launch (``accelerate``, torchrun, SLURM) or a process started on its own."""
    return int(os.environ.get("RANK", "0") or 0) == 0


# ---------------------------------------------------------------------------------------------- arrays
def _check_npy(path: str, shape, dtype) -> None:
    """Raise :class:`StoreError` unless ``path`` is a complete ``.npy`` file of ``dtype[shape]`` (read-only check)."""
    if not os.path.exists(path):
        raise StoreError(f"{path} is missing; rerun the command that wrote {os.path.dirname(path)} with --overwrite")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            hshape, fortran, hdtype = read_header(f)
            offset = f.tell()
        expected = offset + int(np.prod(hshape)) * np.dtype(hdtype).itemsize
        if os.path.getsize(path) < expected:
            raise ValueError(f"{os.path.getsize(path)} bytes, expected {expected}")
    except (ValueError, OSError, EOFError) as e:
        msg = str(e).replace("\n", " ")
        raise StoreError(f"{path} is truncated or corrupted ({msg}); delete the store or rerun with --overwrite") from None
    if tuple(hshape) != tuple(shape) or np.dtype(hdtype) != np.dtype(dtype) or fortran:
        raise StoreError(f"{path} holds {np.dtype(hdtype)}{list(hshape)}, expected {np.dtype(dtype)}{list(shape)}; "
                         "rerun with --overwrite")


def row_checksums(rows) -> np.ndarray:
    """The zlib.crc32 of each row's bytes (``rows``: an array or memmap, first axis = rows), as uint32."""
    out = np.empty(len(rows), dtype=np.uint32)
    for i in range(len(rows)):
        out[i] = zlib.crc32(np.ascontiguousarray(rows[i]))
    return out


class StoredArray:
    """Rows of one array plus their checksums and done flags, opened read-only (``writable=False``) or for writing."""

    def __init__(self, store: "Store", name: str, shape: Sequence[int], dtype: str, writable: bool = False,
                 create: bool = False):
        self.name, self.shape, self.dtype = name, tuple(int(s) for s in shape), np.dtype(dtype)
        self.path = os.path.join(store.root, f"{name}.npy")
        self.crc_path = os.path.join(store.root, f"{name}.crc.npy")
        self.done_path = os.path.join(store.root, f"{name}.done.npy")
        if create:
            self._create()
        self.root, self.writable = store.root, writable
        mode = "r+" if writable else "r"
        self.data = self._open(self.path, self.shape, self.dtype, mode)
        self.crc = self._open(self.crc_path, (self.shape[0],), np.dtype(np.uint32), mode)
        self.done = self._open(self.done_path, (self.shape[0],), np.dtype(bool), mode)

    def _files(self):
        rows = (self.shape[0],)
        return ((self.path, self.shape, self.dtype), (self.crc_path, rows, np.dtype(np.uint32)),
                (self.done_path, rows, np.dtype(bool)))

    def _create(self):
        """New, zeroed files (replacing leftovers of an earlier crash); each is complete before it gets its name."""
        for path, shape, dtype in self._files():
            tmp = path + ".tmp"
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            del mm
            _allocate(tmp, os.path.getsize(tmp))
            os.replace(tmp, path)

    @staticmethod
    def _open(path, shape, dtype, mode):
        _check_npy(path, shape, dtype)
        try:
            return np.lib.format.open_memmap(path, mode=mode)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):  # the store is fine; its place is not writable
                raise StoreError(f"cannot write {path} ({e.strerror}); the store is intact: make its folder writable, "
                                 "or read it without writing, or choose another --out") from None
            raise StoreError(f"{path} cannot be opened ({e}); delete the store or rerun with --overwrite") from None
        except ValueError as e:
            raise StoreError(f"{path} cannot be opened ({e}); delete the store or rerun with --overwrite") from None

    def pending(self, rows: Optional[Sequence[int]] = None) -> np.ndarray:
        """Row ids (of ``rows``, default all) whose done flag is unset."""
        rows = np.arange(self.shape[0]) if rows is None else np.asarray(rows)
        return rows[~self.done[rows]]

    def complete(self) -> bool:
        return bool(self.done.all())

    def write(self, rows: Sequence[int], values) -> None:
        """Write rows, flush them, then their checksums, then mark them done (in that order)."""
        rows = np.asarray(rows)
        values = np.asarray(values, dtype=self.dtype)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise StoreError(f"refusing to store NaN/Inf in {self.name} rows {rows[:5].tolist()}...; "
                             "check the inputs and model for NaN (lower the learning rate or fix the data)")
        self.data[rows] = values
        self.data.flush()
        self.seal(rows, values)

    def seal(self, rows: Sequence[int], values=None) -> None:
        """Checksum rows already written and flushed into :attr:`data` (``values``: the same rows, if at hand),
        then mark them done."""
        rows = np.asarray(rows)
        self.crc[rows] = row_checksums(self.data[rows] if values is None else values)
        self.crc.flush()
        self.done[rows] = True
        self.done.flush()

    def damaged_rows(self, block: int = 1024) -> np.ndarray:
        """Done rows whose data no longer matches its checksum (read in blocks of ``block`` rows)."""
        bad = []
        for lo in range(0, self.shape[0], block):
            sums = row_checksums(self.data[lo:lo + block])
            bad.append(lo + np.flatnonzero((sums != self.crc[lo:lo + block]) & self.done[lo:lo + block]))
        return np.concatenate(bad) if bad else np.zeros(0, dtype=int)

    def read(self) -> np.ndarray:
        """The whole array, every row checked against its checksum; raises if any row is missing or damaged."""
        how = "rerun the same command" if self.writable else f"rerun the command that wrote {self.root}"
        if not self.complete():
            missing = int((~self.done[:]).sum())
            raise StoreError(f"{self.path} is incomplete ({missing} of {self.shape[0]} rows missing); {how} to finish it")
        bad = self.damaged_rows()
        if len(bad):
            rows = ", ".join(map(str, bad[:8].tolist())) + (", ..." if len(bad) > 8 else "")
            raise StoreError(f"{self.path} rows [{rows}] ({len(bad)} of {self.shape[0]}) do not match their checksums "
                             f"(changed or damaged on disk); {how} to recompute them")
        return self.data


# ---------------------------------------------------------------------------------------------- stores
def _read_manifest(root: str) -> dict:
    """The manifest of the store at ``root``, checked for shape; :class:`StoreError` if missing or damaged."""
    path = os.path.join(root, MANIFEST)
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise StoreError(f"no store at {root}; run the step that creates it first") from None
    except (ValueError, OSError) as e:
        raise StoreError(f"{path} is corrupted ({type(e).__name__}); rerun the command that wrote {root} "
                         "with --overwrite") from None
    ok = (isinstance(m, dict) and isinstance(m.get("settings"), dict) and isinstance(m.get("arrays"), dict)
          and all(isinstance(a, dict) and isinstance(a.get("shape"), list) and isinstance(a.get("dtype"), str)
                  and all(isinstance(s, int) and s >= 0 for s in a["shape"]) and len(a["shape"]) >= 1
                  for a in m["arrays"].values()))
    if ok:
        try:
            for a in m["arrays"].values():
                np.dtype(a["dtype"])
        except TypeError:
            ok = False
    if not ok:
        raise StoreError(f"{path} is corrupted (not a store manifest); rerun the command that wrote {root} "
                         "with --overwrite")
    if m.get("format") != FORMAT:
        raise StoreError(f"{root} was written by another version of diffusion-trak (format {m.get('format')!r}, "
                         f"this one reads {FORMAT!r}, with checksums); rerun the command that wrote it with --overwrite")
    return m


def _own_files(manifest: Optional[dict]) -> set:
    """The names of the files a store with ``manifest`` wrote (its manifest, and the files of the arrays it lists
    or was creating)."""
    names = {MANIFEST}
    if manifest:
        for name in list(manifest.get("arrays", {})) + list(manifest.get("creating", [])):
            names.update(name + suffix for suffix in ARRAY_SUFFIXES)
    return names


def _is_own(name: str, own: set) -> bool:
    """Whether ``name`` is one of ``own`` or the temporary name of one of them (``X.tmp``, ``manifest.json.tmpPID``)."""
    return name in own or (name.endswith(".tmp") and name[:-4] in own) or is_staged(name, (MANIFEST,))


def _describe(root: str, names) -> str:
    """``a, b, sub/, ...``: some entries of ``root``."""
    names = sorted(names)
    shown = [n + ("/" if os.path.isdir(os.path.join(root, n)) else "") for n in names[:5]]
    return ", ".join(shown) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _check_owned(root: str, manifest: Optional[dict]) -> None:
    """Refuse (one line naming what it holds) a folder that is not a store's: one with a ``manifest.json`` that is
    not a store manifest beside files of other names, or without a store manifest and with other files than a
    store's. ``manifest``: the store manifest read in ``root`` (None: missing or damaged)."""
    if manifest is not None:
        return
    names = os.listdir(root)
    foreign = [n for n in names if not _STORE_NAME.fullmatch(n) or not os.path.isfile(os.path.join(root, n))]
    arrays = [n for n in names if n.endswith(".npy")]
    if foreign or (MANIFEST in names and not arrays):
        raise StoreError(f"{root} is not a diffusion-trak store (it holds {_describe(root, names)}); nothing was "
                         "changed: choose another output folder (a new or empty one)")


def _clear(root: str, manifest: Optional[dict]) -> None:
    """Delete the store's own files in ``root`` (those of ``manifest``, else every store-named file, which
    :func:`_check_owned` made sure are all the folder holds); the folder and anything else in it stay."""
    for name in os.listdir(root):
        own = _is_own(name, _own_files(manifest)) if manifest is not None else _STORE_NAME.fullmatch(name)
        if own and os.path.isfile(os.path.join(root, name)):
            os.remove(os.path.join(root, name))


def clear_own(root: str, own: str, what: str, delete: bool = True) -> None:
    """Delete what a command wrote in the folder ``root``: every entry, all of whose names fully match the regular
    expression ``own``; if ``root`` holds anything else, refuse in one line naming it, deleting nothing
    (``delete=False``: only that check)."""
    if not os.path.isdir(root):
        return
    names = os.listdir(root)
    foreign = [n for n in names if not re.fullmatch(own, n)]
    if foreign:
        raise StoreError(f"{root} holds files that {what} did not write ({_describe(root, foreign)}); nothing was "
                         "deleted: move them away, or choose another folder")
    for name in names if delete else ():
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


# ---------------------------------------------------------------------------------------------- the one rule
#: the mark a report's page (``<meta name="generator">``) and picture (PNG ``Software``) carry
GENERATOR = "diffusion-trak"
#: the entries of a run folder (``--run``), as the CLI lays it out
RUN_ENTRIES = ("run.json", "model", "features", "latents", "trajectories", "scores", "report")
#: the entries of a scores folder: the score store and the saved result
SCORES_ENTRIES = ("store", "scores.npy", "destination.npy", "scores.json")


def _is_trajectory(path: str) -> bool:
    """Whether ``path`` is a trajectory file diffusion-trak wrote (a safetensors header with our metadata)."""
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            return "diffusion_trak.trajectory" in (f.metadata() or {})
    except Exception:
        return False


def _is_report(path: str) -> bool:
    """Whether ``path`` is a report page or picture diffusion-trak wrote (its generator mark)."""
    if path.endswith(".html"):
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except OSError:
            return False
        return f'<meta name="generator" content="{GENERATOR}">'.encode() in head or b'id="journey-data"' in head
    try:
        from PIL import Image

        with Image.open(path) as im:
            return str(im.info.get("Software", "")).startswith(GENERATOR)
    except Exception:
        return False


def _is_scores_json(path: str) -> bool:
    """Whether ``path`` is a ``scores.json`` that :meth:`~diffusion_trak.api.Scores.save` wrote (it checksums itself)."""
    try:
        with open(path) as f:
            s = json.load(f)
        return isinstance(s, dict) and isinstance(s.get("checksums"), dict) and "scores.json" in s["checksums"]
    except (OSError, ValueError):
        return False


def _foreign_in_scores(root: str) -> list:
    """The entries of the scores folder ``root`` that are not ours."""
    names = os.listdir(root)
    foreign = [n for n in names if n not in SCORES_ENTRIES and not is_staged(n, SCORES_ENTRIES)]
    if foreign:
        return foreign
    if "store" in names:
        try:
            _read_manifest(os.path.join(root, "store"))
        except StoreError:
            return ["store/"]
    if "scores.json" in names and not _is_scores_json(os.path.join(root, "scores.json")):
        return [n for n in names if n != "store"]
    if "store" not in names and "scores.json" not in names:  # arrays with neither our store nor our summary
        return [n for n in names if n.endswith(".npy")]
    return []


def claim(path: str, kind: str, flag: str = "--out") -> bool:
    """The one rule for a file or folder a command is about to write (outside a store, which checks its own):
    refuse, in one line naming ``flag``, a ``path`` that exists and is not diffusion-trak's ``kind``; return whether
    it exists (and is ours). Call it before anything is written. ``kind``:

    - ``"trajectory"``: a ``.safetensors`` trajectory file (ours: the header metadata of a trajectory);
    - ``"report"``: a report's ``.png`` or ``.html`` (ours: the generator mark they carry);
    - ``"scores"``: a scores folder (ours: only :data:`SCORES_ENTRIES`, a score store's manifest, a ``scores.json``
      that checksums itself);
    - ``"run"``: a run folder (ours: empty, a ``run.json``, or only :data:`RUN_ENTRIES`).

    Whether an existing result of ours may be replaced is the caller's question (never without ``overwrite``,
    unless it holds the same result)."""
    if not os.path.lexists(path):
        return False
    folder = kind in ("scores", "run")
    if folder != os.path.isdir(path):
        raise StoreError(f"{flag} {path} is {'a file' if folder else 'a folder'}, not {'a folder' if folder else 'a file'}; "
                         f"choose another {flag}")
    if kind == "trajectory":
        ours, what = _is_trajectory(path), "a trajectory diffusion-trak wrote"
    elif kind == "report":
        ours, what = _is_report(path), "a report diffusion-trak wrote"
    elif kind == "scores":
        foreign = _foreign_in_scores(path)
        ours, what = not foreign, f"a diffusion-trak scores folder (it holds {_describe(path, foreign)})"
    elif kind == "run":
        names = os.listdir(path)
        ours = "run.json" in names or all(n in RUN_ENTRIES for n in names)
        what = f"a diffusion-trak run folder (it holds {_describe(path, [n for n in names if n not in RUN_ENTRIES])})"
    else:
        raise ValueError(f"unknown kind {kind!r}")
    if not ours:
        raise StoreError(f"{flag} {path} is not {what}; nothing was changed (not even with --overwrite): move it "
                         f"away or choose another {flag}")
    return True


def _remove_leftovers(root: str, manifest: dict) -> None:
    """Remove the temporary files of an interrupted write: exactly ``<own file>.tmp`` and ``manifest.json.tmpPID``."""
    own = _own_files(manifest)
    for name in os.listdir(root):
        if name not in own and _is_own(name, own) and os.path.isfile(os.path.join(root, name)):
            os.remove(os.path.join(root, name))


class Store:
    """A folder of arrays made with one set of settings, opened for writing.

    Opening an existing store with different settings raises :class:`StoreError` listing the
    differences, unless ``overwrite=True``, which replaces it (as it does a damaged store). The writer
    holds the store's lock until :meth:`close` (or until it is garbage-collected, or the process ends);
    ``lock=None`` locks unless this is a non-zero rank of a launch (which shares its rank 0's lock).
    Use :meth:`open_existing` to read.
    """

    def __init__(self, root: str, settings: dict, overwrite: bool = False, lock: Optional[bool] = None):
        self.root, self.readonly, self.overwrite = root, False, overwrite
        self.manifest_path = os.path.join(root, MANIFEST)
        settings = json.loads(json.dumps(settings))
        self._key = None
        make_dirs(root)
        if _is_lock_owner() if lock is None else lock:
            self._key = _lock(root)
            self._finalizer = weakref.finalize(self, _unlock, self._key)
            try:
                self.manifest = self._prepare(settings, overwrite, cleanup=True)
            except BaseException:
                self.close()
                raise
        else:
            self.manifest = self._prepare(settings, overwrite, cleanup=False)
        self.settings = settings

    def _prepare(self, settings: dict, overwrite: bool, cleanup: bool) -> dict:
        """Check the existing store (refusing, or replacing it when ``overwrite``); return its manifest. A folder
        that is not a store's is refused either way, and nothing but the store's own files is ever deleted."""
        manifest, damage = None, None
        if os.path.exists(self.manifest_path):
            try:
                manifest = _read_manifest(self.root)
            except StoreError as e:
                damage = e
        _check_owned(self.root, manifest)
        if damage is not None and not overwrite:
            raise damage
        if manifest is not None:
            if manifest.get("settings") != settings:
                if not overwrite:
                    changes = "; ".join(_diff(manifest["settings"], settings)[:6])
                    raise StoreError(f"{self.root} was made with other settings ({changes}); "
                                     "rerun with --overwrite to replace it, or choose another output folder")
                replace = True
            else:  # same settings: resume, unless (with overwrite) some file is damaged
                replace = False
                if overwrite:
                    try:
                        for name, spec in manifest["arrays"].items():
                            _check_npy(os.path.join(self.root, f"{name}.npy"), spec["shape"], spec["dtype"])
                            _check_npy(os.path.join(self.root, f"{name}.crc.npy"), spec["shape"][:1], np.uint32)
                            _check_npy(os.path.join(self.root, f"{name}.done.npy"), spec["shape"][:1], bool)
                    except StoreError:
                        replace = True
        else:
            replace = damage is not None
        if replace and cleanup:
            _clear(self.root, manifest)
        if replace:
            manifest = None
        if cleanup:
            _remove_leftovers(self.root, manifest)
        if manifest is None:
            manifest = {"format": FORMAT, "settings": settings, "arrays": {}}
            write_json_atomic(self.manifest_path, manifest)
        return manifest

    @classmethod
    def open_existing(cls, root: str) -> "Store":
        """The store at ``root``, read-only: nothing is created, truncated or locked."""
        if not os.path.isdir(root):
            raise StoreError(f"no store at {root}; run the step that creates it first")
        self = cls.__new__(cls)
        self.root, self.readonly, self.overwrite, self._key = root, True, False, None
        self.manifest_path = os.path.join(root, MANIFEST)
        self.manifest = _read_manifest(root)
        self.settings = self.manifest["settings"]
        return self

    def close(self) -> None:
        """Release the lock; the store stays readable (read-only) through this object."""
        if self._key is not None:
            self._finalizer.detach()
            _unlock(self._key)
            self._key = None
        self.readonly = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def array(self, name: str, shape: Sequence[int], dtype: str = "float32") -> StoredArray:
        """The array ``name`` for writing, created (zeroed, no rows done) if the store does not list it yet."""
        if self.readonly:
            raise RuntimeError(f"{self.root} is open read-only")
        spec = {"shape": [int(s) for s in shape], "dtype": np.dtype(dtype).str}
        known = self.manifest["arrays"].get(name)
        if known is not None and known != spec:
            if not self.overwrite:
                raise StoreError(f"{self.root}/{name} is {known}, asked for {spec}; rerun with --overwrite")
            known = None
        if known is None:  # the manifest names the files before they exist, so that they count as the store's
            if name not in self.manifest.setdefault("creating", []):
                self.manifest["creating"].append(name)
            write_json_atomic(self.manifest_path, self.manifest)
        arr = StoredArray(self, name, shape, dtype, writable=True, create=known is None)
        if known is None:
            self.manifest["arrays"][name] = spec
            self.manifest["creating"].remove(name)
            if not self.manifest["creating"]:
                del self.manifest["creating"]
            write_json_atomic(self.manifest_path, self.manifest)
        else:  # rows whose data no longer matches their checksum are computed again
            bad = arr.damaged_rows()
            if len(bad):
                arr.done[bad] = False
                arr.done.flush()
        return arr

    def get(self, name: str) -> StoredArray:
        """An array the store lists (read-only once the store is closed or opened with :meth:`open_existing`)."""
        spec = self.manifest["arrays"].get(name)
        if spec is None:
            raise StoreError(f"{self.root} has no array {name!r}; it has {sorted(self.manifest['arrays'])}")
        return StoredArray(self, name, spec["shape"], spec["dtype"], writable=not self.readonly)

    def names(self):
        return sorted(self.manifest["arrays"])
