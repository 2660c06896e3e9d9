"""The layout of an evaluation run folder (``python -m diffusion_trak.evaluations.run ... --out RUN``), in one place.

::

    RUN/
      config.json  timing.json  speedup.json  lds.json  report.md  plots/
      attributed/ckpt-XXXX/            the attributed model's checkpoints
      trajectory.safetensors           the generated targets' trajectories
      features/                        training features (a store)
      target-features/                 target features per (checkpoint, targets) (diffusion_trak.target_cache)
      scores/{generated,heldout}/      TRAK scores (api.Scores)
      baselines/                       encoder.pt, scores.npz, destination.npz
      subsets[-masked]/                masks.npy and the LDS models (``-masked`` with lds_mode="masked")
      replicates[-masked]/             the seed replicates
      groundtruth[-masked]/SET/        measured outputs of the LDS models (stores; SET-destination too)
      groundtruth-replicates[-masked]/SET/
      audit/                           audit-MODE[-LABEL].json, models-MODE/, regenerated-MODE/, restart_check.json
      ablations/                       evaluations.ablations

Writers (:mod:`evaluations.run`, :mod:`evaluations.audit`, :mod:`evaluations.ablations`) and readers
(:mod:`evaluations.bench_featurize`, :mod:`diffusion_trak.report.evidence`) all ask a :class:`RunFolder`.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import numpy as np

SETS = ("generated", "heldout")


def lds_folder(name: str, lds_mode: str) -> str:
    """Folder name of the LDS models and their ground truth: ``name``, or ``name-masked`` for
    ``lds_mode="masked"``, so that both kinds of harness can live in one run folder."""
    return name + ("-masked" if lds_mode == "masked" else "")


class AuditFolder:
    """Where the retrain-without-top-k audit keeps its files (``RUN/audit``)."""

    def __init__(self, root: str):
        self.root = root

    def models(self, mode: str) -> str:
        return os.path.join(self.root, f"models-{mode}")

    def regenerated(self, mode: str) -> str:
        return os.path.join(self.root, f"regenerated-{mode}")

    def result(self, mode: str, label: str = "") -> str:
        return os.path.join(self.root, f"audit-{mode}{'-' + label if label else ''}.json")

    @property
    def restart_check(self) -> str:
        return os.path.join(self.root, "restart_check.json")


class RunFolder:
    """The files of one evaluation run. ``lds_mode`` (the config's) picks the LDS models' folders.

    Attributes (paths): ``config_file``, ``timing_file``, ``speedup_file``, ``lds_file``, ``report_file``,
    ``plots`` (folder), ``attributed`` (checkpoints), ``trajectory``, ``features`` (training-feature store),
    ``target_features`` (the target cache, :mod:`diffusion_trak.target_cache`), ``ablations`` (folder)."""

    def __init__(self, root: str, lds_mode: str = "retrain"):
        self.root, self.lds_mode = root, lds_mode
        self._config: Optional[dict] = None
        join = os.path.join
        self.config_file, self.timing_file = join(root, "config.json"), join(root, "timing.json")
        self.speedup_file, self.lds_file = join(root, "speedup.json"), join(root, "lds.json")
        self.report_file, self.plots = join(root, "report.md"), join(root, "plots")
        self.attributed, self.trajectory = join(root, "attributed"), join(root, "trajectory.safetensors")
        self.features, self.target_features = join(root, "features"), join(root, "target-features")
        self.ablations = join(root, "ablations")

    @classmethod
    def open(cls, root: str) -> "RunFolder":
        """An existing run, its ``lds_mode`` read from its ``config.json`` (one-line error without one)."""
        from diffusion_trak.errors import UserError

        folder = cls(root)
        if not os.path.exists(folder.config_file):
            raise UserError(f"{root} is not an evaluation run (no config.json); give the --out folder of "
                            "`diffusion-trak evaluate`")
        folder.lds_mode = folder.config.get("lds_mode", "retrain")
        return folder

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def config(self) -> dict:
        """The run's ``config.json`` as saved (a dict)."""
        if self._config is None:
            with open(self.config_file, encoding="utf-8") as f:
                self._config = json.load(f)
        return self._config

    def plot(self, name: str) -> str:
        return os.path.join(self.plots, name)

    def scores(self, target_set: str) -> str:
        return self.path("scores", target_set)

    def baselines(self, name: str) -> str:
        """``encoder.pt``, ``scores.npz`` (per step) or ``destination.npz`` (the final image as query)."""
        return self.path("baselines", name)

    # ---- the LDS harness
    @property
    def subsets(self) -> str:
        return self.path(lds_folder("subsets", self.lds_mode))

    @property
    def masks_file(self) -> str:
        return os.path.join(self.subsets, "masks.npy")

    @property
    def replicates(self) -> str:
        return self.path(lds_folder("replicates", self.lds_mode))

    def groundtruth(self, target_set: str, replicates: bool = False) -> str:
        """The ground-truth store of ``target_set`` (``generated``, ``heldout``, ``generated-destination``, ...)."""
        return self.path(lds_folder("groundtruth-replicates" if replicates else "groundtruth", self.lds_mode), target_set)

    @property
    def audit(self) -> AuditFolder:
        return AuditFolder(self.path("audit"))

    # ---- readers
    def masks(self) -> np.ndarray:
        """``(M, N)`` bool: the training subset of each LDS model."""
        return np.load(self.masks_file)

    def ground_truth(self, target_set: str, replicates: bool = False) -> Dict[str, np.ndarray]:
        """``{kind: (M, S, B)}`` measured outputs (the mean of the two halves) of ``target_set``'s store; a
        ``*-destination`` set's one kind is called ``destination``."""
        from diffusion_trak.store import Store

        store = Store.open_existing(self.groundtruth(target_set, replicates))
        res = {}
        S = len(store.settings["steps"])
        for name in store.names():
            kind = "destination" if target_set.endswith("-destination") else name[len(target_set) + 1:]
            arr = np.asarray(store.get(name).read(), dtype=np.float64)
            res[kind] = arr.reshape(arr.shape[0], 2, S, -1).mean(1)
        return res

    def checkpoints(self):
        """The attributed model's checkpoint folders."""
        from diffusion_trak.train import list_checkpoints

        return list_checkpoints(self.attributed)

    def load_trajectory(self):
        from diffusion_trak.pipelines import Trajectory

        return Trajectory.load(self.trajectory)

    def datasets(self):
        """``(train, heldout)``: the run's training set and its ``num_heldout`` held-out targets."""
        from diffusion_trak.data import DataArgs, load_dataset

        cfg = self.config
        train = load_dataset(DataArgs.from_dict(cfg["data"]))
        heldout = load_dataset(DataArgs.from_dict(cfg["heldout"])).subset(np.arange(cfg["num_heldout"]))
        return train, heldout
