"""The Attributor on saved diffusers folders: a tiny DDPMPipeline and a tiny Stable-Diffusion-style pipeline
(AutoencoderKL + CLIP text encoder + UNet2DConditionModel), built and saved here. Its results must equal the
api path's (api.featurize / api.score on the same models and data), bit for bit."""
import json
import os

import numpy as np
import pytest
import torch

from diffusion_trak import Attributor, api
from diffusion_trak.config import FeaturizeArgs, ScoreArgs
from diffusion_trak.data import load_dataset
from diffusion_trak.errors import InputError, LatentError
from diffusion_trak.store import StoreError

from tiny_models import save_ddpm_pipeline, save_image_folder, save_sd_pipeline

FARGS = FeaturizeArgs(num_timesteps=2, proj_dim=32, batch_size=8)
SARGS = ScoreArgs(num_noises=2, destination_draws=2)
KW = dict(featurize_args=FARGS, score_args=SARGS, progress=False)
PROMPT = "a photo of a digit1"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"ddpm": save_ddpm_pipeline(str(root / "ddpm")), "sd": save_sd_pipeline(str(root / "sd")),
            "imgs": save_image_folder(str(root / "imgs"))}


def _train_set(folders):
    return load_dataset(name="folder", path=folders["imgs"])


def test_ddpm_pipeline_folder_in_five_lines(tmp_path, folders):
    attr = Attributor.from_pretrained(folders["ddpm"], train_data=folders["imgs"], out=str(tmp_path / "run"), **KW)
    attr.featurize()
    scores = attr.attribute(attr.pipeline(seed=0, num_inference_steps=5, record_steps=[0, 2, 4]))
    top, _, _, _ = scores.top(3)

    # the api path, by hand
    from diffusers import DDPMScheduler, UNet2DModel

    from diffusion_trak.pipelines import TrajectoryPipeline

    unet = UNet2DModel.from_pretrained(os.path.join(folders["ddpm"], "unet"))
    sched = DDPMScheduler.from_pretrained(os.path.join(folders["ddpm"], "scheduler"))
    data = _train_set(folders)
    fs = api.featurize([(unet, sched)], data, FARGS, str(tmp_path / "ref"), progress=False)
    traj = TrajectoryPipeline(unet=unet, scheduler=sched)(seed=0, num_inference_steps=5, record_steps=[0, 2, 4],
                                                           show_progress=False).trajectory
    ref = api.score(fs, [(unet, sched)], data.indices.numpy(), SARGS, trajectory=traj, progress=False)
    np.testing.assert_array_equal(np.asarray(attr.features.arrays[0]), np.asarray(fs.arrays[0]))
    assert scores.values.shape == (3, 1, 12) and np.abs(scores.values).sum() > 0
    np.testing.assert_array_equal(scores.values, ref.values)
    np.testing.assert_array_equal(scores.destination, ref.destination)
    assert set(top.reshape(-1).tolist()) <= set(data.indices.tolist())


