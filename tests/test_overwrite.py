"""Nothing replaced without asking (issue 34): every file a command or the Python API writes is ours or refused.

Each row of a table runs one command on a copy of a tiny digits run (and a user folder beside it), with the sha256
of every file (and the list of folders) of both before and after: a refused row exits with 2, one line matching
its pattern, and changes nothing; a valid row exits with 0 and is checked by its own function."""
import json
import os
import re
import shutil

import numpy as np
import pytest

from diffusion_trak.cli import main
from helpers import snapshot

COMMON = ["--device", "cpu"]
TRAIN = ["--data", "digits", "--limit", "40", "--epochs", "2", "--batch-size", "20", "--channels-per-level", "8", "16",
         "--num-checkpoints", "1"]


def tree(root):
    """``{relative path: sha256}`` of every file below ``root``, and every folder (``path/``: ``"dir"``)."""
    out = snapshot(root)
    for dirpath, dirs, _ in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny run (train, featurize, generate, score), a second model's run (another seed: its trajectory is another
    model's) and the ensemble of both featurized in the first run (``features-ensemble``)."""
    root = tmp_path_factory.mktemp("base")
    run, other = str(root / "run"), str(root / "other")
    for r, seed in ((run, "0"), (other, "1")):
        assert main(["train", "--run", r, *COMMON, *TRAIN, "--seed", seed]) == 0
        assert main(["generate", "--run", r, *COMMON, "--steps", "6", "--num-record", "3", "--scheduler", "ddim"]) == 0
    assert main(["featurize", "--run", run, *COMMON, "-T", "2", "-k", "32"]) == 0
    assert main(["score", "--run", run, *COMMON, "-R", "2"]) == 0
    ens = [os.path.join(run, "model", "ckpt-0002"), os.path.join(other, "model", "ckpt-0002")]
    assert main(["featurize", "--run", run, *COMMON, "-T", "2", "-k", "32", "--checkpoints", *ens,
                 "--out", os.path.join(run, "features-ensemble")]) == 0
    return {"run": run, "other": other, "ens": ens}


# ---------------------------------------------------------------- preparations (what is there before the command)
def user_scores(c):
    with open(os.path.join(c["user"], "scores.json"), "w") as f:
        json.dump({"mine": [1, 2, 3]}, f)
    np.save(os.path.join(c["user"], "scores.npy"), np.arange(6.0))


def home_like(c):
    for name, text in ((".bashrc", "alias ll='ls -l'\n"), ("notes.txt", "my notes\n")):
        with open(os.path.join(c["user"], name), "w") as f:
            f.write(text)
    os.makedirs(os.path.join(c["user"], "Documents"))
    with open(os.path.join(c["user"], "Documents", "thesis.tex"), "w") as f:
        f.write("\\documentclass{article}\n")


def user_file(name, data=b"my own bytes, not a trajectory\n"):
    def prepare(c):
        with open(os.path.join(c["user"], name), "wb") as f:
            f.write(data)
    return prepare


def user_png(name):
    def prepare(c):
        from PIL import Image

        Image.fromarray(np.full((4, 4), 200, np.uint8)).save(os.path.join(c["user"], name))
    return prepare


def edit_scores_json(c):
    path = os.path.join(c["run"], "scores", "seed-0", "scores.json")
    s = json.load(open(path))
    s["meta"]["score"]["ridge"] = 0.5
    json.dump(s, open(path, "w"), indent=2, sort_keys=True)


def reformat_scores_json(c):  # the same content written otherwise: still our result
    path = os.path.join(c["run"], "scores", "seed-0", "scores.json")
    s = json.load(open(path))
    json.dump(s, open(path, "w"), indent=4)


def ensemble_scores(c):
    assert main(["score", "--run", c["run"], *COMMON, "--checkpoints", *c["ens"], "--features",
                 os.path.join(c["run"], "features-ensemble"), "--out", os.path.join(c["run"], "scores", "ensemble"),
                 "-R", "2"]) == 0


def no_trajectories_no_report(c):
    ensemble_scores(c)
    shutil.rmtree(os.path.join(c["run"], "trajectories"))
    assert not os.path.exists(os.path.join(c["run"], "report"))


def floats_npz(c):
    g = np.random.default_rng(0)
    np.savez(os.path.join(c["user"], "floats.npz"), images=g.uniform(0, 1, (2, 1, 8, 8)).astype(np.float32))


