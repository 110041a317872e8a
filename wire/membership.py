"""Membership changes on a running federation: no broker restart, nobody else disconnected.

Measured on Mosquitto 2.0.11: SIGHUP makes it read its ACL file and its CRL again (a revoked
certificate's next TLS handshake fails: "certificate verify failed"), but a connection that is
already open stays open, and with ``use_identity_as_username`` no password or plugin check runs
that could refuse it. So ``revoke_live`` closes it the way MQTT itself allows: a session
takeover. It issues a one-off certificate for the revoked site's id (valid for minutes, its key
never written to disk), connects with it (``use_username_as_clientid`` makes its client id the
site's, so the broker closes the site's connection: "already connected, closing old
connection"), with a clean start and no session expiry (the site's queued messages go too), and
disconnects; that certificate is then revoked as well and the broker reloaded again. The site's
client reconnects and its handshake fails from then on.

The dynamic-security plugin was the other candidate: its ``kickClient``/``disableClient`` need an
admin identity and a JSON state file the broker rewrites, and with ``use_identity_as_username``
its client checks do not run at connect, so a kicked certificate would come straight back
unless the CRL is reloaded anyway. The reload plus a takeover needs neither.

A site on a bridged regional broker (``neurofed.wire.bridge``) is cut off on that broker: both
brokers are reloaded (the regional one holds the site's ACL and CRL, the central one the bridge's
rights for that site) and the takeover connects to the regional broker.

Participants learn the change from the coordinator's retained ROSTER message (wire/PROTOCOL.md).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from neurofed.wire import bridge
from neurofed.wire import provision as pv
from neurofed.wire.broker import broker_pid as find_broker
from neurofed.wire.broker import reload_broker
from neurofed.wire.errors import ProvisioningError, TransportError

log = logging.getLogger(__name__)

TAKEOVER_MINUTES = 10
RELOAD_SETTLE_S = 0.3  # Mosquitto acts on SIGHUP in its main loop: give it a moment


@dataclass(frozen=True)
class LiveChange:
    site: str
    broker_pid: int
    reloaded_s: float  # from the call to the broker's reload (ACL and CRL)
    closed_s: float | None  # from the call to the revoked site's connection closed (revoke only)


def _reload(out: Path, broker_pid: int | None, regional: tuple[Path, int] | None = None) -> int:
    """SIGHUP the central broker and, for a change on a bridged site, its regional broker too."""
    pid = reload_broker(out / pv.BROKER, broker_pid)
    if regional is not None:
        reload_broker(*regional)
    time.sleep(RELOAD_SETTLE_S)
    return pid


def _regional(out: Path, region: str | None) -> tuple[Path, int] | None:
    """The bundle and PID of ``region``'s running broker (found before anything changes, so a
    broker this machine cannot signal stops the change with nothing written)."""
    if region is None:
        return None
    bundle = out / bridge.regional_folder(region)
    try:
        return bundle, find_broker(bundle)
    except TransportError as exc:
        raise TransportError(
            f"{exc}. The site connects to region {region!r}'s broker: --live signals it from this "
            f"machine. Where it runs elsewhere, make the change without --live, copy {bundle}/acl "
            "and crl.pem to it and send it SIGHUP (docker kill -s HUP <container>), then SIGHUP "
            "the central broker"
        ) from None


def close_connection(
    out: Path | str, site: str, host: str | None = None, port: int | None = None, timeout: float = 10.0
) -> None:
    """Close ``site``'s connection on the broker by a session takeover with a one-off certificate
    for its id, then revoke that certificate too (the caller reloads the broker afterwards)."""
    import paho.mqtt.client as mqtt
    from cryptography.hazmat.primitives import serialization
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    ca = pv._CA(Path(out))
    now = dt.datetime.now(dt.timezone.utc)
    key, cert = pv.issue_certificate(
        ca.key,
        ca.cert,
        site,
        not_before=now - dt.timedelta(minutes=1),
        not_after=now + dt.timedelta(minutes=TAKEOVER_MINUTES),
    )
    site_host, site_port = bridge.broker_address(ca.state, site)  # the broker the site uses
    host = host or site_host
    port = int(port or site_port)
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            refused.append(str(reason_code))
        connected.set()

    # ssl needs files: a private folder, deleted at once; the key never outlives this call
    with tempfile.TemporaryDirectory(prefix="neurofed-takeover-") as tmp:
        certfile, keyfile = Path(tmp) / "c.crt", Path(tmp) / "c.key"
        certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pv._pem_private(key))
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca.dir / "ca.crt"))
        ctx.load_cert_chain(str(certfile), str(keyfile))
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=site, protocol=mqtt.MQTTv5)
    c.tls_set_context(ctx)
    c.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    try:
        c.connect(host, port, keepalive=30, clean_start=True, properties=props)
    except OSError as exc:
        raise TransportError(
            f"cannot reach broker {host}:{port} to close {site}'s connection: {exc}"
        ) from None
    c.loop_start()
    try:
        if not connected.wait(timeout) or refused:
            raise TransportError(
                f"broker {host}:{port} did not take the takeover connection for {site} "
                f"({', '.join(refused) or 'no answer'})"
            )
        c.disconnect()
    finally:
        c.loop_stop()
    ca.state["revoked_serials"].append(cert.serial_number)
    crl = pv._crl(ca)
    for folder in (pv.BROKER, *map(bridge.regional_folder, ca.state.get("bridges", {}))):
        pv._write_public(ca.out / folder / "crl.pem", crl)
    ca.save()


def revoke_live(
    out: Path | str,
    site: str,
    *,
    broker_pid: int | None = None,
    host: str | None = None,
    port: int | None = None,
) -> LiveChange:
    """Revoke ``site`` (CRL, ACL, roster) and apply it to the running broker: reload, close the
    site's connection, reload again. The coordinator picks the new roster up from its bundle
    and publishes it (ROSTER)."""
    out = Path(out)
    t0 = time.monotonic()
    pid = broker_pid or find_broker(out / pv.BROKER)  # before changing anything
    ca = pv._CA(out)
    regional = _regional(out, bridge.site_region(ca.state, site))
    if host is None and port is None:  # the site's broker, as it was before the revocation
        host, port = bridge.broker_address(ca.state, site)
    pv.revoke(out, site)
    pid = _reload(out, pid, regional)
    reloaded = time.monotonic() - t0
    close_connection(out, site, host, port)
    closed = time.monotonic() - t0
    _reload(out, pid, regional)  # the takeover certificate is on the CRL too
    log.info(
        "revoked %s live: broker %d reloaded in %.2f s, connection closed in %.2f s",
        site,
        pid,
        reloaded,
        closed,
    )
    return LiveChange(site, pid, reloaded, closed)


def add_site_live(
    out: Path | str,
    site: str,
    *,
    days: int | None = None,
    broker_pid: int | None = None,
    region: str | None = None,
) -> LiveChange:
    """Add ``site`` (on ``region``'s bridged broker if given) and reload the running brokers'
    ACLs; the coordinator publishes the new roster and the site takes part from the next round."""
    out = Path(out)
    t0 = time.monotonic()
    if region is not None:
        pv._known_region(pv._CA(out).state, region)
    pid = broker_pid or find_broker(out / pv.BROKER)  # before changing anything
    regional = _regional(out, region)
    pv.add_site(out, site, days, region=region)
    pid = _reload(out, pid, regional)
    return LiveChange(site, pid, time.monotonic() - t0, None)


__all__ = ["LiveChange", "add_site_live", "close_connection", "revoke_live", "ProvisioningError"]
