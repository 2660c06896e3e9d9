"""Target features computed once per (checkpoint, targets), shared by scoring, baselines and evaluations.

:func:`target_features_of` gives the target features (:func:`diffusion_trak.targets.all_target_features`) of
every checkpoint of a :class:`~diffusion_trak.api.FeatureSet`. Without a cache attached it simply computes
them. :func:`attach` gives the feature set a :class:`TargetCache` (in memory, and in a folder when given): then
every later request for the same checkpoint, featurizer settings, targets, noises, output and conditioning
is read back instead of recomputed, in this process and, with a folder, in later ones. Entries are keyed by
what the features depend on: the checkpoint's fingerprint and the featurizer settings recorded in the
feature store, digests of the target images and of the conditioning, ``R``, the seed, the output function
and the destination's draws.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .targets import TargetSet, all_target_features, digest

#: the key of the cache in ``FeatureSet.reuse``
REUSE_KEY = "target_cache"


class TargetCache:
    """Target features by key: in memory, and in ``folder`` (one ``.npz`` per entry, written whole then
    renamed, with its key beside it in ``.json``) when given."""

    def __init__(self, folder: Optional[str] = None):
        self.folder = folder
        self.memory = {}

    @staticmethod
    def file_name(key: dict) -> str:
        """The entry's file name (without extension): a sha256 of the key."""
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]

    def get(self, key: dict, compute) -> dict:
        """The arrays (``{name: np.ndarray}``) stored under ``key``, or ``compute()``-d and stored."""
        h = self.file_name(key)
        if h in self.memory:
            return self.memory[h]
        path = os.path.join(self.folder, f"{h}.npz") if self.folder else None
        arrays = None
        if path and os.path.exists(path):
            try:  # a zip member whose CRC-32 does not match (a flipped bit) raises: the entry is computed again
                with np.load(path, allow_pickle=False) as z:
                    arrays = {name: z[name] for name in z.files}
            except Exception:  # noqa: BLE001 - any damage of the cache's own file
                arrays = None
        if arrays is None:
            arrays = compute()
            if path:
                from .store import make_dirs, write_json_atomic

                make_dirs(self.folder)
                write_json_atomic(os.path.join(self.folder, f"{h}.json"), key)
                tmp = f"{path}.tmp{os.getpid()}.npz"
                np.savez(tmp, **arrays)
                os.replace(tmp, path)
        self.memory[h] = arrays
        return arrays

    def keys(self) -> List[dict]:
        """The keys of the entries in the folder."""
        if not self.folder or not os.path.isdir(self.folder):
            return []
        out = []
        for name in sorted(os.listdir(self.folder)):
            if name.endswith(".json") and os.path.exists(os.path.join(self.folder, name[:-5] + ".npz")):
                with open(os.path.join(self.folder, name)) as f:
                    out.append(json.load(f))
        return out


def attach(features, folder: Optional[str] = None) -> TargetCache:
    """Give ``features`` (a FeatureSet) a target cache (kept in ``folder`` when given) and return it; a cache
    already attached with the same folder is kept."""
    cache = features.reuse.get(REUSE_KEY)
    if cache is None or cache.folder != folder:
        cache = features.reuse[REUSE_KEY] = TargetCache(folder)
    return cache


def _cond_digest(cond: Optional[dict]) -> Optional[str]:
    if not cond:
        return None
    return digest(*[x for name in sorted(cond) for x in (name, cond[name])])


def target_features_of(features, ckpts: Sequence, targets: TargetSet, R: int, seed: int, output: Optional[str] = None,
                       cond: Optional[dict] = None, destination_draws: int = 0,
                       device="cpu") -> Tuple[List[np.ndarray], Optional[List[np.ndarray]]]:
    """``(per checkpoint (S, B, k), per checkpoint (B, k) or None)``: the target features of ``targets`` with
    the featurizer of every checkpoint of ``features`` (``ckpts``: its ``(unet, scheduler)`` pairs, already
    checked to be the feature store's), read from the attached :class:`TargetCache` when it has them.
    Featurizers are built (:meth:`FeatureSet.featurizers`) only when something is computed."""
    cache = features.reuse.get(REUSE_KEY)
    settings = features.store.settings

    def compute(c):
        f = features.featurizers(ckpts, device)[c]
        tf = all_target_features(f, targets, R, seed, output, cond, destination_draws)
        arrays = {"steps": tf.steps.numpy()}
        if tf.destination is not None:
            arrays["destination"] = tf.destination.numpy()
        return arrays

    per_ckpt = []
    for c, fingerprint in enumerate(settings["checkpoints"]):
        if cache is None:
            per_ckpt.append(compute(c))
            continue
        key = {"checkpoint": fingerprint, "featurize": settings["featurize"], "steps": targets.step_digest(),
               "final": targets.final_digest() if destination_draws > 0 else None, "num_noises": int(R),
               "seed": int(seed), "output": output, "cond": _cond_digest(cond), "destination_draws": int(destination_draws)}
        per_ckpt.append(cache.get(key, lambda c=c: compute(c)))
    steps = [a["steps"] for a in per_ckpt]
    dest = [a["destination"] for a in per_ckpt] if destination_draws > 0 else None
    return steps, dest
