"""Loading what diffusers saves (the UNet class read from the config) and the Conditioning of each model kind."""
import json
import os
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from diffusion_trak.data import ImageDataset, load_dataset
from diffusion_trak.errors import CheckpointError, LatentError
from diffusion_trak.models import (Conditioning, as_checkpoints, dataset_captions, load_checkpoint, load_pipeline,
                                   unet_conditioning)

from tiny_models import save_ddpm_pipeline, save_sd_pipeline, tiny_cond_unet, tiny_pixel_unet


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return save_sd_pipeline(str(tmp_path_factory.mktemp("m") / "sd"))


def test_checkpoint_unet_class_is_read_from_its_config(tmp_path):
    for name, unet in (("pixel", tiny_pixel_unet()), ("text", tiny_cond_unet(16))):
        unet.save_pretrained(str(tmp_path / name / "unet"))
        DDPMScheduler(num_train_timesteps=50).save_pretrained(str(tmp_path / name / "scheduler"))
        got, sched = load_checkpoint(str(tmp_path / name))
        assert type(got) is type(unet) and sched.config.num_train_timesteps == 50
        torch.testing.assert_close(next(got.parameters()), next(unet.parameters()))


def test_sd_pipeline_folder_components(sd):
    from transformers import CLIPTextModel, CLIPTokenizer

    comp = load_pipeline(sd)
    assert comp["pipeline_class"] == "StableDiffusionPipeline"
    assert isinstance(comp["unet"], UNet2DConditionModel) and isinstance(comp["vae"], AutoencoderKL)
    assert isinstance(comp["text_encoder"], CLIPTextModel) and isinstance(comp["tokenizer"], CLIPTokenizer)
    (unet, sched), = as_checkpoints([sd])
    assert isinstance(unet, UNet2DConditionModel) and isinstance(sched, DDPMScheduler)


def test_ddpm_pipeline_folder_is_also_a_checkpoint_folder(tmp_path):
    folder = save_ddpm_pipeline(str(tmp_path / "ddpm"))
    (a, _), = as_checkpoints([folder])
    b, _ = load_checkpoint(folder)
    assert isinstance(a, UNet2DModel)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_unsupported_component_is_one_line(tmp_path, sd):
    bad = str(tmp_path / "bad")
    shutil.copytree(sd, bad)
    index = json.load(open(os.path.join(bad, "model_index.json")))
    index["text_encoder"] = ["transformers", "T5EncoderModel"]
    json.dump(index, open(os.path.join(bad, "model_index.json"), "w"))
    with pytest.raises(CheckpointError, match=r"text_encoder is a transformers.T5EncoderModel, which diffusion-trak does not load"):
        load_pipeline(bad)
    index["unet"] = None
    index.pop("text_encoder")
    json.dump(index, open(os.path.join(bad, "model_index.json"), "w"))
    with pytest.raises(CheckpointError, match="names no unet"):
        load_pipeline(bad)


def _class_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=10)


def test_model_kinds():
    assert unet_conditioning(tiny_pixel_unet()) == "none"
    assert unet_conditioning(tiny_cond_unet(16)) == "text"
    assert unet_conditioning(_class_unet()) == "class"


def test_pixel_conditioning_adds_nothing_to_the_store_settings():
    data = load_dataset(name="digits", limit=6)
    c = Conditioning()
    assert c.settings(tiny_pixel_unet(), data) == {}
    assert c.training(tiny_pixel_unet(), data, 2, 0) == (None, False)
    fn, per_t = c.training(_class_unet(), data, 2, 0)
    assert torch.equal(fn([1, 3])["class_labels"], data.labels[[1, 3]]) and not per_t
    with pytest.raises(LatentError, match="pass text="):
        c.settings(tiny_cond_unet(16), data)


def test_captions_of_the_training_set(tmp_path):
    data = ImageDataset(torch.zeros(3, 1, 8, 8), indices=torch.tensor([5, 7, 9]))
    assert dataset_captions(data) is None
    caps = dataset_captions(data, ["a cat", ["a dog", "a puppy"], "a cow"])
    assert caps.of(7) == ["a dog", "a puppy"]
    with pytest.raises(LatentError, match="3 training images"):
        dataset_captions(data, ["a cat"])
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"5": "x", "7": "y", "9": "z"}))
    assert dataset_captions(data, str(path)).of(9) == ["z"]
    with pytest.raises(LatentError, match="have no captions; pass --captions FILE .*captions= in Python"):
        Conditioning(text=object())._captions(data)
