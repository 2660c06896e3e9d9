"""LatentTrajectoryPipeline against diffusers' own pipelines (tiny random models, CPU, few steps)."""
import json

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, LDMPipeline, UNet2DConditionModel, UNet2DModel,
                       VQModel)

from diffusion_trak.pipelines.latent_trajectory import LatentTrajectory, LatentTrajectoryPipeline, decode_latents
from diffusion_trak.text import default_text_model

STEPS = 5


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.5).eval()


def tiny_cond_unet(dim=16, seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=dim,
                                attention_head_dim=8, norm_num_groups=8).eval()


def sd_scheduler():
    # What StableDiffusionPipeline would otherwise rewrite in its constructor (steps_offset, clip_sample).
    return DDPMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=1)


@pytest.fixture(scope="module")
def text_model():
    return default_text_model(["a photo of a one", "a photo of a two"], hidden_size=16, seed=0)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    enc = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    return tok, enc


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_reproduces_stable_diffusion_pipeline(clip, guidance):
    from diffusers import StableDiffusionPipeline

    tok, enc = clip
    vae, unet = tiny_vae(), tiny_cond_unet()
    sd = StableDiffusionPipeline(vae=vae, text_encoder=enc, tokenizer=tok, unet=unet, scheduler=sd_scheduler(),
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=STEPS, guidance_scale=guidance, height=16, width=16)
    prompts = ["a photo of a 1", "a photo of a 2"]
    ref_latents = sd(prompts, generator=torch.Generator().manual_seed(7), output_type="latent", **kw).images
    ref_images = sd(prompts, generator=torch.Generator().manual_seed(7), output_type="np", **kw).images

    pipe = LatentTrajectoryPipeline(vae=vae, unet=unet, scheduler=sd_scheduler(), text_encoder=enc, tokenizer=tok)
    out = pipe(prompts, generator=torch.Generator().manual_seed(7), num_inference_steps=STEPS, guidance_scale=guidance,
               show_progress=False)
    assert torch.equal(out.latents, ref_latents)
    np.testing.assert_array_equal(out.images_np(), ref_images)
    traj = out.trajectory
    assert traj.prompts == prompts and traj.x_t.shape == (STEPS, 2, 4, 8, 8) and traj.x0_decoded.shape == (STEPS, 2, 1, 16, 16)
    if guidance > 1:
        assert traj.negative_prompts == ["", ""] and traj.guidance_scale == guidance
        neg = sd.encode_prompt(prompts, "cpu", 1, True)[1]
        torch.testing.assert_close(traj.negative_prompt_embeds, neg)
    else:
        assert traj.negative_prompts is None and traj.negative_prompt_embeds is None
    torch.testing.assert_close(traj.conditioning()["encoder_hidden_states"], sd.encode_prompt(prompts, "cpu", 1, False)[0])


def test_reproduces_ldm_pipeline_unconditional_vq():
    torch.manual_seed(0)
    vq = VQModel(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                 latent_channels=3, num_vq_embeddings=16, norm_num_groups=4, sample_size=16).eval()
    torch.manual_seed(1)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8).eval()
    ldm = LDMPipeline(vqvae=vq, unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    ldm.set_progress_bar_config(disable=True)
    ref = ldm(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=STEPS, output_type="np").images
    pipe = LatentTrajectoryPipeline(vae=vq, unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    out = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=STEPS, show_progress=False)
    np.testing.assert_array_equal(out.images_np(), ref)
    assert out.trajectory.prompts is None and out.trajectory.conditioning() is None


def test_restart_reproduces_and_counterfactual_differs(text_model, tmp_path):
    tok, enc = text_model
    vae, unet = tiny_vae(), tiny_cond_unet()
    pipe = LatentTrajectoryPipeline(vae=vae, unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000),
                                    text_encoder=enc, tokenizer=tok)
    out = pipe("a photo of a one", batch_size=2, seed=5, num_inference_steps=STEPS, guidance_scale=2.5,
               record_steps=[1, 3], show_progress=False)
    traj = out.trajectory
    assert traj.recorded_steps == [1, 3] and traj.x0_decoded.shape[0] == 2
    torch.testing.assert_close(traj.x0_decoded_at(3), decode_latents(vae, traj.x0_pred_at(3)))

    path = traj.save(tmp_path / "t.safetensors")
    loaded = LatentTrajectory.load(path)
    assert loaded.prompts == traj.prompts and loaded.guidance_scale == 2.5 and loaded.negative_prompts == ["", ""]
    assert torch.equal(loaded.prompt_embeds, traj.prompt_embeds) and torch.equal(loaded.x0_decoded, traj.x0_decoded)

    again = pipe(start_from=loaded, start_step=1, show_progress=False)
    assert torch.equal(again.latents, out.latents) and torch.equal(again.images, out.images)
    assert again.trajectory.prompts == traj.prompts and again.trajectory.start_step == 1

    other = LatentTrajectoryPipeline(vae=vae, unet=tiny_cond_unet(seed=9), scheduler=DDPMScheduler(num_train_timesteps=1000))
    cf = other(start_from=loaded, start_step=3, show_progress=False)  # no text encoder needed: embeddings are recorded
    assert not torch.equal(cf.latents, out.latents)
    assert torch.equal(cf.trajectory.x_t[0], traj.x_t_at(3))


def test_guidance_needs_a_prompt_and_text_needs_cross_attention(text_model):
    tok, enc = text_model
    pipe = LatentTrajectoryPipeline(vae=tiny_vae(), unet=tiny_cond_unet(), scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match="needs a prompt"):
        pipe(guidance_scale=3.0, num_inference_steps=2, show_progress=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        pipe("a photo of a one", num_inference_steps=2, show_progress=False)
    torch.manual_seed(0)
    plain = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        norm_num_groups=8, num_class_embeds=3)
    p2 = LatentTrajectoryPipeline(vae=tiny_vae(), unet=plain, scheduler=DDPMScheduler(), text_encoder=enc, tokenizer=tok)
    with pytest.raises(ValueError, match="takes no text"):
        p2("a photo of a one", num_inference_steps=2, show_progress=False)
    out = p2(class_labels=[0, 2], num_inference_steps=2, seed=0, show_progress=False)
    assert out.trajectory.conditioning()["class_labels"].tolist() == [0, 2]
