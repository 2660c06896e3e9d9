"""One layout of an evaluation run: what run.py writes is what the readers (bench_featurize --lds, ablations,
the journey page) read, also for a masked run; target features and checkpoints are computed and loaded once."""
import json
import os

import numpy as np

from diffusion_trak.config import FeaturizeArgs, ScoreArgs, TrainArgs
from diffusion_trak.data import DataArgs
from diffusion_trak.evaluations.configs import EvalConfig
from diffusion_trak.evaluations.run import run


def tiny_config(**kw):
    base = dict(name="tiny", data=DataArgs(name="digits", limit=48), heldout=DataArgs(name="digits", split="test", limit=4),
                train=TrainArgs(block_out_channels=(8, 16), norm_num_groups=4, epochs=2, batch_size=16, num_checkpoints=2),
                featurize=FeaturizeArgs(num_timesteps=2, proj_dim=64, projector="torch"), score=ScoreArgs(num_noises=2),
                num_models=4, train_method="stacked", stack_size=4, num_generated=4, num_inference_steps=10,
                lds_steps=(0, 5, 9), num_heldout=4, gt_noises=2, gt_final_draws=4, encoder_epochs=1, audit_targets=0,
                audit_steps=(5,), n_boot=50, threads=1)
    base.update(kw)
    return EvalConfig(**base)


def test_a_masked_run_is_read_back_through_one_layout(tmp_path, monkeypatch):
    import diffusion_trak.target_cache as target_cache
    import diffusion_trak.train as train_mod
    from diffusion_trak.api import Scores
    from diffusion_trak.evaluations.bench_featurize import lds_inputs
    from diffusion_trak.evaluations.metrics import lds
    from diffusion_trak.evaluations.subsets import subset_masks
    from diffusion_trak.report.evidence import evaluation_run

    loads, computed = [], []
    real_load, real_targets = train_mod.load_checkpoint, target_cache.all_target_features
    monkeypatch.setattr(train_mod, "load_checkpoint", lambda path, *a, **k: loads.append(str(path)) or real_load(path, *a, **k))
    monkeypatch.setattr(target_cache, "all_target_features", lambda *a, **k: computed.append(1) or real_targets(*a, **k))
    out = str(tmp_path / "run")
    cfg = tiny_config(lds_mode="masked", train=TrainArgs(block_out_channels=(8, 16), norm_num_groups=4, epochs=4,
                                                         batch_size=16, num_checkpoints=2),
                      gt_destination_draws=4, score=ScoreArgs(num_noises=2, destination_draws=3))
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
