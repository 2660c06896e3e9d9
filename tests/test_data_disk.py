"""Training data as diffusers users keep it, read from disk in batches.

- image folders with ``metadata.jsonl`` captions (diffusers' text-to-image layout);
- Hugging Face ``datasets``: ``save_to_disk`` folders and ``imagefolder`` (optional dependency);
- :class:`DiskImageDataset`: the interface of :class:`ImageDataset`, but decoded batch by batch; featurizing
  it never reads the whole data set and gives the features of the same images held in memory.
"""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_trak import api
from diffusion_trak.config import FeaturizeArgs
from diffusion_trak.data import DataArgs, DataError, DiskImageDataset, ImageDataset, load_dataset


def _png(path, value, size=(6, 6), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(np.asarray(value, np.uint8) * np.ones(shape, np.uint8)).save(path)


def _random_pngs(root, n, seed=0, size=8, sub=None):
    g = np.random.RandomState(seed)
    for i in range(n):
        d = root / sub[i % len(sub)] if sub else root
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(g.randint(0, 256, (size, size), dtype=np.uint8)).save(d / f"img{i:03d}.png")


def _metadata(root, lines):
    (root / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


# ---------------------------------------------------------------- folder + metadata.jsonl


def test_folder_metadata_captions(tmp_path):
    for i, name in enumerate(["b.png", "a.png", "c.png"]):
        _png(tmp_path / name, 40 * i)
    _metadata(tmp_path, [{"file_name": "a.png", "text": "an A"}, {"file_name": "c.png", "text": ["a C", "another C"]},
                         {"file_name": "b.png", "text": "a B"}])
    ds = load_dataset(DataArgs(name="folder", path=str(tmp_path)))
    assert isinstance(ds, DiskImageDataset) and ds.labels is None
    # stable order: sorted relative paths a, b, c; captions follow the files, not the lines
    assert ds.images[:, 0, 0, 0].tolist() == pytest.approx([40 / 127.5 - 1, -1.0, 80 / 127.5 - 1])
    assert [ds.caption(i) for i in range(3)] == ["an A", "a B", "a C"]
    assert ds.captions.of(2) == ["a C", "another C"]
    kept = load_dataset(DataArgs(name="folder", path=str(tmp_path), limit=2))
    assert len(kept.captions) == 2 and kept.captions.of(1) == ["a B"]


def test_folder_metadata_with_subfolders_and_classes(tmp_path):
    _png(tmp_path / "cat" / "1.png", 10)
    _png(tmp_path / "dog" / "0.png", 20)
    _metadata(tmp_path, [{"file_name": "dog/0.png", "text": "a dog"}, {"file_name": "cat/1.png", "text": "a cat"}])
    dogs = load_dataset(DataArgs(name="folder", path=str(tmp_path), classes=[1]))
    assert dogs.class_names == ["cat", "dog"] and dogs.indices.tolist() == [1]
    assert dogs.caption(0) == "a dog" and dogs.captions.of(1) == ["a dog"]


@pytest.mark.parametrize("lines, match", [
    ([{"file_name": "a.png", "text": "x"}], r"1 images under .* have no line in metadata.jsonl \(e.g. b.png\)"),
    ([{"file_name": "a.png", "text": "x"}, {"file_name": "b.png", "text": "y"}, {"file_name": "z.png", "text": "z"}],
     r"names 1 files that are not images .*\(e.g. z.png\); fix their file_name"),
    ([{"file_name": "a.png", "caption": "x"}, {"file_name": "b.png", "text": "y"}], r'line 1 needs "file_name" and "text"'),
    ([{"file_name": "a.png", "text": 3}, {"file_name": "b.png", "text": "y"}], r'"text" must be a caption'),
])
def test_folder_metadata_errors(tmp_path, lines, match):
    _png(tmp_path / "a.png", 0)
    _png(tmp_path / "b.png", 0)
    _metadata(tmp_path, lines)
    with pytest.raises(DataError, match=match):
        load_dataset(DataArgs(name="folder", path=str(tmp_path)))


def test_folder_metadata_not_json(tmp_path):
    _png(tmp_path / "a.png", 0)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        load_dataset(DataArgs(name="folder", path=str(tmp_path)))


# ---------------------------------------------------------------- Hugging Face datasets


@pytest.fixture
def hf(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))  # not the user's cache
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return datasets


def test_hf_saved_to_disk(tmp_path, hf):
    g = np.random.RandomState(1)
    arrays = [g.randint(0, 256, (6, 6), dtype=np.uint8) for _ in range(6)]
    feats = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=["x", "y"]), "text": hf.Value("string")})
    ds = hf.Dataset.from_dict({"image": [Image.fromarray(a) for a in arrays], "label": [0, 1, 0, 1, 1, 0],
                               "text": [f"t{i}" for i in range(6)]}, features=feats)
    hf.DatasetDict({"train": ds, "test": ds.select([0, 1])}).save_to_disk(str(tmp_path / "saved"))
    ys = load_dataset(DataArgs(name="hf", path=str(tmp_path / "saved"), classes=[1]))
    assert isinstance(ys, DiskImageDataset)
    assert ys.indices.tolist() == [1, 3, 4] and ys.labels.tolist() == [1, 1, 1] and ys.class_names == ["x", "y"]
    assert ys.caption(1) == "t3" and ys.image_shape == (1, 6, 6)
    want = np.stack([arrays[i] for i in (1, 3, 4)])[:, None].astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(ys.images.numpy(), want)
    assert len(load_dataset(DataArgs(name="hf", path=str(tmp_path / "saved"), split="test"))) == 2
    ds.select([0]).save_to_disk(str(tmp_path / "one"))  # a single Dataset: its rows, whatever the split
    assert len(load_dataset(DataArgs(name="hf", path=str(tmp_path / "one"), split="test"))) == 1
    hf.Dataset.from_dict({"x": [1, 2]}).save_to_disk(str(tmp_path / "noimg"))
    with pytest.raises(DataError, match="no image column .*columns: x"):
        load_dataset(DataArgs(name="hf", path=str(tmp_path / "noimg")))


