"""State dicts on the wire: safetensors bytes, never pickle.

``encode_state`` takes numpy arrays or torch tensors (torch is imported only if one is passed) and
returns safetensors bytes, optionally cast to float16 (floating tensors only) to halve the wire;
``decode_state`` returns numpy arrays. The original dtype of fp16-cast tensors is recorded in the
metadata so ``decode_state(..., restore_dtype=True)`` (the default) gives float32 back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from wire.errors import ProtocolError

META_KEY = "neurofed.dtypes"


def _to_numpy(name: str, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    mod = type(value).__module__
    if mod.startswith("torch"):
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.contiguous().numpy()
    if isinstance(value, (int, float, np.generic)):
        return np.asarray(value)
    raise TypeError(f"tensor {name!r} is a {type(value).__name__}; give numpy arrays or torch tensors")


def encode_state(
    state: Mapping[str, Any], fp16: bool = False, metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialise a state dict to safetensors bytes (``fp16=True`` casts floating tensors)."""
    from safetensors.numpy import save

    arrays: dict[str, np.ndarray] = {}
    cast: dict[str, str] = {}
    for name, value in state.items():
        arr = np.asarray(_to_numpy(name, value), order="C")  # keeps 0-d tensors 0-d
        if fp16 and arr.dtype.kind == "f" and arr.dtype != np.float16:
            cast[name] = str(arr.dtype)
            arr = arr.astype(np.float16)
        arrays[name] = arr
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if cast:
        meta[META_KEY] = json.dumps(cast, sort_keys=True)
    return save(arrays, metadata=meta or None)


def decode_state(data: bytes, restore_dtype: bool = True) -> dict[str, np.ndarray]:
    """Parse safetensors bytes into numpy arrays; ProtocolError('bad-payload') if they are not."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        arrays = load(bytes(data))
        meta = state_metadata(data)
    except (SafetensorError, ValueError, OverflowError) as exc:
        raise ProtocolError("bad-payload", f"not a safetensors state dict ({exc})") from None
    if restore_dtype and META_KEY in meta:
        try:
            cast = json.loads(meta[META_KEY])
            for name, dtype in cast.items():
                if name in arrays:
                    arrays[name] = arrays[name].astype(np.dtype(dtype))
        except (ValueError, TypeError) as exc:
            raise ProtocolError("bad-payload", f"invalid dtype metadata ({exc})") from None
    return arrays


def state_metadata(data: bytes) -> dict[str, str]:
    """The safetensors ``__metadata__`` block (empty if none)."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("header length beyond the end")
    header = json.loads(bytes(data[8 : 8 + n]))
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}
