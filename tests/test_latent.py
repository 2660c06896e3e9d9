"""The latent path on tiny models: latent cache, text conditioning, latent features (through api.featurize with a
Conditioning), training, demo --latent."""
import json
import os

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel, VQModel

from diffusion_trak import api
from diffusion_trak import latent as L
from diffusion_trak.config import FeaturizeArgs, ScoreArgs
from diffusion_trak.data import load_dataset
from diffusion_trak.featurize.featurizer import Featurizer, example_draws
from diffusion_trak.models import Conditioning, load_checkpoint, unet_conditioning
from diffusion_trak.outputs import output_value
from diffusion_trak.targets import target_features
from diffusion_trak.text import (CaptionError, CaptionSet, TextConditioner, TinyTextEncoder, WordTokenizer,
                                 caption_conditioning, caption_draws, default_text_model)

from tiny_models import tiny_clip, tiny_cond_unet, tiny_vae

TEMPLATES = ("a photo of a {}", "a drawing of a {}")


@pytest.fixture(scope="module")
def pixels():
    return load_dataset(name="digits", limit=10)


@pytest.fixture(scope="module")
def captions(pixels):
    return CaptionSet.from_class_names(pixels, TEMPLATES)


@pytest.fixture(scope="module")
def text(captions):
    tok, enc = default_text_model(captions.all_texts(), hidden_size=16, seed=0)
    return TextConditioner(tok, enc)


@pytest.fixture
def latents(tmp_path, pixels, captions):
    return L.encode_dataset(pixels, tiny_vae(), str(tmp_path / "cache"), captions=captions, progress=False)


# ---- latent cache -------------------------------------------------------------------------------


def test_latents_are_scaled_posterior_means(latents, pixels):
    vae = tiny_vae()
    with torch.no_grad():
        direct = vae.encode(pixels.images).latent_dist.mean * 0.7
    torch.testing.assert_close(latents.images, direct, rtol=1e-5, atol=1e-6)
    assert latents.image_shape == (4, 4, 4) and latents.scaling_factor == pytest.approx(0.7)
    assert torch.equal(latents.indices, pixels.indices) and latents.pixels is pixels
    assert latents.caption(0) == f"a photo of a {pixels.class_name(0)}"


def test_cache_is_reused_and_refused_when_the_vae_changes(tmp_path, pixels, monkeypatch):
    cache = str(tmp_path / "cache")
    first = L.encode_dataset(pixels, tiny_vae(), cache, progress=False)
    calls = []
    from diffusion_trak import vae as V

    real = V.encode_images
    monkeypatch.setattr(V, "encode_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = L.encode_dataset(pixels, tiny_vae(), cache, progress=False)
    assert len(calls) == 1  # only the one-image shape probe; no row re-encoded
    assert torch.equal(first.images, again.images)

    other = tiny_vae(seed=1)
    with pytest.raises(L.LatentError, match="another VAE.*--overwrite") as e:
        L.encode_dataset(pixels, other, cache, progress=False)
    assert "\n" not in str(e.value)
    redone = L.encode_dataset(pixels, other, cache, overwrite=True, progress=False)
    assert not torch.allclose(redone.images, first.images)
    with torch.no_grad():
        torch.testing.assert_close(redone.images, other.encode(pixels.images).latent_dist.mean * 0.7)


def test_sample_mode_is_a_fixed_seed_posterior_sample(tmp_path, pixels):
    a = L.encode_dataset(pixels, tiny_vae(), str(tmp_path / "a"), mode="sample", seed=3, progress=False)
    b = L.encode_dataset(pixels.subset([5, 6, 7]), tiny_vae(), str(tmp_path / "b"), mode="sample", seed=3, progress=False)
    mean = L.encode_dataset(pixels, tiny_vae(), str(tmp_path / "m"), progress=False)
    torch.testing.assert_close(a.images[5:8], b.images)  # a function of (seed, index), not of the batch
    assert not torch.allclose(a.images, mean.images)


def test_vq_model_latents(tmp_path, pixels):
    torch.manual_seed(0)
    vq = VQModel(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                 latent_channels=3, num_vq_embeddings=16, norm_num_groups=4, sample_size=8, scaling_factor=1.0).eval()
    lat = L.encode_dataset(pixels, vq, str(tmp_path / "vq"), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(lat.images, vq.encode(pixels.images).latents)
    with pytest.raises(L.LatentError, match="mode='mean'"):
        L.encode_dataset(pixels, vq, str(tmp_path / "vq2"), mode="sample", progress=False)


# ---- captions and text --------------------------------------------------------------------------


def test_caption_files(tmp_path):
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"3": ["a cat", "a small cat"], "7": "a dog"}))
    cs = CaptionSet.from_file(str(j))
    assert cs.of(3) == ["a cat", "a small cat"] and cs.of(7) == ["a dog"]
    c = tmp_path / "c.csv"
    c.write_text("index,caption\n3,a cat\n3,\"a cat, sitting\"\n7,a dog\n")
    cs = CaptionSet.from_file(str(c))
    assert cs.of(3) == ["a cat", "a cat, sitting"] and cs.of(7) == ["a dog"]
    with pytest.raises(CaptionError, match="add them to the captions file"):
        cs.check_covers([3, 7, 8])
    with pytest.raises(CaptionError, match=r"\.json or \.csv"):
        (tmp_path / "c.txt").write_text("x")
        CaptionSet.from_file(str(tmp_path / "c.txt"))


