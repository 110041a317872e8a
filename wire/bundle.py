"""Load a participant's provisioning bundle and check it before anything connects.

A bundle is ``DIR/<participant>/`` as ``neurofed provision`` writes it. Loading checks that every
file is there, that the roster is signed by the federation CA, that the participant's own public
keys in the roster match its private keys, that its TLS key belongs to its certificate, and that
its certificate has not expired, so a broken deployment fails at start with a message naming the
file, not later with a TLS or AEAD error.

In a federation whose roster names the hybrid KEM ``mlkem768-x25519`` the bundle also holds
``kem.key`` (the participant's ML-KEM-768+X25519 private key, 0600), checked against the roster
like the other keys; ``Bundle.open_key`` is the key content keys are unwrapped with.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

import tomllib
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from neurofed.wire import kem as kems
from neurofed.wire.bridge import BRIDGE_CERT, BRIDGE_KEY
from neurofed.wire.errors import ProvisioningError
from neurofed.wire.roster import Roster, load_verified_roster

PARTICIPANT_FILES = (
    "bundle.toml",
    "ca.crt",
    "client.crt",
    "client.key",
    "sign.key",
    "enc.key",
    "roster.json",
    "roster.sig",
)
KEM_FILE = "kem.key"
BROKER_FILES = ("ca.crt", "server.crt", "server.key", "crl.pem", "mosquitto.conf", "acl")


@dataclass(frozen=True)
class Bundle:
    """Everything one participant needs to join the federation. ``repr`` shows no key material."""

    path: Path
    federation: str
    participant: str
    role: str
    broker_host: str
    broker_port: int
    roster: Roster
    ca_cert: Path
    client_cert: Path
    client_key: Path
    sign_key: Ed25519PrivateKey
    enc_key: X25519PrivateKey
    cert_not_after: dt.datetime
    kem_key: kems.HybridKeyPair | None = None

    @property
    def kem(self) -> str:
        """The federation's KEM, as its signed roster records it."""
        return self.roster.kem

    @property
    def open_key(self) -> kems.PrivateKey:
        """The private key that opens content keys sealed to this participant under the
        federation's KEM."""
        if self.roster.kem == kems.MLKEM768_X25519:
            if self.kem_key is None:
                raise ProvisioningError(
                    f"{self.path}: the federation seals with {self.roster.kem} but this bundle has no "
                    f"{KEM_FILE}; copy the complete bundle written by `neurofed provision`"
                )
            return self.kem_key.private_key()
        return self.enc_key

    def __repr__(self) -> str:
        return (
            f"Bundle(participant={self.participant!r}, role={self.role!r}, federation={self.federation!r}, "
            f"broker={self.broker_host}:{self.broker_port}, path={str(self.path)!r})"
        )


def _missing(path: Path, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if not (path / n).is_file()]