def test_sd_pipeline_folder_in_five_lines(tmp_path, folders):
    attr = Attributor.from_pretrained(folders["sd"], train_data=folders["imgs"], out=str(tmp_path / "run"), **KW)
    attr.featurize()
    scores = attr.attribute(attr.pipeline(PROMPT, seed=0, num_inference_steps=5, record_steps=[0, 4], guidance_scale=2.0))
    png, html = attr.report(scores)

    # the api path, by hand: latents of the VAE, captions from the class names, the CLIP text model
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffusion_trak import latent as L
    from diffusion_trak.models import Conditioning
    from diffusion_trak.pipelines.latent_trajectory import LatentTrajectoryPipeline
    from diffusion_trak.text import CaptionSet, TextConditioner

    sd = folders["sd"]
    vae = AutoencoderKL.from_pretrained(os.path.join(sd, "vae")).eval()
    unet = UNet2DConditionModel.from_pretrained(os.path.join(sd, "unet")).eval()
    sched = DDPMScheduler.from_pretrained(os.path.join(sd, "scheduler"))
    tok = CLIPTokenizer.from_pretrained(os.path.join(sd, "tokenizer"))
    enc = CLIPTextModel.from_pretrained(os.path.join(sd, "text_encoder")).eval()
    pixels = _train_set(folders)
    latents = L.encode_in_memory(pixels, vae)
    cond = Conditioning(text=TextConditioner(tok, enc), captions=CaptionSet.from_class_names(pixels))
    fs = api.featurize([(unet, sched)], latents, FARGS, str(tmp_path / "ref"), progress=False, conditioning=cond)
    traj = LatentTrajectoryPipeline(vae=vae, unet=unet, scheduler=sched, text_encoder=enc, tokenizer=tok)(
        PROMPT, seed=0, num_inference_steps=5, record_steps=[0, 4], guidance_scale=2.0, show_progress=False).trajectory
    ref = api.score(fs, [(unet, sched)], latents.indices.numpy(), SARGS, trajectory=traj, progress=False)

    assert fs.store.settings["conditioning"]["kind"] == "text"
    assert attr.features.store.settings == fs.store.settings
    np.testing.assert_array_equal(np.asarray(attr.features.arrays[0]), np.asarray(fs.arrays[0]))
    assert scores.values.shape == (2, 1, 12) and np.abs(scores.values).sum() > 0
    np.testing.assert_array_equal(scores.values, ref.values)
    np.testing.assert_array_equal(scores.destination, ref.destination)
    assert os.path.getsize(png) > 0 and PROMPT in open(html, encoding="utf-8").read()
    # another prompt is another target
    other = attr.attribute(attr.pipeline("a photo of a digit7", seed=0, num_inference_steps=5, record_steps=[0, 4],
                                         guidance_scale=2.0))
    assert not np.allclose(other.values, scores.values)


