"""Shamir secret sharing of 32-byte secrets with pycryptodome (``Crypto.Protocol.SecretSharing``).

pycryptodome shares 16-byte secrets over GF(2^128); a 32-byte secret (a self-mask seed, an X25519
private key) is shared as its two 16-byte halves, each under its own random polynomial but at the
same indices, and a share is the two 16-byte halves side by side. Any ``t`` shares give the secret
back; ``t - 1`` shares are independent of it (each half is information-theoretically hidden).
No field arithmetic is written here. The polynomials' coefficients come from pycryptodome's
``get_random_bytes`` (the operating system's CSPRNG).
"""

from __future__ import annotations

from collections.abc import Sequence

from Crypto.Protocol.SecretSharing import Shamir

SECRET_LEN = 32
SHARE_LEN = 32
_HALF = 16


def split_secret(secret: bytes, t: int, n: int) -> list[tuple[int, bytes]]:
    """``n`` shares ``(index, 32 bytes)`` with indices 1..n, any ``t`` of which reconstruct."""
    if len(secret) != SECRET_LEN:
        raise ValueError(f"secret must be {SECRET_LEN} bytes")
    if not 2 <= t <= n:
        raise ValueError(f"need 2 <= t <= n, got t={t}, n={n}")
    lo = Shamir.split(t, n, secret[:_HALF])
    hi = Shamir.split(t, n, secret[_HALF:])
    shares = []
    for (i, a), (j, b) in zip(lo, hi, strict=True):
        if i != j:  # pycryptodome numbers its shares 1..n; both halves must sit at one index
            raise RuntimeError("Shamir halves at different indices")
        shares.append((i, a + b))
    return shares


def combine_secret(shares: Sequence[tuple[int, bytes]]) -> bytes:
    """The secret from at least t shares with distinct indices (more are fine; fewer give garbage,
    which the caller detects against a commitment or public key)."""
    if len({i for i, _ in shares}) != len(shares) or not shares:
        raise ValueError("shares must have distinct indices")
    if any(len(s) != SHARE_LEN or not 1 <= i <= 0xFFFF for i, s in shares):
        raise ValueError("malformed share")
    lo = Shamir.combine([(i, s[:_HALF]) for i, s in shares])
    hi = Shamir.combine([(i, s[_HALF:]) for i, s in shares])
    return lo + hi
