"""Shamir secret sharing of 32-byte secrets over the prime field GF(p), p = 2^256 + 297, with
python-flint's field arithmetic (FLINT's ``fmpz_mod``: polynomials, matrices, solving).

A secret (a self-mask seed, an X25519 private key) is read as a big-endian integer below 2^256 < p
and made the constant term of a polynomial of degree t - 1 whose other coefficients are uniform in
GF(p) (``secrets.randbelow``: the operating system's CSPRNG). Share i is the polynomial's value at
i (i = 1..n), 33 bytes big-endian. Any t shares give the polynomial back and its constant term is
the secret; t - 1 shares are uniform whatever the secret (information-theoretic hiding).
Reconstruction solves the Vandermonde system of the shares' indices with FLINT's linear algebra
over GF(p); no field arithmetic is written here.

Why FLINT rather than pycryptodome's ``Crypto.Protocol.SecretSharing``: pycryptodome multiplies
in GF(2^128) bit by bit in Python and takes 16-byte secrets (a 32-byte secret is two sharings),
so one 32-byte reconstruction cost ~5 ms and the coordinator's unmasking of ten sites ~50 ms on
the benchmark machine; FLINT does both in C, ~30 us a secret (``benchmarks/secagg_core.py``).
Neither runs in constant time; shares are only handled on the parties' own machines.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from flint import fmpz_mod_ctx, fmpz_mod_mat, fmpz_mod_poly_ctx

PRIME = 2**256 + 297  # the smallest prime above 2^256: every 32-byte secret is a field element
SECRET_LEN = 32
SHARE_LEN = 33  # a field element, big-endian
MAX_INDEX = 0xFFFF
_FIELD = fmpz_mod_ctx(PRIME)
_POLYS = fmpz_mod_poly_ctx(_FIELD)


def split_secret(secret: bytes, t: int, n: int) -> list[tuple[int, bytes]]:
    """``n`` shares ``(index, 33 bytes)`` with indices 1..n, any ``t`` of which reconstruct."""
    if len(secret) != SECRET_LEN:
        raise ValueError(f"secret must be {SECRET_LEN} bytes")
    if not 2 <= t <= n <= MAX_INDEX:
        raise ValueError(f"need 2 <= t <= n <= {MAX_INDEX}, got t={t}, n={n}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    poly = _POLYS(coefficients)
    return [(i, int(poly(i)).to_bytes(SHARE_LEN, "big")) for i in range(1, n + 1)]


def is_share(value: bytes) -> bool:
    """True when ``value`` encodes a field element (33 bytes, below p): what a share must be."""
    return len(value) == SHARE_LEN and int.from_bytes(value, "big") < PRIME


def combine_secret(shares: Sequence[tuple[int, bytes]]) -> bytes:
    """The secret from at least t shares with distinct indices (more are fine). Fewer, or shares
    of different secrets, give garbage, which the caller detects against a commitment or public
    key; garbage that is not even a 32-byte value raises ``ValueError``, as do malformed shares."""
    if not shares or len({i for i, _ in shares}) != len(shares):
        raise ValueError("shares must have distinct indices")
    if any(not is_share(s) or not 1 <= i <= MAX_INDEX for i, s in shares):
        raise ValueError("malformed share")
    vandermonde = fmpz_mod_mat([[i**j for j in range(len(shares))] for i, _ in shares], _FIELD)
    values = fmpz_mod_mat([[int.from_bytes(s, "big")] for _, s in shares], _FIELD)
    secret = int(vandermonde.solve(values)[0, 0])
    if secret >> (8 * SECRET_LEN):
        raise ValueError("the shares do not reconstruct a 32-byte secret")
    return secret.to_bytes(SECRET_LEN, "big")