def test_rerun_resumes_and_other_settings_refuse(tmp_path, folders, monkeypatch):
    out = str(tmp_path / "run")
    first = Attributor.from_pretrained(folders["ddpm"], folders["imgs"], out, **KW).featurize()
    before = np.array(first.arrays[0])
    from diffusion_trak.featurize.featurizer import Featurizer

    calls = []
    real = Featurizer.features
    monkeypatch.setattr(Featurizer, "features", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    again = Attributor.from_pretrained(folders["ddpm"], folders["imgs"], out, **KW).featurize()
    assert calls == [] and np.array_equal(np.asarray(again.arrays[0]), before)  # nothing recomputed
    other = Attributor.from_pretrained(folders["ddpm"], folders["imgs"], out, progress=False,
                                       featurize_args=FeaturizeArgs(num_timesteps=3, proj_dim=32))
    with pytest.raises(StoreError, match=r"other settings .*num_timesteps: 2 -> 3.*--overwrite") as e:
        other.featurize()
    assert "\n" not in str(e.value)


def test_images_as_targets_and_self_attribution_equal_the_api(tmp_path, folders):
    attr = Attributor.from_pretrained(folders["ddpm"], folders["imgs"], str(tmp_path / "run"), **KW)
    fs = attr.featurize()
    data = _train_set(folders)
    ckpts = attr.checkpoints
    got = attr.attribute(data.images[:3], image_timesteps=[10, 100])
    ref = api.score(fs, ckpts, data.indices.numpy(), SARGS, images=data.images[:3], image_timesteps=[10, 100],
                    progress=False)
    assert got.values.shape == (2, 3, 12)
    np.testing.assert_array_equal(got.values, ref.values)
    rate, pos = attr.self_attribution(num=6, timestep=10)
    rate_ref, pos_ref = api.self_attribution_rate(fs, ckpts, data, 6, 10, SARGS)
    assert rate == rate_ref and np.array_equal(pos, pos_ref)
    png, html = attr.report(got, name="images")
    assert os.path.getsize(png) > 0 and html.endswith("images.html")


def test_text_model_images_need_prompts(tmp_path, folders):
    attr = Attributor.from_pretrained(folders["sd"], folders["imgs"], str(tmp_path / "run"), **KW)
    attr.featurize()
    pixels = attr.dataset.images[:2]
    with pytest.raises(LatentError, match=r"pass --prompt \(prompts= in Python"):
        attr.attribute(pixels)
    a = attr.attribute(pixels, prompts=["a photo of a digit0", "a photo of a digit1"], image_timesteps=[10])
    b = attr.attribute(pixels, prompts=["a photo of a digit5", "a photo of a digit1"], image_timesteps=[10])
    assert a.values.shape == (1, 2, 12)
    assert not np.allclose(a.values[0, 0], b.values[0, 0]) and np.allclose(a.values[0, 1], b.values[0, 1])
    rate, pos = attr.self_attribution(num=4, timestep=10)  # each latent with its own caption
    assert 0.0 <= rate <= 1.0 and len(pos) == 4


def test_several_checkpoint_folders_are_an_ensemble(tmp_path, folders):
    from diffusion_trak.train import load_checkpoint

    other = save_ddpm_pipeline(str(tmp_path / "ddpm2"), seed=1)
    attr = Attributor.from_pretrained([folders["ddpm"], other], folders["imgs"], str(tmp_path / "run"), **KW)
    fs = attr.featurize()
    assert len(fs.names) == 2 and attr.unet is attr.checkpoints[-1][0]
    assert fs.store.settings["checkpoints"] == api.featurize(
        [load_checkpoint(folders["ddpm"]), load_checkpoint(other)], _train_set(folders), FARGS, str(tmp_path / "ref"),
        progress=False).store.settings["checkpoints"]


def test_no_features_yet_is_one_line(tmp_path, folders):
    attr = Attributor.from_pretrained(folders["ddpm"], folders["imgs"], str(tmp_path / "run"), **KW)
    with pytest.raises(InputError, match=r"no features in .*; call featurize\(\) first"):
        attr.attribute(torch.zeros(1, 1, 8, 8))
    with pytest.raises(InputError, match="pass train_data="):
        Attributor.from_pretrained(folders["ddpm"], None, str(tmp_path / "run2")).featurize()


# ---- the CLI: the same commands for both folders -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddpm", "sd"])
def test_cli_same_commands_for_pipeline_folders(tmp_path, folders, kind, capsys):
    from diffusion_trak.cli import main
    from diffusion_trak.pipelines import Trajectory

    run = str(tmp_path / "run")
    model, data = folders[kind], ["--data", "folder", "--data-path", folders["imgs"]]
    common = ["--pipeline", model, "--run", run, "--device", "cpu"]
    prompt = ["--prompt", PROMPT] if kind == "sd" else []
    assert main(["featurize", *common, *data, "-T", "2", "-k", "32", "--batch-size", "8"]) == 0
    assert main(["generate", *common, "--steps", "4", "--num-record", "2", *prompt]) == 0
    assert main(["score", *common, *data, "-R", "2", "--destination-draws", "2"]) == 0
    assert main(["plot", "--run", run, *data]) == 0
    scores = np.load(os.path.join(run, "scores", "seed-0", "scores.npy"))
    summary = json.load(open(os.path.join(run, "scores", "seed-0", "scores.json")))
    assert scores.shape == (2, 1, 12) and summary["train_indices"] == list(range(12))

    attr = Attributor.from_pretrained(model, folders["imgs"], str(tmp_path / "py"), **KW)
    attr.featurize()
    traj = Trajectory.load(os.path.join(run, "trajectories", "seed-0.safetensors"))
    assert (getattr(traj, "prompts", None) or [None])[0] == (PROMPT if kind == "sd" else None)
    np.testing.assert_array_equal(attr.attribute(traj).values, scores)
    if kind == "sd":  # the latents were cached beside the features, once
        assert os.path.isdir(os.path.join(run, "latents"))


def test_readme_first_python_example_runs(tmp_path, folders, monkeypatch):
    """The README's first Python example: a saved DDPMPipeline folder, a generated image attributed in 5 lines."""
    import shutil

    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"), encoding="utf-8").read()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert len([line for line in block.splitlines() if line.strip()]) <= 5
    assert "my-ddpm-pipeline/" in block and "my_images/" in block
    monkeypatch.chdir(tmp_path)
    shutil.copytree(folders["ddpm"], "my-ddpm-pipeline")
    shutil.copytree(folders["imgs"], "my_images")
    assert json.load(open("my-ddpm-pipeline/model_index.json"))["_class_name"] == "DDPMPipeline"
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    scores = scope["scores"]
    assert scores.values.shape == (10, 1, 12) and np.isfinite(scores.values).all() and scores.destination is not None
    assert os.path.getsize("runs/mine/report/attribution.png") > 0 and os.path.isfile("runs/mine/report/attribution.html")


def test_latent_size_mismatch_is_refused_before_anything_is_written(tmp_path, folders):
    big = load_dataset(name="folder", path=folders["imgs"], image_size=16)  # the VAE makes 8×8 latents of these
    attr = Attributor.from_pretrained(folders["sd"], big, str(tmp_path / "run"), **KW)
    with pytest.raises(LatentError, match=r"4×4 latents but the VAE makes 8×8 \(use --image-size 8\)"):
        attr.featurize()
    assert not os.path.exists(tmp_path / "run")


def test_from_a_pipeline_in_memory(tmp_path, folders):
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(folders["ddpm"])
    a = Attributor.from_pipeline(pipe, folders["imgs"], str(tmp_path / "a"), **KW).featurize()
    b = Attributor.from_pretrained(folders["ddpm"], folders["imgs"], str(tmp_path / "b"), **KW).featurize()
    assert a.store.settings == b.store.settings
    np.testing.assert_array_equal(np.asarray(a.arrays[0]), np.asarray(b.arrays[0]))


def test_sd_folder_with_metadata_captions(tmp_path, folders):
    """An image folder laid out as diffusers' text-to-image scripts keep it (metadata.jsonl captions), read from
    disk, featurized through a Stable-Diffusion-style folder: the store records those captions, and the scores
    equal the same images with the same captions given explicitly."""
    import shutil

    from diffusion_trak.text import CaptionSet

    imgs = str(tmp_path / "captioned")
    shutil.copytree(folders["imgs"], imgs)
    files = sorted(os.path.relpath(os.path.join(d, f), imgs) for d, _, fs in os.walk(imgs) for f in fs if f.endswith(".png"))
    with open(os.path.join(imgs, "metadata.jsonl"), "w") as fh:
        for j, f in enumerate(files):
            fh.write(json.dumps({"file_name": f, "text": f"a handwritten sample number {j % 3}"}) + "\n")
    data = load_dataset(name="folder", path=imgs)
    assert data.captions is not None
    attr = Attributor.from_pretrained(folders["sd"], train_data=imgs, out=str(tmp_path / "run"), **KW)
    attr.featurize()
    scores = attr.attribute(attr.pipeline(PROMPT, seed=0, num_inference_steps=5, record_steps=[4], guidance_scale=2.0))
    explicit = CaptionSet({int(i): data.captions.of(int(i)) for i in data.indices.tolist()})
    ref = Attributor.from_pretrained(folders["sd"], train_data=imgs, out=str(tmp_path / "ref"), captions=explicit, **KW)
    ref.featurize()
    assert attr.features.store.settings["conditioning"]["captions"] == explicit.fingerprint()
    other = CaptionSet.from_class_names(data)
    assert other.fingerprint() != explicit.fingerprint()  # the class names would have been another conditioning
    np.testing.assert_array_equal(np.asarray(attr.features.arrays[0]), np.asarray(ref.features.arrays[0]))
    assert scores.values.shape == (1, 1, len(data)) and np.isfinite(scores.destination).all()


def test_latents_as_targets_equal_the_api(tmp_path, folders):
    """attribute(latents=..., timesteps=..., prompts=...) scores latents as the UNet takes them (e.g. x̂0_t of a
    user's own sampling loop): the same scores as api.score(images=latents, cond=the prompts' conditioning)."""
    attr = Attributor.from_pretrained(folders["sd"], folders["imgs"], str(tmp_path / "run"), **KW)
    fs = attr.featurize()
    traj = attr.pipeline(PROMPT, seed=0, num_inference_steps=5, record_steps=[0, 4], guidance_scale=2.0).trajectory
    z = torch.as_tensor(traj.x0_pred[-1]).float()  # the last recorded x̂0 (latents), 1 image
    z = torch.cat([z, z.flip(-1)])
    prompts = [PROMPT, "a photo of a digit7"]
    got = attr.attribute(latents=z, timesteps=[10, 500], prompts=prompts)
    ref = api.score(fs, attr.checkpoints, attr.inputs.indices.numpy(), SARGS, images=z, image_timesteps=[10, 500],
                    cond=attr.conditioning.prompts(attr.unet, prompts), progress=False)
    assert got.values.shape == (2, 2, 12) and np.abs(got.values).sum() > 0
    np.testing.assert_array_equal(got.values, ref.values)
    np.testing.assert_array_equal(got.destination, ref.destination)
    assert any(n.startswith("latents-") for n in os.listdir(os.path.join(attr.out, "scores")))
    # the prompt is part of the target: other prompts, other scores
    other = attr.attribute(latents=z, timesteps=[10, 500], prompts=[prompts[1], prompts[0]], save=False)
    assert not np.allclose(other.values, got.values)
    png, _ = attr.report(got, name="latents")  # decoded by the VAE for the page
    assert os.path.getsize(png) > 0
    # one line each for what does not fit
    for kw, msg in [(dict(latents=z[:, :2], prompts=prompts), r"latents must be a non-empty \(B, 4"),
                    (dict(latents=z, prompts=prompts, value_range=(0, 1)), "drop the positional target"),
                    (dict(latents=[1, 2], prompts=prompts), "tensor or array"),
                    (dict(latents=z, class_labels=[0, 1]), "not class-conditional")]:
        with pytest.raises(InputError, match=msg) as e:
            attr.attribute(**kw, save=False)
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="timesteps= goes with latents="):
        attr.attribute(traj, timesteps=[10])


