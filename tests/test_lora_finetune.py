"""A user's own LoRA fine-tune, end to end: a tiny Stable-Diffusion-style base pipeline, a LoRA adapter
fine-tuned on captioned images with peft and saved as diffusers' LoRA training scripts save it
(``save_lora_weights``), then attributed from the CLI (``--pipeline BASE --lora ADAPTER``) and from Python
(``lora=``), with features over the adapter's parameters only. The README's LoRA example is run here as it is."""
import html
import json
import os
import shlex

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")

from diffusion_trak import api  # noqa: E402
from diffusion_trak.cli import main  # noqa: E402
from diffusion_trak.featurize.gradients import lora_parameter_names  # noqa: E402

from tiny_models import save_image_folder, save_sd_pipeline  # noqa: E402

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")


def captioned_folder(folder, n=12):
    """``n`` digit images with a ``metadata.jsonl`` caption each (diffusers' text-to-image layout)."""
    save_image_folder(folder, n)
    files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
                   if f.endswith(".png"))
    with open(os.path.join(folder, "metadata.jsonl"), "w") as fh:
        for f in files:
            fh.write(json.dumps({"file_name": f, "text": f"a photo of a {f.split(os.sep)[0]}"}) + "\n")
    return folder


def fine_tune_lora(base, images, out, steps=4):
    """What diffusers' train_text_to_image_lora.py does, in miniature: freeze the base, add a peft LoRA to
    the UNet's attention, train it on (VAE latent, caption) pairs with the DDPM loss, save it with
    ``save_lora_weights``."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from diffusion_trak.data import load_dataset

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    unet, vae, sched = pipe.unet, pipe.vae, pipe.scheduler
    unet.requires_grad_(False)
    unet.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    data = load_dataset(name="folder", path=images)
    with torch.no_grad():
        latents = vae.encode(data.images).latent_dist.mean * vae.config.scaling_factor
        ids = pipe.tokenizer([data.caption(i) for i in range(len(data))], padding="max_length",
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        emb = pipe.text_encoder(ids)[0]
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=emb).sample
        torch.nn.functional.mse_loss(pred, noise).backward()
        opt.step()
        opt.zero_grad()
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet))
    return pipe


def readme_blocks():
    """The README's LoRA example: its python block and its bash block."""
    text = open(README, encoding="utf-8").read()
    section = text.split("### Your own LoRA fine-tune", 1)[1]
    py = section.split("```python\n", 1)[1].split("```", 1)[0]
    sh = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line) for line in sh.splitlines() if line.strip()]
    assert all(c[0] == "diffusion-trak" for c in commands)
    return py, [c[1:] for c in commands]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    save_sd_pipeline(str(root / "my-sd-base"))
    captioned_folder(str(root / "my_images"))
    pipe = fine_tune_lora(str(root / "my-sd-base"), str(root / "my_images"), str(root / "my-lora"))
    assert os.listdir(root / "my-lora") == ["pytorch_lora_weights.safetensors"]
    return root, pipe


