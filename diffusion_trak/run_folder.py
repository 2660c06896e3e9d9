"""A run folder's ``run.json``: the data settings a run was set up with, so that later commands need no ``--data``
again. Read, checked and written here only (the CLI, the demo and the Attributor share it)."""
from __future__ import annotations

import json
import os

from .errors import UserError


def read_run_json(path: str) -> dict:
    """The ``data`` entry of a run's ``run.json``; one line naming the fix if it is damaged."""
    try:
        with open(path) as f:
            data = json.load(f)["data"]
        if not isinstance(data, dict):
            raise TypeError("data is not an object")
        return data
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise UserError(f"{path} is corrupted ({type(e).__name__}); pass --data (and its options) to use another "
                        "dataset, or rerun `diffusion-trak train` with --overwrite") from None


def check_run_json(run: str, dargs, overwrite: bool) -> None:
    """Refuse (one line) a run folder whose ``run.json`` names another dataset, unless ``overwrite``."""
    path = os.path.join(run, "run.json")
    if overwrite or not os.path.exists(path):
        return
    old = read_run_json(path)
    if old != dargs.to_dict():
        from .store import _diff
        changes = "; ".join(_diff(old, dargs.to_dict())[:4])
        raise UserError(f"{run} was set up for another dataset ({changes}); rerun with --overwrite to replace "
                        "the run, or choose another --run")


def write_run_json(run: str, dargs) -> None:
    """Write ``run/run.json`` (after every check has passed), unless it already says the same."""
    from .store import make_dirs, write_json_atomic

    path = os.path.join(run, "run.json")
    if os.path.exists(path):
        try:
            if read_run_json(path) == dargs.to_dict():
                return
        except UserError:  # damaged: replaced (the command was run with --overwrite)
            pass
    make_dirs(run, "--run")
    write_json_atomic(path, {"data": dargs.to_dict()})
