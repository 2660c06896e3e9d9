"""Sharding work across processes started by ``accelerate launch`` (or torchrun / SLURM).

One process (no launcher) runs the same code with ``world == 1``. Work is split in aligned blocks:
block ``b`` belongs to process ``b % world``, so every row is computed by exactly one process and
with the same batch as in a single-process run (bit-identical features).
"""
from __future__ import annotations

import contextlib
import os

import numpy as np


class _Single:
    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self):
        pass


_STATE = None


def state():
    """accelerate's ``PartialState`` when launched with several processes, else a single-process stand-in."""
    global _STATE
    if _STATE is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            import torch
            from accelerate import PartialState

            # without CUDA, accelerate only joins the process group (gloo) when asked for CPU explicitly
            _STATE = PartialState(cpu=not torch.cuda.is_available())
            if _STATE.num_processes != world:
                raise RuntimeError(f"launched with WORLD_SIZE={world} but accelerate sees {_STATE.num_processes} processes")
        else:
            _STATE = _Single()
    return _STATE


@contextlib.contextmanager
def main_process_first():
    s = state()
    if not s.is_main_process:
        s.wait_for_everyone()
    yield
    if s.is_main_process:
        s.wait_for_everyone()


def shard_rows(n: int, block: int, rank: int = None, world: int = None) -> np.ndarray:
    """The rows of ``0..n-1`` owned by ``rank``: whole aligned blocks ``b`` with ``b % world == rank``."""
    s = state()
    rank = s.process_index if rank is None else rank
    world = s.num_processes if world is None else world
    rows = np.arange(n)
    return rows[(rows // block) % world == rank]


def cpu_contention(threads: int = None, cores: int = None, load: float = None):
    """One line when torch's CPU threads meet a busy machine, else ``None``.

    torch runs ``threads`` threads per op, each waiting for the slowest; when other processes already keep the
    cores busy (1-minute load average ``load`` at or above half the ``cores`` this process may use), every op waits
    on the scheduler and a step can take many times longer than on one thread."""
    import torch

    threads = torch.get_num_threads() if threads is None else threads
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # no load average on this system: nothing to say
            return None
    if threads <= 1 or load < cores / 2:
        return None
    return (f"warning: this CPU is busy (load {load:.1f} on {cores} cores) and torch runs {threads} threads per op; "
            "if steps are slow, set OMP_NUM_THREADS=1 (or torch.set_num_threads(1)) or give this job the cores")