def test_latents_need_a_latent_model(tmp_path, folders):
    attr = Attributor.from_pretrained(folders["ddpm"], folders["imgs"], str(tmp_path / "run"), **KW)
    with pytest.raises(InputError, match="no VAE"):
        attr.attribute(latents=torch.zeros(1, 3, 8, 8))


def test_score_images_takes_class_label_as_python_takes_class_labels(tmp_path, folders):
    """``score --images DIR --class-label C`` scores them as ``attribute(images, class_labels=[C] * B)`` does."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from diffusion_trak.cli import main

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=10)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(str(tmp_path / "cls"))
    data = load_dataset(name="folder", path=folders["imgs"])
    assert data.labels is not None
    run = str(tmp_path / "run")
    flags = ["--pipeline", str(tmp_path / "cls"), "--run", run]
    assert main(["featurize", *flags, "--data", "folder", "--data-path", folders["imgs"], "-T", "2", "-k", "32",
                 "--batch-size", "8"]) == 0
    sub = tmp_path / "targets"
    sub.mkdir()
    first = sorted(os.path.join(d, f) for d, _, fs in os.walk(folders["imgs"]) for f in fs if f.endswith(".png"))[:2]
    for f in first:
        os.link(f, sub / os.path.basename(f))
    assert main(["score", *flags, "--images", str(sub), "--class-label", "3", "--image-timesteps", "10", "-R", "2",
                 "--destination-draws", "2", "--out", str(tmp_path / "s")]) == 0
    cli = np.load(tmp_path / "s" / "scores.npy")
    attr = Attributor.from_pretrained(str(tmp_path / "cls"), folders["imgs"], run, progress=False,
                                      score_args=ScoreArgs(num_noises=2, destination_draws=2))
    targets = load_dataset(name="folder", path=str(sub)).images
    py = attr.attribute(targets, image_timesteps=[10], class_labels=[3, 3], save=False)
    np.testing.assert_array_equal(cli, py.values)
    other = attr.attribute(targets, image_timesteps=[10], class_labels=[4, 4], save=False)
    assert not np.array_equal(cli, other.values)  # the label is used, not ignored
    # --class-label goes with --images: with a trajectory it is refused, not ignored
    assert main(["score", *flags, "--class-label", "3", "--out", str(tmp_path / "t")]) == 2
    assert not os.path.exists(tmp_path / "t")


def test_a_single_file_checkpoint_is_refused_with_the_conversion_hint(tmp_path, folders, capsys):
    from diffusion_trak.cli import main
    from diffusion_trak.errors import CheckpointError

    ckpt = tmp_path / "v1-5-pruned-emaonly.safetensors"
    ckpt.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"single-file checkpoint .*StableDiffusionPipeline\.from_single_file\("
                                              r".*\)\.save_pretrained\('my-model'\)"):
        Attributor.from_pretrained(str(ckpt), folders["imgs"], str(tmp_path / "run"))
    capsys.readouterr()
    assert main(["featurize", "--pipeline", str(ckpt), "--data", "folder", "--data-path", folders["imgs"],
                 "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "from_single_file" in err[0] and not os.path.exists(tmp_path / "run")
    # given as --lora: a whole model is no adapter, and the line says how to use it
    pytest.importorskip("peft")
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(ckpt))
    with pytest.raises(CheckpointError, match=r"holds no LoRA layers .*whole model's single-file checkpoint: .*"
                                              r"from_single_file\(.*--pipeline my-model/"):
        Attributor.from_pretrained(folders["sd"], folders["imgs"], str(tmp_path / "run"), lora=str(ckpt))


def test_readable_reprs_a_named_self_attribution_and_the_self_check(tmp_path, folders, capsys, monkeypatch):
    attr = Attributor.from_pretrained(folders["ddpm"], folders["imgs"], str(tmp_path / "run"), **KW)
    attr.featurize()
    data = _train_set(folders)
    scores = attr.attribute(data.images[:2], image_timesteps=[10, 100], save=False)
    for text in (repr(scores.top(8)), repr(scores), repr(scores.top_destination(8))):
        lines = text.splitlines()
        assert 3 <= len(lines) <= 6 and "array(" not in text and max(map(len, lines)) < 400, text
    top = repr(scores.top(8))
    assert "highest:" in top and "lowest:" in top and f"#{scores.top(8).indices[0, 0, 0]} " \
        f"{scores.top(8).sources[0, 0, 0]} (" in top
    assert "2 steps × 2 targets × 12 training images" in repr(scores)
    # self_attribution: a named result that still unpacks as (rate, positions), with a progress bar
    attr.progress = True
    capsys.readouterr()
    res = attr.self_attribution(num=6, timestep=10)
    assert "self-attribution" in capsys.readouterr().err
    rate, pos = res
    assert isinstance(res, api.SelfAttribution) and rate == res.rate and len(pos) == 6 and res.chance == 1 / 12
    assert "of 6 training images" in str(res) and "chance: 8%" in str(res)
    assert (rate, list(pos)) == (res[0], list(res[1]))
    # the self-check printed after featurizing (progress on), and its warning line when near chance
    attr.featurize()
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("self-check: ")]
    low = api.SelfAttribution(1 / 8, np.arange(8), 12, 10)
    assert low.near_chance and not api.SelfAttribution(7 / 8, np.arange(8), 12, 10).near_chance
    monkeypatch.setattr(api, "self_attribution_rate", lambda *a, **k: low)
    attr.featurize()
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("self-check: 1 of 8 training images (12%)") and lines[-1].startswith(
        "warning: the self-check is near chance (12%, chance 8%)")
    attr.featurize(self_check=False)
    assert "self-check" not in capsys.readouterr().out
