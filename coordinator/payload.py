"""Weights <-> bytes for MODEL and UPDATE messages: the wire's safetensors codec (never pickle).

A seam over ``neurofed.wire.payload`` so the coordinator and the edge agent share one codec, plus the
digest that ties a task to its model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np


def encode(weights: Mapping[str, Any], *, fp16: bool = False) -> bytes:
    from neurofed.wire.payload import encode_state

    return encode_state(dict(weights), fp16=fp16)


def decode(payload: bytes | memoryview, copy: bool = True) -> dict[str, np.ndarray]:
    """``copy=False``: read-only views into ``payload`` (an update checked and folded in, never
    kept, need not exist twice in memory)."""
    from neurofed.wire.payload import decode_state

    return decode_state(payload, copy=copy)


def digest(payload: bytes | memoryview) -> str:
    return hashlib.sha256(payload).hexdigest()
