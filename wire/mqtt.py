"""``MqttEndpoint``: the real transport, MQTT 5 over mutual TLS with paho-mqtt's callback API v2.

- TLS with the bundle's client certificate (the broker takes the certificate CN as the username
  and as the client id, and applies the ACL to it); QoS 1 everywhere; a persistent session (``clean_start=False`` and a
  session expiry) so the broker queues messages while a participant is away; automatic reconnect
  with exponential back-off; a will message (a signed ``offline`` STATUS) for sites.
- Subscriptions are made in ``on_connect`` so every reconnect renews them. Callbacks only enqueue:
  decoding and verification run on a worker thread, and nothing ever waits inside a callback
  (paho runs them on its network thread under its lock).
- Memory flat in the number of senders: the worker verifies each chunk and spools multi-chunk
  messages (MODEL, UPDATE) to disk as ciphertext; a complete one is decrypted only when the caller
  asks ``receive`` for the next message, so one bulk message is in memory at a time however many
  sites upload at once (the caller drops its reference before asking again). Incoming chunks are
  acknowledged only once spooled (paho's manual ack), and the CONNECT's Receive Maximum
  (``receive_window``) asks the broker to keep the rest (Mosquitto 2.0 honours it loosely).
- Chunks are sized under the Maximum Packet Size the broker announced in CONNACK, at most
  ``chunk_size``; a single-packet message that would not fit is refused locally with
  ``TransportError`` (the broker would disconnect us and paho would resend it for ever).
- ``send(..., retain=True)`` for TASK and MODEL keeps the current task and model on the broker, so
  a restarted site picks them up without the coordinator resending; when a new retained MODEL is
  sent, the previous round's retained chunks are cleared.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from neurofed.wire.api import COORDINATOR, SENDER_ROLE, Endpoint, Message, MessageKind
from neurofed.wire.bundle import Bundle, load_bundle
from neurofed.wire.chunking import DEFAULT_CHUNK, check_packet, plan_chunk_size
from neurofed.wire.errors import ProvisioningError, TransportError
from neurofed.wire.receiver import Receiver
from neurofed.wire.roster import Roster, roster_from_meta
from neurofed.wire.sealing import seal_message
from neurofed.wire.topics import parse_topic, prefix, subscriptions, topic_for

# The most one socket read asks for. paho reads a packet with recv(bytes still missing), up to a
# whole 1 MiB chunk per call, and an SSL socket allocates a buffer of the size asked for on every
# read, which then returns one TLS record (16 KiB): each record paid for a 1 MiB allocation and
# its release. Measured here (both ends of a TLS stream in one process): 4.5 ms of CPU per MiB
# read with 1 MiB reads, 1.7 ms with 64 KiB reads, 1.8 ms with 16 KiB reads.
RECV_MAX = 64 * 1024


class _Client(mqtt.Client):
    """paho's client with socket reads capped at ``RECV_MAX`` (see there)."""

    def _sock_recv(self, bufsize: int) -> bytes:
        return super()._sock_recv(min(bufsize, RECV_MAX))


log = logging.getLogger(__name__)

SESSION_EXPIRY = 7 * 24 * 3600


