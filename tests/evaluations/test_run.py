import json
import os

import pytest

from diffusion_trak.config import FeaturizeArgs, ScoreArgs, TrainArgs
from diffusion_trak.data import DataArgs
from diffusion_trak.evaluations.configs import CONFIGS, ConfigError, EvalConfig, get_config
from diffusion_trak.evaluations.run import ConfigMismatch, apply_overrides, main, run


def tiny_config(**kw):
    base = dict(name="tiny", data=DataArgs(name="digits", limit=48), heldout=DataArgs(name="digits", split="test", limit=4),
                train=TrainArgs(block_out_channels=(8, 16), norm_num_groups=4, epochs=2, batch_size=16, num_checkpoints=2),
                featurize=FeaturizeArgs(num_timesteps=2, proj_dim=64, projector="torch"), score=ScoreArgs(num_noises=2),
                num_models=4, train_method="stacked", stack_size=4, num_generated=4, num_inference_steps=10,
                lds_steps=(0, 5, 9), num_heldout=4, gt_noises=2, gt_final_draws=4, encoder_epochs=1, audit_targets=2,
                audit_steps=(5,), audit_ks=(0.1,), audit_random_draws=2, n_boot=50, threads=1)
    base.update(kw)
    return EvalConfig(**base)


def test_named_configs_build_and_roundtrip():
    for name in CONFIGS:
        cfg = get_config(name)
        assert EvalConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError):
        get_config("nope")
    with pytest.raises(ConfigError):
        tiny_config(lds_steps=(10,))


def test_end_to_end_tiny(tmp_path):
    out = str(tmp_path / "run")
    res = run(tiny_config(), out, progress=False)
    report = open(os.path.join(out, "report.md")).read()
    assert "| TRAK (paper target) |" in report and "noise ceiling" in report and "speed-up" in report
    for f in ("lds_generated_xhat0_loss.png", "lds_heldout_final_loss_le_t.png", "audit_masked_s5_k5.png"):
        assert os.path.getsize(os.path.join(out, "plots", f)) > 0
    lds = json.load(open(os.path.join(out, "lds.json")))
    assert set(lds["tables"]) == {"generated", "heldout"}
    assert len(lds["tables"]["generated"]["xhat0_loss"]["methods"]["trak"]) == 3
    assert res["audit"]["masked"]["restart_check_max_abs"] < 1e-4
    assert {c["kind"] for c in res["audit"]["masked"]["cases"]} == {"top", "random"}
    # another config in the same folder is refused with a one-line error
    with pytest.raises(ConfigMismatch):
        run(tiny_config(num_models=5), out, progress=False)
    assert main(["tiny-typo", "--out", str(tmp_path / "x")]) == 2
    # settings that only add work resume the run: replicates add the seed ceiling to the tables
    res2 = run(tiny_config(num_replicates=2), out, progress=False, audit=False)
    entry = res2["tables"]["generated"]["xhat0_loss"]
    assert entry["methods"]["trak"][0]["values"] == lds["tables"]["generated"]["xhat0_loss"]["methods"]["trak"][0]["values"]
    assert len(entry["seed_r"]) == 3 and len(entry["seed_r"][0]["values"]) == 4
    assert all(0 <= v <= 1 for e in entry["seed_ceiling"] for v in e["values"])
    assert "seed ceiling" in open(os.path.join(out, "report.md")).read()
    assert len(os.listdir(os.path.join(out, "replicates"))) >= 2
    # extending the audit to another k reuses the finished cases and plots the image change against k
    cases = res["audit"]["masked"]["cases"]
    assert sorted((c["kind"], c["draw"]) for c in cases if c["target"] == 0) == [("random", 0), ("random", 1), ("top", 0)]
    # each random control is one model, measured on every target
    rnd = [c for c in cases if c["kind"] == "random" and c["draw"] == 1]
    assert sorted(c["target"] for c in rnd) == [0, 1] and rnd[0]["removed"] == rnd[1]["removed"]
    assert rnd[0]["pixel_l2"] != rnd[1]["pixel_l2"]
    models = os.path.join(out, "audit", "models-masked")
    assert sorted(os.listdir(models)) == ["k5-random0", "k5-random1", "s0005-b000-k5-top", "s0005-b001-k5-top"]
    before = {d: os.path.getmtime(os.path.join(models, d)) for d in os.listdir(models)}
    res3 = run(tiny_config(num_replicates=2, audit_ks=(0.1, 0.2)), out, progress=False)
    summary = res3["audit"]["masked"]["summary"]
    assert {s["k"] for s in summary} == {5, 10} and all(s["random_draws"] == 2 for s in summary)
    assert all(os.path.getmtime(os.path.join(models, d)) == t for d, t in before.items())
    assert len(os.listdir(models)) == 2 * len(before)
    assert os.path.getsize(os.path.join(out, "plots", "audit_masked_vs_k.png")) > 0
    assert "audit_masked_vs_k.png" in open(os.path.join(out, "report.md")).read()