def test_readme_lora_example_from_python_and_the_cli(workdir, monkeypatch, capsys):
    root, pipe = workdir
    monkeypatch.chdir(root)
    py, commands = readme_blocks()
    assert 'lora="my-lora/"' in py and all("--lora" in c for c in commands if c[0] in ("featurize", "generate", "score"))
    scope = {}
    exec(compile(py, "README.md", "exec"), scope)
    attr, scores = scope["attr"], scope["scores"]
    # features over the adapter's parameters only: the same count as the fine-tune's trainable parameters
    fs = attr.features.store.settings
    trained = sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad)
    assert fs["featurize"]["params"] == "lora" and fs["num_params"] == trained
    assert lora_parameter_names(attr.unet) and fs["lora"][0]["adapter"] and fs["lora"][0]["base"]
    assert scores.values.shape[1:] == (1, 12) and np.isfinite(scores.values).all()
    assert os.path.isfile("runs/my-lora/report/attribution.html")
    # the LoRA-loaded model is the fine-tuned one: its noise predictions equal the fine-tune's own
    x, t, emb = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(attr.unet(x, t, encoder_hidden_states=emb).sample,
                                   pipe.unet(x, t, encoder_hidden_states=emb).sample)

    for argv in commands:  # the CLI: the same adapter, the same features
        assert main(argv) == 0, argv
    run = commands[0][commands[0].index("--run") + 1]
    cli = api.FeatureSet.open(os.path.join(run, "features")).store.settings
    assert cli["featurize"]["params"] == "lora" and cli["lora"] == fs["lora"]
    assert cli["checkpoints"] == fs["checkpoints"]
    sj = json.load(open(os.path.join(run, "scores", "seed-0", "scores.json")))
    for e in sj["top"][0][0]["proponents"] + sj["destination"][0]["proponents"]:  # every image named
        assert e["source"].endswith(".png") and e["caption"].startswith("a photo of a digit")
    page = html.unescape(open(os.path.join(run, "report", "seed-0.html"), encoding="utf-8").read())
    assert 'prompt "a photo of a digit1"' in page  # the CLI's title names the prompt
    assert [n.startswith("seed-0-") for n in os.listdir("runs/my-lora/scores")] == [True]  # attribute() saved them

    # a rerun with another adapter over the same features refuses, naming the adapter
    other = fine_tune_lora(str(root / "my-sd-base"), str(root / "my_images"), str(root / "other-lora"), steps=1)
    del other
    argv = [a if a != "my-lora/" else "other-lora/" for a in commands[2]]
    assert main(argv + ["--out", str(root / "scores-other")]) == 2
    assert "this LoRA adapter (fingerprint" in capsys.readouterr().err
    assert not os.path.exists(root / "scores-other")
    # and featurize again over the same features with it refuses: the adapter's fingerprint is in the settings
    argv = [a if a != "my-lora/" else "other-lora/" for a in commands[0]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "made with other settings" in err and "lora" in err and "--overwrite" in err


def test_what_cannot_be_attributed_is_refused_in_one_line_before_anything_is_written(workdir, tmp_path, capsys):
    from diffusion_trak import Attributor
    from diffusion_trak.api import NO_ADAPTER, featurize
    from diffusion_trak.config import FeaturizeArgs
    from diffusion_trak.errors import CheckpointError, InputError

    root, pipe = workdir
    data = ["--data", "folder", "--data-path", str(root / "my_images")]
    # a pipeline saved with save_pretrained while the LoRA was loaded: adapter layers inside the UNet
    pipe.save_pretrained(str(tmp_path / "loaded"))
    run = str(tmp_path / "run")
    capsys.readouterr()
    assert main(["featurize", "--pipeline", str(tmp_path / "loaded"), "--run", run] + data) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "LoRA adapter layers inside the UNet" in err and "save_lora_weights" in err
    with pytest.raises(CheckpointError, match="fuse_lora"):
        Attributor.from_pretrained(str(tmp_path / "loaded"), str(root / "my_images"), run)
    # fused, as that message advises, it is an ordinary pipeline folder: the fine-tuned model, without an adapter
    from diffusers import StableDiffusionPipeline

    fused = StableDiffusionPipeline.from_pretrained(str(root / "my-sd-base"), safety_checker=None,
                                                    requires_safety_checker=False)
    fused.load_lora_weights(str(root / "my-lora"))
    fused.fuse_lora()
    fused.unload_lora_weights()
    fused.save_pretrained(str(tmp_path / "fused"))
    a = Attributor.from_pretrained(str(tmp_path / "fused"), None, str(tmp_path / "fused-run"))
    x, t, emb = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(a.unet(x, t, encoder_hidden_states=emb).sample,
                                   pipe.unet(x, t, encoder_hidden_states=emb).sample, rtol=1e-4, atol=1e-5)
    assert not a.has_adapter and a.featurize_args.params == "all"
    # --params lora without an adapter: the CLI's advice, the same in Python, and no latents/ written
    assert main(["featurize", "--pipeline", str(root / "my-sd-base"), "--params", "lora", "--run", run] + data) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"diffusion-trak featurize: error: {NO_ADAPTER}" and "--lora PATH" in err
    with pytest.raises(InputError) as e:
        Attributor.from_pretrained(str(root / "my-sd-base"), str(root / "my_images"), run,
                                   featurize_args=FeaturizeArgs(params="lora")).featurize()
    assert str(e.value) == NO_ADAPTER
    with pytest.raises(InputError) as e:  # and api.featurize, the same
        featurize([(pipe.unet.__class__.from_pretrained(str(root / "my-sd-base" / "unet")), pipe.scheduler)], None,
                  FeaturizeArgs(params="lora"), out=run)
    assert str(e.value) == NO_ADAPTER
    assert not os.path.exists(run)
    # an adapter path that is not one
    assert main(["featurize", "--pipeline", str(root / "my-sd-base"), "--lora", str(tmp_path / "nope"), "--run", run]
                + data) == 2
    assert "save_lora_weights" in capsys.readouterr().err and not os.path.exists(run)
    # an adapter with text-encoder layers: they would change the model, and are not loaded, so it is refused
    from safetensors.torch import load_file, save_file

    state = load_file(str(root / "my-lora" / "pytorch_lora_weights.safetensors"))
    state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 16)
    state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(16, 2)
    save_file(state, str(tmp_path / "with-text.safetensors"))
    with pytest.raises(CheckpointError, match="also has text_encoder layers, which diffusion-trak does not load"):
        Attributor.from_pretrained(str(root / "my-sd-base"), None, run, lora=str(tmp_path / "with-text.safetensors"))
    assert not os.path.exists(run)


