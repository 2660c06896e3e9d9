import dataclasses

import pytest
import torch

from diffusion_trak.config import FeaturizeArgs, asdict, from_dict
from diffusion_trak.featurize.featurizer import example_draws, sample_timesteps


@pytest.mark.parametrize("strategy", ["uniform", "evenly_spaced", "stratified"])
def test_full_range_is_the_default_draw(strategy):
    a = sample_timesteps(strategy, 7, 1000, torch.Generator().manual_seed(3))
    b = sample_timesteps(strategy, 7, 1000, torch.Generator().manual_seed(3), (0, 999))
    assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", ["uniform", "evenly_spaced", "stratified"])
def test_range_restricts_timesteps(strategy):
    t = torch.cat([sample_timesteps(strategy, 10, 1000, torch.Generator().manual_seed(s), (200, 260)) for s in range(50)])
    assert t.min() >= 200 and t.max() <= 260
    if strategy != "evenly_spaced":
        assert len(set(t.tolist())) > 30
    else:
        assert t.min() == 200 and t.max() == 260
    with pytest.raises(ValueError, match="reaches past"):
        sample_timesteps(strategy, 4, 100, torch.Generator(), (50, 100))


def test_range_setting_roundtrip_and_old_settings_unchanged():
    # unset, the new setting is not written: stores made before it still compare equal
    assert "timestep_range" not in asdict(FeaturizeArgs())
    a = FeaturizeArgs(timestep_strategy="stratified", timestep_range=[0, 100])
    assert a.timestep_range == (0, 100) and asdict(a)["timestep_range"] == [0, 100]
    # params "auto" is left out as "all" was (stores resolve it before saving): it reads back as "all"
    assert from_dict(FeaturizeArgs, asdict(a)) == dataclasses.replace(a, params="all")
    assert "params" not in asdict(a) and from_dict(FeaturizeArgs, asdict(a)).params == "all"
    assert asdict(dataclasses.replace(a, params="lora"))["params"] == "lora"
    t, _ = example_draws(5, a, 1000, (1, 4, 4))
    assert t.max() <= 100
    with pytest.raises(ValueError):
        FeaturizeArgs(timestep_range=(10, 5))
