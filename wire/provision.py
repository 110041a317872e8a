"""Provisioning: the federation CA, certificates, keys, roster, Mosquitto config and ACL.

``provision(out, ...)`` writes one bundle folder per participant, ``out/<participant>/``, with
``coordinator`` and ``broker`` reserved, plus ``out/.ca/`` holding the CA private key and the
provisioning state (never part of any bundle). Each bundle holds only what its participant needs:

- broker:      ca.crt, server.crt, server.key, crl.pem, mosquitto.conf, acl, data/
- coordinator: ca.crt, client.crt, client.key, sign.key, enc.key, roster.json, roster.sig, bundle.toml
- <site>:      the same as the coordinator, with the site's own certificate and keys
- broker.<region> (``add_bridge``): a regional broker bridged to the central one: the broker's
  files plus bridge.crt, bridge.key (the bridge's own client identity, ``neurofed.wire.bridge``)

``kem="mlkem768-x25519"`` makes the federation seal with the hybrid post-quantum KEM
(``neurofed.wire.kem``): the roster records it and every participant bundle also gets ``kem.key``
(its ML-KEM-768+X25519 private key). The KEM is fixed for the federation's life: ``add_site``
gives a new site a key of the federation's KEM.

``add_site`` adds a participant without touching existing certificates or keys (the roster is
re-signed and redistributed, the ACL regenerated); ``revoke`` puts the site's certificate on the
CRL, drops it from the roster and ACL. A running broker takes the new ACL and CRL on SIGHUP
(``neurofed.wire.membership`` applies a change live and closes a revoked site's connection).
Private keys are written 0600 and never printed or logged.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from neurofed.wire import bridge
from neurofed.wire import kem as kems
from neurofed.wire.api import COORDINATOR
from neurofed.wire.errors import ProvisioningError
from neurofed.wire.roster import Participant, Roster, sign_roster

BROKER = "broker"
RESERVED = {COORDINATOR, BROKER}
CA_DIR = ".ca"
ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
FED_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_-]{0,62}$")

# Broker limits. Chunks are 1 MiB by default, so 4 MiB leaves room for headers and refuses any
# packet a misbehaving client could use to exhaust memory.
MAX_PACKET_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True)
class ProvisionResult:
    out: Path
    federation: str
    participants: list[str]
    revoked: list[str]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    """Create a private-key file 0600 from the start (no window where it is world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _pem_private(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _raw_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def issue_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    *,
    server_names: list[str] | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    days: int = 365,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Issue a TLS certificate signed by the federation CA (client unless ``server_names`` given).

    ``not_before``/``not_after`` exist so tests can mint an already-expired certificate.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or (_now() - dt.timedelta(minutes=5))
    end = not_after or (start + dt.timedelta(days=days))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, True, False, True, False, False, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server_names:
        sans: list[x509.GeneralName] = []
        for name in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def _make_ca(federation: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "neurofed"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"neurofed federation CA {federation}"),
        ]
    )
    start = _now() - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=max(days, 3650)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


