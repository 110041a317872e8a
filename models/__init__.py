"""The 3D-UNet (MONAI), its safetensors checkpoints, ONNX export and onnxruntime inference.

Knows nothing of MQTT, MLflow or sites: everything here works on one machine and one model.
The names below are imported lazily: the coordinator reads ``neurofed.models.config`` without paying for
torch and MONAI (about 0.5 GB resident) in a process that never builds a network.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ModelConfig": "neurofed.models.config",
    "Preprocessing": "neurofed.models.config",
    "ModelError": "neurofed.models.errors",
    "SpatialSizeError": "neurofed.models.errors",
    "build_unet": "neurofed.models.unet",
    "check_spatial_size": "neurofed.models.unet",
    "required_multiple": "neurofed.models.unet",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'neurofed.models' has no attribute {name!r}")
