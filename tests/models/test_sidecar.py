"""infer for pipelines: a JSON sidecar per mask, plausibility warnings (and --fail-on-implausible)
on a deliberately bad model, 4-D input, training checkpoints, and an unreachable registry."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

from neurofed.cli import main
from neurofed.models.config import ModelConfig
from tests.models.conftest import blob_scan, save_nifti, threshold_onnx

AFF = np.diag([2.0, 2.0, 2.0, 1.0])
SHAPE = (32, 32, 32)
LABEL_ML = {"min": 1.0, "median": 4.0, "max": 10.0, "cases": 12}


def _scan(tmp_path):
    img, truth = blob_scan(SHAPE, AFF, centre=(30.0, 32.0, 30.0), radius=6.0, brain_radius=20.0)
    return save_nifti(tmp_path / "in" / "P1_flair.nii.gz", img, AFF), truth


def _config(**training):
    cfg = ModelConfig.tiny(spacing=(2.0, 2.0, 2.0), patch_size=(32, 32, 32))
    return cfg.with_training_data(**training) if training else cfg


def _infer(*args) -> int:
    return main(["infer", *map(str, args), "--threads", "1"])


def test_sidecar_of_a_plausible_mask(tmp_path, capsys):
    scan, truth = _scan(tmp_path)
    model = threshold_onnx(tmp_path / "good.onnx", _config(label_ml=LABEL_ML))
    assert _infer(scan, "--model", model, "-o", tmp_path / "out" / "P1.nii.gz") == 0
    side = json.loads((tmp_path / "out" / "P1.json").read_text())
    assert side["volume_ml"] == pytest.approx(truth.sum() * 8 / 1000, rel=0.2)
    assert side["outside_brain_fraction"] == 0.0 and side["components"] == 1
    assert side["model"]["sha256"] and len(side["model"]["sha256"]) == 64
    assert side["model"]["config_digest"] == _config().digest()
    assert side["training_label_ml"] == LABEL_ML and side["warnings"] == [] and side["refused"] is False
    assert side["mask"].endswith("P1.nii.gz")


def test_a_model_that_calls_everything_tumour_is_flagged(tmp_path, capsys):
    scan, _ = _scan(tmp_path)
    bad = threshold_onnx(tmp_path / "bad.onnx", _config(label_ml=LABEL_ML), level=-100.0)
    assert _infer(scan, "--model", bad, "-o", tmp_path / "out") == 0  # warned, not failed
    out = capsys.readouterr().out
    side = json.loads((tmp_path / "out" / "P1_mask.json").read_text())
    codes = [w["code"] for w in side["warnings"]]
    assert codes == ["NF-I001", "NF-I002"], side
    assert side["outside_brain_fraction"] > 0.5 and side["volume_ml"] == pytest.approx(32**3 * 8 / 1000)
    assert "NF-I001" in out and "NF-I002" in out
    assert (tmp_path / "out" / "P1_mask.nii.gz").is_file()
    # told to fail: no mask, the sidecar says why, exit status 1
    assert _infer(scan, "--model", bad, "-o", tmp_path / "strict", "--fail-on-implausible") == 1
    assert not (tmp_path / "strict" / "P1_mask.nii.gz").exists()
    strict = json.loads((tmp_path / "strict" / "P1_mask.json").read_text())
    assert strict["refused"] is True and strict["mask"] is None
    assert "REFUSED" in capsys.readouterr().out


def test_a_model_without_training_volumes_says_so(tmp_path, capsys):
    scan, _ = _scan(tmp_path)
    bad = threshold_onnx(tmp_path / "bad.onnx", _config(), level=-100.0)
    assert _infer(scan, "--model", bad, "-o", tmp_path / "out" / "m.nii.gz", "--fail-on-implausible") == 1
    side = json.loads((tmp_path / "out" / "m.json").read_text())
    assert [w["code"] for w in side["warnings"]] == ["NF-I001", "NF-I003"]
    assert side["training_label_ml"] is None
    assert "records no training label volumes" in capsys.readouterr().out


def test_a_4d_image_is_segmented(tmp_path, capsys):
    img, _ = blob_scan(SHAPE, AFF, centre=(30.0, 32.0, 30.0), radius=6.0, brain_radius=20.0)
    four = save_nifti(tmp_path / "BRATS_001.nii.gz", np.stack([img, img * 0.5, img, img], axis=-1), AFF)
    model = threshold_onnx(tmp_path / "m.onnx", _config(label_ml=LABEL_ML))
    assert _infer(four, "--model", model, "-o", tmp_path / "out") == 0, capsys.readouterr()
    import nibabel as nib

    mask = nib.load(str(tmp_path / "out" / "BRATS_001_mask.nii.gz"))
    assert mask.shape == SHAPE and np.asarray(mask.dataobj).sum() > 0


def test_training_checkpoint_is_accepted_and_other_safetensors_refused_with_the_reason(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from neurofed.edge_node.centralized import save_checkpoint
    from neurofed.edge_node.training import TrainConfig
    from neurofed.models.unet import build_unet

    scan, _ = _scan(tmp_path)
    cfg = _config(label_ml=LABEL_ML)
    net = build_unet(cfg)
    opt = torch.optim.Adam(net.parameters())
    (tmp_path / "run").mkdir()
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoint.safetensors", net, opt, 3, cfg, TrainConfig())
    assert _infer(scan, "--model", ckpt, "-o", tmp_path / "out" / "m.nii.gz") == 0, capsys.readouterr()
    side = json.loads((tmp_path / "out" / "m.json").read_text())
    assert (
        side["model"]["source"].endswith("checkpoint.safetensors") and side["training_label_ml"] == LABEL_ML
    )
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "somebody-else"})
    assert _infer(scan, "--model", other, "-o", tmp_path / "o2") != 0
    err = capsys.readouterr().err
    assert "not written by neurofed as a model" in err and "somebody-else" in err


def test_an_unreachable_registry_fails_within_seconds(tmp_path, capsys):
    scan, _ = _scan(tmp_path)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    rc = _infer(
        scan,
        "--model",
        "models:/demo-unet@champion",
        "--tracking-uri",
        f"http://127.0.0.1:{port}",
        "-o",
        tmp_path / "o",
    )
    assert rc != 0 and time.monotonic() - t0 < 20
    err = capsys.readouterr().err
    assert "cannot be reached" in err and f"127.0.0.1:{port}" in err