@pytest.mark.parametrize("layout", ["captions", "classes"])
def test_hf_imagefolder_matches_folder(tmp_path, hf, layout):
    """datasets' imagefolder builder and our folder reader give the same examples, in the same order."""
    root = tmp_path / "imgs"
    if layout == "captions":
        _random_pngs(root, 7)
        _metadata(root, [{"file_name": f"img{i:03d}.png", "text": f"picture {i}"} for i in range(7)])
    else:
        _random_pngs(root, 7, sub=["b", "a"])
    ours = load_dataset(DataArgs(name="folder", path=str(root)))
    theirs = load_dataset(DataArgs(name="hf", path=str(root)))
    assert torch.equal(ours.images, theirs.images) and ours.fingerprint() == theirs.fingerprint()
    if layout == "captions":
        assert [theirs.caption(i) for i in range(7)] == [f"picture {i}" for i in range(7)]
        assert theirs.captions.captions == ours.captions.captions
    else:
        assert theirs.class_names == ours.class_names == ["a", "b"]
        assert torch.equal(theirs.labels, ours.labels)


def test_hf_needs_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    tmp_path.joinpath("x").mkdir()
    with pytest.raises(DataError, match="pip install datasets"):
        load_dataset(DataArgs(name="hf", path=str(tmp_path / "x")))
    with pytest.raises(DataError, match="needs a path; pass --data-path"):
        DataArgs(name="hf")


def test_hf_path_errors(tmp_path, hf):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match="neither a dataset saved with save_to_disk nor an image folder"):
        load_dataset(DataArgs(name="hf", path=str(tmp_path / "f.txt")))


# ---------------------------------------------------------------- lazy, batched reads


class _Opens:
    """Counts image files opened (PIL ``Image.open``)."""

    def __init__(self, monkeypatch):
        self.n, real = 0, Image.open

        def counting(*a, **k):
            self.n += 1
            return real(*a, **k)
        monkeypatch.setattr(Image, "open", counting)


def test_disk_dataset_reads_only_what_is_asked(tmp_path, monkeypatch):
    _random_pngs(tmp_path, 12, sub=["x", "y"])
    opens = _Opens(monkeypatch)
    ds = load_dataset(DataArgs(name="folder", path=str(tmp_path), channels=1, image_size=8))
    assert opens.n == 0  # with --channels and --image-size not even the headers are read
    x = ds.read([3, 5])
    assert opens.n == 2 and x.shape == (2, 1, 8, 8)
    mem = ds.to_memory()
    assert isinstance(mem, ImageDataset) and torch.equal(mem.images[[3, 5]], x)
    assert ds.fingerprint() == mem.fingerprint()
    item = ds[4]
    assert torch.equal(item["pixel_values"], mem.images[4]) and item["index"] == 4 and item["label"] == mem[4]["label"]
    sub = ds.subset([7, 2])
    assert isinstance(sub, DiskImageDataset) and sub.indices.tolist() == [7, 2] and torch.equal(sub.images, mem.images[[7, 2]])
    assert ds.positions_of([7, 2]).tolist() == [7, 2]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert torch.equal(batch["pixel_values"], mem.images[:5]) and batch["index"].tolist() == [0, 1, 2, 3, 4]
    assert [p.tolist() for p, _ in ds.batches(5)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]


def test_featurize_reads_the_disk_in_batches(tmp_path, monkeypatch, tiny_unet, scheduler):
    """Featurizing a folder never holds more than one batch of images, and gives the in-memory features."""
    _random_pngs(tmp_path / "imgs", 10)
    ds = load_dataset(DataArgs(name="folder", path=str(tmp_path / "imgs")))
    mem = ds.to_memory()
    args = FeaturizeArgs(num_timesteps=2, proj_dim=8, batch_size=4)
    want = api.featurize([(tiny_unet, scheduler)], mem, args, str(tmp_path / "mem"), progress=False)

    sizes, real = [], DiskImageDataset.read

    def read(self, positions):
        sizes.append(len(np.asarray(positions).reshape(-1)))
        return real(self, positions)
    monkeypatch.setattr(DiskImageDataset, "read", read)
    monkeypatch.setattr(DiskImageDataset, "images", property(lambda self: pytest.fail("read the whole dataset")))
    monkeypatch.setattr("diffusion_trak.data.READ_BATCH", 3)
    got = api.featurize([(tiny_unet, scheduler)], ds, args, str(tmp_path / "disk"), progress=False)
    assert sizes and max(sizes) <= 4  # batches of batch_size (featurize) or READ_BATCH (fingerprint, finiteness)
    assert sum(sizes) >= 3 * len(ds)  # fingerprint, finiteness check and features each read every row once
    np.testing.assert_array_equal(np.asarray(got.arrays[0]), np.asarray(want.arrays[0]))
    assert got.store.settings["dataset"] == want.store.settings["dataset"]  # same fingerprint: the stores agree
    api.check_dataset(want.store.settings, ds)
