"""The 3D-UNet (MONAI), its safetensors checkpoints, ONNX export and onnxruntime inference.

Knows nothing of MQTT, MLflow or sites: everything here works on one machine and one model.
"""

from models.config import ModelConfig, Preprocessing
from models.errors import ModelError, SpatialSizeError
from models.unet import build_unet, check_spatial_size, required_multiple

__all__ = [
    "ModelConfig",
    "Preprocessing",
    "ModelError",
    "SpatialSizeError",
    "build_unet",
    "check_spatial_size",
    "required_multiple",
]
