"""Data as users hold it, and one behaviour for Python and the CLI.

- A Hugging Face ``datasets.Dataset`` / ``DatasetDict`` in memory is a training set wherever one is taken
  (``Attributor(train_data=ds)``, ``data.from_hf(ds, image_column=..., text_column=...)``): the same images,
  captions and features as the same dataset saved with ``save_to_disk`` and read with ``--data hf``.
- Every bad input of the table is refused by the CLI (exit 2, one line) and by the ``Attributor`` with the same
  message and a :class:`~diffusion_trak.errors.UserError`, and neither writes a file.
"""
import os

import numpy as np
import pytest
from PIL import Image

from diffusion_trak import Attributor
from diffusion_trak.cli import main
from diffusion_trak.config import FeaturizeArgs
from diffusion_trak.data import DataArgs, from_hf, load_dataset
from diffusion_trak.errors import InputError, UserError

from tiny_models import save_ddpm_pipeline, save_image_folder, save_sd_pipeline

FARGS = FeaturizeArgs(num_timesteps=2, proj_dim=16, kernel_draws=2)


def save_sized_folder(folder, h, w, n=4):
    os.makedirs(folder)
    g = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(g.integers(0, 256, (h, w), dtype=np.uint8), mode="L").save(os.path.join(folder, f"{i}.png"))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"ddpm": save_ddpm_pipeline(str(root / "ddpm")), "sd": save_sd_pipeline(str(root / "sd")),
            "imgs": save_image_folder(str(root / "imgs"), 8), "big": save_sized_folder(str(root / "big"), 32, 32),
            "wide": save_sized_folder(str(root / "wide"), 12, 20)}


def hf_digits(n=8, image="image", text="text"):
    """``n`` digits as a datasets.Dataset in memory: PIL images and a caption each."""
    datasets = pytest.importorskip("datasets")
    ds = load_dataset(name="digits", limit=n)
    pil = [Image.fromarray(((ds.images[i, 0].numpy() + 1) * 127.5).round().astype(np.uint8), mode="L") for i in range(n)]
    return datasets.Dataset.from_dict({image: pil, text: [f"a photo of a digit{int(c)}" for c in ds.labels]})


def test_in_memory_datasets_dataset_is_a_training_set(tmp_path, folders):
    datasets = pytest.importorskip("datasets")
    ds = hf_digits()
    attr = Attributor.from_pretrained(folders["sd"], train_data=ds, out=str(tmp_path / "mem"), featurize_args=FARGS,
                                      progress=False)
    fs = attr.featurize()
    assert attr.dataset.captions.of(3) == [ds[3]["text"]] and attr.dataset.describe(3)["source"] == "row 3"
    # the same dataset saved to disk and read as --data hf: the same images, captions and features
    ds.save_to_disk(str(tmp_path / "saved"))
    disk = Attributor.from_pretrained(folders["sd"], train_data=DataArgs(name="hf", path=str(tmp_path / "saved")),
                                      out=str(tmp_path / "disk"), featurize_args=FARGS, progress=False)
    ref = disk.featurize()
    assert attr.dataset.fingerprint() == disk.dataset.fingerprint()
    assert fs.store.settings["conditioning"]["captions"] == ref.store.settings["conditioning"]["captions"]
    np.testing.assert_array_equal(np.asarray(fs.arrays[0]), np.asarray(ref.arrays[0]))
    # a DatasetDict: its train split; other column names, named
    dd = datasets.DatasetDict({"train": ds, "test": hf_digits(2)})
    assert Attributor.from_pretrained(folders["sd"], dd, str(tmp_path / "dd")).dataset.fingerprint() == \
        attr.dataset.fingerprint()
    named = from_hf(hf_digits(image="img", text="prompt"), image_column="img", text_column="prompt")
    assert named.fingerprint() == attr.dataset.fingerprint() and named.captions.of(3) == [ds[3]["text"]]
    with pytest.raises(UserError, match="text_column 'caption' is not a column"):
        from_hf(ds, text_column="caption")
    with pytest.raises(UserError, match="image_column 'text' .* is not a datasets.Image column"):
        from_hf(ds, image_column="text")


def snapshot(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, ds, fs in os.walk(root) for f in fs + ds)


