"""Keys and pseudo-random streams of secure aggregation: HKDF-SHA256 and AES-256-CTR, from ``cryptography``.

Every mask is the AES-256-CTR keystream (the encryption of zeros; 256-bit key, 128-bit counter
block from 0: each key is used for one stream only) of a key derived with HKDF-SHA256 from a 32-byte
secret (a self-mask seed, an X25519 shared secret, a rounding seed) with ``info`` naming the
federation, run, round, attempt, purpose and both parties (``RoundContext.info``). The keystream
is read as little-endian ring words and added to (or subtracted from) a vector in place, a block
at a time, so no second model-sized buffer is needed. Nothing here uses numpy's or Python's
``random``: numpy only adds the words.

AES-256-CTR rather than ChaCha20 (both are sound PRGs here): with the AES instructions every
x86-64 server and ARMv8 board with the crypto extension has, OpenSSL's AES-CTR makes the masks'
keystream ~1.6x faster than its ChaCha20 (8.3 against 5.2 GB/s on the benchmark machine), and the
mask step is most of a site's protocol work. A stream is 16*2^128 bytes long before its counter
wraps; a model's mask uses a few megabytes of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from neurofed.wire.secagg.params import SecAggConfig

KEY_LEN = 32
BLOCK_WORDS = 1 << 15  # keystream words read at a time: in cache, and few Python round trips
_ZEROS = bytes(BLOCK_WORDS * 8)
_IV = bytes(16)  # the first counter block; every key serves one stream, so a fixed start is safe


def derive_key(secret: bytes, info: bytes) -> bytes:
    """A 256-bit key for one purpose (HKDF-SHA256, no salt: the secrets are uniform or DH outputs)."""
    return HKDF(hashes.SHA256(), KEY_LEN, salt=None, info=info).derive(secret)


def _encryptor(key: bytes):
    if len(key) != KEY_LEN:
        raise ValueError("the mask PRG needs a 256-bit key")
    return Cipher(algorithms.AES(key), modes.CTR(_IV)).encryptor()


class Keystream:
    """One key's keystream as ring words, read in order, a block at a time."""

    def __init__(self, key: bytes, dtype: np.dtype | str) -> None:
        self.dtype = np.dtype(dtype)
        self._enc = _encryptor(key)
        self._buf = bytearray(BLOCK_WORDS * self.dtype.itemsize)
        self._words = np.frombuffer(self._buf, dtype=self.dtype)

    def read(self, count: int) -> np.ndarray:
        """The next ``count`` (at most ``BLOCK_WORDS``) words: a view valid until the next read."""
        if count > BLOCK_WORDS:
            raise ValueError("read at most BLOCK_WORDS words at a time")
        nbytes = count * self.dtype.itemsize
        self._enc.update_into(memoryview(_ZEROS)[:nbytes], memoryview(self._buf)[:nbytes])
        return self._words[:count]


class Streams:
    """Several keystreams read side by side, one block of the vector at a time.

    ``add_block(acc, start, stop)`` adds each key's words ``start..stop`` (times its sign) to
    ``acc[start:stop]``: walking the vector block by block with every stream open keeps the block
    in cache while all masks go on it, instead of one pass over the whole vector per mask. The
    sum is the same ring element as adding the streams one after the other (addition in Z_2^b
    commutes), so a site or coordinator may use either. Blocks must come in order, from 0."""

    def __init__(self, keys: Sequence[tuple[bytes, int]], dtype: np.dtype) -> None:
        self._streams = [(Keystream(key, dtype), np.add if sign > 0 else np.subtract) for key, sign in keys]
        self._at = 0

    def add_block(self, acc: np.ndarray, start: int, stop: int) -> None:
        if start != self._at or stop - start > BLOCK_WORDS:
            raise ValueError("blocks must come in order and hold at most BLOCK_WORDS words")
        part = acc[start:stop]
        for stream, op in self._streams:
            op(part, stream.read(stop - start), out=part)
        self._at = stop


def apply_streams(acc: np.ndarray, keys: Sequence[tuple[bytes, int]]) -> None:
    """``acc += sum(sign * PRG(key))`` over ``keys`` ((key, sign) pairs), in place, in the ring
    of acc's unsigned dtype (wraps), block by block (``Streams``): one pass for every key."""
    if acc.dtype.kind != "u" or not acc.flags.c_contiguous or acc.ndim != 1:
        raise ValueError("apply_streams needs a contiguous 1-D unsigned array")
    streams = Streams(keys, acc.dtype)
    for start in range(0, acc.size, BLOCK_WORDS):
        streams.add_block(acc, start, min(acc.size, start + BLOCK_WORDS))


def apply_stream(acc: np.ndarray, key: bytes, sign: int) -> None:
    """``acc += sign * PRG(key)`` in the ring of acc's unsigned dtype (wraps), in place."""
    apply_streams(acc, [(key, sign)])


def stream_words(key: bytes, count: int, dtype: np.dtype | str = "<u4") -> np.ndarray:
    """``count`` keystream words of ``dtype`` (a fresh, writable array)."""
    out = np.zeros(count, dtype=np.dtype(dtype))
    apply_stream(out, key, +1)
    return out


# --- the keys of one attempt (the site and the coordinator derive them alike) ------------------


def self_mask_key(config: SecAggConfig, site: str, seed: bytes) -> bytes:
    """Key of ``site``'s self mask, from its 32-byte self-mask seed."""
    return derive_key(seed, config.context.info("self-mask", site, config.digest))


def pair_mask_key(config: SecAggConfig, a: str, b: str, shared: bytes) -> bytes:
    """Key of the pairwise mask of ``a`` and ``b``, from their X25519 shared secret (same for both)."""
    lo, hi = sorted((a, b))
    return derive_key(shared, config.context.info("pair-mask", lo, hi, config.digest))


def pair_sign(site: str, peer: str) -> int:
    """``site`` adds the pairwise mask with ``peer`` when its id sorts first, else subtracts it."""
    return 1 if site < peer else -1


def coin_key(config: SecAggConfig, site: str, seed: bytes) -> bytes:
    """Key of ``site``'s stochastic-rounding coins, from its (persisted) rounding seed."""
    return derive_key(seed, config.context.info("rounding", site, config.digest))
