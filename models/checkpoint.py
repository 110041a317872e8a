"""Model weights as safetensors, with the model config in the file's metadata.

safetensors (not pickle) because weights cross hospital boundaries and come out of registries:
loading one must never execute code. The config travels inside the file, so a weights file is
self-describing: channels, modalities and preprocessing come back with the tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from neurofed.models.config import ModelConfig
from neurofed.models.errors import CheckpointError

CONFIG_KEY = "neurofed.model_config"
FORMAT_KEY = "neurofed.format"
FORMAT = "neurofed-weights-v1"
# ``neurofed train``'s resumable checkpoint (RUN/checkpoint.safetensors): weights under
# ``model.*``, optimiser tensors under ``optim.*``, the model config under ``model_config``.
TRAIN_CHECKPOINT_FORMAT = "neurofed-train-checkpoint-v1"


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def save_weights(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    config: ModelConfig,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``state_dict`` atomically (temp file + rename) so a crash never leaves half a file."""
    path = Path(path)
    meta = {FORMAT_KEY: FORMAT, CONFIG_KEY: config.to_json()}
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def load_weights(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, str]]:
    """Return (state_dict, config, metadata) of a weights file (``save_weights``) or of a training
    checkpoint (``neurofed train``'s checkpoint.safetensors: its model weights). Raises
    ``CheckpointError`` with the reason."""
    path = Path(path)
    meta = read_metadata(path)
    training = meta.get("format") == TRAIN_CHECKPOINT_FORMAT
    key = "model_config" if training else CONFIG_KEY
    if key not in meta:
        if training:
            raise CheckpointError(
                f"{path}: a neurofed training checkpoint without its model config; it is damaged"
            )
        fmt = meta.get("format") or meta.get(FORMAT_KEY)
        raise CheckpointError(
            f"{path}: safetensors file has no {CONFIG_KEY!r} metadata"
            + (f" (format {fmt!r})" if fmt else "")
            + "; it was not written by neurofed as a model (give model.safetensors or checkpoint.safetensors "
            "from `neurofed train`, or an .onnx file)"
        )
    try:
        config = ModelConfig.from_json(meta[key])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: model config in metadata is invalid ({exc})") from None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors data ({exc})") from None
    if training:  # the model's weights only; the optimiser's state stays behind
        tensors = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        if not tensors:
            raise CheckpointError(
                f"{path}: a neurofed training checkpoint without model weights; it is damaged"
            )
    return tensors, config, meta


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A digest of names, dtypes, shapes and bytes, independent of file layout."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_model(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, ModelConfig]:
    """Build the UNet described in the file and load its weights (strict)."""
    from neurofed.models.unet import build_unet

    tensors, config, _ = load_weights(path)
    model = build_unet(config)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the model config they carry ({exc})") from None
    return model.to(device), config


def describe(meta: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out