# name, CLI argv (after the command), Python call: each with F (model folders) and RUN (a run folder not yet made)
CASES = [
    ("text_model_without_prompt", ["generate", "--pipeline", "{sd}", "--steps", "3"],
     lambda F, run: Attributor.from_pretrained(F["sd"], None, run).pipeline(seed=0, num_inference_steps=3)),
    ("prompt_for_a_model_without_text", ["generate", "--pipeline", "{ddpm}", "--steps", "3", "--prompt", "a cat"],
     lambda F, run: Attributor.from_pretrained(F["ddpm"], None, run).pipeline("a cat", num_inference_steps=3)),
    ("class_label_for_an_unconditional_model", ["generate", "--pipeline", "{ddpm}", "--steps", "3", "--class-label", "3"],
     lambda F, run: Attributor.from_pretrained(F["ddpm"], None, run).pipeline(class_labels=3, num_inference_steps=3)),
    ("steps_past_the_scheduler", ["generate", "--pipeline", "{ddpm}", "--steps", "5000"],
     lambda F, run: Attributor.from_pretrained(F["ddpm"], None, run).pipeline(num_inference_steps=5000)),
    ("record_steps_past_the_end", ["generate", "--pipeline", "{ddpm}", "--steps", "4", "--record-steps", "9"],
     lambda F, run: Attributor.from_pretrained(F["ddpm"], None, run).pipeline(num_inference_steps=4, record_steps=[9])),
    ("images_larger_than_the_model", ["featurize", "--pipeline", "{ddpm}", "--data", "folder", "--data-path", "{big}",
                                      "-T", "2", "-k", "16"],
     lambda F, run: Attributor.from_pretrained(F["ddpm"], F["big"], run, featurize_args=FARGS).featurize()),
    ("images_of_another_aspect_ratio", ["featurize", "--pipeline", "{ddpm}", "--data", "folder", "--data-path", "{wide}",
                                        "-T", "2", "-k", "16"],
     lambda F, run: Attributor.from_pretrained(F["ddpm"], F["wide"], run, featurize_args=FARGS).featurize()),
    ("scheduler_folder_as_a_model", ["featurize", "--checkpoints", "{ddpm}/scheduler", "-T", "2", "-k", "16"],
     lambda F, run: Attributor.from_pretrained(os.path.join(F["ddpm"], "scheduler"), F["imgs"], run)),
    ("params_lora_without_adapter", ["featurize", "--pipeline", "{sd}", "--data", "folder", "--data-path", "{imgs}",
                                     "--params", "lora", "-T", "2", "-k", "16"],
     lambda F, run: Attributor.from_pretrained(F["sd"], F["imgs"], run,
                                               featurize_args=FeaturizeArgs(num_timesteps=2, proj_dim=16,
                                                                            params="lora")).featurize()),
]


@pytest.mark.parametrize("name,argv,call", CASES, ids=[c[0] for c in CASES])
def test_cli_and_python_refuse_alike(tmp_path, folders, capsys, name, argv, call):
    run = str(tmp_path / "run")
    before = snapshot(tmp_path)
    capsys.readouterr()
    rc = main([a.format(**folders) for a in argv] + ["--run", run])
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert rc == 2 and len(lines) == 1, lines
    with pytest.raises(UserError) as e:
        call(folders, run)
    assert isinstance(e.value, InputError)
    assert lines[0] == f"diffusion-trak {argv[0]}: error: {e.value}"
    assert "\n" not in str(e.value)
    assert snapshot(tmp_path) == before, "nothing written"


def test_attribute_saves_its_scores_under_the_run_folder(tmp_path, folders):
    """As ``diffusion-trak score`` does: ``out/scores/<named by the target>``; a rerun resumes; save=False keeps
    them in memory; real images with other prompts are another target (another folder, never the old scores)."""
    from diffusion_trak.api import Scores

    attr = Attributor.from_pretrained(folders["sd"], folders["imgs"], str(tmp_path / "run"), featurize_args=FARGS,
                                      progress=False)
    attr.featurize()
    traj = attr.pipeline("a photo of a digit1", seed=3, num_inference_steps=3, record_steps=[0, 2]).trajectory
    sc = attr.attribute(traj)
    (name,) = os.listdir(tmp_path / "run" / "scores")
    assert name.startswith("seed-3-")
    saved = Scores.load(str(tmp_path / "run" / "scores" / name))
    np.testing.assert_array_equal(saved.values, sc.values)
    np.testing.assert_array_equal(attr.attribute(traj).values, sc.values)  # resumed
    attr.attribute(traj, save=False)
    assert len(os.listdir(tmp_path / "run" / "scores")) == 1
    px = attr.dataset.images[:1]
    a = attr.attribute(px, prompts=["a photo of a digit0"])
    b = attr.attribute(px, prompts=["a photo of a digit1"])
    assert len(os.listdir(tmp_path / "run" / "scores")) == 3 and not np.array_equal(a.values, b.values)


def test_images_of_a_text_model_without_prompts_refused_alike(tmp_path, folders, capsys):
    run = str(tmp_path / "run")
    data = ["--data", "folder", "--data-path", folders["imgs"]]
    assert main(["featurize", "--pipeline", folders["sd"], "--run", run, "-T", "2", "-k", "16", "--kernel-draws", "2"]
                + data) == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(["score", "--pipeline", folders["sd"], "--run", run, "--images", folders["imgs"]]) == 2
    line = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    attr = Attributor.from_pretrained(folders["sd"], folders["imgs"], run, featurize_args=FARGS)
    with pytest.raises(InputError) as e:
        attr.attribute(attr.dataset.images[:2])
    assert line == [f"diffusion-trak score: error: {e.value}"] and "--prompt" in str(e.value)
    assert snapshot(tmp_path) == before
