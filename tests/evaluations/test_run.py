import json
import os

import pytest

from diffusion_trak.config import FeaturizeArgs, ScoreArgs, TrainArgs
from diffusion_trak.data import DataArgs
from evaluations.configs import CONFIGS, ConfigError, EvalConfig, get_config
from evaluations.run import ConfigMismatch, main, run


def tiny_config(**kw):
    base = dict(name="tiny", data=DataArgs(name="digits", limit=48), heldout=DataArgs(name="digits", split="test", limit=4),
                train=TrainArgs(block_out_channels=(8, 16), norm_num_groups=4, epochs=2, batch_size=16, num_checkpoints=2),
                featurize=FeaturizeArgs(num_timesteps=2, proj_dim=64, projector="torch"), score=ScoreArgs(num_noises=2),
                num_models=4, train_method="stacked", stack_size=4, num_generated=4, num_inference_steps=10,
                lds_steps=(0, 5, 9), num_heldout=4, gt_noises=2, gt_final_draws=4, encoder_epochs=1, audit_targets=2,
                audit_steps=(5,), audit_ks=(0.1,), n_boot=50, threads=1)
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
