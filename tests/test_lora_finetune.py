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


def _kohya(state, alpha):
    """A peft UNet LoRA state (``<module>.lora_A.weight``) with kohya's keys (``lora_unet_<module_>.lora_down.weight``,
    ``lora_up``, and an ``alpha`` per module), as kohya's sd-scripts write SD 1.x LoRAs."""
    out = {}
    for k, v in state.items():
        module, part = k.rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = v.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


@pytest.fixture(scope="module")
def formats(workdir, tmp_path_factory):
    """One adapter (rank 2, alpha 4: its scale is not 1, so a lost alpha shows) saved in every layout diffusers and
    peft write, and the UNet that carries it (the reference)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import save_file

    root, _ = workdir
    out = tmp_path_factory.mktemp("formats")
    cfg = dict(r=2, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    ref = UNet2DConditionModel.from_pretrained(str(root / "my-sd-base" / "unet"))
    ref.add_adapter(peft.LoraConfig(init_lora_weights="gaussian", **cfg))
    with torch.no_grad():  # both factors away from zero, so every layer changes the output
        g = torch.Generator().manual_seed(3)
        for n, p in ref.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    state = get_peft_model_state_dict(ref)
    ref.save_lora_adapter(str(out / "save_lora_adapter"))  # keys without unet.
    wrapped = peft.get_peft_model(UNet2DConditionModel.from_pretrained(str(root / "my-sd-base" / "unet")),
                                  peft.LoraConfig(**cfg))
    assert not set_peft_model_state_dict(wrapped, {"base_model.model." + k: v for k, v in state.items()}).unexpected_keys
    wrapped.save_pretrained(str(out / "peft"))  # adapter_model.safetensors + adapter_config.json
    train = out / "train_text_to_image_lora"  # the script's output folder: the final save and checkpoint-N/ folders
    meta = ref.peft_config["default"].to_dict()
    for d in (train, train / "checkpoint-2", train / "checkpoint-4"):
        StableDiffusionPipeline.save_lora_weights(str(d), unet_lora_layers=state, unet_lora_adapter_metadata=meta)
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):  # accelerate's save_state beside it
        (train / "checkpoint-4" / name).write_bytes(b"\0")
    save_file(_kohya(state, 4), str(out / "kohya.safetensors"))
    paths = {"save_lora_weights": str(train), "checkpoint-N": str(train / "checkpoint-4"),
             "save_lora_adapter": str(out / "save_lora_adapter"), "peft save_pretrained": str(out / "peft"),
             "peft adapter file": str(out / "peft" / "adapter_model.safetensors"), "kohya": str(out / "kohya.safetensors")}
    assert sorted(os.listdir(out / "peft"))[:2] == ["README.md", "adapter_config.json"]
    return paths, ref, out


def test_every_lora_layout_loads_as_the_same_adapter_and_attributes(workdir, formats, tmp_path):
    from diffusion_trak import Attributor
    from diffusion_trak.config import FeaturizeArgs, ScoreArgs
    from diffusion_trak.models import load_lora

    root, _ = workdir
    paths, ref, _ = formats
    adapter = sum(p.numel() for n, p in ref.named_parameters() if ".lora_" in n)
    x, t, emb = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.randn(2, 5, 16)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=emb).sample
        ref.disable_adapters()
        base = ref(x, t, encoder_hidden_states=emb).sample
        ref.enable_adapters()
    assert (want - base).abs().max() > 1e-3  # the adapter changes the model
    features = {}
    for name, path in paths.items():
        attr = Attributor.from_pretrained(str(root / "my-sd-base"), train_data=str(root / "my_images"), lora=path,
                                          out=str(tmp_path / name.replace(" ", "-")), progress=False,
                                          featurize_args=FeaturizeArgs(num_timesteps=2, kernel_draws=2, proj_dim=16),
                                          score_args=ScoreArgs(num_noises=1, destination_draws=2))
        with torch.no_grad():  # the same model as the reference: every layer loaded, with its alpha
            torch.testing.assert_close(attr.unet(x, t, encoder_hidden_states=emb).sample, want, msg=name)
        fs = attr.featurize()
        assert fs.store.settings["num_params"] == adapter and fs.store.settings["featurize"]["params"] == "lora", name
        features[name] = np.asarray(fs.arrays[0])
        sc = attr.attribute(attr.dataset.images[:1], image_timesteps=[10], prompts=["a photo of a digit1"], save=False)
        assert sc.values.shape == (1, 1, 12) and np.isfinite(sc.values).all(), name
    first = next(iter(features.values()))
    for name, f in features.items():  # the same adapter, whatever the layout: the same features
        np.testing.assert_allclose(f, first, rtol=1e-4, atol=1e-6, err_msg=name)
    # a training run's folder before its final save: refused, naming its latest checkpoint
    from diffusers import UNet2DConditionModel

    from diffusion_trak.errors import CheckpointError

    unet = UNet2DConditionModel.from_pretrained(str(root / "my-sd-base" / "unet"))
    os.remove(os.path.join(paths["save_lora_weights"], "pytorch_lora_weights.safetensors"))
    with pytest.raises(CheckpointError, match=r"training checkpoints checkpoint-2, checkpoint-4 but no final .* "
                                              r"--lora .*checkpoint-4$"):
        load_lora(unet, paths["save_lora_weights"])


def _one_line_refusal(argv, capfd):
    """Run the CLI; what it printed (stdout and stderr, at the file-descriptor level: library log handlers
    included), which must be exactly one line, the refusal."""
    capfd.readouterr()
    assert main(argv) == 2
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_an_adapter_that_does_not_fit_is_one_line_with_no_library_output(workdir, formats, tmp_path, capfd):
    import shutil

    from diffusers import UNet2DConditionModel

    root, _ = workdir
    paths, _, out = formats
    # the peft layout whose adapter_config.json says another rank than its tensors have
    shutil.copytree(paths["peft save_pretrained"], tmp_path / "rank4")
    cfg = json.load(open(tmp_path / "rank4" / "adapter_config.json"))
    json.dump({**cfg, "r": 4}, open(tmp_path / "rank4" / "adapter_config.json", "w"))
    # and an adapter of another base model (another text width: its to_k/to_v layers have another shape)
    from tiny_models import tiny_cond_unet

    other = tiny_cond_unet(8)
    other.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    other.save_lora_adapter(str(tmp_path / "other-base"))
    data = ["--data", "folder", "--data-path", str(root / "my_images"), "-T", "2", "-k", "16"]
    for adapter, shown in ((tmp_path / "rank4", "[4, 16] in this model"), (tmp_path / "other-base", "in this model")):
        line = _one_line_refusal(["featurize", "--pipeline", str(root / "my-sd-base"), "--lora", str(adapter),
                                  "--run", str(tmp_path / "run")] + data, capfd)
        assert line.startswith("diffusion-trak featurize: error: the LoRA adapter") and "does not fit this model" in line
        assert shown in line and line.endswith("pass the base model it was trained on"), line
    assert not os.path.exists(tmp_path / "run")
    # in Python: the same one line, and the model given is left without a half-loaded adapter
    from diffusion_trak.errors import CheckpointError
    from diffusion_trak.models import load_lora

    unet = UNet2DConditionModel.from_pretrained(str(root / "my-sd-base" / "unet"))
    before = {n: p.clone() for n, p in unet.named_parameters()}
    capfd.readouterr()
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_lora(unet, str(tmp_path / "rank4"))
    assert capfd.readouterr() == ("", "")
    assert {n for n, _ in unet.named_parameters()} == set(before) and not lora_parameter_names(unet)
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())
    # layers the model lacks (diffusers only warns and loads the rest): refused, not loaded in part
    from safetensors.torch import load_file, save_file

    state = load_file(os.path.join(paths["checkpoint-N"], "pytorch_lora_weights.safetensors"))
    a = next(k for k in state if ".to_q.lora_A." in k)
    for part in ("lora_A", "lora_B"):
        state[a.replace("to_q", "to_zz").replace("lora_A", part)] = state[a.replace("lora_A", part)].clone()
    save_file(state, str(tmp_path / "extra.safetensors"))
    capfd.readouterr()
    with pytest.raises(CheckpointError, match=r"does not fit this model \(1 of its layers, e.g. .*to_zz, are not in it\)"):
        load_lora(unet, str(tmp_path / "extra.safetensors"))
    assert capfd.readouterr() == ("", "") and not lora_parameter_names(unet)


def test_a_missing_optional_package_or_captions_is_one_line_naming_the_fix(workdir, tmp_path, monkeypatch, capfd):
    import shutil
    import sys

    root, _ = workdir
    data = ["--data", "folder", "--data-path", str(root / "my_images"), "-T", "2", "-k", "16"]
    run = ["--run", str(tmp_path / "run")]
    with monkeypatch.context() as m:  # peft not installed: `import peft` fails
        m.setitem(sys.modules, "peft", None)
        line = _one_line_refusal(["featurize", "--pipeline", str(root / "my-sd-base"), "--lora", str(root / "my-lora")]
                                 + run + data, capfd)
        assert line == ('diffusion-trak featurize: error: --lora (lora=) needs peft, which is not installed; install it '
                        'with pip install "diffusion-trak[lora]"')
    with monkeypatch.context() as m:  # transformers not installed: the pipeline's CLIP text encoder cannot load
        for name in [n for n in sys.modules if n == "transformers" or n.startswith("transformers.")]:
            m.setitem(sys.modules, name, None)
        line = _one_line_refusal(["featurize", "--pipeline", str(root / "my-sd-base")] + run + data, capfd)
        assert line.startswith("diffusion-trak featurize: error: this pipeline's text encoder and tokenizer are "
                               "transformers'") and line.endswith('pip install "diffusion-trak[text]"')
    # a text model's training images without captions: the CLI's message names --captions
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted((root / "my_images").rglob("*.png"))[:4]:
        shutil.copy(f, flat / f.name)
    line = _one_line_refusal(["featurize", "--pipeline", str(root / "my-sd-base"), "--data", "folder", "--data-path",
                              str(flat), "-T", "2", "-k", "16"] + run, capfd)
    assert "have no captions; pass --captions FILE" in line
    assert not os.path.exists(tmp_path / "run" / "features")