def plotted(c):
    assert main(["plot", "--run", c["run"], *COMMON]) == 0


def drop_score_store(c):
    shutil.rmtree(os.path.join(c["run"], "scores", "seed-0", "store"))


def notes_in_scores(c):
    with open(os.path.join(c["run"], "scores", "seed-0", "notes.txt"), "w") as f:
        f.write("mine\n")


def notes_in_model(c):
    with open(os.path.join(c["run"], "model", "notes.txt"), "w") as f:
        f.write("mine\n")


def drop_scores_json(c):
    os.remove(os.path.join(c["run"], "scores", "seed-0", "scores.json"))


def flip_scores_bit(c):
    path = os.path.join(c["run"], "scores", "seed-0", "scores.npy")
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x10
    open(path, "wb").write(bytes(data))


# ---------------------------------------------------------------- checks of valid rows
def unchanged(c, before, after):
    assert after == before


def only_changed(*paths):
    """Every file but ``paths`` (relative to the run) is as it was; each of ``paths`` changed or is new."""
    def check(c, before, after):
        run_b, user_b = before
        run_a, user_a = after
        assert user_a == user_b
        for p in paths:
            assert run_a.get(p) != run_b.get(p), p
        assert {k: v for k, v in run_a.items() if k not in paths} == {k: v for k, v in run_b.items() if k not in paths}
    return check


def new_files(where, *names, absent=()):
    def check(c, before, after):
        root = c[where]
        for n in names:
            assert os.path.getsize(os.path.join(root, n)) > 0, n
        for n in absent:
            assert not os.path.exists(os.path.join(root, n)), n
        key = 0 if where == "run" else 1
        other = 1 - key
        assert after[other] == before[other]
        assert all(after[key].get(k) == v for k, v in before[key].items())  # nothing of before changed
    return check


def plotted_ensemble(c, before, after):
    assert os.path.getsize(os.path.join(c["run"], "report", "ensemble.png")) > 1000
    html = open(os.path.join(c["run"], "report", "ensemble.html")).read()
    assert "journey-data" in html
    assert after[1] == before[1]


def scored_images(c, before, after):
    values = np.load(os.path.join(c["run"], "scores", "images", "scores.npy"))
    assert values.shape == (3, 2, 40) and np.isfinite(values).all()
    assert after[1] == before[1]


def trained_one_checkpoint(c, before, after):
    assert sorted(os.listdir(os.path.join(c["user"], "new", "model"))) == ["ckpt-0001", "train_args.json"]


def regenerated(c, before, after):
    from diffusion_trak.pipelines import Trajectory

    t = Trajectory.load(os.path.join(c["run"], "trajectories", "seed-0.safetensors"))
    assert t.num_inference_steps == 8
    assert main(["plot", "--run", c["run"], *COMMON]) == 2  # its scores no longer match it: one line


def rescored(c, before, after):
    s = json.load(open(os.path.join(c["run"], "scores", "seed-0", "scores.json")))
    assert s["meta"]["score"]["num_noises"] == 3
    assert after[0]["scores/seed-0/scores.npy"] != before[0]["scores/seed-0/scores.npy"]


# ---------------------------------------------------------------- the table
R, U, O = "{run}", "{user}", "{other}"
TRAJ = "{run}/trajectories/seed-0.safetensors"
OTHER_TRAJ = "{other}/trajectories/seed-0.safetensors"
GEN = ["generate", "--run", R, "--steps", "6", "--num-record", "3", "--scheduler", "ddim"]

