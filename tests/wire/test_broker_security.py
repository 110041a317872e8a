"""The broker's side of the security model, probed with Mosquitto's own clients (mosquitto_pub /
mosquitto_sub), which this project did not write."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import ssl
import subprocess
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from neurofed.wire.api import MessageKind
from neurofed.wire.mqtt import MqttEndpoint
from neurofed.wire.payload import encode_state
from tests.fixtures.broker import connection_ends

pytestmark = pytest.mark.slow

PUB, SUB = shutil.which("mosquitto_pub"), shutil.which("mosquitto_sub")
needs_clients = pytest.mark.skipif(
    not (PUB and SUB), reason="mosquitto-clients missing: apt-get install mosquitto-clients"
)


def tls_args(broker, bundle_dir=None, cert=None, key=None) -> list[str]:
    args = [
        "-h",
        "localhost",
        "-p",
        str(broker.port),
        "-V",
        "mqttv5",
        "--cafile",
        str(broker.root / "broker" / "ca.crt"),
    ]
    if bundle_dir is not None:
        cert, key = bundle_dir / "client.crt", bundle_dir / "client.key"
    if cert is not None:
        args += ["--cert", str(cert), "--key", str(key)]
    return args


def pub(broker, topic: str, message: str = "x", **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PUB, *tls_args(broker, **kw), "-q", "1", "-t", topic, "-m", message, "-i", f"probe-{os.getpid()}"],
        capture_output=True,
        timeout=20,
    )


class Sub:
    """mosquitto_sub in the background, raw payloads (no newline) to stdout."""

    def __init__(self, broker, topic: str, count: int, wait: int, **kw) -> None:
        self.proc = subprocess.Popen(
            [
                SUB,
                *tls_args(broker, **kw),
                "-q",
                "1",
                "-t",
                topic,
                "-C",
                str(count),
                "-W",
                str(wait),
                "-N",
                "-v",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.8)  # let it subscribe

    def result(self) -> tuple[int, bytes, bytes]:
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, err


@needs_clients
def test_client_without_certificate_is_refused(broker):
    r = pub(broker, "nf/testfed/status/site-a")
    assert r.returncode != 0
    assert "did not return a certificate" in broker.log_text() or "certificate" in broker.log_text()


@needs_clients
def test_anonymous_plaintext_client_is_refused(broker):
    r = subprocess.run(
        [PUB, "-h", "localhost", "-p", str(broker.port), "-V", "mqttv5", "-t", "nf/testfed/task", "-m", "x"],
        capture_output=True,
        timeout=20,
    )
    assert r.returncode != 0


@needs_clients
def test_certificate_of_another_federation_is_refused(broker, fed):
    r = pub(broker, "nf/testfed/status/site-a", bundle_dir=fed.other_a.path)
    assert r.returncode != 0


@needs_clients
def test_site_cannot_read_another_sites_updates(broker):
    spy = Sub(broker, "nf/testfed/update/#", 1, 4, bundle_dir=broker.bundle("site-a"))
    b = MqttEndpoint(broker.bundle("site-b"))
    b.start(timeout=20)
    try:
        b.send(MessageKind.UPDATE, 1, payload=b"secret update" * 100)
    finally:
        b.close()
    rc, out, _ = spy.result()
    assert out == b""


@needs_clients
def test_site_cannot_publish_as_another_site(broker):
    # the watcher is the coordinator's only connection: a second one with the same certificate
    # would have the same client id (the certificate CN) and the two would displace each other
    watcher = Sub(broker, "nf/testfed/update/#", 1, 4, bundle_dir=broker.bundle("coordinator"))
    r = pub(broker, "nf/testfed/update/site-b/1/abcd/0", "forged", bundle_dir=broker.bundle("site-a"))
    rc, out, _ = watcher.result()
    assert out == b""  # the broker dropped it: the coordinator-level client saw nothing
    assert "forged" not in r.stdout.decode()
    # the control: site-a publishing under its own name does reach the coordinator
    watcher = Sub(broker, "nf/testfed/update/#", 1, 10, bundle_dir=broker.bundle("coordinator"))
    pub(broker, "nf/testfed/update/site-a/1/abcd/0", "own-name", bundle_dir=broker.bundle("site-a"))
    rc, out, _ = watcher.result()
    assert b"own-name" in out
    assert "already connected" not in broker.log_text()


@needs_clients
def test_no_plaintext_crosses_the_broker(broker):
    rng = np.random.default_rng(0)
    state = {
        "layer.weight": rng.standard_normal((64, 64, 3), dtype=np.float32),
        "layer.bias": np.arange(512.0),
    }
    payload = encode_state(state)
    from neurofed.wire.sealing import encode_plaintext_prefix

    n_chunks = -(-(len(payload) + len(encode_plaintext_prefix({"num_cases": 12345}))) // (16 * 1024))
    raw = Sub(broker, "nf/testfed/update/#", n_chunks, 15, bundle_dir=broker.bundle("coordinator"))
    site = MqttEndpoint(broker.bundle("site-a"), chunk_size=16 * 1024)
    site.start(timeout=20)
    try:
        site.send(MessageKind.UPDATE, 1, meta={"num_cases": 12345}, payload=payload)
    finally:
        site.close()
    _, seen, _ = raw.result()
    assert len(seen) >= len(payload)  # we did capture the whole upload
    header_len = int.from_bytes(payload[:8], "little")
    assert payload[8 : 8 + header_len] not in seen  # safetensors header
    assert b"layer.weight" not in seen and b"dtype" not in seen and b"num_cases" not in seen
    tensor_bytes = payload[8 + header_len :]
    for off in range(0, len(tensor_bytes) - 32, 4096):  # no 32-byte window of any tensor
        assert tensor_bytes[off : off + 32] not in seen


@needs_clients
def test_revoked_site_is_refused(broker):
    from neurofed.wire.provision import revoke

    old = broker.root.parent / "site-c-old"
    shutil.copytree(broker.bundle("site-c"), old)
    assert pub(broker, "nf/testfed/status/site-c", bundle_dir=old).returncode == 0  # works before
    revoke(broker.root, "site-c")
    broker.restart()  # Mosquitto loads the CRL at start
    r = pub(broker, "nf/testfed/status/site-c", bundle_dir=old)
    assert r.returncode != 0
    assert pub(broker, "nf/testfed/status/site-a", bundle_dir=broker.bundle("site-a")).returncode == 0


@needs_clients
def test_expired_certificate_is_refused(broker, tmp_path):
    from neurofed.wire.provision import issue_certificate

    ca_dir = broker.root / ".ca"
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    now = dt.datetime.now(dt.timezone.utc)
    key, cert = issue_certificate(
        ca_key,
        ca_cert,
        "site-a",
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    (tmp_path / "c.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "c.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    r = pub(broker, "nf/testfed/status/site-a", cert=tmp_path / "c.crt", key=tmp_path / "c.key")
    assert r.returncode != 0
    # Mosquitto 2.0.11 logs no reason ("expired" matched only the test's folder name in the
    # "Config loaded from <path>" line while the broker was started with an absolute path)
    assert "certificate verify failed" in broker.log_text()


def receive_kind(ep: MqttEndpoint, kind: MessageKind, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = ep.receive(timeout=max(0.1, deadline - time.monotonic()))
        if m is not None and m.kind is kind:
            return m
    return None


def _try_client_id(broker, bundle_dir, client_id: str, clean_start: bool) -> str:
    """Connect with ``bundle_dir``'s certificate asking for ``client_id`` (raw paho, MQTT 5,
    session expiry 1 h), subscribe to everything, stay a moment and leave; return the reason code."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(bundle_dir / "ca.crt"))
    ctx.load_cert_chain(str(bundle_dir / "client.crt"), str(bundle_dir / "client.key"))
    c.tls_set_context(ctx)
    done, result = threading.Event(), []

    def on_connect(client, userdata, flags, reason_code, properties):
        result.append(str(reason_code))
        client.subscribe("nf/testfed/#", qos=1)
        done.set()

    c.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c.connect("localhost", broker.port, 30, clean_start=clean_start, properties=props)
    c.loop_start()
    try:
        assert done.wait(10), f"no CONNACK for {client_id!r}"
        time.sleep(0.3)
    finally:
        c.disconnect()
        c.loop_stop()
    return result[0]


