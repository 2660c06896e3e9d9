import json
import os

from diffusion_trak.config import FeaturizeArgs, ScoreArgs, TrainArgs
from diffusion_trak.data import DataArgs
from diffusion_trak.evaluations.ablations import RIDGES, main
from diffusion_trak.evaluations.configs import EvalConfig
from diffusion_trak.evaluations.run import run


def tiny_config(**kw):
    base = dict(name="tiny", data=DataArgs(name="digits", limit=48), heldout=DataArgs(name="digits", split="test", limit=4),
                train=TrainArgs(block_out_channels=(8, 16), norm_num_groups=4, epochs=2, batch_size=16, num_checkpoints=2),
                featurize=FeaturizeArgs(num_timesteps=2, proj_dim=64, projector="torch"), score=ScoreArgs(num_noises=2),
                num_models=6, train_method="stacked", stack_size=6, num_generated=4, num_inference_steps=10,
                lds_steps=(0, 5, 9), num_heldout=4, gt_noises=2, gt_final_draws=4, encoder_epochs=1, audit_targets=0, audit_steps=(5,),
                n_boot=50, threads=1)
    base.update(kw)
    return EvalConfig(**base)



def test_ablations_on_a_tiny_run(tmp_path):
    out = str(tmp_path / "run")
    run(tiny_config(), out, progress=False, audit=False)
    names = ["paper (loss/loss, uniform T=10)", "timestep-matched loss/loss, t±100, stratified T=10"]
    assert main([out, "--variants", *names]) == 0
    res = json.load(open(os.path.join(out, "ablations", "ablations.json")))
    rows = [r for r in res["rows"] if r["method"] in names]
    assert {r["method"] for r in rows} == set(names)
    assert all(r["ridge"] in RIDGES and len(r["cells"]) == 3 for r in rows)
    # the report half never overlaps the selection half
    assert not set(res["selection_models"]) & set(res["report_models"])
    # timestep-matched features: one store per step, each drawn from that step's window only
    feats = sorted(d for d in os.listdir(os.path.join(out, "ablations", "features")) if "-t" in d)
    assert len(feats) == 3
    for d in feats:
        lo, hi = (int(v) for v in d.rsplit("-t", 1)[1].split("-"))
        settings = json.load(open(os.path.join(out, "ablations", "features", d, "manifest.json")))["settings"]
        assert settings["featurize"]["timestep_range"] == [lo, hi] and hi - lo <= 200


def test_ensemble_variant_trains_independent_models(tmp_path):
    out = str(tmp_path / "run")
    run(tiny_config(), out, progress=False, audit=False)
    name = "paper, ensemble of 4 models"
    assert main([out, "--variants", name, "paper, last checkpoint only"]) == 0
    res = json.load(open(os.path.join(out, "ablations", "ablations.json")))
    assert {r["method"] for r in res["rows"] if not r["method"].startswith("baseline")} == {name, "paper, last checkpoint only"}
    ens = os.path.join(out, "ablations", "ensemble")
    members = sorted(os.listdir(ens))
    assert members == ["model-0000", "model-0001", "model-0002"]
    seeds = {json.load(open(os.path.join(ens, m, "train_args.json")))["train"]["seed"] for m in members}
    attributed = json.load(open(os.path.join(out, "attributed", "train_args.json")))["train"]["seed"]
    assert len(seeds) == 3 and attributed not in seeds
    # each member is featurized with its own final checkpoint, on the full training set
    prints = set()
    for m in members:
        st = json.load(open(os.path.join(out, "ablations", "features", "ensemble", m, "loss-uniform-T10", "manifest.json")))
        assert st["settings"]["dataset"]["size"] == 48 and len(st["settings"]["checkpoints"]) == 1
        prints.add(st["settings"]["checkpoints"][0])
    assert len(prints) == 3


