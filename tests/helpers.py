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
