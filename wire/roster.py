"""The federation roster: who takes part, in which role, with which public keys.

The roster is the trust root of the message layer: a receiver accepts a message only from a
participant listed here, verified with the signing key listed here. It is signed at provisioning by
the federation CA (ECDSA P-256 / SHA-256), so a bundle holder can check it against ``ca.crt`` and a
tampered roster file is refused rather than trusted.

It also records the federation's KEM (``neurofed.wire.kem``), chosen at provisioning: every sealed
message uses it, and a message sealed with another is refused. A roster without a ``kem`` field is
``x25519`` (rosters written before the choice existed keep their bytes and signature); with
``mlkem768-x25519`` every participant carries its ML-KEM-768+X25519 public key (``kem_key``).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from neurofed.wire import kem as kems
from neurofed.wire.errors import ProvisioningError

ROSTER_FORMAT = "neurofed-roster/1"
ROLES = ("coordinator", "site")


@dataclass(frozen=True)
class Participant:
    """One roster entry: the public half of a participant's identity."""

    id: str
    role: str
    sign_key: bytes  # raw Ed25519 public key (32 bytes)
    enc_key: bytes  # raw X25519 public key (32 bytes)
    kem_key: bytes = b""  # raw ML-KEM-768 || X25519 public key (1,216 bytes), hybrid federations only

    def signing_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.sign_key)

    def encryption_key(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(self.enc_key)

    def sealing_key(self, kem: str) -> kems.PublicKey:
        """The public key messages to this participant are sealed to under ``kem``."""
        if kem == kems.MLKEM768_X25519:
            if not self.kem_key:
                raise ProvisioningError(f"{self.id!r} has no {kem} key in the roster; re-provision it")
            return kems.hybrid_public_key(self.kem_key)
        return self.encryption_key()


@dataclass(frozen=True)
class Roster:
    federation: str
    version: int
    issued_at: str
    participants: dict[str, Participant]
    revoked: tuple[str, ...] = field(default=())
    kem: str = kems.DEFAULT

    @property
    def sites(self) -> list[str]:
        return sorted(p for p, e in self.participants.items() if e.role == "site")

    def get(self, participant: str) -> Participant | None:
        return self.participants.get(participant)

    def sealing_key(self, participant: str) -> kems.PublicKey:
        """``participant``'s public key under this federation's KEM."""
        return self.participants[participant].sealing_key(self.kem)

    def _entry(self, p: Participant) -> dict[str, str]:
        e = {
            "role": p.role,
            "sign_key": base64.b64encode(p.sign_key).decode(),
            "enc_key": base64.b64encode(p.enc_key).decode(),
        }
        if p.kem_key:
            e["kem_key"] = base64.b64encode(p.kem_key).decode()
        return e

    def to_json(self) -> bytes:
        """Canonical bytes (sorted keys, no spaces): exactly what the CA signs."""
        doc: dict[str, Any] = {
            "format": ROSTER_FORMAT,
            "federation": self.federation,
            "version": self.version,
            "issued_at": self.issued_at,
            "participants": {pid: self._entry(p) for pid, p in sorted(self.participants.items())},
            "revoked": sorted(self.revoked),
        }
        if self.kem != kems.DEFAULT:  # absent = x25519: older rosters keep their signed bytes
            doc["kem"] = self.kem
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = "roster") -> Roster:
        try:
            doc = json.loads(data)
            if doc.get("format") != ROSTER_FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}, expected {ROSTER_FORMAT!r}")
            kem = kems.check_kem(doc.get("kem", kems.DEFAULT), "the roster's KEM")
            parts = {}
            for pid, e in doc["participants"].items():
                if e["role"] not in ROLES:
                    raise ValueError(f"participant {pid!r} has unknown role {e['role']!r}")
                sk, ek = base64.b64decode(e["sign_key"]), base64.b64decode(e["enc_key"])
                kk = base64.b64decode(e.get("kem_key", ""))
                if len(sk) != 32 or len(ek) != 32:
                    raise ValueError(f"participant {pid!r} has keys of the wrong length")
                if kem == kems.MLKEM768_X25519 and len(kk) != kems.HYBRID_PUBLIC_LEN:
                    raise ValueError(
                        f"participant {pid!r} has no {kem} public key of {kems.HYBRID_PUBLIC_LEN} "
                        "bytes, though the federation seals with it"
                    )
                parts[pid] = Participant(pid, e["role"], sk, ek, kk)
            return cls(
                federation=str(doc["federation"]),
                version=int(doc["version"]),
                issued_at=str(doc["issued_at"]),
                participants=parts,
                revoked=tuple(doc.get("revoked", [])),
                kem=kem,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ProvisioningError(
                f"{where} is not a valid neurofed roster ({exc}); re-run `neurofed provision`"
            ) from None


def sign_roster(roster: Roster, ca_key: ec.EllipticCurvePrivateKey) -> bytes:
    """Return the base64 DER ECDSA signature of the roster's canonical bytes."""
    sig = ca_key.sign(roster.to_json(), ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(sig)


def load_verified_roster(roster_path: Path, sig_path: Path, ca_cert: x509.Certificate) -> Roster:
    """Read the roster and check its signature against the federation CA; refuse it otherwise."""
    for p in (roster_path, sig_path):
        if not p.is_file():
            raise ProvisioningError(f"{p} is missing; copy the whole bundle folder from `neurofed provision`")
    return verify_roster(roster_path.read_bytes(), sig_path.read_bytes(), ca_cert, str(roster_path))


def verify_roster(data: bytes, sig_b64: bytes, ca_cert: x509.Certificate, where: str = "roster") -> Roster:
    """The roster in ``data`` if ``sig_b64`` (base64 DER ECDSA, as in roster.sig) is the
    federation CA's signature of exactly these bytes; ProvisioningError otherwise."""
    try:
        sig = base64.b64decode(sig_b64, validate=True)
        pub = ca_cert.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, AssertionError, TypeError):
        raise ProvisioningError(
            f"{where}: signature does not verify against the federation CA; the roster was altered "
            "or belongs to another federation (take it again from the provisioning output)"
        ) from None
    return Roster.from_json(data, where)


def roster_meta(data: bytes, sig_b64: bytes) -> dict[str, str]:
    """The ``meta`` of a ROSTER message: the roster's exact signed bytes and the CA's signature."""
    return {"roster": base64.b64encode(data).decode(), "sig": sig_b64.decode().strip()}


def roster_from_meta(meta: dict[str, Any], ca_cert: x509.Certificate, federation: str) -> Roster:
    """Verify a ROSTER message's roster against the federation CA; ProvisioningError otherwise."""
    try:
        data = base64.b64decode(str(meta["roster"]), validate=True)
        sig = str(meta["sig"]).encode()
    except (KeyError, ValueError, TypeError):
        raise ProvisioningError("ROSTER message without a roster and its signature") from None
    roster = verify_roster(data, sig, ca_cert, "ROSTER message")
    if roster.federation != federation:
        raise ProvisioningError(f"ROSTER message is for federation {roster.federation!r}, not {federation!r}")
    return roster
