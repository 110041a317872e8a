"""Compressed model and update payloads: 8-bit deltas, optionally top-k sparse (pure numpy).

Both ends of the wire use these functions, so what a site reconstructs is byte for byte what the
coordinator computed (``apply_delta`` is the only way either side turns a delta into weights).

A delta payload is a safetensors file. For each floating tensor ``<name>`` of the model:

- ``q/<name>``: int8 codes of the kept values (all of them, or the top-k by magnitude),
- ``s/<name>``: float32 scales, one per block of ``BLOCK`` consecutive kept values
  (value = code * scale; scale = max |value| / 127 over the block, nearest rounding),
- ``m/<name>`` (top-k only): the kept positions as a bit mask over the flattened tensor
  (``numpy.packbits``, big-endian bit order).

Other tensors (integer counters) travel as ``raw/<name>``, their value, not a change. The metadata
key ``neurofed.compression`` holds ``{"codec", "block", "tensors": {name: shape}}``.

Bytes against fp32: ``int8`` about 0.25x; ``int8-topk`` at density d about (1/8 + d) / 4
(0.056x at d = 0.1). Rounding and dropped values are not lost: the sender keeps them as an error
feedback residual and adds it to its next delta (the site in its round state; the coordinator by
computing each broadcast delta against the model the sites reconstructed).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping

import numpy as np

from neurofed.wire.errors import ProtocolError

COMPRESSIONS = ("none", "fp16", "int8", "int8-topk")
"""``--compression`` values: ``none`` fp32 models and full-weight updates; ``fp16`` half-precision
models and fp16 update deltas (``--fp16``); ``int8`` 8-bit deltas both ways with error feedback;
``int8-topk`` the same, keeping only the largest ``topk_density`` share of each tensor's values."""
DELTA_CODECS = ("int8", "int8-topk")
ENCODING = {"int8": "int8-delta", "int8-topk": "int8-topk-delta"}
"""The UPDATE/MODEL ``encoding`` each delta codec travels as."""
CODEC_OF = {v: k for k, v in ENCODING.items()}
MODEL_FULL = "full"  # a MODEL whose payload is the whole (fp32) model
META_KEY = "neurofed.compression"
BLOCK = 2048
DEFAULT_DENSITY = 0.1
DENSE_BELOW = 1024  # tensors this small (biases, norms) are sent whole even under top-k


def _bad(detail: str) -> ProtocolError:
    return ProtocolError("bad-payload", detail)


def _float(arr: np.ndarray) -> bool:
    return arr.dtype.kind == "f"


def quantize(values: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes, float32 scale per block) of a 1-d float32 array, nearest rounding."""
    n = values.size
    blocks = max(1, math.ceil(n / block))
    padded = np.zeros(blocks * block, dtype=np.float32)
    padded[:n] = values
    padded = padded.reshape(blocks, block)
    scale = (np.abs(padded).max(axis=1) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    codes = np.rint(padded / safe[:, None])
    np.clip(codes, -127, 127, out=codes)
    return codes.astype(np.int8).reshape(-1)[:n], scale


def dequantize(codes: np.ndarray, scale: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """float32 values of ``quantize``'s output."""
    n = codes.size
    out = codes.astype(np.float32)
    if n:
        out *= np.repeat(scale, block)[:n]
    return out


def top_k_mask(values: np.ndarray, density: float) -> np.ndarray:
    """Bool mask of the ``ceil(density * n)`` largest magnitudes of a 1-d array."""
    n = values.size
    k = min(n, max(1, math.ceil(density * n)))
    mask = np.zeros(n, dtype=bool)
    if k == n:
        mask[:] = True
    else:
        mask[np.argpartition(np.abs(values), n - k)[n - k :]] = True
    return mask


def encode_delta(
    delta: Mapping[str, np.ndarray], codec: str, *, density: float = DEFAULT_DENSITY, block: int = BLOCK
) -> bytes:
    """Safetensors bytes of ``delta`` (float tensors: changes; others: values) under ``codec``."""
    from safetensors.numpy import save

    if codec not in DELTA_CODECS:
        raise ValueError(f"not a delta codec: {codec!r} (one of {', '.join(DELTA_CODECS)})")
    if not 0 < density <= 1:
        raise ValueError(f"top-k density must be in (0, 1], got {density}")
    arrays: dict[str, np.ndarray] = {}
    shapes: dict[str, list[int]] = {}
    for name in sorted(delta):
        arr = np.asarray(delta[name])
        if not _float(arr):
            arrays[f"raw/{name}"] = np.ascontiguousarray(arr)
            continue
        flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
        shapes[name] = list(arr.shape)
        if codec == "int8-topk" and flat.size >= DENSE_BELOW:
            mask = top_k_mask(flat, density)
            arrays[f"m/{name}"] = np.packbits(mask)
            flat = flat[mask]
        arrays[f"q/{name}"], arrays[f"s/{name}"] = quantize(flat, block)
    meta = {META_KEY: json.dumps({"codec": codec, "block": block, "tensors": shapes}, sort_keys=True)}
    return save(arrays, metadata=meta)


