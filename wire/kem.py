"""The federation's key-encapsulation mechanism (KEM): which HPKE suite seals content keys.

A federation chooses its KEM once, at provisioning, and the CA-signed roster records it:

- ``x25519`` (the default): DHKEM(X25519, HKDF-SHA256), RFC 9180. Small (32-byte encapsulated key)
  and fast, but a quantum computer able to run Shor's algorithm breaks X25519, so an adversary who
  records sealed updates today could open them then ("harvest now, decrypt later").
- ``mlkem768-x25519``: the hybrid ML-KEM-768 + X25519 KEM (X-Wing, HPKE KEM id 0x647a) that
  ``cryptography`` 50 offers. A wrapped key opens only for someone who breaks both ML-KEM-768
  (FIPS 203, believed to resist quantum computers) and X25519, so it is no weaker than today's
  suite and resists harvest-now-decrypt-later. It costs 1,120 bytes of encapsulated key per
  recipient (instead of 32) and a 1,216-byte public key per participant in the roster.

Both use HKDF-SHA256 and AES-256-GCM. HPKE puts the KEM id into its key schedule, so a key
wrapped under one suite never opens under the other; the signed header names the KEM as well,
so a receiver refuses a message sealed with another KEM than its roster's with that reason
(``wrong-kem``) rather than a bare failed wrap.

The hybrid private key is kept as two PKCS#8 PEM blocks in ``kem.key`` (the ML-KEM-768 seed key,
then its own X25519 key: not the one in ``enc.key``, so no key serves two KEMs); the public key in
the roster is the raw ML-KEM-768 public key (1,184 bytes) followed by the raw X25519 one (32).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

X25519 = "x25519"
MLKEM768_X25519 = "mlkem768-x25519"
KEMS = (X25519, MLKEM768_X25519)
DEFAULT = X25519

MLKEM768_PUBLIC_LEN = 1184
HYBRID_PUBLIC_LEN = MLKEM768_PUBLIC_LEN + 32

SUITES = {
    X25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    MLKEM768_X25519: hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}
ENC_LEN = {X25519: hpke.KEM.X25519.enc_length(), MLKEM768_X25519: hpke.KEM.MLKEM768_X25519.enc_length()}

PublicKey = X25519PublicKey | hpke.MLKEM768X25519PublicKey
PrivateKey = X25519PrivateKey | hpke.MLKEM768X25519PrivateKey

_PEM_END = b"-----END PRIVATE KEY-----"


def check_kem(kem: str, where: str = "KEM") -> str:
    """``kem`` if it is one this node speaks; ValueError naming the choices otherwise."""
    if kem not in KEMS:
        raise ValueError(f"{where} {kem!r} is not one of {', '.join(KEMS)}")
    return kem


def kem_of(key: PublicKey | PrivateKey) -> str:
    """The KEM a public or private key belongs to."""
    if isinstance(key, (hpke.MLKEM768X25519PublicKey, hpke.MLKEM768X25519PrivateKey)):
        return MLKEM768_X25519
    if isinstance(key, (X25519PublicKey, X25519PrivateKey)):
        return X25519
    raise TypeError(f"{type(key).__name__} is not a key of a neurofed KEM")


def wrapped_len(kem: str, plaintext_len: int = 32) -> int:
    """Bytes of one HPKE ciphertext of ``plaintext_len`` bytes: encapsulated key + sealed + tag."""
    return ENC_LEN[kem] + plaintext_len + 16


class HybridKeyPair:
    """An ML-KEM-768 + X25519 key pair whose parts can be written out (HPKE's key object keeps
    them opaque)."""

    def __init__(self, mlkem: MLKEM768PrivateKey, x25519: X25519PrivateKey) -> None:
        self.mlkem, self.x25519 = mlkem, x25519

    @classmethod
    def generate(cls) -> HybridKeyPair:
        return cls(MLKEM768PrivateKey.generate(), X25519PrivateKey.generate())

    def private_key(self) -> hpke.MLKEM768X25519PrivateKey:
        return hpke.MLKEM768X25519PrivateKey(self.mlkem, self.x25519)

    def public_bytes(self) -> bytes:
        return self.mlkem.public_key().public_bytes_raw() + self.x25519.public_key().public_bytes_raw()

    def to_pem(self) -> bytes:
        """Two PKCS#8 PEM blocks, ML-KEM-768 first (the ``kem.key`` file)."""
        args = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        return self.mlkem.private_bytes(*args) + self.x25519.private_bytes(*args)

    @classmethod
    def from_pem(cls, data: bytes) -> HybridKeyPair:
        """Parse ``to_pem`` output; ValueError if it is not an ML-KEM-768 and an X25519 key."""
        blocks = [b + _PEM_END for b in data.split(_PEM_END) if b.strip()]
        if len(blocks) != 2:
            raise ValueError(f"expected 2 PEM private keys, found {len(blocks)}")
        mlkem = serialization.load_pem_private_key(blocks[0].strip(), None)
        x = serialization.load_pem_private_key(blocks[1].strip(), None)
        if not isinstance(mlkem, MLKEM768PrivateKey) or not isinstance(x, X25519PrivateKey):
            raise ValueError("expected an ML-KEM-768 private key followed by an X25519 private key")
        return cls(mlkem, x)

    @classmethod
    def from_raw(cls, data: bytes) -> HybridKeyPair:
        """From ``raw()``: the 64-byte ML-KEM-768 seed and the 32-byte X25519 private key."""
        if len(data) != 96:
            raise ValueError(f"a hybrid private key is 96 raw bytes, got {len(data)}")
        return cls(
            MLKEM768PrivateKey.from_seed_bytes(data[:64]), X25519PrivateKey.from_private_bytes(data[64:])
        )

    def raw(self) -> bytes:
        return self.mlkem.private_bytes_raw() + self.x25519.private_bytes_raw()


def hybrid_public_key(data: bytes) -> hpke.MLKEM768X25519PublicKey:
    """The HPKE public key from its raw roster form (ML-KEM-768 public key || X25519 public key)."""
    if len(data) != HYBRID_PUBLIC_LEN:
        raise ValueError(f"an ML-KEM-768+X25519 public key is {HYBRID_PUBLIC_LEN} bytes, got {len(data)}")
    return hpke.MLKEM768X25519PublicKey(
        MLKEM768PublicKey.from_public_bytes(data[:MLKEM768_PUBLIC_LEN]),
        X25519PublicKey.from_public_bytes(data[MLKEM768_PUBLIC_LEN:]),
    )
