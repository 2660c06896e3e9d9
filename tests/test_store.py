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


def _files(root):
    return {n: open(os.path.join(root, n), "rb").read() for n in sorted(os.listdir(root))}


def test_reads_never_create_truncate_or_zero(tmp_path):
    root = str(tmp_path / "s")
    with Store(root, {"a": 1}) as s:
        s.array("x", (4, 2)).write([0, 1, 2, 3], np.arange(8).reshape(4, 2))
    os.remove(os.path.join(root, "x.done.npy"))
    before = _files(root)
    with pytest.raises(StoreError, match=r"x.done.npy is missing; rerun .* with --overwrite"):
        Store.open_existing(root).get("x")
    assert _files(root) == before
    r = Store.open_existing(str(tmp_path / "s"))
    assert r.readonly and not os.path.exists(os.path.join(root, "x.done.npy"))
    with pytest.raises(StoreError, match="no store at"):
        Store.open_existing(str(tmp_path / "none"))
    assert not os.path.exists(tmp_path / "none")


def test_read_only_arrays_cannot_be_written(tmp_path):
    root = str(tmp_path / "s")
    with Store(root, {}) as s:
        s.array("x", (2, 2)).write([0, 1], np.ones((2, 2)))
    a = Store.open_existing(root).get("x")
    assert not a.data.flags.writeable and not a.done.flags.writeable
    np.testing.assert_array_equal(a.read(), np.ones((2, 2)))


def test_overwrite_gets_past_damage_and_otherwise_resumes(tmp_path):
    root = str(tmp_path / "s")
    with Store(root, {"a": 1}) as s:
        s.array("x", (3, 2)).write([0], np.ones((1, 2)))
    with Store(root, {"a": 1}, overwrite=True) as s:  # intact, same settings: resumed
        assert s.array("x", (3, 2)).pending().tolist() == [1, 2]
    with open(os.path.join(root, "manifest.json"), "w") as f:
        f.write("{")
    with pytest.raises(StoreError, match="corrupted"):
        Store(root, {"a": 1})
    with Store(root, {"a": 1}, overwrite=True) as s:
        assert s.array("x", (3, 2)).pending().tolist() == [0, 1, 2]


def test_leftovers_of_a_crash_are_removed_by_the_next_writer(tmp_path):
    import json

    root = str(tmp_path / "s")
    Store(root, {}).close()
    m = json.load(open(os.path.join(root, "manifest.json")))
    m["creating"] = ["x"]  # a crash while the array x was being created
    open(os.path.join(root, "manifest.json"), "w").write(json.dumps(m))
    for name in ("manifest.json.tmp123", "x.npy.tmp", "x.done.npy.tmp", "y.npy.tmp"):
        open(os.path.join(root, name), "w").write("half")
    Store(root, {}).close()
    assert sorted(os.listdir(root)) == ["manifest.json", "y.npy.tmp"], "only the store's own temporary names"


def test_one_writer_per_store_shared_within_a_process(tmp_path):
    root = str(tmp_path / "s")
    a = Store(root, {})
    b = Store(root, {})  # the same process (and so the same run) may open it twice
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            Store(root, {})
        except StoreError as e:
            code = 0 if f"being written by process {os.getppid()}" in str(e) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    a.close()
    assert not _child_can_write(root), "still held by b"
    b.close()
    assert _child_can_write(root), "released"


def _child_can_write(root) -> bool:
    """Whether a forked child process can open ``root`` as a writer."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            Store(root, {}).close()
            code = 0
        finally:
            os._exit(code)
    return os.WEXITSTATUS(os.waitpid(pid, 0)[1]) == 0


def test_ranks_of_a_launch_share_the_lock(tmp_path, monkeypatch):
    root = str(tmp_path / "s")
    holder = Store(root, {})
    pid = os.fork()
    if pid == 0:
        try:
            os.environ["RANK"] = "1"  # a non-zero rank of the same launch writes its rows without the lock
            Store(root, {}).array("x", (2, 2))
            code = 0
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    assert os.WEXITSTATUS(os.waitpid(pid, 0)[1]) == 0
    holder.close()
