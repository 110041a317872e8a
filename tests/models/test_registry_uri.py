"""`neurofed infer` and `neurofed export` with models:/ URIs against a real MLflow server."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from tests.models.conftest import blob_scan, save_nifti

pytestmark = pytest.mark.slow


@pytest.fixture
def registered(mlflow_server, tmp_path, tiny_model, tiny_config):  # noqa: F811
    from neurofed.mlflow_server.tracking import FederationTracker
    from neurofed.models.checkpoint import save_weights

    weights = save_weights(tmp_path / "round1.safetensors", tiny_model.state_dict(), tiny_config)
    tracker = FederationTracker(mlflow_server, "cinfer", {"rounds": 1})
    try:
        tracker.register_round(1, weights, tiny_config, sites=["site-a"], cases=4)
    finally:
        tracker.close()
    return mlflow_server, f"models:/{tracker.model_name}@latest-round"


def test_infer_and_export_from_a_registered_model(registered, tmp_path, tiny_model, tiny_config, capsys):
    from neurofed.cli import main
    from neurofed.models.export import check_parity, read_onnx_config

    uri_server, uri = registered
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    img, _ = blob_scan((40, 40, 24), affine, centre=(20.0, 18.0, 16.0), brain_radius=18.0)
    scan = save_nifti(tmp_path / "p_flair.nii.gz", img, affine)
    out = tmp_path / "mask.nii.gz"
    rc = main(
        ["infer", str(scan), "--model", uri, "--tracking-uri", uri_server, "-o", str(out), "--threads", "1"]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "sha256 checked" in text and "tumour volume" in text
    assert nib.load(str(out)).shape == (40, 40, 24)

    onnx_out = tmp_path / "exported.onnx"
    rc = main(["export", "--checkpoint", uri, "--tracking-uri", uri_server, "-o", str(onnx_out)])
    assert rc == 0
    assert read_onnx_config(onnx_out) == tiny_config
    assert check_parity(tiny_model, tiny_config, onnx_out, sizes=[(32, 32, 32)]).ok


def test_unknown_registered_model_is_a_clear_error(mlflow_server, tmp_path, capsys):  # noqa: F811
    from neurofed.cli import main

    scan = save_nifti(tmp_path / "p_flair.nii.gz", np.ones((16, 16, 16), np.float32), np.eye(4))
    rc = main(
        [
            "infer",
            str(scan),
            "--model",
            "models:/nope-unet@champion",
            "--tracking-uri",
            mlflow_server,
            "-o",
            str(tmp_path / "m.nii.gz"),
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "models:/nope-unet@champion" in err and "Traceback" not in err
