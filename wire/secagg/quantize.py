"""Clip, quantize with stochastic rounding, weight, and map to and from the ring Z_2^b.

These are the steps one at a time, as the protocol defines them: a site computes them together
with its masks in one pass (``masking.masked_ring``, checked against these in the tests); the
coordinator maps the unmasked sum back with ``from_ring``.

The stochastic rounding draws its coins from the masks' PRG (an AES-256-CTR keystream,
``prg.Keystream``) keyed by a per-attempt random seed that the site persists, so a restarted site
rounds exactly as before and re-sends byte-identical input. The coins are not secret, but they
must be unpredictable by others and reproducible by the site itself; numpy's generators are never
used. Rounding up happens with probability ``frac`` to within 2^-32 (32-bit coins), so the
rounding is unbiased to that precision and always moves a value by less than one unit. See
``params`` for the wrap bound.
"""

from __future__ import annotations

import numpy as np

from neurofed.wire.secagg.prg import BLOCK_WORDS, Keystream


def clip_l2(x: np.ndarray, clip: float) -> tuple[np.ndarray, float]:
    """``x`` (as float64) scaled down to L2 norm at most ``clip``; returns (clipped, original norm)."""
    v = np.array(x, dtype=np.float64).reshape(-1)  # always a fresh copy: callers scale it in place
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm):
        raise ValueError("update has non-finite values")
    if norm > clip:
        v *= clip / norm
    return v, norm


def stochastic_round(v: np.ndarray, coin_key: bytes) -> np.ndarray:
    """Round each value down or up (up with probability equal to its fractional part), as int64.
    Works a keystream block at a time (in cache) and overwrites ``v`` with scratch values."""
    q = np.empty(v.size, dtype=np.int64)
    coins = Keystream(coin_key, "<u4")
    for start in range(0, v.size, BLOCK_WORDS):
        stop = min(v.size, start + BLOCK_WORDS)
        seg = v[start:stop]
        fl = np.floor(seg)
        np.subtract(seg, fl, out=seg)
        np.multiply(seg, 4294967296.0, out=seg)  # fractional part in units of 2^-32, in [0, 2^32)
        out = q[start:stop]
        out[:] = fl
        out += coins.read(stop - start) < seg  # uint32 against float64: numpy compares exactly
    return q


def to_ring(q: np.ndarray, weight: int, dtype: np.dtype) -> np.ndarray:
    """``weight * q`` as ring elements (two's complement modulo 2^bits)."""
    w = q * np.int64(weight)
    r = w.view(np.uint64)
    return r.astype(dtype) if dtype.itemsize == 4 else r.astype(dtype, copy=False)


def from_ring(acc: np.ndarray) -> np.ndarray:
    """Ring elements back to signed integers (int64), centred on zero."""
    signed = np.dtype(f"<i{acc.dtype.itemsize}")
    return acc.view(signed).astype(np.int64)
