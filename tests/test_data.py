import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_trak.data import (
    FMNIST_DEBIAN_DIR,
    DataArgs,
    DataError,
    ImageDataset,
    load_dataset,
    save_npz,
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataArgs(name="digits"))


# ---------------------------------------------------------------- digits


def test_digits_shapes_range_indices(digits):
    assert len(digits) == 1500
    assert digits.image_shape == (1, 8, 8)
    assert digits.num_channels == 1 and digits.resolution == 8
    assert digits.images.dtype == torch.float32
    assert float(digits.images.min()) == -1.0 and float(digits.images.max()) == 1.0
    assert torch.equal(digits.indices, torch.arange(1500))
    assert digits.labels.dtype == torch.long and set(digits.labels.tolist()) == set(range(10))
    assert digits.class_names == [str(i) for i in range(10)]
    item = digits[3]
    assert item["pixel_values"].shape == (1, 8, 8)
    assert item["index"] == 3 and item["label"] == int(digits.labels[3])
    assert digits.caption(3) == f"a photo of a {int(digits.labels[3])}"


def test_digits_split_is_stable_and_disjoint(digits):
    test = load_dataset(DataArgs(name="digits", split="test"))
    assert len(test) == 297
    again = load_dataset(DataArgs(name="digits"))
    assert torch.equal(again.images, digits.images)
    assert again.fingerprint() == digits.fingerprint()
    # train and test hold different images (every digit image of the source is in one split)
    from sklearn.datasets import load_digits

    n_src = len(load_digits().images)
    assert len(digits) + len(test) == n_src
    tr = {tuple(x.flatten().tolist()) for x in digits.images[:200]}
    te = {tuple(x.flatten().tolist()) for x in test.images}
    assert len(tr & te) < 5  # (the source has a few exact duplicates)


def test_fingerprint_changes_with_data(digits):
    fp = digits.fingerprint()
    assert isinstance(fp, str) and len(fp) >= 8
    imgs = digits.images.clone()
    imgs[0, 0, 0, 0] += 0.5
    assert ImageDataset(imgs, digits.labels, digits.indices).fingerprint() != fp
    idx = digits.indices.clone()
    idx[0] = 99999
    assert ImageDataset(digits.images, digits.labels, idx).fingerprint() != fp
    assert digits.subset(range(10)).fingerprint() != fp


def test_classes_and_limit_keep_original_indices(digits):
    ds = load_dataset(DataArgs(name="digits", classes=[3, 7], limit=20))
    assert len(ds) == 20
    assert set(ds.labels.tolist()) <= {3, 7}
    expected = torch.nonzero((digits.labels == 3) | (digits.labels == 7)).flatten()[:20]
    assert torch.equal(ds.indices, expected)
    assert torch.equal(ds.images, digits.images[expected])
    assert [ds[i]["index"] for i in range(3)] == expected[:3].tolist()
    sub = ds.subset([5, 2])
    assert sub.indices.tolist() == [int(expected[5]), int(expected[2])]
    assert torch.equal(sub.images[0], ds.images[5])


def test_resize_and_channels():
    ds = load_dataset(DataArgs(name="digits", image_size=16, channels=3, limit=8))
    assert ds.image_shape == (3, 16, 16)
    assert float(ds.images.min()) >= -1.0 and float(ds.images.max()) <= 1.0


def test_empty_after_filtering_errors():
    with pytest.raises(DataError, match="empty after filtering"):
        load_dataset(DataArgs(name="digits", classes=[42]))


def test_dataargs_roundtrip_and_validation():
    a = DataArgs(name="digits", split="test", image_size=16, classes=[1, 2], limit=5, channels=3)
    d = a.to_dict()
    assert d["classes"] == [1, 2]
    assert DataArgs.from_dict(d) == a
    assert DataArgs.from_dict({**d, "unknown": 1}) == a
    with pytest.raises(DataError):
        DataArgs(name="imagenet")
    with pytest.raises(DataError):
        DataArgs(split="val")
    with pytest.raises(DataError):
        DataArgs(channels=2)


