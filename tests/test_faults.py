"""Fault injection: ``kill -9`` of ``featurize`` and ``score`` at 20 random points, each followed by a rerun of
the same command; every final store (and score folder) is bit-identical to an uninterrupted run's, on CPU.

The commands run in forked children of this process (torch is imported once, so 40 runs take seconds). A child
counts the file-system events of the store (memmap flushes, fsyncs, renames, allocations) and SIGKILLs itself
just before or just after the K-th one, K drawn at random over the events of an uninterrupted run: every point
between two writes that a crash can leave behind is reachable.
"""
import os
import random
import signal
import sys

import numpy as np
import pytest

from diffusion_trak import cli
from helpers import snapshot

FEAT = ["-T", "2", "-k", "16", "--batch-size", "4", "--data", "digits", "--limit", "24", "--device", "cpu"]
SCORE = ["--data", "digits", "--limit", "24", "--image-timesteps", "10", "200", "-R", "1", "--device", "cpu"]
KILLS_PER_COMMAND = 10
SEED = int(os.environ.get("DIFFUSION_TRAK_FAULT_SEED", "17"))



def _instrument(kill_at, after, sig=signal.SIGKILL):
    """Count store events in this (child) process; send ``sig`` to itself at event ``kill_at`` (before it, or
    ``after`` it)."""
    count = [0]

    def wrap(owner, name):
        real = getattr(owner, name)

        def hooked(*a, **k):
            count[0] += 1
            if count[0] == kill_at and not after:
                os.kill(os.getpid(), sig)
            result = real(*a, **k)
            if count[0] == kill_at and after:
                os.kill(os.getpid(), sig)
            return result
        setattr(owner, name, hooked)

    wrap(np.memmap, "flush")
    for name in ("replace", "fsync", "posix_fallocate"):
        wrap(os, name)
    return count


