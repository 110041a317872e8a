"""Build the MONAI 3D-UNet and guard its one sharp edge: spatial sizes must be multiples of
2**len(strides) (16 for the default), or MONAI fails deep inside a concatenation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import UNet

from neurofed.models.config import ModelConfig
from neurofed.models.errors import SpatialSizeError

# ModelConfig.norm / .act -> MONAI's layer factories (the defaults are MONAI's own)
_NORMS = {"instance": "INSTANCE", "batch": "BATCH"}
_ACTS: dict[str, Any] = {"prelu": "PRELU", "leakyrelu": ("leakyrelu", {"negative_slope": 0.01})}


def build_unet(config: ModelConfig) -> torch.nn.Module:
    """A fresh ``monai.networks.nets.UNet`` for ``config`` (spatial_dims=3)."""
    return UNet(
        spatial_dims=3,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        channels=config.channels,
        strides=config.strides,
        num_res_units=config.num_res_units,
        dropout=config.dropout,
        norm=_NORMS[config.norm],
        act=_ACTS[config.act],
    )


def required_multiple(config: ModelConfig) -> int:
    """Every spatial size the network sees must be a multiple of this."""
    return int(math.prod(config.strides))


def check_spatial_size(shape: Sequence[int], config: ModelConfig, *, where: str = "input") -> None:
    """Raise a clear error unless ``shape`` (spatial dims only) fits the network."""
    m = required_multiple(config)
    bad = [int(s) for s in shape if int(s) % m]
    if len(shape) != 3 or bad:
        fixed = tuple(int(math.ceil(int(s) / m) * m) for s in shape)
        raise SpatialSizeError(
            f"{where}: spatial size {tuple(int(s) for s in shape)} does not fit the UNet: every size must "
            f"be a multiple of {m} (2**{len(config.strides)} strides). Pad or crop to e.g. {fixed}, "
            f"or choose a patch size that is a multiple of {m}."
        )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
