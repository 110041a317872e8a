"""Weights <-> bytes for MODEL and UPDATE messages: the wire's safetensors codec (never pickle).

A seam over ``wire.payload`` so the coordinator and the edge agent share one codec, plus the
digest that ties a task to its model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np


def encode(weights: Mapping[str, Any], *, fp16: bool = False) -> bytes:
    from wire.payload import encode_state

    return encode_state(dict(weights), fp16=fp16)


def decode(payload: bytes) -> dict[str, np.ndarray]:
    from wire.payload import decode_state

    return decode_state(payload)


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()