# ---------------------------------------------------------------- npz


def test_npz_roundtrip_float(tmp_path, digits):
    ds = load_dataset(DataArgs(name="digits", classes=[0, 1], limit=30))
    p = save_npz(ds, tmp_path / "d.npz")
    back = load_dataset(DataArgs(name="npz", path=p))
    assert torch.equal(back.images, ds.images)
    assert torch.equal(back.labels, ds.labels)
    assert torch.equal(back.indices, ds.indices)
    assert back.class_names == ds.class_names
    assert back.fingerprint() == ds.fingerprint()
    # filtering an exported file keeps the exported stable ids
    b1 = load_dataset(DataArgs(name="npz", path=p, classes=[1], limit=3))
    assert torch.equal(b1.indices, ds.indices[ds.labels == 1][:3])


def test_npz_roundtrip_uint8(tmp_path, digits):
    p = save_npz(digits.subset(range(10)), tmp_path / "u.npz", dtype="uint8")
    back = load_dataset(DataArgs(name="npz", path=p))
    assert torch.allclose(back.images, digits.images[:10], atol=1 / 127.5 + 1e-6)


@pytest.mark.parametrize(
    "layout,dtype",
    [("nhw", "uint8"), ("nhwc", "uint8"), ("nchw", "uint8"), ("nhwc", "f01"), ("nchw", "fpm1")],
)
def test_npz_raw_inputs(tmp_path, layout, dtype):
    rng = np.random.RandomState(0)
    base = rng.randint(0, 256, size=(6, 3, 5, 7)).astype(np.uint8)  # N,C,H,W
    base[0, :, 0, 0] = 0
    base[0, :, 0, 1] = 255
    if layout == "nhw":
        arr = base[:, 0]
        expect_c = 1
    elif layout == "nhwc":
        arr = base.transpose(0, 2, 3, 1)
        expect_c = 3
    else:
        arr = base
        expect_c = 3
    if dtype == "f01":
        arr = arr.astype(np.float32) / 255.0
    elif dtype == "fpm1":
        arr = arr.astype(np.float32) / 127.5 - 1.0
    p = tmp_path / "raw.npz"
    np.savez(p, images=arr, labels=np.arange(6) % 2)
    if dtype in ("f01", "fpm1"):  # floats state their range (the rule never guesses it)
        with pytest.raises(DataError, match=r"are floats \(they span .*\) and state no range; state it with --value-range"):
            load_dataset(DataArgs(name="npz", path=str(p)))
    stated = {"f01": (0, 1), "fpm1": (-1, 1)}.get(dtype)
    ds = load_dataset(DataArgs(name="npz", path=str(p), value_range=stated))
    assert ds.image_shape == (expect_c, 5, 7)
    expected = torch.from_numpy(base[:, :expect_c].astype(np.float32) / 127.5 - 1.0)
    assert torch.allclose(ds.images, expected, atol=1e-5)
    assert ds.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert ds.class_names is None and ds.caption(1) == "a photo of a 1"