def test_masked_lds_mode(tmp_path):
    out = str(tmp_path / "run")
    res = run(tiny_config(lds_mode="masked", num_replicates=2, num_models=3), out, progress=False, audit=False)
    assert os.path.isdir(os.path.join(out, "subsets-masked")) and not os.path.exists(os.path.join(out, "subsets"))
    assert len(res["tables"]["heldout"]["final_loss_le_t"]["seed_ceiling"]) == 3
    assert "masked: the attributed run replayed" in open(os.path.join(out, "report.md")).read()
    with pytest.raises(ConfigMismatch):  # changing how the subset models are trained is not an extension
        run(tiny_config(lds_mode="retrain", num_replicates=2, num_models=3), out, progress=False, audit=False)


def test_overrides():
    cfg = apply_overrides(get_config("digits-quick"), ["lds_mode=masked", "num_replicates=16", "train.epochs=3",
                                                       "audit_steps=[50]"])
    assert (cfg.lds_mode, cfg.num_replicates, cfg.train.epochs, cfg.audit_steps) == ("masked", 16, 3, (50,))
    for bad in (["nope=1"], ["train.nope=1"], ["lds_mode"], ["lds_mode=sometimes"]):
        with pytest.raises(ConfigError):
            apply_overrides(get_config("digits-quick"), bad)


def test_destination_column_and_shared_initialisation(tmp_path):
    """A run with a destination ground truth reports the final image's LDS for every method, and models
    that share ``init_seed`` start from the same weights."""
    out = str(tmp_path / "run")
    cfg = tiny_config(gt_destination_draws=4, score=ScoreArgs(num_noises=2, destination_draws=6), num_replicates=2,
                      train=TrainArgs(block_out_channels=(8, 16), norm_num_groups=4, epochs=2, batch_size=16,
                                      num_checkpoints=2, init_seed=3))
    res = run(cfg, out, progress=False, audit=False)
    for sname in ("generated", "heldout"):
        entry = res["tables"][sname]["destination"]
        assert set(entry["methods"]) == set(cfg.methods)
        assert all(len(rows) == 1 and len(rows[0]["values"]) == 4 for rows in entry["methods"].values())
        assert len(entry["seed_r"]) == 1
    assert any(a["kind"] == "destination" for a in res["acceptance"])
    assert "| method | final image |" in open(os.path.join(out, "report.md")).read()
    # the TRAK destination row is the one api.score saved beside the per-step rows
    from diffusion_trak.api import Scores
    sc = Scores.load(os.path.join(out, "scores", "generated"))
    assert sc.destination.shape == (4, 48)


def test_init_seed_gives_every_model_the_same_initial_weights(tmp_path):
    """With lr 1e-30 a checkpoint holds the initial weights: models with other seeds (shuffling, noise) but
    one ``init_seed`` are identical, and without it they differ."""
    import numpy as np
    import torch
    from diffusers import UNet2DModel
    from diffusion_trak.data import load_dataset
    from diffusion_trak.train import train_ddpm
    from diffusion_trak.evaluations.retrain import final_checkpoint, train_models

    data = load_dataset(DataArgs(name="digits", limit=32))
    masks = np.ones((2, 32), dtype=bool)
    masks[0, :8] = False
    for init_seed, same in ((7, True), (None, False)):
        args = TrainArgs(block_out_channels=(8, 16), norm_num_groups=4, epochs=1, batch_size=16, num_checkpoints=1,
                         learning_rate=1e-30, init_seed=init_seed)  # updates far below float32 resolution
        dirs = train_models(data, args, masks, str(tmp_path / f"m{init_seed}"), [1, 2], method="stacked", stack_size=2,
                            progress=False)
        single = train_ddpm(data, args, str(tmp_path / f"one{init_seed}"), progress=False)[-1]
        w = [UNet2DModel.from_pretrained(os.path.join(final_checkpoint(d, args), "unet")).state_dict() for d in dirs]
        w.append(UNet2DModel.from_pretrained(os.path.join(single, "unet")).state_dict())
        for other in w[1:]:
            assert all(torch.allclose(w[0][k], other[k], rtol=0, atol=1e-12) for k in w[0]) == same