def check_key_matches_certificate(cert_path: Path, key_path: Path) -> None:
    """Raise ProvisioningError naming both files when ``key_path`` is not the private key of the
    certificate in ``cert_path`` (TLS would otherwise fail later with an ``ssl.SSLError``)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ProvisioningError(f"{cert_path} is not a readable certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    except OSError as exc:
        raise ProvisioningError(f"cannot read {key_path} ({exc.strerror or exc})") from None
    except (ValueError, TypeError):
        raise ProvisioningError(f"{key_path} is not a readable, unencrypted private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ProvisioningError(
            f"{key_path} is not the private key of {cert_path}; copy both from the same "
            "`neurofed provision` bundle"
        )


def load_bundle(path: Path | str) -> Bundle:  # noqa: C901 - one check per file of the bundle
    """Load and validate ``path`` (a participant's bundle folder); raise ProvisioningError saying
    what is missing or wrong and what to do."""
    path = Path(path)
    if not path.is_dir():
        raise ProvisioningError(f"bundle folder {path} does not exist (give --bundle DIR/<participant>)")
    if (path / "mosquitto.conf").is_file() and not (path / "client.crt").is_file():
        raise ProvisioningError(
            f"{path} is the broker's bundle; run it with `neurofed broker --bundle {path}`"
        )
    missing = _missing(path, PARTICIPANT_FILES)
    if missing:
        raise ProvisioningError(
            f"bundle {path} lacks {', '.join(missing)}; copy the complete folder written by `neurofed provision`"
        )
    try:
        cfg = tomllib.loads((path / "bundle.toml").read_text())
        federation, participant, role = cfg["federation"], cfg["participant"], cfg["role"]
        host, port = str(cfg["broker_host"]), int(cfg["broker_port"])
    except (tomllib.TOMLDecodeError, KeyError, ValueError) as exc:
        raise ProvisioningError(
            f"{path / 'bundle.toml'} is invalid ({exc}); re-provision this participant"
        ) from None
    try:
        ca = x509.load_pem_x509_certificate((path / "ca.crt").read_bytes())
        cert = x509.load_pem_x509_certificate((path / "client.crt").read_bytes())
    except ValueError as exc:
        raise ProvisioningError(f"{path}: a certificate is unreadable ({exc})") from None
    cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    if not cn or cn[0].value != participant:
        raise ProvisioningError(f"{path / 'client.crt'} is not {participant!r}'s certificate")
    not_after = cert.not_valid_after_utc
    if not_after < dt.datetime.now(dt.timezone.utc):
        raise ProvisioningError(
            f"{path / 'client.crt'} expired on {not_after:%Y-%m-%d}; ask the federation operator for a new bundle"
        )
    check_key_matches_certificate(path / "client.crt", path / "client.key")
    keys = {}
    for name, kind in (("sign.key", Ed25519PrivateKey), ("enc.key", X25519PrivateKey)):
        kp = path / name
        _check_private_mode(kp)
        try:
            key = serialization.load_pem_private_key(kp.read_bytes(), None)
        except (ValueError, TypeError):
            raise ProvisioningError(f"{kp} is not a readable private key") from None
        if not isinstance(key, kind):
            raise ProvisioningError(f"{kp} holds the wrong kind of key")
        keys[name] = key
    roster = load_verified_roster(path / "roster.json", path / "roster.sig", ca)
    if roster.federation != federation:
        raise ProvisioningError(
            f"{path}: roster is for federation {roster.federation!r}, bundle for {federation!r}"
        )
    me = roster.get(participant)
    if me is None:
        why = " (it was revoked)" if participant in roster.revoked else ""
        raise ProvisioningError(f"{participant!r} is not in the roster of {federation!r}{why}")
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    if (
        keys["sign.key"].public_key().public_bytes(*raw) != me.sign_key
        or keys["enc.key"].public_key().public_bytes(*raw) != me.enc_key
    ):
        raise ProvisioningError(f"{path}: the private keys do not match the roster; the bundle is mixed up")
    if me.role != role:
        raise ProvisioningError(f"{path}: bundle.toml says role {role!r}, roster says {me.role!r}")
    kem_key = _load_kem_key(path, roster.kem, me.kem_key)
    return Bundle(
        path=path,
        federation=federation,
        participant=participant,
        role=role,
        broker_host=host,
        broker_port=port,
        roster=roster,
        ca_cert=path / "ca.crt",
        client_cert=path / "client.crt",
        client_key=path / "client.key",
        sign_key=keys["sign.key"],
        enc_key=keys["enc.key"],
        cert_not_after=not_after,
        kem_key=kem_key,
    )


def _check_private_mode(kp: Path) -> None:
    if os.name == "posix" and kp.stat().st_mode & 0o077:
        raise ProvisioningError(f"{kp} is readable by others; run `chmod 600 {kp}`")


def _load_kem_key(path: Path, kem: str, roster_public: bytes) -> kems.HybridKeyPair | None:
    """The participant's hybrid key pair when the roster's KEM needs one (``kem.key``, 0600,
    matching the roster's ``kem_key``); None for an x25519 federation."""
    if kem != kems.MLKEM768_X25519:
        return None
    kp = path / KEM_FILE
    if not kp.is_file():
        raise ProvisioningError(
            f"{path}: the federation's roster seals with {kem}, but the bundle has no {KEM_FILE} "
            "(the participant's ML-KEM-768+X25519 private key); copy the complete bundle written by "
            "`neurofed provision --kem mlkem768-x25519`"
        )
    _check_private_mode(kp)
    try:
        pair = kems.HybridKeyPair.from_pem(kp.read_bytes())
    except (ValueError, TypeError) as exc:
        raise ProvisioningError(f"{kp} is not a readable ML-KEM-768+X25519 private key ({exc})") from None
    if pair.public_bytes() != roster_public:
        raise ProvisioningError(f"{path}: {KEM_FILE} does not match the roster; the bundle is mixed up")
    return pair


def check_broker_bundle(path: Path | str) -> Path:
    """Check a broker bundle has every file Mosquitto will read; return its mosquitto.conf."""
    path = Path(path)
    if not path.is_dir():
        raise ProvisioningError(f"broker bundle {path} does not exist (give --bundle DIR/broker)")
    missing = _missing(path, BROKER_FILES)
    if missing:
        raise ProvisioningError(
            f"broker bundle {path} lacks {', '.join(missing)}; copy DIR/broker from `neurofed provision`"
        )
    check_key_matches_certificate(path / "server.crt", path / "server.key")
    if (path / BRIDGE_CERT).is_file() or (path / BRIDGE_KEY).is_file():  # a regional broker
        check_key_matches_certificate(path / BRIDGE_CERT, path / BRIDGE_KEY)
    return path / "mosquitto.conf"
