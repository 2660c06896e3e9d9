import json
import os

import numpy as np
import pytest

from diffusion_trak.store import Store, StoreError


def test_rows_done_flags_and_resume(tmp_path):
    s = Store(str(tmp_path / "s"), {"k": 4})
    a = s.array("x", (5, 4))
    assert a.pending().tolist() == [0, 1, 2, 3, 4]
    a.write([1, 3], np.ones((2, 4)))
    again = Store(str(tmp_path / "s"), {"k": 4}).array("x", (5, 4))
    assert again.pending().tolist() == [0, 2, 4]
    assert np.all(again.data[1] == 1) and np.all(again.data[0] == 0)
    with pytest.raises(StoreError, match="incomplete"):
        again.read()


def test_refuses_other_settings_unless_overwrite(tmp_path):
    root = str(tmp_path / "s")
    Store(root, {"k": 4, "T": 2}).array("x", (3, 4)).write([0], np.ones((1, 4)))
    with pytest.raises(StoreError, match=r"T: 2 -> 3.*--overwrite"):
        Store(root, {"k": 4, "T": 3})
    # nothing was damaged by the refusal
    assert Store(root, {"k": 4, "T": 2}).array("x", (3, 4)).pending().tolist() == [1, 2]
    s = Store(root, {"k": 4, "T": 3}, overwrite=True)
    assert s.array("x", (3, 4)).pending().tolist() == [0, 1, 2]


def test_refuses_nan_rows(tmp_path):
    a = Store(str(tmp_path / "s"), {}).array("x", (2, 2))
    with pytest.raises(StoreError, match="NaN"):
        a.write([0], np.array([[np.nan, 1.0]]))
    assert a.pending().tolist() == [0, 1]


def test_truncated_memmap_is_reported(tmp_path):
    root = str(tmp_path / "s")
    Store(root, {}).array("x", (100, 8)).write([0], np.ones((1, 8)))
    path = os.path.join(root, "x.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(StoreError, match="truncated or corrupted"):
        Store(root, {}).array("x", (100, 8))


def test_manifest_is_written_atomically(tmp_path):
    root = str(tmp_path / "s")
    Store(root, {"a": 1}).array("x", (2, 2))
    with open(os.path.join(root, "manifest.json")) as f:
        m = json.load(f)
    assert m["settings"] == {"a": 1} and m["arrays"]["x"]["shape"] == [2, 2]
    assert not [p for p in os.listdir(root) if ".tmp" in p]