def test_settings_never_change_which_parameters_are_attributed(workdir, tmp_path, capsys):
    """``featurize_args`` that set only the timesteps keep the adapter-only default (params="auto"), in Python and
    the CLI alike; params="all" is honoured only when asked for; the start-of-run line says which and how many;
    a store made over every parameter (before "auto") resumes with --params all and refuses otherwise, naming it."""
    from diffusion_trak import Attributor
    from diffusion_trak.config import FeaturizeArgs

    root, pipe = workdir
    adapter = sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad)  # what the fine-tune trained
    every = sum(p.numel() for p in pipe.unet.parameters())
    capsys.readouterr()
    args = FeaturizeArgs(num_timesteps=2, kernel_draws=2, proj_dim=16)
    attr = Attributor.from_pretrained(str(root / "my-sd-base"), train_data=str(root / "my_images"),
                                      lora=str(root / "my-lora"), out=str(tmp_path / "py"), featurize_args=args)
    assert attr.featurize_args.params == "lora"
    fs = attr.featurize().store.settings
    assert fs["featurize"]["params"] == "lora" and fs["num_params"] == adapter < every
    with open(tmp_path / "py" / "features" / "manifest.json") as f:  # the manifest on disk says the same
        assert json.load(f)["settings"]["num_params"] == adapter
    out = capsys.readouterr().out
    assert f"featurizing 12 training images with 1 checkpoint(s): attributing the LoRA adapter's {adapter:,} " \
           f"parameters (of {every:,}" in out and "--params all" in out
    data = ["--data", "folder", "--data-path", str(root / "my_images")]
    cli = ["featurize", "--pipeline", str(root / "my-sd-base"), "--lora", str(root / "my-lora"), "-T", "2",
           "--kernel-draws", "2", "-k", "16"] + data
    assert main(cli + ["--run", str(tmp_path / "cli")]) == 0
    cs = api.FeatureSet.open(str(tmp_path / "cli" / "features")).store.settings
    assert cs["featurize"] == fs["featurize"] and cs["num_params"] == adapter
    # every parameter only when asked for, in Python and the CLI; the store then leaves "all" out, as old ones did
    attr = Attributor.from_pretrained(str(root / "my-sd-base"), train_data=str(root / "my_images"),
                                      lora=str(root / "my-lora"), out=str(tmp_path / "all"),
                                      featurize_args=FeaturizeArgs(num_timesteps=2, kernel_draws=2, proj_dim=16,
                                                                   params="all"))
    fa = attr.featurize().store.settings
    assert fa["num_params"] == every and "params" not in fa["featurize"]
    assert f"attributing all {every:,} UNet parameters" in capsys.readouterr().out
    # that store (as one made before "auto" existed) resumes with --params all, and refuses without it, naming it
    assert main(cli + ["--run", str(tmp_path / "all"), "--params", "all"]) == 0
    capsys.readouterr()
    assert main(cli + ["--run", str(tmp_path / "all")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the loaders' progress bars)
    assert "made with other settings" in err and "--params all (FeaturizeArgs(params='all')) to resume it" in err