class MqttEndpoint(Endpoint):
    """A participant's connection to the federation over MQTT 5 (see wire/PROTOCOL.md).

    ``bundle`` is the participant's bundle folder (or a loaded ``Bundle``); ``host``/``port``
    override the broker address in it. ``client_id`` defaults to the participant id; the
    provisioned Mosquitto replaces any other id with the certificate's CN, so a second connection
    with the same certificate takes over the first one's connection and session. ``window`` is how many chunks may await the broker's
    acknowledgement at once (QoS 1 pipelining); it also bounds the sender's memory.
    """

    def __init__(
        self,
        bundle: Path | str | Bundle,
        *,
        host: str | None = None,
        port: int | None = None,
        client_id: str | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        window: int = 32,
        keepalive: int = 30,
        session_expiry: int = SESSION_EXPIRY,
        incomplete_timeout: float = 300.0,
        max_message_bytes: int = 2 * 1024**3,
        reconnect_delay: tuple[int, int] = (1, 30),
        receive_window: int = 8,
        spool_dir: str | Path | None = None,
        spool_in_memory: bool | None = None,
        run: str | None = None,
        seen_path: str | Path | None = None,
    ) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.run = run or ""
        self.participant = self.bundle.participant
        self.federation = self.bundle.federation
        self.role = "coordinator" if self.bundle.role == "coordinator" else "site"
        self.host = host or self.bundle.broker_host
        self.port = int(port or self.bundle.broker_port)
        # The provisioned broker sets every client id to the certificate's CN
        # (use_username_as_clientid), which is the participant id: ask for that id, so the id the
        # client knows, the broker's log and the persistent session all agree.
        self.client_id = client_id or self.participant
        self.chunk_size = chunk_size
        self.window = max(1, window)
        self.keepalive = keepalive
        self.session_expiry = session_expiry
        self.reconnect_delay = reconnect_delay
        self.receive_window = max(1, receive_window)
        self.receiver = Receiver(
            self.bundle,
            incomplete_timeout=incomplete_timeout,
            max_message_bytes=max_message_bytes,
            spool_dir=spool_dir,
            # a site receives one model a round, from the coordinator only: memory; the
            # coordinator receives every site's update at once: disk (flat in the sites)
            spool_in_memory=self.role == "site" if spool_in_memory is None else spool_in_memory,
            defer_open=True,
            run=run,
            # a site follows the coordinator into a run that started later (a new --state)
            follow_newer_runs=self.role == "site",
            seen_path=seen_path,
        )
        self.broker_max_packet: int | None = None
        # (topic, payload, retained, retained-or-redelivered, connection generation, mid, qos);
        # None stops the worker
        self._inbox: queue.Queue[tuple[str, bytes, bool, bool, int, int, int] | None] = queue.Queue()
        self._generation = 0
        self._arrival = threading.Condition()
        self._woken = False  # ``wake`` was called: the waiting (or next) ``receive`` returns None
        self._outbox: queue.Queue[Message] = queue.Queue()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._connect_error: str | None = None
        self._sub_mid: int | None = None
        self._acks = threading.Condition()
        self._unacked: set[int] = set()
        self._early_acks: set[int] = set()
        self._worker: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._retained: dict[MessageKind, set[str]] = {MessageKind.MODEL: set()}
        self._retained_lock = threading.Lock()
        self._ack_lock = threading.Lock()  # an acknowledgement is never queued once close() began
        # retained MODEL topics sent without waiting: older rounds' are deleted by flush()
        self._pending_keep: dict[MessageKind, set[str]] = {}
        self._closing = False
        self._last_inbound = 0.0  # monotonic time of the last message from the broker

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        c = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=True,
            manual_ack=True,
        )
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.bundle.ca_cert))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.bundle.client_cert), str(self.bundle.client_key))
        c.tls_set_context(ctx)
        c.reconnect_delay_set(*self.reconnect_delay)
        c.max_inflight_messages_set(self.window)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_socket_open = _no_delay
        if self.role == "site":
            will = seal_message(
                self.bundle, MessageKind.STATUS, 0, {"status": "offline", "reason": "lost"}, run=self.run
            )
            topic, frame = next(will.frames)
            c.will_set(topic, frame, qos=1, retain=False)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry
        props.ReceiveMaximum = self.receive_window
        self._client = c
        self._closing = False
        self._worker = threading.Thread(target=self._work, name=f"wire-{self.participant}", daemon=True)
        self._worker.start()
        try:
            c.connect_async(self.host, self.port, self.keepalive, clean_start=False, properties=props)
            c.loop_start()
        except (OSError, ValueError) as exc:
            self._shutdown_threads()
            raise TransportError(f"cannot reach broker {self.host}:{self.port}: {exc}") from None
        deadline = time.monotonic() + timeout
        while not self._subscribed.wait(0.05):
            if self._connect_error:
                err = self._connect_error
                self._shutdown_threads()
                raise TransportError(f"broker {self.host}:{self.port} refused {self.participant}: {err}")
            if time.monotonic() > deadline:
                self._shutdown_threads()
                raise TransportError(
                    f"no connection to broker {self.host}:{self.port} within {timeout:.0f} s "
                    "(is it running? are the bundle's certificates for this federation?)"
                )
        if self.role == "site":
            self._send(MessageKind.STATUS, 0, {"status": "online"}, b"", False, min(timeout, 30.0))

    def close(self) -> None:
        if self._client is None:
            return
        try:
            if self.role == "site" and self._connected.is_set():
                self._send(MessageKind.STATUS, 0, {"status": "offline", "reason": "closed"}, b"", False, 5.0)
        except TransportError as exc:
            log.info("%s: offline status not acknowledged: %s", self.participant, exc)
        # No acknowledgement may start after this. With the worker thread still acknowledging
        # chunks while paho disconnected, Mosquitto logged "Protocol error" for sites closing at
        # the end of a federation (6 of 9 benchmark runs; none of 3 with this). Unacknowledged
        # chunks are resent by the broker to the session's next connection, as after any
        # disconnect.
        with self._ack_lock:
            self._closing = True
        self._let_inbound_settle()
        self._client.disconnect()
        self._shutdown_threads()

    def _let_inbound_settle(self, quiet: float = 0.1, limit: float = 2.0) -> None:
        """Read what the broker already sent before paho closes the socket. paho closes it right
        after writing DISCONNECT; a TCP socket closed with unread data in it is reset, the reset
        can discard the DISCONNECT, and Mosquitto logs "disconnected: Protocol error." (7 of 10
        closes while 3-MB models streamed in; 0 of 10 with this wait). With acknowledgements
        stopped the broker sends at most ``receive_window`` more messages, so the stream goes
        quiet; those messages are redelivered to the session's next connection."""
        end = time.monotonic() + limit
        while time.monotonic() < end and time.monotonic() - self._last_inbound < quiet:
            time.sleep(quiet / 4)

    def _shutdown_threads(self) -> None:
        if self._client is not None:
            self._client.loop_stop()
        self._inbox.put(None)
        if self._worker is not None:
            self._worker.join(10)
        self._client = None
        self.receiver.close()

    # -- paho callbacks (network thread: enqueue only) ------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._connect_error = str(reason_code)
            log.warning("%s: broker refused connection: %s", self.participant, reason_code)
            return
        if properties is not None and hasattr(properties, "MaximumPacketSize"):
            self.broker_max_packet = int(properties.MaximumPacketSize)
        self._generation += 1
        self._connected.set()
        opts = SubscribeOptions(qos=1, noLocal=True, retainHandling=SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE)
        self._sub_topics = subscriptions(self.federation, self.role)
        result, mid = client.subscribe([(t, opts) for t in self._sub_topics])
        self._sub_mid = mid
        log.info("%s connected to %s:%s (session present: %s)", self.participant, self.host, self.port, flags)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        topics = getattr(self, "_sub_topics", [])
        bad = []
        for i, rc in enumerate(reason_codes):
            if not rc.is_failure:
                continue
            if i < len(topics) and topics[i].endswith("/roster"):
                # a broker ACL written before ROSTER existed: the site runs on, without live roster
                # changes, until `neurofed provision --add-site/--revoke` rewrites the ACL
                log.warning(
                    "%s: the broker refused the roster topic (%s); its ACL predates live membership: "
                    "regenerate it with neurofed provision",
                    self.participant,
                    rc,
                )
                continue
            bad.append(str(rc))
        if bad:
            self._connect_error = f"subscription refused ({', '.join(bad)})"
        elif mid == self._sub_mid:
            self._subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if not self._closing:
            log.warning("%s disconnected from broker (%s); reconnecting", self.participant, reason_code)

    def _on_message(self, client, userdata, msg) -> None:
        self._last_inbound = time.monotonic()
        # a redelivery (DUP) of a chunk we took before a reconnect counts as a copy, like retained
        again = bool(msg.retain) or bool(msg.dup)
        self._inbox.put((msg.topic, msg.payload, bool(msg.retain), again, self._generation, msg.mid, msg.qos))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._acks:
            if mid in self._unacked:
                self._unacked.discard(mid)
            else:
                self._early_acks.add(mid)
            self._acks.notify_all()

    # -- worker thread ---------------------------------------------------------------------------
    def _work(self) -> None:
        last_expire = time.monotonic()
        while True:
            try:
                item = self._inbox.get(timeout=1.0)
            except queue.Empty:
                item = ()
            if item is None:
                return
            if item:
                topic, data, retained, again, generation, mid, qos = item
                msg = None
                if self.role == "coordinator" and topic.startswith(prefix(self.federation) + "/model/"):
                    self._note_retained_model(topic, data, retained)
                else:
                    msg = self.receiver.feed(topic, data, again)
                    if msg is not None and msg.kind is MessageKind.ROSTER:
                        self._take_roster(msg)
                del data, item
                self._ack(generation, mid, qos)
                if msg is not None or self.receiver.ready_count:
                    with self._arrival:
                        if msg is not None:
                            self._outbox.put(msg)
                        self._arrival.notify_all()
                msg = None
            if time.monotonic() - last_expire > 5.0:
                self.receiver.expire()
                last_expire = time.monotonic()

    def _ack(self, generation: int, mid: int, qos: int) -> None:
        """PUBACK a decoded chunk. A chunk from an earlier connection is not acknowledged: its
        packet id means nothing on this one, and the broker resends it (duplicates are ignored)."""
        client = self._client
        with self._ack_lock:
            current = generation == self._generation and self._connected.is_set() and not self._closing
            if qos and client is not None and current:
                client.ack(mid, qos)

    def _note_retained_model(self, topic: str, data: bytes, retained: bool) -> None:
        if retained and data:
            with self._retained_lock:
                self._retained[MessageKind.MODEL].add(topic)

    # -- Endpoint API ----------------------------------------------------------------------------
    def send(
        self,
        kind: MessageKind,
        round: int,
        *,
        meta: Mapping[str, Any] | None = None,
        payload: bytes = b"",
        retain: bool = False,
        timeout: float = 120.0,
        wait: bool = True,
    ) -> str:
        kind = MessageKind(kind)
        if SENDER_ROLE[kind] != self.role:
            raise ValueError(f"{self.participant} ({self.role}) may not send {kind}")
        return self._send(kind, round, meta, payload, retain, timeout, wait)

    def _publish_and_track(self, topic: str, frame: bytes | None, retain: bool, deadline: float) -> None:
        """Publish QoS 1, keeping at most ``window`` chunks unacknowledged. paho calls on_publish
        under its own lock, so ours is never held across ``client.publish`` (no lock cycle); an
        acknowledgement that overtakes the bookkeeping is parked in ``_early_acks``."""
        assert self._client is not None
        with self._acks:
            while len(self._unacked) >= self.window:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportError(f"{self.participant}: broker did not acknowledge in time ({topic})")
                self._acks.wait(min(left, 1.0))
        info = self._client.publish(topic, frame, qos=1, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        with self._acks:
            if info.mid in self._early_acks:
                self._early_acks.discard(info.mid)
            else:
                self._unacked.add(info.mid)

    def _wait_all_acked(self, deadline: float, what: str) -> None:
        with self._acks:
            while self._unacked:
                left = deadline - time.monotonic()
                if left <= 0:
                    n = len(self._unacked)
                    raise TransportError(f"{self.participant}: {n} chunks of {what} not acknowledged in time")
                self._acks.wait(min(left, 1.0))

    def _send(self, kind, round, meta, payload, retain, timeout, wait=True) -> str:
        if self._client is None:
            raise TransportError(f"{self.participant}: endpoint not started")
        deadline = time.monotonic() + timeout
        chunk = plan_chunk_size(self.chunk_size, self.broker_max_packet)
        sealed = seal_message(self.bundle, kind, round, meta, payload, chunk_size=chunk, run=self.run)
        self._remember_digest(sealed.msg_id, sealed.header.digest)
        topics: list[str] = []
        for topic, frame in sealed.frames:
            check_packet(topic, len(frame), self.broker_max_packet)
            self._publish_and_track(topic, frame, retain, deadline)
            if retain:
                topics.append(topic)
        if not wait:
            if retain and kind is MessageKind.MODEL:
                with self._retained_lock:
                    self._pending_keep[kind] = set(topics)
            return sealed.msg_id
        self._wait_all_acked(deadline, f"{kind} {sealed.msg_id}")
        if retain and kind is MessageKind.MODEL:
            with self._retained_lock:
                self._pending_keep.pop(kind, None)
            self._clear_old_retained(kind, set(topics), deadline)
        return sealed.msg_id

    def flush(self, timeout: float = 120.0) -> None:
        if self._client is None:
            raise TransportError(f"{self.participant}: endpoint not started")
        deadline = time.monotonic() + timeout
        self._wait_all_acked(deadline, "messages sent without waiting")
        with self._retained_lock:
            pending, self._pending_keep = self._pending_keep, {}
        for kind, keep in pending.items():
            # deleted only now: a site that connects meanwhile still finds a complete model
            self._clear_old_retained(kind, keep, deadline)

    def _clear_old_retained(self, kind: MessageKind, keep: set[str], deadline: float) -> None:
        """An empty retained publish deletes a retained message: drop older rounds' model chunks."""
        with self._retained_lock:
            old = self._retained[kind] - keep
            self._retained[kind] = set(keep)
        for topic in sorted(old):
            self._publish_and_track(topic, None, True, deadline)
        self._wait_all_acked(deadline, "clearing old retained chunks")

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next message: small ones in arrival order, then a spooled bulk one, decrypted now.
        Drop the reference to the previous bulk message before calling again."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self._outbox.get_nowait()
            except queue.Empty:
                pass
            while self.receiver.ready_count:
                msg = self.receiver.open_ready()  # None: it failed its checks (counted)
                if msg is not None:
                    return msg
            with self._arrival:
                if self._outbox.qsize() or self.receiver.ready_count:
                    continue
                if self._woken:
                    self._woken = False
                    return None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._arrival.wait(left if left is not None else 1.0)

    def wake(self) -> None:
        with self._arrival:
            self._woken = True
            self._arrival.notify_all()

    def set_round_window(self, lowest: int, highest: int) -> None:
        self.receiver.set_round_window(lowest, highest)

    def set_run(self, run: str) -> None:
        self.run = run
        self.receiver.set_run(run)

    def set_roster(self, roster: Roster) -> None:
        """From now on accept messages from ``roster``'s participants and encrypt to its sites."""
        self.bundle = dataclasses.replace(self.bundle, roster=roster)
        self.receiver.bundle = self.bundle

    def _take_roster(self, msg: Message) -> None:
        """A ROSTER from the coordinator (worker thread): applied here, before any later message
        is decoded, if the CA signed it and it is newer than ours; older or equal ones are ignored
        (never downgraded). The message still goes to the caller."""
        from cryptography import x509

        try:
            ca = x509.load_pem_x509_certificate(self.bundle.ca_cert.read_bytes())
            roster = roster_from_meta(msg.meta, ca, self.federation)
        except (ProvisioningError, OSError, ValueError) as exc:
            log.warning("%s: ROSTER from %s refused: %s", self.participant, msg.sender, exc)
            return
        current = self.bundle.roster
        if roster.kem != current.kem:
            log.warning(
                "%s: ROSTER version %d from %s refused: it seals with %s, this federation with %s "
                "(the KEM is fixed at provisioning)",
                self.participant,
                roster.version,
                msg.sender,
                roster.kem,
                current.kem,
            )
            return
        if roster.version <= current.version:
            if roster.version < current.version:
                log.info(
                    "%s: ignoring roster version %d (holding %d)",
                    self.participant,
                    roster.version,
                    current.version,
                )
            return
        self.set_roster(roster)
        gone = sorted(set(current.participants) - set(roster.participants))
        new = sorted(set(roster.participants) - set(current.participants))
        log.warning(
            "%s: roster version %d applied (was %d): added %s, removed %s",
            self.participant,
            roster.version,
            current.version,
            ", ".join(new) or "none",
            ", ".join(gone) or "none",
        )

    def drain_rejected(self) -> list[dict[str, Any]]:
        return self.receiver.drain_rejected()

    @property
    def rejections(self) -> Mapping[str, int]:
        return dict(self.receiver.rejections)

    @property
    def connections(self) -> int:
        return self._generation


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """TCP_NODELAY on the broker connection: an acknowledgement or a task is a packet of a few
    bytes, and Nagle's algorithm holds it until the previous segment is acknowledged, which the
    broker's delayed ACK can stretch to 40 ms per exchange (the broker side: ``set_tcp_nodelay``)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (e.g. a unix socket or a test double)
        pass


def topic_of(federation: str, kind: MessageKind, sender: str, round: int, msg_id: str, index: int = 0) -> str:
    """Re-exported for tests and tools that publish raw envelopes."""
    return topic_for(federation, kind, sender, round, msg_id, index)


__all__ = ["MqttEndpoint", "COORDINATOR", "parse_topic", "topic_of"]