# (id, prepare, argv, expected: a pattern of the one line of a refusal (exit 2), or a check of a valid row (exit 0))
CASES = [
    # -- the cases
    ("score_out_user_scores", user_scores, ["score", "--run", R, "-R", "2", "--out", U],
     r"--out .*user is not a diffusion-trak scores folder \(it holds scores\.json, scores\.npy\)"),
    ("score_out_user_scores_overwrite", user_scores, ["score", "--run", R, "-R", "2", "--out", U, "--overwrite"],
     r"not a diffusion-trak scores folder.*not even with --overwrite"),
    ("generate_over_scored_trajectory", None, ["generate", "--run", R, "--steps", "20"],
     r"already holds another trajectory \(--steps 6 there, 20 now.*--overwrite"),
    ("generate_out_user_file", user_file("mine.safetensors"), ["generate", "--run", R, "--out", U + "/mine.safetensors"],
     r"--out .*mine\.safetensors is not a trajectory diffusion-trak wrote"),
    ("generate_out_user_file_overwrite", user_file("mine.safetensors"),
     ["generate", "--run", R, "--out", U + "/mine.safetensors", "--overwrite"], r"is not a trajectory diffusion-trak"),
    ("score_trajectory_of_another_model", None,
     ["score", "--run", R, "-R", "2", "--trajectory", OTHER_TRAJ, "--out", R + "/scores/new"],
     r"the trajectory was generated by another model \(fingerprint \w+\) than the checkpoints being scored"),
    ("score_out_home_overwrite", home_like, ["score", "--run", R, "-R", "2", "--out", U, "--overwrite"],
     r"not a diffusion-trak scores folder \(it holds \.bashrc, Documents/, notes\.txt\)"),
    ("train_overwrite_home", home_like, ["train", "--run", U, *TRAIN, "--overwrite"],
     r"--run .*user is not a diffusion-trak run folder \(it holds \.bashrc, Documents/, notes\.txt\)"),
    ("train_home", home_like, ["train", "--run", U, *TRAIN], r"is not a diffusion-trak run folder"),
    ("plot_out_dir", None, ["plot", "--run", R, "--out", U + "/figs/"],
     new_files("user", "figs/seed-0.png", "figs/seed-0.html", absent=("figs/.html", "figs/.png"))),
    ("plot_out_png", None, ["plot", "--run", R, "--out", U + "/fig.png"],
     new_files("user", "fig.png", "fig.html", absent=("fig.png.png", "fig.png.html"))),
    ("plot_ensemble_scores_without_trajectory", ensemble_scores, ["plot", "--run", R, "--scores", R + "/scores/ensemble"],
     plotted_ensemble),
    ("plot_ensemble_scores_no_trajectory_anywhere", no_trajectories_no_report,
     ["plot", "--run", R, "--scores", R + "/scores/ensemble"],
     r"no trajectory in .*trajectories is the one the scores in .*ensemble were computed on; pass --trajectory"),
    ("plot_hand_edited_scores_json", edit_scores_json, ["plot", "--run", R],
     r"scores\.json does not match its own checksum \(edited by hand"),
    ("score_images_floats_value_range", floats_npz,
     ["score", "--run", R, "-R", "2", "--images", U + "/floats.npz", "--value-range", "0", "1"], scored_images),
    ("train_epochs_1", None, ["train", "--run", U + "/new", *TRAIN[:-2], "--epochs", "1"], trained_one_checkpoint),
    ("train_epochs_1_num_checkpoints_3", None, ["train", "--run", U + "/new", *TRAIN[:-2], "--epochs", "1",
                                                "--num-checkpoints", "3"],
     r"--num-checkpoints 3 is more than --epochs 1.*pass --num-checkpoints 1 or fewer"),
    # -- probes: other commands, orders and files
    ("p01_featurize_out_user_scores", user_scores, ["featurize", "--run", R, "-T", "2", "-k", "32", "--out", U],
     r"is not a diffusion-trak store"),
    ("p02_featurize_run_home", home_like, ["featurize", "--run", U, "--checkpoints", R + "/model/ckpt-0002", "-T", "2",
                                          "-k", "32", "--out", R + "/features-new"], r"is not a diffusion-trak run folder"),
    ("p03_score_rerun_same_settings", None, ["score", "--run", R, "-R", "2"], only_changed()),
    ("p04_score_other_settings", None, ["score", "--run", R, "-R", "3"], r"was made with other settings.*--overwrite"),
    ("p05_score_other_settings_overwrite", None, ["score", "--run", R, "-R", "3", "--overwrite"], rescored),
    ("p06_score_store_deleted_other_settings", drop_score_store, ["score", "--run", R, "-R", "3"],
     r"holds scores without their store.*--overwrite"),
    ("p07_generate_same_settings", None, GEN, unchanged),
    ("p08_generate_over_scored_overwrite", None, ["generate", "--run", R, "--steps", "8", "--overwrite"], regenerated),
    ("p09_generate_out_new_file", None, ["generate", "--run", R, "--steps", "4", "--out", U + "/t.safetensors"],
     new_files("user", "t.safetensors")),
    ("p10_generate_out_folder", None, ["generate", "--run", R, "--out", U], r"is a folder, not a file"),
    ("p11_generate_other_seed", None, ["generate", "--run", R, "--steps", "4", "--seed", "1"],
     new_files("run", "trajectories/seed-1.safetensors")),
    ("p12_generate_run_home", home_like, ["generate", "--run", U, "--checkpoint", R + "/model/ckpt-0002", "--steps", "4"],
     r"--run .*user is not a diffusion-trak run folder"),
    ("p13_plot_rerun_same_report", plotted, ["plot", "--run", R], unchanged),  # our own report: rewritten, the same
    ("p14_plot_out_over_user_html", user_file("fig.html", b"<html>my page</html>"), ["plot", "--run", R, "--out",
                                                                                     U + "/fig"],
     r"--out .*fig\.html is not a report diffusion-trak wrote"),
    ("p15_plot_out_over_user_png", user_png("fig.png"), ["plot", "--run", R, "--out", U + "/fig", "--overwrite"],
     r"--out .*fig\.png is not a report diffusion-trak wrote"),
    ("p16_plot_flipped_scores_bit", flip_scores_bit, ["plot", "--run", R], r"does not match the checksum"),
    ("p17_plot_reformatted_scores_json", reformat_scores_json, ["plot", "--run", R],
     new_files("run", "report/seed-0.png", "report/seed-0.html")),
    ("p18_score_out_scores_with_user_file", notes_in_scores, ["score", "--run", R, "-R", "2", "--overwrite"],
     r"not a diffusion-trak scores folder \(it holds notes\.txt\)"),
    ("p19_score_rerun_restores_deleted_json", drop_scores_json, ["score", "--run", R, "-R", "2"],
     new_files("run", "scores/seed-0/scores.json")),
    ("p20_train_rerun_same", None, ["train", "--run", R, *TRAIN], unchanged),
    ("p21_train_overwrite_user_file_in_model", notes_in_model, ["train", "--run", R, *TRAIN, "--overwrite"],
     r"holds files that training did not write \(notes\.txt\)"),
    ("p22_score_trajectory_user_file", user_file("mine.safetensors"),
     ["score", "--run", R, "--trajectory", U + "/mine.safetensors", "--out", R + "/scores/x"],
     r"is not a readable trajectory"),
    ("p23_demo_out_home", home_like, ["demo", "--quick", "--out", U], r"--out .*user is not a diffusion-trak run folder"),
    ("p24_score_images_floats_without_range", floats_npz, ["score", "--run", R, "-R", "2", "--images",
                                                           U + "/floats.npz"], r"--value-range"),
    ("p25_score_ensemble_member_trajectory", None,
     ["score", "--run", R, "-R", "2", "--checkpoints", "{ens0}", "{ens1}", "--features", R + "/features-ensemble",
      "--trajectory", OTHER_TRAJ, "--out", R + "/scores/other"], new_files("run", "scores/other/scores.npy")),
    ("p26_score_out_new_nested", None, ["score", "--run", R, "-R", "2", "--out", U + "/a/b"],
     new_files("user", "a/b/scores.npy", "a/b/scores.json")),
    ("p27_plot_out_existing_dir_no_slash", None, ["plot", "--run", R, "--out", U],
     new_files("user", "seed-0.png", "seed-0.html")),
]


