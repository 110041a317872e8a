"""The wire's cryptography, all from ``cryptography``, with library errors mapped to ProtocolError here.

Scheme (see wire/PROTOCOL.md):
- Each message gets a fresh random 256-bit content key. Its chunks are sealed with AES-256-GCM under
  that key, nonce = chunk index (unique because the key is never reused), associated data = the
  signed header plus the chunk index and final flag (truncation, reordering and splicing fail).
- The content key is wrapped for each recipient with HPKE base mode (RFC 9180), KEM the
  federation's (``neurofed.wire.kem``: DHKEM-X25519 by default, or the hybrid ML-KEM-768+X25519)
  / HKDF-SHA256 / AES-256-GCM, ``info`` binding federation, round, message id, sender and recipient.
  Site -> coordinator: one recipient (the coordinator). Coordinator -> sites: one wrap per site.
- The sender signs with Ed25519 a SHA-256 digest of the header, which holds the SHA-256 digest of the
  whole plaintext; GCM tags alone would not do, since every recipient of a broadcast holds the key.

Why not HPKE one-shot for the bulk: it was several times slower than bare AES-GCM on 19 MB here
(benchmarks/crypto.py measures it), and it takes no associated data per chunk. HPKE wraps 32 bytes;
AES-GCM carries the bulk, so sealing costs one AES-GCM pass plus one SHA-256 pass, the lower bound.
"""

from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from neurofed.wire import kem as kems
from neurofed.wire.errors import ProtocolError

SUITE = kems.SUITES[kems.X25519]
KEY_LEN = 32
TAG_LEN = 16
WRAPPED_LEN = 32 + KEY_LEN + TAG_LEN  # HPKE: encapsulated key + sealed content key
SIG_LEN = 64
SIG_CONTEXT = b"neurofed-sig/2\x00"
WRAP_CONTEXT = b"neurofed-wrap/2\x00"


def new_content_key() -> bytes:
    return os.urandom(KEY_LEN)


def wrap_info(federation: str, round: int, msg_id: str, sender: str, recipient: str, run: str = "") -> bytes:
    """HPKE ``info``: a wrapped key only opens for this federation run, message, round, sender and
    recipient."""
    return WRAP_CONTEXT + "\x00".join((federation, run, str(round), msg_id, sender, recipient)).encode()


def wrap_key(content_key: bytes, recipient: kems.PublicKey, info: bytes) -> bytes:
    """HPKE-seal ``content_key`` to ``recipient`` under the suite of the recipient key's KEM."""
    return kems.SUITES[kems.kem_of(recipient)].encrypt(content_key, recipient, info=info)


def unwrap_key(wrapped: bytes, private_key: kems.PrivateKey, info: bytes) -> bytes:
    """Open a wrapped content key with our key of the federation's KEM; ProtocolError
    ``bad-key-wrap`` when it does not open (another recipient, context or KEM, or altered)."""
    kem = kems.kem_of(private_key)
    if len(wrapped) != kems.wrapped_len(kem, KEY_LEN):
        raise ProtocolError(
            "bad-key-wrap",
            f"wrapped key is {len(wrapped)} bytes, a {kem} wrap is {kems.wrapped_len(kem, KEY_LEN)}",
        )
    try:
        key = kems.SUITES[kem].decrypt(wrapped, private_key, info=info)
    except (InvalidTag, ValueError, TypeError) as exc:
        raise ProtocolError(
            "bad-key-wrap", f"content key does not open for this recipient ({exc!r})"
        ) from None
    if len(key) != KEY_LEN:
        raise ProtocolError("bad-key-wrap", "content key has the wrong length")
    return key


# Composed alternative (X25519 + HKDF-SHA256 + AES-256-GCM by hand, as HPKE does internally);
# kept for benchmarks/crypto.py, which measures it against the one-shot HPKE call.
def composed_wrap(content_key: bytes, recipient: X25519PublicKey, info: bytes) -> bytes:
    eph = X25519PrivateKey.generate()
    enc = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    kek = HKDF(hashes.SHA256(), KEY_LEN, salt=enc, info=info).derive(eph.exchange(recipient))
    return enc + AESGCM(kek).encrypt(b"\x00" * 12, content_key, info)


def composed_unwrap(wrapped: bytes, private_key: X25519PrivateKey, info: bytes) -> bytes:
    try:
        enc, ct = wrapped[:32], wrapped[32:]
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(enc))
        kek = HKDF(hashes.SHA256(), KEY_LEN, salt=enc, info=info).derive(shared)
        return AESGCM(kek).decrypt(b"\x00" * 12, ct, info)
    except (InvalidTag, ValueError) as exc:
        raise ProtocolError("bad-key-wrap", repr(exc)) from None


def chunk_nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


def seal_chunk(aead: AESGCM, index: int, plaintext: bytes | memoryview, aad: bytes) -> bytes:
    return aead.encrypt(chunk_nonce(index), plaintext, aad)


def seal_chunk_into(
    aead: AESGCM, index: int, plaintext: bytes | memoryview, aad: bytes, out: memoryview
) -> None:
    """Encrypt chunk ``index`` straight into ``out`` (the plaintext's size plus ``TAG_LEN``), so
    the sender builds each frame in one buffer instead of joining a head to a ciphertext copy."""
    aead.encrypt_into(chunk_nonce(index), plaintext, aad, out)


def open_chunk_into(
    aead: AESGCM, index: int, ciphertext: bytes | memoryview, aad: bytes, out: memoryview
) -> None:
    """Decrypt and authenticate chunk ``index`` straight into ``out`` (exactly the plaintext's
    size): no per-chunk copy. A failed tag is ``tampered-chunk``."""
    try:
        aead.decrypt_into(chunk_nonce(index), ciphertext, aad, out)
    except (InvalidTag, ValueError):
        raise ProtocolError("tampered-chunk", f"chunk {index} fails authentication") from None


def header_digest(header_bytes: bytes) -> bytes:
    return hashlib.sha256(SIG_CONTEXT + header_bytes).digest()


def sign(private_key: Ed25519PrivateKey, header_bytes: bytes) -> bytes:
    """Sign the header (which carries the plaintext payload digest) through its SHA-256 digest."""
    return private_key.sign(header_digest(header_bytes))


def verify(public_key: Ed25519PublicKey, signature: bytes, header_bytes: bytes) -> None:
    try:
        public_key.verify(signature, header_digest(header_bytes))
    except (InvalidSignature, ValueError):
        raise ProtocolError("bad-signature", "Ed25519 signature does not verify") from None
