"""Gaussian noise for differential privacy from a cryptographic source (ChaCha20 keyed from
``os.urandom``), for processes that do not load torch (the coordinator).

Why not numpy's generators: their state is predictable from outputs and their seeds are often
small; the noise that a guarantee rests on must be unknowable to anyone who sees the result.
Here the uniform variates are 53-bit fractions of ChaCha20 keystream words (``cryptography``),
and numpy only does the arithmetic of the Box-Muller transform. The samples are floating-point
Gaussians: the epsilon reported is that of the ideal Gaussian mechanism, and the low-order bits
of a float64 sample carry a trace of the value it was added to (Mironov 2012). docs/privacy.md
says what that means; under secure aggregation the noise is integer (Skellam) and has no such
trace.
"""

from __future__ import annotations

import math
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_CHUNK = 1 << 16  # Gaussians per keystream chunk (1 MiB of keystream)


class SecureGaussian:
    """A stream of N(0, 1) samples; a fresh 256-bit key from the operating system per stream."""

    def __init__(self, key: bytes | None = None) -> None:
        key = os.urandom(32) if key is None else key
        if len(key) != 32:
            raise ValueError("SecureGaussian needs a 256-bit key")
        self._enc = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def _uniform(self, n: int) -> np.ndarray:
        """n uniforms in (0, 1): 53 random bits each, offset by half a unit (never 0 or 1)."""
        words = np.frombuffer(self._enc.update(bytes(8 * n)), dtype="<u8")
        return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53

    def standard_normal(self, n: int) -> np.ndarray:
        """n independent N(0, 1) samples (float64), Box-Muller over pairs of uniforms."""
        out = np.empty(n, dtype=np.float64)
        for start in range(0, n, 2 * _CHUNK):
            m = min(2 * _CHUNK, n - start)
            half = (m + 1) // 2
            u1, u2 = self._uniform(half), self._uniform(half)
            r = np.sqrt(-2.0 * np.log(u1))
            theta = 2.0 * math.pi * u2
            pair = np.concatenate([r * np.cos(theta), r * np.sin(theta)])
            out[start : start + m] = pair[:m]
        return out

    def add_to(self, arr: np.ndarray, std: float) -> None:
        """``arr += N(0, std^2)`` element-wise, in place (float arrays)."""
        flat = arr.reshape(-1)
        for start in range(0, flat.size, 4 * _CHUNK):
            stop = min(flat.size, start + 4 * _CHUNK)
            flat[start:stop] += std * self.standard_normal(stop - start)