def test_word_tokenizer_and_encoder_roundtrip(tmp_path):
    tok, enc = default_text_model(["a photo of a cat", "a dog"], hidden_size=8, seed=1)
    ids = tok(["a cat", "", "a zebra"], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    assert ids.shape == (3, tok.model_max_length) and ids[2, 2] == tok.unk_token_id and ids[1, 1] == tok.eos_token_id
    tok.save_pretrained(str(tmp_path / "tok"))
    enc.save_pretrained(str(tmp_path / "enc"))
    tok2, enc2 = WordTokenizer.from_pretrained(str(tmp_path / "tok")), TinyTextEncoder.from_pretrained(str(tmp_path / "enc"))
    a = TextConditioner(tok, enc).encode(["a cat", "a dog"])
    b = TextConditioner(tok2, enc2).encode(["a cat", "a dog"])
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[0], a[1])


def test_caption_modes(text, captions, pixels):
    idx = pixels.indices[:3].tolist()
    rnd = caption_conditioning(text, captions, idx, "random", num_timesteps=6, seed=2)["encoder_hidden_states"]
    assert rnd.shape[:2] == (3, 6)
    for b, i in enumerate(idx):
        picks = caption_draws(2, i, 2, 6)
        torch.testing.assert_close(rnd[b], text.encode([captions.of(i)[int(j)] for j in picks]))
    mean = caption_conditioning(text, captions, idx, "mean")["encoder_hidden_states"]
    torch.testing.assert_close(mean[1], text.encode(captions.of(idx[1])).mean(0))
    first = caption_conditioning(text, captions, idx, "first")["encoder_hidden_states"]
    torch.testing.assert_close(first[2], text.encode(captions.of(idx[2])[0])[0])


# ---- features -----------------------------------------------------------------------------------


def _direct_features(unet, sched, latents, text, args, caption_mode):
    """Per-example gradients with plain autograd (no vmap), one (timestep, noise, caption) at a time."""
    params = [p for p in unet.parameters() if p.requires_grad]
    proj = Featurizer(unet, sched, args).projector  # the projection the featurizer uses (CountSketch by default)
    out = []
    for r in range(len(latents)):
        idx = int(latents.indices[r])
        t, noise = example_draws(idx, args, 1000, latents.image_shape)
        caps = latents.captions.of(idx)
        if caption_mode == "random":
            embs = text.encode([caps[int(j)] for j in caption_draws(args.seed, idx, len(caps), args.num_timesteps)])
        else:
            embs = text.encode(caps).mean(0, keepdim=True).expand(args.num_timesteps, -1, -1)
        total = 0
        for j in range(args.num_timesteps):
            total = total + output_value(unet, sched, latents.images[r:r + 1], t[j:j + 1], noise[j:j + 1], "loss",
                                         {"encoder_hidden_states": embs[j:j + 1]}).sum()
        grads = torch.autograd.grad(total / args.num_timesteps, params)
        out.append(proj(torch.cat([g.reshape(1, -1) for g in grads], dim=1)))
    return torch.cat(out)


@pytest.mark.parametrize("caption_mode", ["random", "mean"])
def test_latent_features_equal_direct_computation(tmp_path, latents, text, caption_mode):
    unet, sched = tiny_cond_unet(16), DDPMScheduler(num_train_timesteps=1000)
    args = FeaturizeArgs(num_timesteps=3, proj_dim=32, batch_size=4)
    fs = api.featurize([(unet, sched)], latents, args, str(tmp_path / "f"), progress=False,
                       conditioning=Conditioning(text=text, caption_mode=caption_mode))
    got = torch.as_tensor(np.asarray(fs.arrays[0]))
    expected = _direct_features(unet, sched, latents, text, args, caption_mode)
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-4)
    assert fs.store.settings["conditioning"]["caption_mode"] == caption_mode
    assert fs.store.settings["conditioning"]["vae"]["fingerprint"] == latents.vae_fingerprint


def test_changing_the_caption_changes_target_features(latents, text):
    from diffusion_trak.featurize.featurizer import Featurizer

    f = Featurizer(tiny_cond_unet(16), DDPMScheduler(num_train_timesteps=1000), FeaturizeArgs(proj_dim=64))
    x0 = latents.images[:1]
    feats = lambda prompt: target_features(f, x0, 20, R=3, seed=0, cond={"encoder_hidden_states": text.encode([prompt])})
    a, a2, b = feats("a photo of a 1"), feats("a photo of a 1"), feats("a photo of a 2")
    torch.testing.assert_close(a, a2)
    assert (a - b).norm() > 1e-3 * a.norm()


