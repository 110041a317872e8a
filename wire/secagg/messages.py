"""The messages of secure aggregation, as bytes ready for the wire's sealed and signed envelopes.

Every message but MaskedInput is canonical JSON (sorted keys, no spaces, binary fields in base64)
and carries the config digest, so it only counts in the attempt it was made for. The wire already
seals each message to its recipient and signs it with the sender's identity; on top of that, key
sets and survivor-list echoes are signed by the sites themselves (they are relayed by the
coordinator, and other sites must check them), and share bundles are sealed end to end from site
to site (the coordinator relays them without being able to read them).

| message | from -> to | what |
|---|---|---|
| KeySet | site -> coordinator -> neighbours | two X25519 public keys (and, in a federation that seals with ``mlkem768-x25519``, a fresh ML-KEM-768+X25519 public key for the share bundles), a commitment to the self-mask seed, Ed25519 signature |
| share bundles | site -> coordinator -> each neighbour | ``{recipient: sealed}``: one sealed bundle per neighbour (``pack_bundles``) |
| MaskedInput | site -> coordinator | case weight, neighbours masked with, the masked vector (binary) |
| SurvivorList | coordinator -> survivors | who sent masked input |
| echo | survivor -> coordinator | 64-byte Ed25519 signature over the survivor list |
| UnmaskRequest | coordinator -> survivors | the survivor list and at least t echoes |
| Reveal | survivor -> coordinator | per neighbour one share: self-mask seed (survived) or mask key (dropped) |
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from neurofed.wire import kem as kems
from neurofed.wire.errors import ProtocolError
from neurofed.wire.secagg.params import DOMAIN, RoundContext, SecAggConfig
from neurofed.wire.secagg.prg import derive_key
from neurofed.wire.secagg.shamir import SHARE_LEN, is_share

KEYSET_FORMAT = "neurofed-secagg-keyset/1"
BUNDLE_FORMAT = "neurofed-secagg-shares/2"  # /2: shares are 33-byte GF(p) elements
SURVIVORS_FORMAT = "neurofed-secagg-survivors/1"
REQUEST_FORMAT = "neurofed-secagg-unmask/1"
REVEAL_FORMAT = "neurofed-secagg-reveal/2"
MASKED_MAGIC = b"NFSA1\x00"
NONCE_LEN = 12
SIG_LEN = 64

RosterKeys = Mapping[str, "Ed25519PublicKey | bytes"]


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def unb64(s: Any, length: int | None = None) -> bytes:
    b = base64.b64decode(s, validate=True)
    if length is not None and len(b) != length:
        raise ValueError(f"expected {length} bytes, got {len(b)}")
    return b


def canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _load(data: bytes, fmt: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, TypeError) as exc:
        raise ProtocolError("secagg-malformed", f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise ProtocolError("secagg-malformed", f"expected a {fmt} message")
    return doc


def share_bytes(s: Any) -> bytes:
    """A share from its base64 text: a field element (``shamir.is_share``), else ValueError."""
    value = unb64(s, SHARE_LEN)
    if not is_share(value):
        raise ValueError("a share is not an element of the sharing field")
    return value


def malformed(kind: str, exc: Exception) -> ProtocolError:
    return ProtocolError("secagg-malformed", f"{kind}: {exc!r}")


def signing_key(roster: RosterKeys, site: str) -> Ed25519PublicKey:
    key = roster.get(site)
    if key is None:
        raise ProtocolError("secagg-unknown-site", f"{site!r} is not in the roster")
    return key if isinstance(key, Ed25519PublicKey) else Ed25519PublicKey.from_public_bytes(key)


def raw_public(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return pub.public_bytes_raw()


def seed_commitment(config: SecAggConfig, site: str, seed: bytes) -> bytes:
    """SHA-256 commitment to a site's self-mask seed (hiding: the seed is 256 uniform bits), so the
    coordinator can tell a reconstructed seed from garbage made by a bad share."""
    return hashlib.sha256(config.context.info("seed-commit", site, config.digest) + seed).digest()


# --- key sets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeySet:
    """A site's public keys for one attempt, signed with its Ed25519 identity.

    The signed bytes name federation, run id, round, attempt, site and the config digest.
    """

    site: str
    context: RoundContext
    config_digest: bytes
    mask_key: bytes  # X25519 public key for pairwise mask agreement
    share_key: bytes  # X25519 public key that share bundles are sealed to
    seed_commit: bytes  # seed_commitment() of the self-mask seed
    signature: bytes = b""
    share_kem_key: bytes = b""  # ML-KEM-768+X25519 public key the bundles are also sealed to (PQ)

    def body(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": KEYSET_FORMAT,
            "site": self.site,
            "context": self.context.to_dict(),
            "config": self.config_digest.hex(),
            "mask_key": b64(self.mask_key),
            "share_key": b64(self.share_key),
            "seed_commit": b64(self.seed_commit),
        }
        if self.share_kem_key:
            d["share_kem_key"] = b64(self.share_kem_key)
        return d

    def signed_bytes(self) -> bytes:
        return DOMAIN + b"\x00keyset\x00" + canonical(self.body())

    def to_bytes(self) -> bytes:
        return canonical({**self.body(), "signature": b64(self.signature)})

    @classmethod
    def from_bytes(cls, data: bytes) -> KeySet:
        doc = _load(data, KEYSET_FORMAT)
        try:
            return cls(
                str(doc["site"]),
                RoundContext.from_dict(doc["context"]),
                bytes.fromhex(doc["config"]),
                unb64(doc["mask_key"], 32),
                unb64(doc["share_key"], 32),
                unb64(doc["seed_commit"], 32),
                unb64(doc["signature"], SIG_LEN),
                unb64(doc["share_kem_key"], kems.HYBRID_PUBLIC_LEN) if "share_kem_key" in doc else b"",
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise malformed("keyset", exc) from None

    def signed(self, identity: Ed25519PrivateKey) -> KeySet:
        return KeySet(**{**self.__dict__, "signature": identity.sign(self.signed_bytes())})

    def verify(self, config: SecAggConfig, roster: RosterKeys, sender: str | None = None) -> None:
        """Raise ProtocolError with a reason unless this key set is ``sender``'s, for this attempt,
        and signed by the identity the roster lists for it."""
        if sender is not None and sender != self.site:
            raise ProtocolError("secagg-wrong-sender", f"{sender!r} relayed a key set of {self.site!r}")
        if self.site not in config.participants:
            raise ProtocolError("secagg-not-participant", f"{self.site!r} is not asked to take part")
        if self.context != config.context:
            raise ProtocolError(
                "secagg-wrong-context", f"key set is for {self.context}, not {config.context}"
            )
        if self.config_digest != config.digest:
            raise ProtocolError("secagg-wrong-config", f"{self.site!r} signed another configuration")
        try:
            signing_key(roster, self.site).verify(self.signature, self.signed_bytes())
        except (InvalidSignature, ValueError):
            raise ProtocolError(
                "secagg-bad-keyset-signature", f"key set of {self.site!r} does not verify against the roster"
            ) from None
        if self.mask_key == self.share_key:
            raise ProtocolError("secagg-weak-key", f"{self.site!r} uses one key for both purposes")
        pq = config.kem == kems.MLKEM768_X25519
        if pq != bool(self.share_kem_key):
            raise ProtocolError(
                "secagg-wrong-kem",
                f"key set of {self.site!r} "
                + ("has no ML-KEM-768+X25519 share key" if pq else "carries a share key of another KEM")
                + f", but this round seals shares with {config.kem}",
            )


# --- share bundles -----------------------------------------------------------------------------


def _bundle_key(
    config: SecAggConfig, own: X25519PrivateKey, peer_public: bytes, sender: str, recipient: str
) -> tuple[bytes, bytes]:
    info = config.context.info("share-bundle", sender, recipient, config.digest)
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise ProtocolError("secagg-weak-key", "share key agreement gives a low-order point") from None
    return derive_key(shared, info), info


def seal_bundle(
    config: SecAggConfig,
    sender: str,
    recipient: str,
    own_share_key: X25519PrivateKey,
    recipient_share_key: bytes,
    index: int,
    seed_share: bytes,
    key_share: bytes,
    recipient_kem_key: bytes = b"",
) -> bytes:
    """Seal the sender's two shares for one neighbour: AES-256-GCM under HKDF(X25519(sender's
    share key, recipient's share key)), context and both ids as HKDF info and associated data.
    Only the recipient (or the sender) can open it, and it opens only in this attempt.

    When the round's KEM is ``mlkem768-x25519`` that ciphertext is sealed once more with HPKE to
    the recipient's fresh hybrid key (``recipient_kem_key``, from its signed key set), the same
    info: the inner layer authenticates the sender (static X25519 agreement), the outer one keeps
    the shares secret from whoever records the relayed bundles and later breaks X25519."""
    key, info = _bundle_key(config, own_share_key, recipient_share_key, sender, recipient)
    body = canonical(
        {
            "format": BUNDLE_FORMAT,
            "sender": sender,
            "recipient": recipient,
            "index": index,
            "seed_share": b64(seed_share),
            "key_share": b64(key_share),
        }
    )
    nonce = os.urandom(NONCE_LEN)
    inner = nonce + AESGCM(key).encrypt(nonce, body, info)
    if config.kem == kems.MLKEM768_X25519:
        return kems.SUITES[config.kem].encrypt(inner, kems.hybrid_public_key(recipient_kem_key), info=info)
    return inner


def open_bundle(
    config: SecAggConfig,
    sealed: bytes,
    sender: str,
    recipient: str,
    own_share_key: X25519PrivateKey,
    sender_share_key: bytes,
    own_kem_key: kems.HybridKeyPair | None = None,
) -> tuple[int, bytes, bytes]:
    """Open a bundle from ``sender``; return (index, seed share, key share) or raise ProtocolError.
    ``own_kem_key``: this attempt's hybrid key pair, when the round's KEM is ``mlkem768-x25519``."""
    key, info = _bundle_key(config, own_share_key, sender_share_key, sender, recipient)
    try:
        if config.kem == kems.MLKEM768_X25519:
            if own_kem_key is None:
                raise ProtocolError("secagg-wrong-kem", f"{recipient!r} holds no {config.kem} share key")
            sealed = kems.SUITES[config.kem].decrypt(sealed, own_kem_key.private_key(), info=info)
        body = AESGCM(key).decrypt(sealed[:NONCE_LEN], sealed[NONCE_LEN:], info)
    except (InvalidTag, ValueError):
        raise ProtocolError(
            "secagg-bad-share-bundle", f"bundle from {sender!r} does not open for {recipient!r}"
        ) from None
    doc = _load(body, BUNDLE_FORMAT)
    try:
        if doc["sender"] != sender or doc["recipient"] != recipient:
            raise ValueError("sender or recipient differ from the sealed context")
        return int(doc["index"]), share_bytes(doc["seed_share"]), share_bytes(doc["key_share"])
    except (KeyError, TypeError, ValueError) as exc:
        raise malformed("share bundle", exc) from None


def pack_bundles(bundles: Mapping[str, bytes]) -> bytes:
    """``{peer: sealed bundle}`` as bytes for one wire message (either direction)."""
    return canonical({"format": BUNDLE_FORMAT, "bundles": {p: b64(b) for p, b in sorted(bundles.items())}})


def unpack_bundles(data: bytes) -> dict[str, bytes]:
    doc = _load(data, BUNDLE_FORMAT)
    try:
        return {str(p): unb64(b) for p, b in doc["bundles"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise malformed("bundles", exc) from None


# --- masked input ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskedInput:
    """A site's masked, weighted, quantized update.

    Bytes: ``NFSA1\\0``, a 4-byte big-endian header length, the JSON header
    ``{site, config, weight, masked_with}``, then the vector as little-endian ring words.
    """

    site: str
    config_digest: bytes
    weight: int
    masked_with: tuple[str, ...]
    vector: np.ndarray

    def header(self) -> bytes:
        return canonical(
            {
                "site": self.site,
                "config": self.config_digest.hex(),
                "weight": self.weight,
                "masked_with": list(self.masked_with),
                "dtype": self.vector.dtype.str,
                "length": int(self.vector.size),
            }
        )

    def to_bytes(self) -> bytes:
        head = self.header()
        vec = np.ascontiguousarray(self.vector)
        return b"".join((MASKED_MAGIC, struct.pack(">I", len(head)), head, memoryview(vec).cast("B")))

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> MaskedInput:
        """Parse without copying the vector (a read-only view of ``data``)."""
        try:
            mv = memoryview(data)
            if bytes(mv[: len(MASKED_MAGIC)]) != MASKED_MAGIC:
                raise ValueError("not a masked input")
            (hlen,) = struct.unpack(">I", mv[len(MASKED_MAGIC) : len(MASKED_MAGIC) + 4])
            start = len(MASKED_MAGIC) + 4
            doc = json.loads(bytes(mv[start : start + hlen]))
            dtype = np.dtype(doc["dtype"])
            if dtype.str not in ("<u4", "<u8"):
                raise ValueError(f"ring dtype {dtype.str}")
            vec = np.frombuffer(mv[start + hlen :], dtype=dtype)
            if vec.size != int(doc["length"]):
                raise ValueError("vector length differs from its header")
            return cls(
                str(doc["site"]),
                bytes.fromhex(doc["config"]),
                int(doc["weight"]),
                tuple(str(s) for s in doc["masked_with"]),
                vec,
            )
        except (KeyError, TypeError, ValueError, struct.error) as exc:
            raise malformed("masked input", exc) from None


# --- survivor list, echoes, unmask request, reveal ---------------------------------------------


@dataclass(frozen=True)
class SurvivorList:
    """The coordinator's statement of whose masked input it holds (sorted ids)."""

    context: RoundContext
    config_digest: bytes
    survivors: tuple[str, ...]

    def to_bytes(self) -> bytes:
        return canonical(
            {
                "format": SURVIVORS_FORMAT,
                "context": self.context.to_dict(),
                "config": self.config_digest.hex(),
                "survivors": list(self.survivors),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SurvivorList:
        doc = _load(data, SURVIVORS_FORMAT)
        try:
            surv = tuple(str(s) for s in doc["survivors"])
            if list(surv) != sorted(set(surv)):
                raise ValueError("survivors must be sorted and distinct")
            return cls(RoundContext.from_dict(doc["context"]), bytes.fromhex(doc["config"]), surv)
        except (KeyError, TypeError, ValueError) as exc:
            raise malformed("survivor list", exc) from None

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(DOMAIN + b"\x00survivors\x00" + self.to_bytes()).digest()

    def echo_bytes(self) -> bytes:
        """What a survivor signs to echo this list (the consistency round)."""
        return DOMAIN + b"\x00echo\x00" + self.digest

    def check(self, config: SecAggConfig) -> None:
        if self.context != config.context or self.config_digest != config.digest:
            raise ProtocolError("secagg-wrong-context", "survivor list is for another attempt")
        if not set(self.survivors) <= set(config.participants):
            raise ProtocolError("secagg-not-participant", "survivor list names a site not asked")
        if len(self.survivors) < config.min_survivors:
            raise ProtocolError(
                "secagg-too-few-survivors",
                f"{len(self.survivors)} survivors; never unmask fewer than max(t, 3) = {config.min_survivors}",
            )


@dataclass(frozen=True)
class UnmaskRequest:
    """The survivor list with the echoes (``{site: signature}``) the coordinator collected."""

    survivor_list: bytes
    echoes: dict[str, bytes]

    def to_bytes(self) -> bytes:
        return canonical(
            {
                "format": REQUEST_FORMAT,
                "survivors": b64(self.survivor_list),
                "echoes": {s: b64(sig) for s, sig in sorted(self.echoes.items())},
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        doc = _load(data, REQUEST_FORMAT)
        try:
            echoes = {str(s): unb64(sig, SIG_LEN) for s, sig in doc["echoes"].items()}
            return cls(unb64(doc["survivors"]), echoes)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise malformed("unmask request", exc) from None


def verify_echoes(lst: SurvivorList, echoes: Mapping[str, bytes], roster: RosterKeys, t: int) -> set[str]:
    """The survivors whose echo of ``lst`` verifies; ProtocolError unless there are at least t."""
    good = set()
    for site, sig in echoes.items():
        if site not in lst.survivors:
            continue
        try:
            signing_key(roster, site).verify(sig, lst.echo_bytes())
        except (InvalidSignature, ValueError, ProtocolError):
            continue
        good.add(site)
    if len(good) < t:
        raise ProtocolError(
            "secagg-too-few-echoes",
            f"only {len(good)} survivors echoed this survivor list, threshold t={t}",
        )
    return good


@dataclass(frozen=True)
class Reveal:
    """A survivor's answer: per neighbour ``(index, 33-byte share)`` of either its self-mask seed
    (``seed_shares``: the neighbour survived) or its mask key (``key_shares``: it dropped)."""

    site: str
    survivors_digest: bytes
    seed_shares: dict[str, tuple[int, bytes]]
    key_shares: dict[str, tuple[int, bytes]]

    def to_bytes(self) -> bytes:
        def enc(d: Mapping[str, tuple[int, bytes]]) -> dict[str, list[Any]]:
            return {p: [i, b64(s)] for p, (i, s) in sorted(d.items())}

        return canonical(
            {
                "format": REVEAL_FORMAT,
                "site": self.site,
                "survivors": self.survivors_digest.hex(),
                "seed_shares": enc(self.seed_shares),
                "key_shares": enc(self.key_shares),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Reveal:
        doc = _load(data, REVEAL_FORMAT)
        try:

            def dec(d: Mapping[str, Any]) -> dict[str, tuple[int, bytes]]:
                return {str(p): (int(v[0]), share_bytes(v[1])) for p, v in d.items()}

            return cls(
                str(doc["site"]),
                bytes.fromhex(doc["survivors"]),
                dec(doc["seed_shares"]),
                dec(doc["key_shares"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise malformed("reveal", exc) from None
