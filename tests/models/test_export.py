"""ONNX export: checker, metadata, dynamic axes and parity with torch at several sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurofed.models.config import ModelConfig
from neurofed.models.export import (
    ExportError,
    OnnxModelError,
    ParityError,
    check_parity,
    export_onnx,
    read_onnx_config,
    read_onnx_metadata,
)
from neurofed.models.unet import build_unet

SIZES = [(32, 32, 32), (32, 48, 64), (16, 16, 16)]


def test_export_passes_checker_and_carries_the_preprocessing(tmp_path, tiny_model):
    import onnx

    cfg = ModelConfig.tiny(
        modalities=("t1ce", "flair"), spacing=(1.0, 1.0, 2.0), patch_size=(32, 48, 32), threshold=0.4
    )
    model = build_unet(cfg)
    path = export_onnx(model.state_dict(), cfg, tmp_path / "m.onnx", metadata={"neurofed.round": "7"})
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version >= 17
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 2, "x", "y", "z"]  # dynamic batch and spatial axes, fixed channels
    again = read_onnx_config(path)
    assert again == cfg
    assert again.preprocessing.modalities == ("t1ce", "flair")
    assert read_onnx_metadata(path)["neurofed.round"] == "7"
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob(".*tmp"))


def test_parity_at_several_sizes_including_non_cubic(tiny_model, tiny_config, tiny_onnx):
    report = check_parity(tiny_model.state_dict(), tiny_config, tiny_onnx, sizes=SIZES)
    assert report.ok
    assert {c.size for c in report.cases} == set(SIZES)
    assert {c.input for c in report.cases} == {"random", "synthetic"}
    assert report.max_abs_diff < 1e-3
    assert all(c.mismatches_outside_margin == 0 for c in report.cases)


def test_parity_catches_a_model_that_differs(tiny_config, tiny_onnx):
    torch.manual_seed(123)
    other = build_unet(tiny_config)
    with pytest.raises(ParityError, match="does not match torch"):
        check_parity(other.state_dict(), tiny_config, tiny_onnx, sizes=[(32, 32, 32)])
    report = check_parity(other, tiny_config, tiny_onnx, sizes=[(32, 32, 32)], raise_on_failure=False)
    assert not report.ok and report.max_abs_diff > 1e-3


def test_ort_session_io_binding_equals_plain_run(tiny_onnx):
    from neurofed.models.onnx_session import create_session

    x = np.random.default_rng(0).standard_normal((3, 1, 32, 16, 48)).astype(np.float32)
    bound = create_session(tiny_onnx, threads=1, device="cpu")
    plain = create_session(tiny_onnx, threads=1, device="cpu", io_binding=False)
    a, b = bound.run_numpy(x), plain.run_numpy(x)
    assert a.shape == (3, 1, 32, 16, 48)
    np.testing.assert_array_equal(a, b)
    assert "CPUExecutionProvider" in bound.describe()


def test_external_data_for_large_models(tmp_path, tiny_model, tiny_config):
    path = export_onnx(tiny_model.state_dict(), tiny_config, tmp_path / "big.onnx", external_data=True)
    data = tmp_path / "big.onnx.data"
    assert data.is_file() and data.stat().st_size > 0.9 * sum(
        t.numel() * 4 for t in tiny_model.state_dict().values() if t.dtype == torch.float32
    )
    assert path.stat().st_size < data.stat().st_size
    assert check_parity(tiny_model.state_dict(), tiny_config, path, sizes=[(32, 48, 64)]).ok


def test_old_opset_and_wrong_weights_are_refused(tmp_path, tiny_model, tiny_config):
    with pytest.raises(ExportError, match="opset 13"):
        export_onnx(tiny_model.state_dict(), tiny_config, tmp_path / "m.onnx", opset=13)
    with pytest.raises(ExportError, match="do not match"):
        export_onnx(tiny_model.state_dict(), ModelConfig.small(), tmp_path / "m.onnx")


def test_foreign_or_corrupt_onnx_files_are_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(OnnxModelError, match="not a readable ONNX model"):
        read_onnx_config(junk)
    with pytest.raises(OnnxModelError, match="no such ONNX"):
        read_onnx_config(tmp_path / "missing.onnx")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(foreign))
    with pytest.raises(OnnxModelError, match="neurofed export"):
        read_onnx_config(foreign)


def test_export_cli_writes_a_checked_model(tmp_path, tiny_model, tiny_config, capsys):
    from neurofed.cli import main
    from neurofed.models.checkpoint import save_weights

    weights = save_weights(
        tmp_path / "w.safetensors", tiny_model.state_dict(), tiny_config, {"neurofed.round": "3"}
    )
    out = tmp_path / "out" / "model.onnx"
    rc = main(["export", "--checkpoint", str(weights), "-o", str(out), "--parity-sizes", "32x32x32,16x32x48"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "16x32x48" in text and "max |logit diff|" in text
    assert read_onnx_config(out) == tiny_config
    assert read_onnx_metadata(out)["neurofed.round"] == "3"


def test_export_cli_reports_a_bad_checkpoint(tmp_path, capsys):
    from neurofed.cli import main

    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert main(["export", "--checkpoint", str(bad), "-o", str(tmp_path / "m.onnx")]) == 1
    assert "not a readable safetensors" in capsys.readouterr().err


@pytest.mark.slow
def test_dynamo_exporter_also_matches(tmp_path, tiny_model, tiny_config):
    path = export_onnx(tiny_model.state_dict(), tiny_config, tmp_path / "d.onnx", dynamo=True)
    assert not (tmp_path / "d.onnx.data").exists()  # weights inline, one file
    assert read_onnx_config(path) == tiny_config
    assert check_parity(tiny_model.state_dict(), tiny_config, path, sizes=SIZES).ok


@pytest.mark.slow
def test_default_unet_matches_at_real_sizes(tmp_path):
    cfg = ModelConfig(preprocessing=ModelConfig().preprocessing)
    torch.manual_seed(1)
    model = build_unet(cfg).eval()
    path = export_onnx(model.state_dict(), cfg, tmp_path / "default.onnx")
    report = check_parity(model, cfg, path, sizes=[(64, 64, 64), (48, 64, 80)])
    assert report.ok, report.summary()


def test_prelu_rewrite_is_exact(tmp_path, tiny_model, tiny_config):
    """The exported graph runs LeakyRelu instead of onnxruntime's slow generic PRelu, with
    bit-identical output to the unrewritten export."""
    import onnx

    from neurofed.models.onnx_session import create_session

    fast = export_onnx(tiny_model.state_dict(), tiny_config, tmp_path / "fast.onnx")
    plain = export_onnx(tiny_model.state_dict(), tiny_config, tmp_path / "plain.onnx", optimise=False)
    ops_fast = {n.op_type for n in onnx.load(str(fast)).graph.node}
    ops_plain = {n.op_type for n in onnx.load(str(plain)).graph.node}
    assert "PRelu" in ops_plain and "PRelu" not in ops_fast and "LeakyRelu" in ops_fast
    x = np.random.default_rng(1).standard_normal((2, 1, 16, 32, 48)).astype(np.float32)
    a = create_session(fast, threads=1, device="cpu").run_numpy(x)
    b = create_session(plain, threads=1, device="cpu").run_numpy(x)
    np.testing.assert_array_equal(a, b)


def test_a_dp_trained_leakyrelu_unet_exports_with_its_layers_and_matches(tmp_path):
    """``act="leakyrelu"`` (the parameter-free choice for DP-SGD) reaches the network, the ONNX
    metadata and the model rebuilt from it: the export matches torch at several sizes, and the
    config read back from the file builds the same layers."""
    from neurofed.edge_node.privacy import DPStep, PrivateStep

    cfg = ModelConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=1, act="leakyrelu")
    torch.manual_seed(0)
    model = build_unet(cfg)
    assert not any(isinstance(m, torch.nn.PReLU) for m in model.modules())
    # one DP-SGD step first: the exported weights are those Opacus trained, its hooks gone
    private = PrivateStep(
        model, torch.optim.Adam(model.parameters(), lr=1e-2), DPStep(1.0, 1.0, 1.0, 1), expected_batch_size=1
    )
    x = torch.randn(1, 1, 32, 32, 32)
    private.step(
        [(x, (x > 1).float())], lambda out, y: torch.nn.functional.binary_cross_entropy_with_logits(out, y)
    )
    private.close()
    path = export_onnx(model.state_dict(), cfg, tmp_path / "dp.onnx")
    again = read_onnx_config(path)
    assert again == cfg and again.act == "leakyrelu"
    assert str(build_unet(again)) == str(model)
    report = check_parity(model.state_dict(), again, path, sizes=SIZES)
    assert report.ok and report.max_abs_diff < 1e-3
    # and a default model's config JSON carries neither field (digests of older models unchanged)
    assert "act" not in ModelConfig.tiny().to_dict() and "norm" not in ModelConfig.tiny().to_dict()