def run_child(argv, kill_at=0, after=False, sig=signal.SIGKILL, stderr=os.devnull):
    """``diffusion-trak ARGV`` in a forked child (stderr to the file ``stderr``); returns ``(killed or exit
    status, events counted)``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            os.close(r)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            count = _instrument(kill_at, after, sig)
            code = cli.main(argv)
            os.write(w, str(count[0]).encode())
        finally:
            os._exit(code if isinstance(code, int) else 3)
    os.close(w)
    events = os.read(r, 64)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if sig != signal.SIGKILL:
        return os.WEXITSTATUS(status), int(events or 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert killed or os.WEXITSTATUS(status) == 0, f"{argv} exited with {os.WEXITSTATUS(status)}"
    return killed, int(events or 0)


def _commands(tmp_path, unet, scheduler):
    """``featurize(out)`` and ``score(out)`` argv makers over a tiny checkpoint (``score`` reads ``tmp/features``)."""
    from diffusion_trak.data import load_dataset, save_npz

    ckpt = str(tmp_path / "ckpt")
    unet.save_pretrained(os.path.join(ckpt, "unet"))
    scheduler.save_pretrained(os.path.join(ckpt, "scheduler"))
    targets = str(tmp_path / "targets.npz")
    save_npz(load_dataset(name="digits", split="test", limit=6), targets)
    feats = str(tmp_path / "features")
    featurize = lambda out: ["featurize", "--checkpoints", ckpt, *FEAT, "--out", out]
    score = lambda out: ["score", "--checkpoints", ckpt, *SCORE, "--features", feats, "--images", targets, "--out", out]
    return featurize, score, feats


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="needs fork and SIGKILL")
def test_kill_9_at_20_random_points_then_rerun_is_bit_identical(tmp_path, tiny_unet, scheduler):
    featurize, score, feats = _commands(tmp_path, tiny_unet, scheduler)
    rng = random.Random(SEED)
    for name, command in (("featurize", featurize), ("score", score)):
        ref = str(tmp_path / f"{name}-ref")
        killed, events = run_child(command(ref))
        assert not killed and events > 8
        if command is featurize:
            assert cli.main(featurize(feats)) == 0
        expected = snapshot(ref)
        kills = 0
        for i in range(KILLS_PER_COMMAND):
            out = str(tmp_path / f"{name}-{i}")
            k, after = rng.randint(1, events), rng.random() < 0.5
            killed, _ = run_child(command(out), kill_at=k, after=after)
            kills += killed
            assert not run_child(command(out))[0]  # the same command again, to the end
            assert snapshot(out) == expected, f"{name}: kill -9 at event {k} ({'after' if after else 'before'})"
        assert kills == KILLS_PER_COMMAND


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="needs fork and SIGINT")
def test_ctrl_c_at_random_points_one_line_then_the_same_command_resumes(tmp_path, tiny_unet, scheduler):
    featurize, score, feats = _commands(tmp_path, tiny_unet, scheduler)
    rng = random.Random(SEED + 1)
    err = str(tmp_path / "stderr.txt")
    for name, command in (("featurize", featurize), ("score", score)):
        ref = str(tmp_path / f"{name}-ref")
        _, events = run_child(command(ref))
        if command is featurize:
            assert cli.main(featurize(feats)) == 0
        for i in range(2):
            out = str(tmp_path / f"{name}-{i}")
            k = rng.randint(2, events - 1)
            rc, _ = run_child(command(out), kill_at=k, after=True, sig=signal.SIGINT, stderr=err)
            lines = [line for line in open(err).read().splitlines() if line.strip() and "%|" not in line]
            assert rc == 130 and lines == [f"diffusion-trak {name}: interrupted; the work done so far is kept, "
                                           "and rerunning the same command resumes it"], (k, lines)
            assert not run_child(command(out))[0]
            assert snapshot(out) == snapshot(ref), f"{name}: Ctrl-C at event {k}"


# ---- issue 27: a full disk or a read-only file system end in one line and change nothing ------------------------
def _score_folder(tmp_path, unet, scheduler):
    featurize, score, feats = _commands(tmp_path, unet, scheduler)
    assert cli.main(featurize(feats)) == 0
    out = str(tmp_path / "scores")
    assert cli.main(score(out)) == 0
    return score, out


def test_disk_full_while_saving_scores_keeps_the_previous_result(tmp_path, tiny_unet, scheduler, monkeypatch, capsys):
    import errno
    import json

    from diffusion_trak import store as store_module

    score, out = _score_folder(tmp_path, tiny_unet, scheduler)
    before = {k: v for k, v in snapshot(out).items() if not k.startswith("store/")}
    real = store_module.staged

    def full(path, write, mode="wb"):
        if path.endswith("scores.json"):
            raise OSError(errno.ENOSPC, "No space left on device", path + ".tmp1")
        return real(path, write, mode)

    monkeypatch.setattr(store_module, "staged", full)
    capsys.readouterr()
    rc = cli.main(score(out) + ["--overwrite", "--ridge", "50"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "%|" not in line]
    assert rc == 2 and len(err) == 1, err
    assert "cannot save the scores in" in err[0] and "nothing there was changed" in err[0], err
    assert {k: v for k, v in snapshot(out).items() if not k.startswith("store/")} == before, "the old result, whole"
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    assert json.load(open(os.path.join(out, "scores.json")))["meta"]["score"]["ridge"] != 50


def test_a_healthy_store_on_a_read_only_file_system_is_not_called_damaged(tmp_path, tiny_unet, scheduler, monkeypatch,
                                                                         capsys):
    import errno

    featurize, score, feats = _commands(tmp_path, tiny_unet, scheduler)
    assert cli.main(featurize(feats)) == 0
    before = snapshot(feats)
    real = np.lib.format.open_memmap

    def read_only(path, mode="r+", *a, **k):
        if mode != "r":
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real(path, mode, *a, **k)

    monkeypatch.setattr(np.lib.format, "open_memmap", read_only)
    capsys.readouterr()
    rc = cli.main(featurize(feats))
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "%|" not in line]
    assert rc == 2 and len(err) == 1, err
    assert "(Read-only file system); the store is intact" in err[0] and "--overwrite" not in err[0], err
    assert snapshot(feats) == before


def test_a_damaged_target_cache_entry_is_computed_again(tmp_path):
    from diffusion_trak.target_cache import TargetCache

    calls = []

    def compute():
        calls.append(1)
        return {"steps": np.arange(1000, dtype=np.float32)}

    TargetCache(str(tmp_path)).get({"k": 1}, compute)
    path = next(str(p) for p in tmp_path.iterdir() if p.suffix == ".npz")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 8  # one bit of the array (the zip member's CRC-32 no longer matches)
    open(path, "wb").write(data)
    got = TargetCache(str(tmp_path)).get({"k": 1}, compute)
    assert len(calls) == 2 and np.array_equal(got["steps"], np.arange(1000, dtype=np.float32))