def test_audit_of_a_variant_shares_the_random_controls(tmp_path):
    out = str(tmp_path / "run")
    run(tiny_config(audit_targets=2, audit_ks=(0.1,), audit_random_draws=2), out, progress=False, audit=True)
    models = os.path.join(out, "audit", "models-masked")
    before = {d: os.path.getmtime(os.path.join(models, d, "train_args.json")) for d in os.listdir(models)}
    assert sorted(before) == ["k5-random0", "k5-random1", "s0005-b000-k5-top", "s0005-b001-k5-top"]
    name = "paper, last checkpoint only"
    assert main([out, "--variants", name, "--audit"]) == 0
    after = sorted(os.listdir(models))
    assert after == sorted([*before, "s0005-b000-k5-top-paper-last-checkpoint-only", "s0005-b001-k5-top-paper-last-checkpoint-only"])
    for d, t in before.items():  # the run's own models, the random controls included, were not retrained
        assert os.path.getmtime(os.path.join(models, d, "train_args.json")) == t
    res = json.load(open(os.path.join(out, "ablations", "ablations.json")))
    (a,) = res["audits"]
    assert a["method"] == name and a["step"] == 5 and a["k"] == 5 and a["num_targets"] == 2 and a["random_draws"] == 2
    mine = json.load(open(os.path.join(out, "audit", "audit-masked-paper-last-checkpoint-only.json")))
    tops = [c for c in mine["cases"] if c["kind"] == "top"]
    assert len(tops) == 2 and all(len(c["removed"]) == 5 for c in tops)
    assert "Retrain without top-k, per variant" in open(os.path.join(out, "ablations", "ablations.md")).read()
    # without --audit, an audit on disk is reported only while its top-k sets are the variant's
    assert main([out, "--variants", name]) == 0
    assert len(json.load(open(os.path.join(out, "ablations", "ablations.json")))["audits"]) == 1
    path = os.path.join(out, "audit", "audit-masked-paper-last-checkpoint-only.json")
    mine["cases"][0]["removed"] = mine["cases"][0]["removed"][::-1][:4] + [47]
    json.dump(mine, open(path, "w"))
    assert main([out, "--variants", name]) == 0
    assert json.load(open(os.path.join(out, "ablations", "ablations.json")))["audits"] == []


def test_choices_group_fixed_ridges_report_all_models_and_the_destination(tmp_path):
    """The power benchmarks' group: a ridge fixed in advance is reported on every model, a selected one on
    the report half; every variant and baseline gets the destination column."""
    from diffusion_trak.evaluations.ablations import CHOICES

    out = str(tmp_path / "run")
    run(tiny_config(gt_destination_draws=4, score=ScoreArgs(num_noises=2, destination_draws=4)), out, progress=False,
        audit=False)
    names = [CHOICES[0].name, "loss/loss, stratified T=100, ridge selected", "loss/loss, stratified T=100, R=5, ridge 1"]
    assert main([out, "--group", "choices", "--variants", *names]) == 0
    res = json.load(open(os.path.join(out, "ablations", "ablations-choices.json")))
    rows = {(r["method"], r["set"], r["models"]): r for r in res["rows"]}
    assert rows[(names[0], "generated", "all")]["ridge"] == 0.01
    assert rows[(names[1], "generated", "report half")]["ridge"] in RIDGES
    for name in names[::2]:
        for sname in ("generated-destination", "heldout-destination"):
            r = rows[(name, sname, "all")]
            assert r["gt"] == "destination" and len(r["cells"]) == 1
    assert ("baseline: pixel_neg_l2", "heldout-destination", "all") in rows
    # the R=5 variant's target features are kept with R=5, in the run's target cache
    from diffusion_trak.target_cache import TargetCache
    from diffusion_trak.evaluations.folder import RunFolder

    kept = TargetCache(RunFolder(out).target_features).keys()
    assert any(k["num_noises"] == 5 and k["featurize"]["num_timesteps"] == 100 for k in kept)
    md = open(os.path.join(out, "ablations", "ablations-choices.md")).read()
    assert "| method | ridge | models | final image |" in md