def test_featurize_needs_text_for_a_text_unet(tmp_path, latents):
    with pytest.raises(L.LatentError, match="text="):
        api.featurize([(tiny_cond_unet(16), DDPMScheduler())], latents, FeaturizeArgs(proj_dim=8),
                      str(tmp_path / "f"), progress=False)


def test_user_clip_text_model_works_unchanged(tmp_path, latents):
    pytest.importorskip("transformers")
    tok, enc = tiny_clip(str(tmp_path / "clip"), max_length=20)
    text = TextConditioner(tok, enc)
    emb = text.encode(["a photo of a 1", "a photo of a 2"])
    assert emb.shape == (2, 20, 16) and not torch.allclose(emb[0], emb[1])
    unet = tiny_cond_unet(16)
    fs = api.featurize([(unet, DDPMScheduler())], latents, FeaturizeArgs(num_timesteps=2, proj_dim=16, batch_size=5),
                       str(tmp_path / "f"), progress=False, conditioning=Conditioning(text=text))
    assert np.isfinite(fs.arrays[0]).all() and np.abs(fs.arrays[0]).sum() > 0


# ---- training ----------------------------------------------------------------------------------


def test_train_text_and_class_unets_and_score(tmp_path, latents, text):
    args = L.LatentTrainArgs(block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4, epochs=4, batch_size=5,
                             num_checkpoints=2)
    ckpts = L.train_latent_unet(latents, args, str(tmp_path / "text"), text=text, progress=False)
    assert len(ckpts) == 2
    unet, sched = load_checkpoint(ckpts[-1])
    assert isinstance(unet, UNet2DConditionModel) and unet.config.cross_attention_dim == 16
    # rerun resumes (nothing left to do) and gives the same checkpoints
    assert L.train_latent_unet(latents, args, str(tmp_path / "text"), text=text, progress=False) == ckpts
    with pytest.raises(L.LatentError, match="--overwrite"):
        L.train_latent_unet(latents, L.LatentTrainArgs(epochs=3), str(tmp_path / "text"), text=text, progress=False)

    cargs = L.LatentTrainArgs(conditioning="class", block_out_channels=(8, 16), norm_num_groups=4, epochs=1,
                              batch_size=5, num_checkpoints=1)
    cck = L.train_latent_unet(latents, cargs, str(tmp_path / "class"), progress=False)
    cu, _ = load_checkpoint(cck[0])
    assert isinstance(cu, UNet2DModel) and unet_conditioning(cu) == "class"
    fargs = FeaturizeArgs(num_timesteps=2, proj_dim=16, batch_size=5)
    fs = api.featurize(cck, latents, fargs, str(tmp_path / "cf"), progress=False)
    rate, pos = api.self_attribution_rate(fs, cck, latents, num=4, timestep=10, args=ScoreArgs(num_noises=2))
    assert 0.0 <= rate <= 1.0 and len(pos) == 4


def test_user_supplied_unet_is_trained_from_its_weights(tmp_path, latents, text):
    unet = tiny_cond_unet(16, seed=5)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    args = L.LatentTrainArgs(epochs=1, batch_size=5, num_checkpoints=1, learning_rate=1e-3)
    ck = L.train_latent_unet(latents, args, str(tmp_path / "u"), text=text, unet=unet, progress=False)
    trained, _ = load_checkpoint(ck[0])
    assert trained.config.block_out_channels == (8, 16) or list(trained.config.block_out_channels) == [8, 16]
    moved = sum(float((trained.state_dict()[k] - before[k]).abs().sum()) for k in before)
    assert moved > 0


def test_quick_demo_end_to_end(tmp_path, capsys):
    from diffusion_trak.demo import run_demo

    out = run_demo(str(tmp_path / "demo"), quick=True, latent=True)
    printed = capsys.readouterr().out
    assert out["prompt"] in printed and out["png"] in printed and "self-attribution" in printed
    assert os.path.getsize(out["png"]) > 0 and os.path.exists(out["html"])
    scores = np.load(os.path.join(out["scores"], "scores.npy"))
    assert scores.shape == (3, 1, 48) and np.isfinite(scores).all()
    html = open(out["html"], encoding="utf-8").read()
    assert out["prompt"] in html


def test_latent_size_mismatch_names_the_image_size(tmp_path, latents, text):
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4)
    with pytest.raises(L.LatentError, match=r"8×8 latents but the VAE makes 4×4 \(use --image-size 16\)"):
        api.featurize([(unet, DDPMScheduler())], latents, FeaturizeArgs(proj_dim=8), str(tmp_path / "f"), progress=False,
                      conditioning=Conditioning(text=text))
