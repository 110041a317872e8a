"""Fixtures for the export and inference tests: tiny models, and scans written as real NIfTI files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from neurofed.models.config import ModelConfig


def threshold_onnx(path: Path, config: ModelConfig, *, channel: int = 0, level: float = 1.5) -> Path:
    """A train-free ONNX model with neurofed metadata: logits = 20 * (image[:, channel] - level).

    After z-scoring, a bright blob lies far above ``level`` and everything else below it, so the
    expected mask is known exactly; any spatial mistake (orientation, resampling, inversion) or a
    wrong channel order shows up as a misplaced or empty mask.
    """
    import onnx
    from onnx import TensorProto, helper

    from neurofed.models.export import CONFIG_KEY

    c = config.in_channels
    nodes = [
        helper.make_node(
            "Constant", [], ["starts"], value=helper.make_tensor("s", TensorProto.INT64, [1], [channel])
        ),
        helper.make_node(
            "Constant", [], ["ends"], value=helper.make_tensor("e", TensorProto.INT64, [1], [channel + 1])
        ),
        helper.make_node(
            "Constant", [], ["axes"], value=helper.make_tensor("a", TensorProto.INT64, [1], [1])
        ),
        helper.make_node("Slice", ["image", "starts", "ends", "axes"], ["chan"]),
        helper.make_node(
            "Constant", [], ["level"], value=helper.make_tensor("l", TensorProto.FLOAT, [], [level])
        ),
        helper.make_node(
            "Constant", [], ["gain"], value=helper.make_tensor("g", TensorProto.FLOAT, [], [20.0])
        ),
        helper.make_node("Sub", ["chan", "level"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["logits"]),
    ]
    dims = ["batch", c, "x", "y", "z"]
    graph = helper.make_graph(
        nodes,
        "threshold",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, "x", "y", "z"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    entry = model.metadata_props.add()
    entry.key, entry.value = CONFIG_KEY, config.to_json()
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def world_grid(shape, affine) -> np.ndarray:
    """World (mm) coordinates of every voxel centre, shape (*shape, 3)."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(np.float64)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def blob_scan(shape, affine, *, centre, radius=9.0, brain_radius=30.0, seed=0):
    """A skull-stripped-like volume on the grid (shape, affine): tissue ~ 100 inside a sphere of
    ``brain_radius`` mm around the grid's centre, a blob of 300 of ``radius`` mm at world
    ``centre``, zero outside. Returns (image, truth mask)."""
    rng = np.random.default_rng(seed)
    world = world_grid(shape, affine)
    mid = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
    brain = np.linalg.norm(world - mid, axis=-1) < brain_radius
    truth = np.linalg.norm(world - np.asarray(centre), axis=-1) < radius
    img = np.where(brain, 100.0 + 3.0 * rng.standard_normal(shape), 0.0)
    img = np.where(truth, 300.0, img)
    return img.astype(np.float32), truth


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nib.save(img, str(path))
    return path


def lps_affine(spacing=(1.0, 1.5, 3.0), origin=(40.0, 50.0, -30.0)) -> np.ndarray:
    """A non-RAS grid: array axes permuted (axis 0 runs A->P, axis 1 R->L, axis 2 I->S) with
    anisotropic voxels, as some scanners and DICOM converters store scans."""
    a = np.zeros((4, 4))
    a[1, 0] = -spacing[0]  # axis 0 -> -y (posterior)
    a[0, 1] = -spacing[1]  # axis 1 -> -x (left)
    a[2, 2] = spacing[2]  # axis 2 -> +z
    a[:3, 3] = origin
    a[3, 3] = 1
    return a


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig.tiny(patch_size=(32, 32, 32))


@pytest.fixture
def tiny_model(tiny_config):
    from neurofed.models.unet import build_unet

    torch.manual_seed(0)
    return build_unet(tiny_config).eval()


@pytest.fixture
def tiny_onnx(tmp_path, tiny_model, tiny_config) -> Path:
    from neurofed.models.export import export_onnx

    return export_onnx(tiny_model.state_dict(), tiny_config, tmp_path / "tiny.onnx")