class _CA:
    """The private side of a federation: CA key, state (participants, serials, revocations)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.dir = out / CA_DIR
        if not (self.dir / "ca.key").is_file():
            raise ProvisioningError(
                f"{self.dir}/ca.key not found: {out} was not written by `neurofed provision` "
                "(create the federation first, without --add-site/--revoke)"
            )
        self.key = serialization.load_pem_private_key((self.dir / "ca.key").read_bytes(), None)
        self.cert = x509.load_pem_x509_certificate((self.dir / "ca.crt").read_bytes())
        self.state = json.loads((self.dir / "state.json").read_text())
        self.roster = Roster.from_json((self.dir / "roster.json").read_bytes(), str(self.dir / "roster.json"))

    def save(self) -> None:
        _write_private(self.dir / "state.json", json.dumps(self.state, indent=2).encode())
        _write_private(self.dir / "roster.json", self.roster.to_json())


def _validate_ids(federation: str, sites: list[str]) -> None:
    if not FED_RE.match(federation):
        raise ProvisioningError(
            f"federation name {federation!r} must be 1-63 letters, digits, '-' or '_' (it becomes an MQTT topic)"
        )
    seen = set()
    for s in sites:
        if not ID_RE.match(s):
            raise ProvisioningError(
                f"site id {s!r} must be 1-63 lower-case letters, digits, '-' or '_' and start with a letter or digit"
            )
        if s in RESERVED:
            raise ProvisioningError(f"site id {s!r} is reserved; choose another name")
        if s in seen:
            raise ProvisioningError(f"site id {s!r} is listed twice")
        seen.add(s)


def _write_participant(ca: _CA, pid: str, role: str, days: int) -> Participant:
    """Create a participant bundle: client cert, signing and encryption keys, bundle.toml."""
    bdir = ca.out / pid
    key, cert = issue_certificate(ca.key, ca.cert, pid, days=days)
    sign_key = Ed25519PrivateKey.generate()
    enc_key = X25519PrivateKey.generate()
    _write_public(bdir / "ca.crt", ca.cert.public_bytes(serialization.Encoding.PEM))
    _write_public(bdir / "client.crt", cert.public_bytes(serialization.Encoding.PEM))
    _write_private(bdir / "client.key", _pem_private(key))
    _write_private(bdir / "sign.key", _pem_private(sign_key))
    _write_private(bdir / "enc.key", _pem_private(enc_key))
    kem_public = b""
    if ca.roster.kem == kems.MLKEM768_X25519:
        pair = kems.HybridKeyPair.generate()
        _write_private(bdir / "kem.key", pair.to_pem())
        kem_public = pair.public_bytes()
    st = ca.state
    _write_bundle_toml(ca, pid, role)
    st["certs"].setdefault(pid, []).append(
        {"serial": cert.serial_number, "not_after": cert.not_valid_after_utc.isoformat()}
    )
    return Participant(pid, role, _raw_public(sign_key), _raw_public(enc_key), kem_public)


def _write_bundle_toml(ca: _CA, pid: str, role: str) -> None:
    """Who the participant is and which broker it connects to (a regional one for a bridged site)."""
    st = ca.state
    host, port = bridge.broker_address(st, pid)
    _write_public(
        ca.out / pid / "bundle.toml",
        (
            "# neurofed bundle: who this participant is and where its broker lives.\n"
            f'federation = "{st["federation"]}"\n'
            f'participant = "{pid}"\n'
            f'role = "{role}"\n'
            f'broker_host = "{host}"\n'
            f"broker_port = {int(port)}\n"
        ).encode(),
    )


def _acl(federation: str, sites: list[str], bridges: dict | None = None, *, coordinator: bool = True) -> str:
    """Mosquitto ACL per design.md section 3: identity is the certificate CN (use_identity_as_username).

    ``bridges`` (central broker): each region's bridge identity and what it may carry;
    ``coordinator=False`` (a regional broker): the coordinator never connects there."""
    p = f"nf/{federation}"
    lines = [
        "# neurofed ACL (generated by `neurofed provision`; regenerated by --add-site / --revoke).",
        "# Usernames are client-certificate common names. Anything not listed is denied.",
    ]
    if coordinator:
        lines += [f"user {COORDINATOR}", f"topic readwrite {p}/#", ""]
    for region, b in sorted((bridges or {}).items()):
        lines += bridge.central_acl_section(federation, region, list(b["sites"]))
    for s in sites:
        lines += [
            f"user {s}",
            f"topic read {p}/task",
            f"topic read {p}/roster",
            f"topic read {p}/model/#",
            f"topic read {p}/receipts/#",
            f"topic read {p}/relay/#",
            f"topic read {p}/status/#",
            f"topic write {p}/update/{s}/#",
            f"topic write {p}/metrics/{s}/#",
            f"topic write {p}/secagg/{s}/#",
            f"topic write {p}/status/{s}",
            "",
        ]
    return "\n".join(lines)


def _mosquitto_conf(state: dict, port: int | None = None) -> str:
    """The broker's config; every broker of a federation (central, regional) gets the same limits,
    since a smaller limit anywhere on a bridged path drops chunks."""
    n = len(state["sites"]) + 1
    # Every site may upload a model-sized update at once; each is up to a few hundred 1 MiB
    # chunks. Mosquitto's default of 1000 queued messages silently drops QoS 1 chunks beyond it.
    max_queued = max(10000, 2000 * n)
    return f"""# Mosquitto config for neurofed federation {state["federation"]} (generated by `neurofed provision`).