def decode_delta(payload: bytes | memoryview, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Dense changes (float tensors, in ``reference``'s dtype) and values (other tensors) of a
    delta payload; ``ProtocolError('bad-payload')`` unless it fits ``reference`` exactly."""
    from neurofed.wire.payload import state_metadata, view_state

    try:
        arrays = view_state(payload)
        meta = json.loads(state_metadata(payload).get(META_KEY, "null"))
    except (ValueError, TypeError, RecursionError) as exc:
        raise _bad(f"not a compressed delta ({exc})") from None
    if not isinstance(meta, dict) or meta.get("codec") not in DELTA_CODECS:
        raise _bad("no neurofed.compression metadata naming a delta codec")
    block, shapes = meta.get("block"), meta.get("tensors")
    if not (isinstance(block, int) and 1 <= block <= 1 << 24 and isinstance(shapes, dict)):
        raise _bad("bad block size or tensor list in the compression metadata")
    out: dict[str, np.ndarray] = {}
    used = set()
    for name, ref in reference.items():
        if not _float(ref):
            raw = arrays.get(f"raw/{name}")
            if raw is None:
                raise _bad(f"{name}: missing")
            used.add(f"raw/{name}")
            out[name] = raw
            continue
        if list(ref.shape) != shapes.get(name):
            raise _bad(f"{name}: shape {shapes.get(name)} in the payload, {list(ref.shape)} in the model")
        codes, scale = arrays.get(f"q/{name}"), arrays.get(f"s/{name}")
        if codes is None or scale is None or codes.dtype != np.int8 or scale.dtype != np.float32:
            raise _bad(f"{name}: codes (int8) or scales (float32) missing")
        n = int(np.prod(ref.shape, dtype=np.int64))
        mask_bits = arrays.get(f"m/{name}")
        used.update({f"q/{name}", f"s/{name}"})
        if codes.ndim != 1 or scale.ndim != 1 or scale.size != max(1, math.ceil(codes.size / block)):
            raise _bad(f"{name}: {codes.size} codes do not fit {scale.size} scales of block {block}")
        if not np.isfinite(scale).all() or (scale < 0).any():
            raise _bad(f"{name}: scales must be finite and not negative")
        if mask_bits is not None:
            used.add(f"m/{name}")
        dense = _scatter(name, dequantize(codes, scale, block), mask_bits, n)
        out[name] = dense.reshape(ref.shape).astype(ref.dtype, copy=False)
    extra = sorted(set(arrays) - used)
    if extra:
        raise _bad(f"{len(extra)} tensors not in the model, e.g. {extra[:3]}")
    return out


def _scatter(name: str, values: np.ndarray, mask_bits: np.ndarray | None, n: int) -> np.ndarray:
    """The ``n`` dense values: ``values`` themselves, or put where a top-k mask says."""
    if mask_bits is None:
        if values.size != n:
            raise _bad(f"{name}: {values.size} codes for {n} values")
        return values
    if mask_bits.dtype != np.uint8 or mask_bits.shape != (math.ceil(n / 8),):
        raise _bad(f"{name}: the top-k mask does not fit {n} values")
    mask = np.unpackbits(mask_bits, count=n).astype(bool)
    if int(mask.sum()) != values.size:
        raise _bad(f"{name}: the mask keeps {int(mask.sum())} values, {values.size} codes sent")
    dense = np.zeros(n, dtype=np.float32)
    dense[mask] = values
    return dense


def apply_delta(base: Mapping[str, np.ndarray], payload: bytes | memoryview) -> dict[str, np.ndarray]:
    """The model a receiver reconstructs: ``base`` plus the payload's changes (float tensors),
    the payload's values (others). Coordinator and sites both call this, so they agree to the
    byte."""
    delta = decode_delta(payload, base)
    return {
        name: (
            np.add(base[name], delta[name], dtype=base[name].dtype)
            if _float(base[name])
            else delta[name].copy()
        )
        for name in sorted(base)
    }


def compress(
    delta: Mapping[str, np.ndarray], codec: str, *, density: float = DEFAULT_DENSITY
) -> tuple[bytes, dict[str, np.ndarray]]:
    """(payload, residual): the residual is what the payload did not carry (``delta`` minus its
    decoded value, float tensors only), the error feedback for the sender's next delta."""
    payload = encode_delta(delta, codec, density=density)
    sent = decode_delta(payload, delta)
    residual = {
        k: np.subtract(v, sent[k], dtype=np.float32) for k, v in delta.items() if _float(np.asarray(v))
    }
    return payload, residual


def to_numpy(state: Mapping[str, object]) -> dict[str, np.ndarray]:
    """numpy arrays of a state dict of numpy arrays or torch tensors (torch not imported here)."""
    from neurofed.wire.payload import _to_numpy

    return {k: _to_numpy(k, v) for k, v in state.items()}


def canonical(weights: Mapping[str, np.ndarray]) -> bytes:
    """The fp32 safetensors bytes a reconstructed model is named by (its digest) and sent whole as."""
    from neurofed.wire.payload import encode_state

    return encode_state({k: weights[k] for k in sorted(weights)})


def digest(weights: Mapping[str, np.ndarray]) -> str:
    return hashlib.sha256(canonical(weights)).hexdigest()
