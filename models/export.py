"""ONNX export of the UNet with dynamic batch and spatial axes.

The model config (channels, modalities, preprocessing) goes into the ONNX metadata under
``neurofed.model_config`` so that inference reads, not guesses, how to prepare a scan.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from models.config import ModelConfig
from models.unet import build_unet, required_multiple

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
CONFIG_KEY = "neurofed.model_config"


def export_onnx(
    state_dict: dict[str, torch.Tensor],
    config: ModelConfig,
    path: str | os.PathLike[str],
    *,
    opset: int = OPSET,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a self-contained ONNX file (weights inline: the default UNet is 19 MB, far below
    protobuf's 2 GB limit) and return its path."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_unet(config)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    side = required_multiple(config) * 2
    example = torch.zeros(1, config.in_channels, side, side, side)
    axes = {0: "batch", 2: "x", 3: "y", 4: "z"}
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
            opset_version=opset,
            dynamo=False,
        )
    proto = onnx.load(str(tmp))
    props = {CONFIG_KEY: config.to_json(), **(metadata or {})}
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    tmp.unlink(missing_ok=True)
    return path


def read_onnx_config(path: str | os.PathLike[str]) -> ModelConfig:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if CONFIG_KEY not in props:
        from models.errors import ModelError

        raise ModelError(
            f"{path}: ONNX file has no {CONFIG_KEY!r} metadata; export it with `neurofed export`"
        )
    return ModelConfig.from_json(props[CONFIG_KEY])
