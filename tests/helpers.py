"""Helpers shared by several test modules (importable because pytest puts ``tests/`` on ``sys.path``)."""
import hashlib
import os


def snapshot(root):
    """``{relative path: sha256}`` of every file below ``root``: compare before and after a command."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.relpath(os.path.join(dirpath, f), root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def step_by_step(run, device):
    """The README's step-by-step commands (train, featurize, generate, score, plot) on a tiny digits run on
    ``device``; returns the scores array ``(steps, targets, training examples)``."""
    import numpy as np

    from diffusion_trak.cli import main

    common = ["--run", run, "--device", device]
    assert main(["train", *common, "--data", "digits", "--limit", "40", "--epochs", "2", "--batch-size", "20",
                 "--channels-per-level", "8", "16", "--num-checkpoints", "1"]) == 0
    assert main(["featurize", *common, "-T", "2", "-k", "32"]) == 0
    assert main(["generate", *common, "--steps", "6", "--num-record", "3", "--scheduler", "ddim"]) == 0
    assert main(["score", *common, "-R", "2"]) == 0
    assert main(["plot", *common]) == 0
    return np.load(os.path.join(run, "scores", "seed-0", "scores.npy"))