def test_a_sites_certificate_cannot_take_the_coordinators_client_id_or_session(broker):
    """Identity is the certificate for the client id too (``use_username_as_clientid``): a client
    with site-a's certificate asking for the coordinator's client id gets site-a's id instead. It
    neither takes over the coordinator's persistent session (an update queued for the offline
    coordinator is still delivered) nor pushes the connected coordinator off the broker."""
    attacker = broker.bundle("site-a")
    ids = ["nf-testfed-coordinator", "coordinator"]  # the kit's former client id, and the CN
    coord = MqttEndpoint(broker.bundle("coordinator"))
    coord.start(timeout=20)  # creates the persistent session and its subscriptions
    coord.close()
    site_b = MqttEndpoint(broker.bundle("site-b"))
    site_b.start(timeout=20)
    try:
        # queued for the offline coordinator; then site-a's certificate tries its client id
        queued = site_b.send(MessageKind.UPDATE, 1, meta={"n": "queued"}, payload=b"q" * 5000)
        for client_id in ids:
            for clean_start in (True, False):
                assert _try_client_id(broker, attacker, client_id, clean_start) == "Success"
        coord = MqttEndpoint(broker.bundle("coordinator"))
        coord.start(timeout=20)
        try:
            got = receive_kind(coord, MessageKind.UPDATE, 10)
            assert got is not None and got.msg_id == queued, "the queued update was lost"
            # connected: site-a's certificate tries its client id again and again while site-b sends
            sent = []
            for i in range(3):
                for client_id in ids:
                    assert _try_client_id(broker, attacker, client_id, i % 2 == 0) == "Success"
                    sent.append(site_b.send(MessageKind.METRICS, 1, meta={"i": i}))
            got_ids = []
            for _ in sent:
                m = receive_kind(coord, MessageKind.METRICS, 10)
                assert m is not None, f"the coordinator received {len(got_ids)} of {len(sent)} messages"
                got_ids.append(m.msg_id)
            assert got_ids == sent
            assert coord._generation == 1, "the coordinator was disconnected and reconnected"
            assert coord._connected.is_set()
        finally:
            coord.close()
    finally:
        site_b.close()
    log = broker.log_text()
    assert "already connected" not in log, log
    as_coordinator = [line for line in log.splitlines() if " as coordinator (" in line]
    assert len(as_coordinator) == 2 and all("u'coordinator'" in line for line in as_coordinator), log
    ends = connection_ends(log, "coordinator")
    assert len(ends) == 2 and all(line.endswith(" disconnected.") for line in ends), ends
    assert len([line for line in log.splitlines() if " as site-a (" in line and "u'site-a'" in line]) == 10