def test_npz_errors(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(p, pixels=np.zeros((2, 4, 4)))
    with pytest.raises(DataError, match="'images'"):
        load_dataset(DataArgs(name="npz", path=str(p)))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(DataArgs(name="npz", path=str(tmp_path / "missing.npz")))
    q = tmp_path / "nolab.npz"
    np.savez(q, images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="classes"):
        load_dataset(DataArgs(name="npz", path=str(q), classes=[0]))
    ds = load_dataset(DataArgs(name="npz", path=str(q)))
    assert ds.labels is None and ds[0]["label"] == -1 and ds.caption(0) == ""


# ---------------------------------------------------------------- folder


def _write_png(path, size, value, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        a = np.full((size[1], size[0]), value, np.uint8)
    else:
        a = np.full((size[1], size[0], 3), value, np.uint8)
    Image.fromarray(a).save(path)


def test_folder_flat(tmp_path):
    for i, name in enumerate(["b.png", "a.png", "c.png"]):
        _write_png(tmp_path / name, (6, 6), 50 * i)
    ds = load_dataset(DataArgs(name="folder", path=str(tmp_path)))
    assert ds.image_shape == (1, 6, 6) and ds.labels is None
    # sorted relative paths: a.png (value 50), b.png (0), c.png (100)
    vals = ds.images[:, 0, 0, 0].tolist()
    assert vals == pytest.approx([50 / 127.5 - 1, -1.0, 100 / 127.5 - 1])
    assert ds.indices.tolist() == [0, 1, 2]
    rgb = load_dataset(DataArgs(name="folder", path=str(tmp_path), channels=3, image_size=4))
    assert rgb.image_shape == (3, 4, 4)


def test_folder_with_classes(tmp_path):
    _write_png(tmp_path / "dog" / "1.png", (5, 5), 10, "RGB")
    _write_png(tmp_path / "cat" / "2.png", (5, 5), 20, "RGB")
    _write_png(tmp_path / "cat" / "1.jpg", (5, 5), 30, "RGB")
    _write_png(tmp_path / "dog" / "0.png", (5, 5), 40, "RGB")
    (tmp_path / "notes.txt").write_text("ignored")
    ds = load_dataset(DataArgs(name="folder", path=str(tmp_path)))
    assert ds.class_names == ["cat", "dog"]
    assert ds.image_shape == (3, 5, 5)
    # order: cat/1.jpg, cat/2.png, dog/0.png, dog/1.png
    assert ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.caption(2) == "a photo of a dog"
    dogs = load_dataset(DataArgs(name="folder", path=str(tmp_path), classes=[1]))
    assert dogs.indices.tolist() == [2, 3]
    assert dogs.images[0, 0, 0, 0].item() == pytest.approx(40 / 127.5 - 1)


def test_folder_mismatched_sizes(tmp_path):
    _write_png(tmp_path / "a.png", (6, 6), 0)
    _write_png(tmp_path / "b.png", (8, 6), 0)
    with pytest.raises(DataError, match="--image-size"):
        load_dataset(DataArgs(name="folder", path=str(tmp_path)))
    ds = load_dataset(DataArgs(name="folder", path=str(tmp_path), image_size=4))
    assert ds.image_shape == (1, 4, 4)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no images"):
        load_dataset(DataArgs(name="folder", path=str(tmp_path)))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(DataArgs(name="folder", path=str(tmp_path / "nope")))
    with pytest.raises(DataError):
        DataArgs(name="folder")


def test_dataloader_collate(digits):
    dl = torch.utils.data.DataLoader(digits.subset(range(6)), batch_size=4)
    batch = next(iter(dl))
    assert batch["pixel_values"].shape == (4, 1, 8, 8)
    assert batch["index"].tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------- fmnist

_HAVE_FMNIST = os.path.isfile(os.path.join(FMNIST_DEBIAN_DIR, "train-images-idx3-ubyte.gz"))


@pytest.mark.skipif(not _HAVE_FMNIST, reason="Debian package dataset-fashion-mnist not installed")
def test_fmnist_debian():
    train = load_dataset(DataArgs(name="fmnist"))
    assert len(train) == 60000 and train.image_shape == (1, 28, 28)
    assert train.labels.shape == (60000,) and set(train.labels.tolist()) == set(range(10))
    assert float(train.images.min()) == -1.0 and float(train.images.max()) == 1.0
    assert train.class_names[9] == "Ankle boot"
    del train
    test = load_dataset(DataArgs(name="fmnist", split="test"))
    assert len(test) == 10000 and test.image_shape == (1, 28, 28)
    small = load_dataset(DataArgs(name="fmnist", split="test", image_size=16, classes=[0, 9], limit=40))
    assert small.image_shape == (1, 16, 16) and len(small) == 40
    assert set(small.labels.tolist()) <= {0, 9}
    assert torch.equal(small.labels, test.labels[small.indices])


def test_one_rule_for_image_values_of_8_and_16_bit_files_and_float_files(tmp_path):
    """8-bit files are 0..255, 16-bit ones 0..65535, float ones state their range (issue 27); nothing is guessed."""
    from diffusion_trak.data import DataError

    a16 = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    (tmp_path / "w").mkdir()
    Image.fromarray(a16).save(tmp_path / "w" / "a.png")
    ds = load_dataset(DataArgs(name="folder", path=str(tmp_path / "w")))
    assert torch.allclose(ds.images[0, 0], torch.from_numpy(a16 / 65535.0 * 2 - 1).float(), atol=1e-6)
    a8 = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    (tmp_path / "e").mkdir()
    Image.fromarray(a8).save(tmp_path / "e" / "a.png")
    ds = load_dataset(DataArgs(name="folder", path=str(tmp_path / "e")))
    assert torch.allclose(ds.images[0, 0], torch.from_numpy(a8 / 127.5 - 1).float(), atol=1e-6)
    with pytest.raises(DataError, match=r"have values in \[0, 252\], outside the stated range \[0, 1\]"):
        load_dataset(DataArgs(name="folder", path=str(tmp_path / "e"), value_range=(0, 1))).images
    from diffusion_trak.data import _decode  # float images (PIL mode F, e.g. from a datasets column) state their range

    f = Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8))
    with pytest.raises(DataError, match=r"are floats \(they span \[0, 1\]\) and state no range"):
        _decode(f, "L", None)
    assert torch.allclose(_decode(f, "L", None, (0, 1))[0], torch.linspace(-1, 1, 64).reshape(8, 8), atol=1e-6)