# Paths are relative to this folder: start it with `neurofed broker --bundle <this folder>`.
per_listener_settings false
allow_anonymous false
acl_file acl

# Persistence: a broker restart keeps retained messages (task, current model) and queued QoS 1.
persistence true
persistence_location data/
autosave_interval 30
persistent_client_expiration 14d

log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
connection_messages true

# Sizes: the client reads max_packet_size from CONNACK and chunks below it.
max_packet_size {MAX_PACKET_SIZE}
max_inflight_messages 100
max_queued_messages {max_queued}
max_queued_bytes 0
max_keepalive 300
# Small packets (acknowledgements, tasks, receipts) go out at once: with Nagle's algorithm each
# waits for the ACK of the one before, which the peer delays by up to 40 ms.
set_tcp_nodelay true

listener {int(port or state["broker_port"])}
cafile ca.crt
certfile server.crt
keyfile server.key
crlfile crl.pem
require_certificate true
# Identity is the certificate: the username is its CN, and so is the client id, whatever id the
# client sent. No certificate can take over another participant's connection or session.
use_identity_as_username true
use_username_as_clientid true
tls_version tlsv1.2
"""


def _write_broker(ca: _CA, days: int, reissue: bool) -> None:
    bdir = ca.out / BROKER
    st = ca.state
    if reissue or not (bdir / "server.crt").is_file():
        names = [st["broker_host"], "localhost", "127.0.0.1"]
        names = list(dict.fromkeys(names))
        key, cert = issue_certificate(ca.key, ca.cert, BROKER, server_names=names, days=days)
        _write_private(bdir / "server.key", _pem_private(key))
        _write_public(bdir / "server.crt", cert.public_bytes(serialization.Encoding.PEM))
    _write_public(bdir / "ca.crt", ca.cert.public_bytes(serialization.Encoding.PEM))
    bridged = bridge.bridged_sites(st)
    central_sites = [s for s in st["sites"] if s not in bridged]
    _write_public(bdir / "acl", _acl(st["federation"], central_sites, st.get("bridges")).encode())
    _write_public(bdir / "mosquitto.conf", _mosquitto_conf(st).encode())
    crl = _crl(ca)  # one list for every broker of the federation
    _write_public(bdir / "crl.pem", crl)
    (bdir / "data").mkdir(exist_ok=True)
    for region in st.get("bridges", {}):
        _write_regional_broker(ca, region, days, reissue=False, crl=crl)


def _write_regional_broker(ca: _CA, region: str, days: int, reissue: bool, crl: bytes | None = None) -> None:
    """DIR/broker.<region>/: the central broker's listener settings, CRL and ACL for the region's
    sites, plus the bridge to the central broker with the bridge's own certificate."""
    st = ca.state
    b = st["bridges"][region]
    bdir = ca.out / bridge.regional_folder(region)
    if reissue or not (bdir / "server.crt").is_file():
        names = list(dict.fromkeys([b["host"], "localhost", "127.0.0.1"]))
        key, cert = issue_certificate(
            ca.key, ca.cert, bridge.regional_folder(region), server_names=names, days=days
        )
        _write_private(bdir / "server.key", _pem_private(key))
        _write_public(bdir / "server.crt", cert.public_bytes(serialization.Encoding.PEM))
    if reissue or not (bdir / bridge.BRIDGE_CERT).is_file():
        ident = bridge.bridge_identity(region)
        key, cert = issue_certificate(ca.key, ca.cert, ident, days=days)
        _write_private(bdir / bridge.BRIDGE_KEY, _pem_private(key))
        _write_public(bdir / bridge.BRIDGE_CERT, cert.public_bytes(serialization.Encoding.PEM))
        st["certs"].setdefault(ident, []).append(
            {"serial": cert.serial_number, "not_after": cert.not_valid_after_utc.isoformat()}
        )
    _write_public(bdir / "ca.crt", ca.cert.public_bytes(serialization.Encoding.PEM))
    _write_public(bdir / "acl", _acl(st["federation"], list(b["sites"]), coordinator=False).encode())
    conf = _mosquitto_conf(st, port=int(b["port"])) + bridge.bridge_block(
        st["federation"], region, st["broker_host"], int(st["broker_port"])
    )
    _write_public(bdir / "mosquitto.conf", conf.encode())
    _write_public(bdir / "crl.pem", crl or _crl(ca))
    (bdir / "data").mkdir(exist_ok=True)


