"""MqttEndpoint against a real Mosquitto started from a provisioned bundle."""

from __future__ import annotations

import os
import threading
import time

import pytest

from neurofed.wire.api import MessageKind
from neurofed.wire.errors import TransportError
from neurofed.wire.mqtt import MqttEndpoint
from neurofed.wire.sealing import message_digest
from tests.fixtures.broker import connection_ends

pytestmark = pytest.mark.slow
MiB = 1024 * 1024


def receive_kind(ep: MqttEndpoint, kind: MessageKind, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = ep.receive(timeout=max(0.1, deadline - time.monotonic()))
        if m is not None and m.kind is kind:
            return m
    return None


def assert_late_joiner_gets_only(broker, r: int, model: bytes) -> None:
    """A site that was never online gets the retained TASK and MODEL of round ``r`` and nothing older."""
    late = MqttEndpoint(broker.bundle("site-b"))
    late.start(timeout=20)
    try:
        got = []
        while (m := late.receive(timeout=5)) is not None:
            got.append(m)
        kinds = [(m.kind, m.round) for m in got if m.kind is not MessageKind.STATUS]
        assert sorted(kinds) == [(MessageKind.MODEL, r), (MessageKind.TASK, r)]
        assert next(m for m in got if m.kind is MessageKind.MODEL).payload == model
    finally:
        late.close()


@pytest.fixture
def coord(broker):
    ep = MqttEndpoint(broker.bundle("coordinator"))
    ep.start(timeout=20)
    yield ep
    ep.close()


@pytest.fixture
def site_a(broker):
    ep = MqttEndpoint(broker.bundle("site-a"))
    ep.start(timeout=20)
    yield ep
    ep.close()


@pytest.mark.parametrize("size", [1024, 20 * MiB], ids=["1KB", "20MB"])
def test_update_round_trip(coord, site_a, size):
    data = os.urandom(size)
    msg_id = site_a.send(MessageKind.UPDATE, 1, meta={"num_cases": 4}, payload=data)
    m = receive_kind(coord, MessageKind.UPDATE)
    assert m is not None and m.msg_id == msg_id
    assert m.payload == data and m.meta == {"num_cases": 4} and m.sender == "site-a"
    # the digest the envelope signed and the receiver verified: what the sender can record itself
    assert m.digest == message_digest({"num_cases": 4}, data)
    assert m.digest != message_digest({"num_cases": 5}, data)
    # the sender keeps the digest it signed, for its audit log, without hashing the payload again
    assert site_a.sent_digest(msg_id) == m.digest
    assert site_a.sent_digest("another-id") is None
    assert coord.broker_max_packet is not None and coord.broker_max_packet >= MiB
    assert not coord.rejections


def test_model_to_sites_and_restarted_site_gets_current_task_and_model(broker, coord, site_a):
    # a site keeps a model's chunks in memory until it opens it, the coordinator spools to disk
    assert site_a.receiver.spool_in_memory and not coord.receiver.spool_in_memory
    coord.send(MessageKind.TASK, 1, meta={"round": 1}, retain=True)
    coord.send(MessageKind.MODEL, 1, payload=os.urandom(3 * MiB), retain=True)
    assert receive_kind(site_a, MessageKind.TASK).meta == {"round": 1}
    assert len(receive_kind(site_a, MessageKind.MODEL).payload) == 3 * MiB
    model2 = os.urandom(2 * MiB + 5)
    coord.send(MessageKind.TASK, 2, meta={"round": 2}, retain=True)
    coord.send(MessageKind.MODEL, 2, payload=model2, retain=True)
    # site-b was never online: it must get round 2's task and model only (round 1 cleared)
    assert_late_joiner_gets_only(broker, 2, model2)
    # the broker keeps retained messages across a restart (persistence)
    broker.restart()
    again = MqttEndpoint(broker.bundle("site-c"))
    again.start(timeout=20)
    try:
        assert receive_kind(again, MessageKind.MODEL, 20).payload == model2
    finally:
        again.close()


def test_reconnects_after_broker_restart(broker, coord, site_a):
    broker.restart()
    data = os.urandom(100_000)
    site_a.send(MessageKind.UPDATE, 1, payload=data, timeout=60)
    assert receive_kind(coord, MessageKind.UPDATE, 60).payload == data


def test_single_packet_over_broker_maximum_is_refused_locally(coord, site_a):
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="maximum packet size"):
        coord.send(MessageKind.TASK, 1, meta={"blob": "x" * (5 * MiB)}, retain=True, timeout=30)
    assert time.monotonic() - t0 < 10
    coord.send(MessageKind.TASK, 1, meta={"round": 1}, retain=True, timeout=30)  # connection still fine
    assert receive_kind(site_a, MessageKind.TASK).meta == {"round": 1}


def test_site_may_not_send_coordinator_kinds(site_a):
    with pytest.raises(ValueError, match="may not send"):
        site_a.send(MessageKind.MODEL, 1, payload=b"x")