@pytest.mark.parametrize("name,prepare,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_cli_writes_only_what_is_ours(base, tmp_path, capsys, name, prepare, argv, expected):
    run, user = str(tmp_path / "run"), str(tmp_path / "user")
    shutil.copytree(base["run"], run)
    os.makedirs(user)
    c = {"run": run, "user": user, "other": base["other"], "ens": [p.replace(base["run"], run) for p in base["ens"]]}
    c["ens0"], c["ens1"] = c["ens"]
    if prepare:
        prepare(c)
    capsys.readouterr()
    before = (tree(run), tree(user))
    rc = main([a.format(**c) for a in argv] + COMMON)
    err = capsys.readouterr().err
    after = (tree(run), tree(user))
    if isinstance(expected, str):
        lines = err.strip().splitlines()
        assert rc == 2, err
        assert len(lines) == 1 and "Traceback" not in err, err
        assert re.search(expected, lines[0]), lines[0]
        assert after == before  # nothing written, nothing deleted, not even an empty folder
    else:
        assert rc == 0, err
        assert "Traceback" not in err
        expected(c, before, after)


# ---------------------------------------------------------------- the Python API: the same rule
def _attributor(run, **kw):
    from diffusion_trak import Attributor
    from diffusion_trak.config import ScoreArgs
    from diffusion_trak.data import DataArgs

    return Attributor.from_pretrained([os.path.join(run, "model", "ckpt-0002")], DataArgs(name="digits", limit=40), run,
                                      device="cpu", score_args=ScoreArgs(num_noises=2), **kw)


def _load(path):
    from diffusion_trak.pipelines import Trajectory

    return Trajectory.load(path)


def api_attribute(c):
    _attributor(c["run"]).attribute(_load(c["traj"]), out=c["user"])


def api_attribute_another_models_trajectory(c):
    _attributor(c["run"]).attribute(_load(c["other_traj"]), out=os.path.join(c["run"], "scores", "x"))


def api_trajectory_save_over_user_file(c):
    _load(c["traj"]).save(os.path.join(c["user"], "t.safetensors"), overwrite=True)


def api_trajectory_save_over_another(c):
    _load(c["other_traj"]).save(c["traj"])


def api_scores_save_into_user(c):
    from diffusion_trak import api

    api.Scores.load(os.path.join(c["run"], "scores", "seed-0")).save(c["user"], overwrite=True)


def api_scores_save_over_other_scores(c):
    from diffusion_trak import api

    sc = api.Scores.load(os.path.join(c["run"], "scores", "seed-0"))
    sc.values = np.asarray(sc.values) * 2
    sc.save(os.path.join(c["run"], "scores", "seed-0"))


def user_report_png(c):
    os.makedirs(os.path.join(c["user"], "report"))
    user_png(os.path.join("report", "attribution.png"))(c)


def api_report_over_user_png(c):
    from diffusion_trak import api

    a = _attributor(c["run"])
    a.out = c["user"]
    a.report(api.Scores.load(os.path.join(c["run"], "scores", "seed-0")), _load(c["traj"]))


# (id, prepare, call, the one line's pattern)
API_REFUSED = [
    ("attribute_into_user_scores", user_scores, api_attribute, "not a diffusion-trak scores folder"),
    ("attribute_into_home", home_like, api_attribute, "not a diffusion-trak scores folder"),
    ("attribute_another_models_trajectory", None, api_attribute_another_models_trajectory, "generated by another model"),
    ("trajectory_save_over_user_file", user_file("t.safetensors"), api_trajectory_save_over_user_file,
     "not a trajectory diffusion-trak wrote"),
    ("trajectory_save_over_another", None, api_trajectory_save_over_another, "already holds another trajectory"),
    ("scores_save_into_home", home_like, api_scores_save_into_user, "not a diffusion-trak scores folder"),
    ("scores_save_over_other_scores", None, api_scores_save_over_other_scores, "already holds other scores"),
    ("report_over_user_png", user_report_png, api_report_over_user_png, "is not a report diffusion-trak wrote"),
]


@pytest.mark.parametrize("name,prepare,call,pattern", API_REFUSED, ids=[c[0] for c in API_REFUSED])
def test_api_refuses_what_is_not_ours(base, tmp_path, name, prepare, call, pattern):
    from diffusion_trak.errors import UserError

    run, user = str(tmp_path / "run"), str(tmp_path / "user")
    shutil.copytree(base["run"], run)
    os.makedirs(user)
    c = {"run": run, "user": user, "traj": os.path.join(run, "trajectories", "seed-0.safetensors"),
         "other_traj": os.path.join(base["other"], "trajectories", "seed-0.safetensors")}
    if prepare:
        prepare(c)
    before = tree(run), tree(user)
    with pytest.raises(UserError) as e:
        call(c)
    msg = str(e.value)
    assert "\n" not in msg and pattern in msg, msg
    assert (tree(run), tree(user)) == before


def test_api_trajectory_save_same_is_kept_and_overwrite_replaces(base, tmp_path):
    path = str(tmp_path / "t.safetensors")
    shutil.copy(os.path.join(base["run"], "trajectories", "seed-0.safetensors"), path)
    t = _load(path)
    before = tree(str(tmp_path))
    t.save(path)  # the same trajectory: kept as it is
    assert tree(str(tmp_path)) == before
    other = _load(os.path.join(base["other"], "trajectories", "seed-0.safetensors"))
    other.save(path, overwrite=True)
    assert _load(path).same_as(other) and not _load(path).same_as(t)
    assert sorted(os.listdir(tmp_path)) == ["t.safetensors"]  # no temporary file left


def test_trajectories_record_their_model(base):
    from diffusion_trak.featurize.featurizer import model_fingerprint
    from diffusion_trak.models import load_checkpoint

    t = _load(os.path.join(base["run"], "trajectories", "seed-0.safetensors"))
    unet, _ = load_checkpoint(os.path.join(base["run"], "model", "ckpt-0002"))
    assert t.generator == {"model": model_fingerprint(unet), "adapter": None}


def test_hf_dataset_with_none_caption_is_one_line():
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from diffusion_trak.data import from_hf
    from diffusion_trak.errors import UserError

    img = Image.fromarray(np.zeros((8, 8), np.uint8))
    ds = datasets.Dataset.from_dict({"image": [img, img, img], "text": ["a", None, "c"]})
    with pytest.raises(UserError, match=r"row 1 of the 'text' column .* holds None, not a caption"):
        from_hf(ds)


def test_overlong_prompt_warns_once_and_records_what_the_model_saw(tmp_path, capsys, caplog):
    from tiny_models import save_sd_pipeline

    sd = save_sd_pipeline(str(tmp_path / "sd"))
    out = str(tmp_path / "t.safetensors")
    prompt = "a photo of a cat " * 600  # 10,200 characters; the tiny tokenizer takes 32 tokens
    rc = main(["generate", "--pipeline", sd, "--prompt", prompt, "--steps", "2", "--num-record", "1", "--out", out,
               *COMMON])
    assert rc == 0, capsys.readouterr().err
    warned = [r.getMessage() for r in caplog.records if "the text encoder takes 32" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0]
    t = _load(out)
    assert t.prompts_given == [prompt]
    seen = t.prompts[0]
    assert 0 < len(seen) < 60 and prompt.replace(" ", "").startswith(seen.replace(" ", ""))
    # the same command again: the same trajectory, nothing to do
    before = tree(str(tmp_path))
    assert main(["generate", "--pipeline", sd, "--prompt", prompt, "--steps", "2", "--num-record", "1", "--out", out,
                 *COMMON]) == 0
    assert tree(str(tmp_path)) == before


def test_api_attribute_resumes_and_overwrite_replaces_only_ours(base, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(base["run"], run)
    out = str(tmp_path / "user" / "scores")
    sc = _attributor(run).attribute(_load(os.path.join(run, "trajectories", "seed-0.safetensors")), out=out)
    before = tree(out)
    again = _attributor(run).attribute(_load(os.path.join(run, "trajectories", "seed-0.safetensors")), out=out)
    assert tree(out) == before  # the same result, resumed: every file as it was
    np.testing.assert_array_equal(np.asarray(again.values), np.asarray(sc.values))
    from diffusion_trak.config import ScoreArgs
    from diffusion_trak.errors import UserError

    a = _attributor(run)
    a.score_args = ScoreArgs(num_noises=3)
    with pytest.raises(UserError, match="other settings"):
        a.attribute(_load(os.path.join(run, "trajectories", "seed-0.safetensors")), out=out)
    assert tree(out) == before
    a = _attributor(run, overwrite=True)
    a.score_args = ScoreArgs(num_noises=3)
    a.attribute(_load(os.path.join(run, "trajectories", "seed-0.safetensors")), out=out)
    assert json.load(open(os.path.join(out, "scores.json")))["meta"]["score"]["num_noises"] == 3


def test_a_text_longer_than_the_encoder_takes_is_one_warning_line(caplog):
    """Targets' prompts and training captions are cut as generation prompts are: one warning line, once."""
    from diffusion_trak.text import TextConditioner, default_text_model, seen_prompts

    tok, enc = default_text_model(["a photo of a cat"], max_length=8)
    long = "a photo of a cat " * 50
    seen, cut = seen_prompts(tok, ["a cat", long])
    assert cut == 1 and seen[0] == "a cat" and seen[1] == "a photo of a cat a"  # 6 words + BOS/EOS = 8
    caplog.clear()
    cond = TextConditioner(tok, enc)
    cond.encode([long, "a cat"])
    cond.encode([long + " cat", "a cat"])
    warned = [r.getMessage() for r in caplog.records if "the text encoder takes 8" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0] and "prompt or caption is 252 tokens" in warned[0]