def _crl(ca: _CA) -> bytes:
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=max(int(ca.state["days"]), 1)))
    )
    for serial in ca.state["revoked_serials"]:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(int(serial)).revocation_date(now).build()
        )
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _publish_roster(ca: _CA) -> None:
    """Re-sign the roster and copy it into every live participant bundle."""
    sig = sign_roster(ca.roster, ca.key)
    data = ca.roster.to_json()
    for pid in ca.roster.participants:
        bdir = ca.out / pid
        if bdir.is_dir():
            _write_public(bdir / "roster.json", data)
            _write_public(bdir / "roster.sig", sig)
    ca.save()


def provision(
    out: Path | str,
    federation: str,
    sites: list[str],
    broker_host: str,
    broker_port: int = 8883,
    days: int = 365,
    kem: str = kems.DEFAULT,
) -> ProvisionResult:
    """Create a new federation in ``out`` (which must not already hold one), sealing with ``kem``
    (``x25519`` or the hybrid post-quantum ``mlkem768-x25519``)."""
    out = Path(out)
    _validate_ids(federation, sites)
    try:
        kems.check_kem(kem, "--kem")
    except ValueError as exc:
        raise ProvisioningError(str(exc)) from None
    if not sites:
        raise ProvisioningError("at least one site is needed (--sites a,b,c)")
    if days < 1:
        raise ProvisioningError(f"--days must be at least 1, got {days}")
    if (out / CA_DIR).exists():
        raise ProvisioningError(
            f"{out} already holds a federation; use --add-site or --revoke, or choose a new --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / CA_DIR).mkdir(mode=0o700)
    ca_key, ca_cert = _make_ca(federation, days)
    _write_private(out / CA_DIR / "ca.key", _pem_private(ca_key))
    _write_public(out / CA_DIR / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    state = {
        "federation": federation,
        "broker_host": broker_host,
        "broker_port": int(broker_port),
        "days": int(days),
        "sites": list(sites),
        "revoked": [],
        "revoked_serials": [],
        "certs": {},
    }
    empty = Roster(federation, 0, _now().isoformat(), {}, kem=kem)
    _write_private(out / CA_DIR / "state.json", json.dumps(state).encode())
    _write_private(out / CA_DIR / "roster.json", empty.to_json())
    ca = _CA(out)
    parts = {COORDINATOR: _write_participant(ca, COORDINATOR, "coordinator", days)}
    for s in sites:
        parts[s] = _write_participant(ca, s, "site", days)
    ca.roster = Roster(federation, 1, _now().isoformat(), parts, kem=kem)
    _write_broker(ca, days, reissue=True)
    _publish_roster(ca)
    return ProvisionResult(out, federation, [COORDINATOR, *sites], [])


def add_site(
    out: Path | str, site: str, days: int | None = None, region: str | None = None
) -> ProvisionResult:
    """Add one site; existing certificates and keys stay valid (roster and ACL are updated).
    ``region``: the site connects to that region's bridged broker instead of the central one."""
    ca = _CA(Path(out))
    st = ca.state
    _validate_ids(st["federation"], [site])
    if site in ca.roster.participants:
        raise ProvisioningError(f"site {site!r} is already in federation {st['federation']!r}")
    if site in st["revoked"]:
        raise ProvisioningError(f"site id {site!r} was revoked; give the site a new id")
    if region is not None:
        _known_region(st, region)
        st["bridges"][region]["sites"].append(site)
    new = _write_participant(ca, site, "site", days or int(st["days"]))
    st["sites"].append(site)
    ca.roster = Roster(
        ca.roster.federation,
        ca.roster.version + 1,
        _now().isoformat(),
        {**ca.roster.participants, site: new},
        ca.roster.revoked,
        ca.roster.kem,
    )
    _write_broker(ca, int(st["days"]), reissue=False)
    _publish_roster(ca)
    return ProvisionResult(ca.out, st["federation"], [COORDINATOR, *st["sites"]], list(st["revoked"]))


def revoke(out: Path | str, site: str) -> ProvisionResult:
    """Revoke a site: its certificates go on the CRL, it leaves the roster and the ACL.

    A running broker takes the new CRL and ACL on SIGHUP, but keeps the site's open connection:
    ``neurofed.wire.membership.revoke_live`` closes it too.
    """
    ca = _CA(Path(out))
    st = ca.state
    if site not in ca.roster.participants or ca.roster.participants[site].role != "site":
        raise ProvisioningError(f"{site!r} is not a site of federation {st['federation']!r}")
    st["revoked_serials"] += [c["serial"] for c in st["certs"].get(site, [])]
    st["revoked"].append(site)
    st["sites"].remove(site)
    region = bridge.site_region(st, site)
    if region is not None:
        st["bridges"][region]["sites"].remove(site)
    parts = dict(ca.roster.participants)
    del parts[site]
    ca.roster = Roster(
        ca.roster.federation,
        ca.roster.version + 1,
        _now().isoformat(),
        parts,
        (*ca.roster.revoked, site),
        ca.roster.kem,
    )
    _write_broker(ca, int(st["days"]), reissue=False)
    _publish_roster(ca)
    return ProvisionResult(ca.out, st["federation"], [COORDINATOR, *st["sites"]], list(st["revoked"]))


def _known_region(state: dict, region: str) -> None:
    if region not in state.get("bridges", {}):
        known = ", ".join(sorted(state.get("bridges", {}))) or "none yet"
        raise ProvisioningError(
            f"no bridged broker for region {region!r} (regions: {known}); create it first with "
            "--bridge REGION --bridge-sites ... --bridge-host HOST"
        )


def add_bridge(
    out: Path | str, region: str, sites: list[str], host: str, port: int = 8883, days: int | None = None
) -> ProvisionResult:
    """Add a regional broker bridged to the central one, and move ``sites`` onto it.

    Writes ``DIR/broker.<region>/`` (its server certificate, the bridge's client certificate
    ``bridge.<region>``, the sites' ACL, mosquitto.conf with the bridge block), gives the central
    ACL the bridge's rights (and drops the moved sites from it: each site connects to one broker),
    and points the moved sites' bundle.toml at the regional broker. Keys, certificates and the
    roster stay as they are; the moved sites and both brokers restart to take the new files."""
    ca = _CA(Path(out))
    st = ca.state
    bridges = st.setdefault("bridges", {})
    if not ID_RE.match(region):
        raise ProvisioningError(
            f"region {region!r} must be 1-63 lower-case letters, digits, '-' or '_' and start with a "
            "letter or digit (the regional broker's folder is DIR/broker.<region>)"
        )
    if region in bridges:
        raise ProvisioningError(
            f"region {region!r} already has a bridged broker ({out}/{bridge.regional_folder(region)}); "
            f"add a site to it with --add-site SITE --bridge {region}"
        )
    if not sites:
        raise ProvisioningError("a bridged broker needs its sites: --bridge-sites a,b")
    if not host:
        raise ProvisioningError("a bridged broker needs --bridge-host (the name its sites reach it by)")
    for s in sites:
        if s not in st["sites"]:
            raise ProvisioningError(
                f"{s!r} is not a site of federation {st['federation']!r} (sites: {', '.join(st['sites'])})"
            )
        other = bridge.site_region(st, s)
        if other is not None:
            raise ProvisioningError(f"site {s!r} already connects to region {other!r}'s broker")
    if len(set(sites)) != len(sites):
        raise ProvisioningError("a site is listed twice in --bridge-sites")
    if (host, int(port)) == (st["broker_host"], int(st["broker_port"])) or any(
        (b["host"], int(b["port"])) == (host, int(port)) for b in bridges.values()
    ):
        raise ProvisioningError(f"{host}:{port} is already another broker of this federation")
    bridges[region] = {"host": host, "port": int(port), "sites": list(sites)}
    _write_regional_broker(ca, region, days or int(st["days"]), reissue=True)
    for s in sites:
        _write_bundle_toml(ca, s, "site")
    _write_broker(ca, int(st["days"]), reissue=False)
    ca.save()
    return ProvisionResult(ca.out, st["federation"], [COORDINATOR, *st["sites"]], list(st["revoked"]))
