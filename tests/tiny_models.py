"""Tiny diffusers pipelines built and saved in tests (nothing is downloaded)."""
import json
import os

import numpy as np
import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"


def tiny_pixel_unet(seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=None)


def tiny_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=8, scaling_factor=0.7).eval()


def tiny_cond_unet(dim, seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=dim,
                                attention_head_dim=4, norm_num_groups=4).eval()


def tiny_clip(folder, max_length=32, hidden=16, seed=0):
    """A character-level ``CLIPTokenizer`` (vocab and merges written to ``folder``) and a tiny ``CLIPTextModel``."""
    import transformers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in LETTERS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                                     model_max_length=max_length)
    torch.manual_seed(seed)
    enc = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    return tok, enc


def save_ddpm_pipeline(folder, seed=0):
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=tiny_pixel_unet(seed), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def save_sd_pipeline(folder, seed=0):
    """A Stable-Diffusion-style folder: AutoencoderKL + CLIP text encoder/tokenizer + UNet2DConditionModel + DDPM."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    tok, enc = tiny_clip(folder + "-vocab", seed=seed)
    sched = DDPMScheduler(num_train_timesteps=1000, steps_offset=1, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=tiny_vae(seed), text_encoder=enc, tokenizer=tok, unet=tiny_cond_unet(16, seed),
                                   scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def save_image_folder(folder, n=12):
    """``n`` digits as 8×8 grayscale PNGs in one subfolder per class (the class names become the captions)."""
    from PIL import Image

    from diffusion_trak.data import load_dataset

    ds = load_dataset(name="digits", limit=n)
    for i in range(n):
        sub = os.path.join(folder, f"digit{int(ds.labels[i])}")
        os.makedirs(sub, exist_ok=True)
        a = ((ds.images[i, 0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(a, mode="L").save(os.path.join(sub, f"{i:03d}.png"))
    return folder
