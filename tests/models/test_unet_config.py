import json

import pytest
import torch

from neurofed.models import ModelConfig, SpatialSizeError, build_unet, check_spatial_size
from neurofed.models.checkpoint import (
    CheckpointError,
    load_model,
    load_weights,
    save_weights,
    state_dict_sha256,
)
from neurofed.models.config import preset
from neurofed.models.unet import count_parameters


def test_default_unet_matches_the_study_size():
    cfg = ModelConfig()
    model = build_unet(cfg)
    n = count_parameters(model)
    assert 4.7e6 < n < 4.9e6
    assert cfg.in_channels == 1 and cfg.modalities == ("flair",)


def test_four_modalities_change_input_channels():
    cfg = preset("tiny", modalities=("t1", "t1ce", "t2", "flair"))
    model = build_unet(cfg)
    out = model(torch.zeros(1, 4, 32, 32, 32))
    assert out.shape == (1, 1, 32, 32, 32)


def test_bad_spatial_size_is_a_clear_error():
    cfg = ModelConfig()
    with pytest.raises(SpatialSizeError, match="multiple of 16"):
        check_spatial_size((64, 64, 70), cfg, where="case-001")
    check_spatial_size((64, 96, 128), cfg)


def test_config_round_trips_through_json():
    cfg = preset("small", modalities=("t2", "flair"), spacing=(1.0, 1.0, 2.0))
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["in_channels"] == 2
    assert cfg.digest() != ModelConfig().digest()


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    cfg = ModelConfig.tiny()
    model = build_unet(cfg)
    sd = model.state_dict()
    path = save_weights(tmp_path / "w.safetensors", sd, cfg, {"round": "3"})
    loaded, cfg2, meta = load_weights(path)
    assert cfg2 == cfg and meta["round"] == "3"
    assert state_dict_sha256(loaded) == state_dict_sha256(sd)
    for k in sd:
        assert torch.equal(loaded[k], sd[k])
    model2, _ = load_model(path)
    assert state_dict_sha256(model2.state_dict()) == state_dict_sha256(sd)


def test_corrupt_or_foreign_weights_are_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_weights(bad)
    with pytest.raises(CheckpointError, match="no such weights file"):
        load_weights(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not written by neurofed"):
        load_weights(foreign)