def test_npz_captions(tmp_path):
    """An .npz's captions array ((N,) or (N, K) strings, empty strings pad) is the training set's CaptionSet, keyed by
    the kept examples' stable indices; save_npz writes it back; a wrong array is one line."""
    from diffusion_trak.text import CaptionSet

    x = np.random.RandomState(0).rand(5, 8, 8).astype(np.float32)
    caps = np.array([["a red circle", ""], ["a blue square", "blue, square"], ["a cat", ""], ["a dog", ""],
                     ["a sun", "the sun"]])
    np.savez(tmp_path / "c.npz", images=x, value_range=np.array([0.0, 1.0]), captions=caps,
             indices=np.array([10, 11, 12, 13, 14]), labels=np.array([0, 1, 0, 1, 0]))
    ds = load_dataset(DataArgs(name="npz", path=str(tmp_path / "c.npz"), classes=[1]))
    assert ds.indices.tolist() == [11, 13]
    assert isinstance(ds.captions, CaptionSet)
    assert ds.captions.of(11) == ["a blue square", "blue, square"] and ds.captions.of(13) == ["a dog"]
    again = load_dataset(DataArgs(name="npz", path=save_npz(ds, tmp_path / "again.npz")))
    assert again.captions.of(11) == ["a blue square", "blue, square"] and again.captions.of(13) == ["a dog"]
    one = np.array(["one", "two", "three", "four", "five"])
    np.savez(tmp_path / "one.npz", images=x, value_range=np.array([0.0, 1.0]), captions=one)
    assert load_dataset(DataArgs(name="npz", path=str(tmp_path / "one.npz"))).captions.of(2) == ["three"]
    for bad, msg in [(one[:4], r"\(N,\) or \(N, K\) strings for the 5 images"), (np.arange(5), "array of strings"),
                     (np.array(["a", "b", " ", "d", "e"]), "image 2 has no caption")]:
        np.savez(tmp_path / "bad.npz", images=x, value_range=np.array([0.0, 1.0]), captions=bad)
        with pytest.raises(DataError, match=msg) as e:
            load_dataset(DataArgs(name="npz", path=str(tmp_path / "bad.npz")))
        assert "\n" not in str(e.value)
