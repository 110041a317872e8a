"""A site's masked input in one pass: clip, quantize, weight and mask its update block by block.

The steps are those of ``quantize`` (clip to the L2 bound, scale, stochastic rounding with PRG
coins, times the case weight, two's complement into Z_2^b) followed by the self mask and one
pairwise mask per neighbour (``prg``). Done one after the other over a whole model they cost a pass
over the vector each (a dozen and more for ten sites); here every step and every mask goes on one
block of 2^15 words while it sits in cache. The result is the same ring vector, word for word, as
the steps done apart (the tests check it against ``quantize`` and ``prg.apply_stream``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from neurofed.wire.secagg.prg import BLOCK_WORDS, Keystream, Streams

_TWO32 = 4294967296.0


def l2_norm(vec: np.ndarray) -> float:
    """The L2 norm of ``vec``, summed in float64 a block at a time (no model-sized copy)."""
    flat = vec.reshape(-1)
    total = 0.0
    for start in range(0, flat.size, BLOCK_WORDS):
        part = flat[start : start + BLOCK_WORDS].astype(np.float64)
        total += float(np.dot(part, part))
    return math.sqrt(total)


def clip_factor(norm: float, clip: float) -> float:
    """What scales an update of L2 norm ``norm`` down to ``clip`` (1 when it is within)."""
    if not math.isfinite(norm):
        raise ValueError("update has non-finite values")
    return clip / norm if norm > clip else 1.0


def masked_ring(
    vec: np.ndarray,
    *,
    factor: float,
    scale: float,
    weight: int,
    coin_key: bytes,
    dtype: np.dtype,
    masks: Sequence[tuple[bytes, int]],
    tail: Sequence[int] = (),
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """``weight * round(vec * factor * scale)`` (stochastic rounding, coins from ``coin_key``),
    then ``tail`` (integers, unweighted), plus ``noise`` (int64, one per word) and every mask in
    ``masks`` ((key, sign) pairs), as words of the ring ``dtype``."""
    flat = vec.reshape(-1)
    m = flat.size
    n = m + len(tail)
    if noise is not None and noise.shape != (n,):
        raise ValueError(f"noise must have {n} values")
    dtype = np.dtype(dtype)
    ring = np.empty(n, dtype=dtype)
    coins = Keystream(coin_key, "<u4")
    streams = Streams(masks, dtype)
    tail_words = np.asarray(tail, dtype=np.int64)
    for start in range(0, n, BLOCK_WORDS):
        stop = min(n, start + BLOCK_WORDS)
        q = np.empty(stop - start, dtype=np.int64)
        upd = min(stop, m) - start  # words of the update in this block; the rest is the tail
        if upd > 0:
            seg = flat[start : start + upd].astype(np.float64)
            if factor != 1.0:
                seg *= factor
            seg *= scale
            fl = np.floor(seg)
            np.subtract(seg, fl, out=seg)
            np.multiply(seg, _TWO32, out=seg)  # fractional part in units of 2^-32, in [0, 2^32)
            head = q[:upd]
            head[:] = fl
            head += coins.read(upd) < seg  # uint32 against float64: numpy compares exactly
            head *= np.int64(weight)
        if stop > m:
            q[max(0, m - start) :] = tail_words[max(0, start - m) : stop - m]
        if noise is not None:
            q += noise[start:stop]
        ring[start:stop] = q.view(np.uint64)  # two's complement, truncated to the ring's width
        streams.add_block(ring, start, stop)
    return ring