@pytest.mark.parametrize("flags, pattern", [
    (["--set", "num_models=abc"], r"num_models must be an integer >= 2, got 'abc'; fix it in the config or with --set"),
    (["--set", "alpha=2"], r"alpha \(the subset fraction\) must be between 0 and 1, got 2"),
    (["--set", "audit_ks=[0]"], r"every one of audit_ks must be a finite number > 0, got 0"),
    (["--set", "seed_mode=sometimes"], r"unknown seed_mode 'sometimes'"),
    (["--threads", "-1"], r"--threads must be an integer >= 0, got -1"),
    (["--device", "gpu0"], r"--device 'gpu0' is not a device; use cpu or cuda"),
])
def test_flags_are_checked_before_anything_runs(tmp_path, capsys, flags, pattern):
    import re

    out = tmp_path / "run"
    assert main(["digits-quick", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(pattern, err), err
    assert not out.exists()


def test_a_masked_run_is_read_back_through_one_layout(tmp_path, monkeypatch):
    """One layout of an evaluation run: what run.py writes is what the readers (bench_featurize --lds, the
    journey page) read, also for a masked run; target features are computed, and checkpoints loaded, once."""
    import numpy as np

    import diffusion_trak.models as models_mod
    import diffusion_trak.target_cache as target_cache
    import diffusion_trak.train as train_mod
    from diffusion_trak.api import Scores
    from diffusion_trak.evaluations.bench_featurize import lds_inputs
    from diffusion_trak.evaluations.metrics import lds
    from diffusion_trak.evaluations.subsets import subset_masks
    from diffusion_trak.report.evidence import evaluation_run

    loads, computed = [], []
    real_load, real_targets = train_mod.load_checkpoint, target_cache.all_target_features
    counted = lambda path, *a, **k: loads.append(str(path)) or real_load(path, *a, **k)  # noqa: E731
    for mod in (models_mod, train_mod):  # the loader lives in models; train re-exports it
        monkeypatch.setattr(mod, "load_checkpoint", counted)
    monkeypatch.setattr(target_cache, "all_target_features", lambda *a, **k: computed.append(1) or real_targets(*a, **k))
    out = str(tmp_path / "run")
    cfg = tiny_config(lds_mode="masked", train=TrainArgs(block_out_channels=(8, 16), norm_num_groups=4, epochs=4,
                                                         batch_size=16, num_checkpoints=2),
                      gt_destination_draws=4, score=ScoreArgs(num_noises=2, destination_draws=3), audit_targets=0)
    run(cfg, out, progress=False, audit=False)
    attributed = sorted(p for p in loads if os.path.join(out, "attributed") in p)
    C = len(os.listdir(os.path.join(out, "target-features"))) // 4  # .npz + .json per (checkpoint, set)
    assert C == 2 and attributed == sorted(set(attributed)) and len(attributed) == C  # each loaded once
    assert len(computed) == 2 * C  # target features of (generated, heldout) × checkpoints, once, for scores and baselines
    subset_models = [p for p in loads if os.path.join(out, "subsets-masked") in p]
    assert len(subset_models) == 4 == len(set(subset_models))  # each measured for all four sets after one load

    # bench_featurize --lds reads the masks and ground truth that run.py used: its LDS of the run's TRAK scores
    # is lds.json's, value for value (a masked run has no subsets/ nor groundtruth/ folder)
    assert not os.path.exists(os.path.join(out, "subsets")) and not os.path.exists(os.path.join(out, "groundtruth"))
    inp = lds_inputs(out)
    np.testing.assert_array_equal(inp["masks"], subset_masks(48, 4, cfg.alpha, cfg.subset_seed))
    tables = json.load(open(os.path.join(out, "lds.json")))["tables"]
    for sname in ("generated", "heldout"):
        scores = np.asarray(Scores.load(os.path.join(out, "scores", sname)).values)
        for kind, y in inp["gts"][sname].items():
            assert y.shape == (4, 3, 4)
            for j, si in enumerate(inp["lds_pos"]):
                want = tables[sname][kind]["methods"]["trak"][j]["values"]
                np.testing.assert_array_equal(lds(scores[si], inp["masks"], y[:, j, :]), want)
    assert evaluation_run(out)["scores"] == os.path.join(out, "scores", "generated")


def test_ekfac_method_added_to_a_finished_run(tmp_path):
    """methods may grow on a finished run: EK-FAC (kronfluence) is computed, everything else is kept; its rows sit
    beside TRAK's per step and at the destination."""
    pytest.importorskip("kronfluence")
    from diffusion_trak.evaluations.configs import DEFAULT_METHODS

    out = str(tmp_path / "run")
    kw = dict(gt_destination_draws=2, score=ScoreArgs(num_noises=2, destination_draws=2))
    first = run(tiny_config(**kw), out, progress=False, audit=False)
    second = run(tiny_config(methods=DEFAULT_METHODS + ("ekfac",), **kw), out, progress=False, audit=False)
    for sname in ("generated", "heldout"):
        for kind in ("xhat0_loss", "destination"):
            a, b = first["tables"][sname][kind]["methods"], second["tables"][sname][kind]["methods"]
            assert a["trak"] == b["trak"] and a["pixel_neg_l2"] == b["pixel_neg_l2"]
            assert "ekfac" not in a and len(b["ekfac"]) == len(b["trak"])
    assert "| EK-FAC influence (kronfluence) |" in open(os.path.join(out, "report.md")).read()
    with pytest.raises(ConfigMismatch):  # fewer methods is another config
        run(tiny_config(methods=("trak", "random"), **kw), out, progress=False, audit=False)