def test_100_concurrent_uploads_arrive_intact(broker):
    """1200 QoS 1 chunks queued for an offline coordinator: above Mosquitto's default
    max_queued_messages (1000), which would silently drop some."""
    coord = MqttEndpoint(broker.bundle("coordinator"))
    coord.start(timeout=20)
    coord.close()  # persistent session: the broker now queues for it
    sites = [MqttEndpoint(broker.bundle(s), chunk_size=16 * 1024) for s in ("site-a", "site-b", "site-c")]
    for s in sites:
        s.start(timeout=20)
    payloads = {i: os.urandom(12 * 16 * 1024 - 100 - i) for i in range(100)}
    sent: dict[str, int] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def upload(i: int) -> None:
        try:
            mid = sites[i % 3].send(MessageKind.UPDATE, 1, meta={"i": i}, payload=payloads[i], timeout=120)
            with lock:
                sent[mid] = i
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors and len(sent) == 100
    for s in sites:
        s.close()
    coord = MqttEndpoint(broker.bundle("coordinator"))
    coord.start(timeout=20)
    try:
        got = {}
        deadline = time.monotonic() + 120
        while len(got) < 100 and time.monotonic() < deadline:
            m = coord.receive(timeout=5)
            if m is not None and m.kind is MessageKind.UPDATE:
                got[m.msg_id] = m
        assert len(got) == 100, (len(got), coord.rejections)
        for mid, m in got.items():
            assert m.payload == payloads[sent[mid]] and m.meta == {"i": sent[mid]}
        assert not coord.rejections
    finally:
        coord.close()


def test_payload_over_256_mib(coord, site_a):
    size = 256 * MiB + 4097  # above MQTT's packet maximum and paho's payload limit
    data = bytearray(os.urandom(MiB)) * 256 + os.urandom(4097)
    assert len(data) == size
    data = bytes(data)
    msg_id = site_a.send(MessageKind.UPDATE, 1, payload=data, timeout=300)
    m = receive_kind(coord, MessageKind.UPDATE, 300)
    assert m is not None and m.msg_id == msg_id and len(m.payload) == size
    assert m.payload == data


def test_bulk_messages_wait_spooled_until_the_consumer_asks(broker):
    """Flow control: six 1.5 MiB updates from three sites while the coordinator does not call
    receive. The endpoint verifies and spools them as they come (its inbox drains, nothing is
    decrypted), then decrypts one per ``receive`` call, so one bulk message is in memory at a time
    however many sites upload at once."""
    coord = MqttEndpoint(broker.bundle("coordinator"), receive_window=4)
    coord.start(timeout=20)
    sites = [MqttEndpoint(broker.bundle(s), chunk_size=64 * 1024) for s in ("site-a", "site-b", "site-c")]
    for s in sites:
        s.start(timeout=20)
    payloads = {i: os.urandom(3 * MiB // 2 + i) for i in range(6)}
    errors: list[BaseException] = []

    def upload(i: int) -> None:
        try:
            sites[i % 3].send(MessageKind.UPDATE, 1, meta={"i": i}, payload=payloads[i], timeout=120)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=upload, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        deadline = time.monotonic() + 30
        while coord.receiver.ready_count < 6 and time.monotonic() < deadline:
            time.sleep(0.1)
        # all six complete, verified chunk by chunk and spooled; none decrypted into memory yet
        assert coord.receiver.ready_count == 6 and coord._inbox.qsize() == 0
        assert coord.receiver.pending_bytes >= sum(map(len, payloads.values()))
        assert all(len(m.payload) < 1024 for m in list(coord._outbox.queue))  # STATUS only
        got = {}
        while len(got) < 6:
            m = coord.receive(timeout=5)
            assert m is not None, sorted(got)
            if m.kind is MessageKind.UPDATE:
                left = coord.receiver.ready_count
                assert left == 6 - len(got) - 1  # exactly one was opened for this call
                got[m.meta["i"]] = bytes(m.payload)
            del m
        assert got == payloads
        assert coord.receiver.pending_bytes == 0
    finally:
        for s in sites:
            s.close()
        coord.close()
    assert not coord.rejections


def test_both_ends_of_the_broker_connection_send_small_packets_at_once(broker, coord):
    """TCP_NODELAY on the client socket, set_tcp_nodelay in the broker's generated config (which
    this Mosquitto started with): acknowledgements and tasks do not wait out Nagle's algorithm."""
    import socket

    sock = coord._client.socket()
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    conf = (broker.root / "broker" / "mosquitto.conf").read_text()
    assert "\nset_tcp_nodelay true\n" in conf


def test_send_without_waiting_still_delivers_and_later_sends_wait_for_it(coord, site_a):
    """wait=False (receipts) returns before the broker's acknowledgement; the message arrives all
    the same, and the next waiting send returns only once every earlier chunk is acknowledged."""
    coord.send(MessageKind.RECEIPTS, 1, meta={"round": 1, "held": ["site-a"]}, wait=False)
    coord.send(MessageKind.RECEIPTS, 1, meta={"round": 1, "held": ["site-a", "site-b"]})
    assert not coord._unacked
    got = [receive_kind(site_a, MessageKind.RECEIPTS) for _ in range(2)]
    assert [m.meta["held"] for m in got] == [["site-a"], ["site-a", "site-b"]]


def test_model_and_task_back_to_back_then_flush_clears_older_rounds(broker, coord, site_a):
    """A round's MODEL and TASK go out without waiting in between (the coordinator's announce);
    flush() waits for both acknowledgements and only then deletes the older round's retained model,
    so a site that connects at any moment finds a complete model."""
    coord.send(MessageKind.MODEL, 1, payload=os.urandom(2 * MiB), retain=True)
    coord.send(MessageKind.TASK, 1, meta={"round": 1}, retain=True)
    model2 = os.urandom(3 * MiB + 7)
    coord.send(MessageKind.MODEL, 2, payload=model2, retain=True, wait=False)
    coord.send(MessageKind.TASK, 2, meta={"round": 2}, retain=True, wait=False)
    # before the flush, round 1's retained chunks are still there (deleted only after round 2's acks)
    assert coord._pending_keep and coord._retained[MessageKind.MODEL]
    coord.flush(timeout=30)
    assert not coord._unacked and not coord._pending_keep
    # the live site got round 2's model and task
    kinds = []
    while (m := site_a.receive(timeout=3)) is not None:
        kinds.append((m.kind, m.round))
    assert (MessageKind.MODEL, 2) in kinds and (MessageKind.TASK, 2) in kinds
    # a site connecting after the flush finds round 2 only: round 1's retained model was deleted
    assert_late_joiner_gets_only(broker, 2, model2)


def test_flush_times_out_with_a_clear_error_when_the_broker_is_gone(broker, coord):
    broker.stop()
    coord.send(MessageKind.TASK, 1, meta={"round": 1}, retain=True, wait=False)
    with pytest.raises(TransportError, match="not acknowledged in time"):
        coord.flush(timeout=1.5)


def test_socket_reads_are_capped_so_a_1_mib_chunk_is_not_one_allocation_per_tls_record():
    """paho asks the socket for the whole missing packet (up to a 1 MiB chunk); an SSL socket
    allocates that much per read. Our client asks for at most RECV_MAX. Fails loudly if paho
    renames the method the cap hooks into."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from neurofed.wire.mqtt import RECV_MAX, _Client

    assert hasattr(mqtt.Client, "_sock_recv"), "paho no longer reads through _sock_recv: move the cap"
    asked: list[int] = []

    class Sock:
        def recv(self, n: int) -> bytes:
            asked.append(n)
            return b"x" * min(n, 16384)

    c = _Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c._sock = Sock()
    try:
        assert len(c._sock_recv(1024 * 1024)) == 16384
        assert len(c._sock_recv(100)) == 100
    finally:
        c._sock = None  # the stand-in has no close() for paho's __del__
    assert asked == [RECV_MAX, 100]


def test_closing_while_messages_stream_in_says_goodbye_cleanly(broker, coord):
    """paho closes the socket right after writing DISCONNECT; with the broker's data still
    unread in it the kernel resets the connection and Mosquitto logs "disconnected: Protocol
    error." instead of "disconnected." (14 of 20 such closes without the settling wait)."""

    def flood(stop: threading.Event) -> None:  # models stream to the site while it closes
        while not stop.is_set():
            try:
                coord.send(
                    MessageKind.MODEL, 1, meta={"round": 1}, payload=b"m" * (3 * MiB), timeout=5, wait=False
                )
            except TransportError:
                pass
            time.sleep(0.0005)

    for _ in range(5):
        site = MqttEndpoint(broker.bundle("site-a"))
        site.start(timeout=20)
        stop = threading.Event()
        sender = threading.Thread(target=flood, args=(stop,), daemon=True)
        sender.start()
        try:
            time.sleep(0.5)
            site.close()
        finally:
            stop.set()
            sender.join(10)

    def ends() -> list[str]:
        return connection_ends(broker.log_text(), "site-a")

    deadline = time.monotonic() + 10
    while len(ends()) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(ends()) == 5 and all(line.endswith(" disconnected.") for line in ends()), ends()


def test_wake_ends_a_wait_for_messages_at_once_and_messages_still_come(coord, site_a):
    """``wake`` (a site's training or scoring ended) makes a ``receive`` blocked in another thread
    return None at once; one called after the wake returns None once; messages are unaffected."""
    import threading
    import time

    while coord.receive(timeout=0.5) is not None:  # the site's online status
        pass
    box: dict[str, float] = {}

    def wait() -> None:
        t0 = time.monotonic()
        box["got"] = coord.receive(timeout=20)
        box["took"] = time.monotonic() - t0

    th = threading.Thread(target=wait)
    th.start()
    time.sleep(0.3)
    coord.wake()
    th.join(5)
    assert not th.is_alive() and box["got"] is None and box["took"] < 5
    coord.wake()  # nobody waits: the next receive returns None once, then waits as usual
    assert coord.receive(timeout=20) is None
    site_a.send(MessageKind.UPDATE, 1, meta={"num_cases": 1}, payload=b"x")
    m = receive_kind(coord, MessageKind.UPDATE)
    assert m is not None and m.payload == b"x"
