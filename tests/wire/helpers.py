"""Crafting envelopes by hand for rejection tests (a valid message, then one thing changed), and a
raw MQTT client with a participant's certificate to publish them through a real broker."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
import threading
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from neurofed.wire import crypto
from neurofed.wire.api import MessageKind
from neurofed.wire.bundle import Bundle
from neurofed.wire.envelope import ENC_AEAD, Header, chunk_aad, encode_frame
from neurofed.wire.sealing import encode_plaintext_prefix, new_msg_id
from neurofed.wire.topics import topic_for


def forge(
    bundle: Bundle,
    kind: MessageKind,
    round: int,
    payload: bytes,
    *,
    meta: dict | None = None,
    chunk_size: int = 1024,
    recipients: list[str] | None = None,
    federation: str | None = None,
    sender: str | None = None,
    header_changes: dict | None = None,
    run: str = "",
    wrap_run: str | None = None,
    plaintext: bytes | None = None,
    msg_id: str | None = None,
) -> list[tuple[str, bytes]]:
    """Seal like the real sender, without its role checks, signed with ``bundle``'s key.

    ``run``: the federation run in the header and the key wraps (a receiver of run R takes only
    ``run=R``); ``wrap_run`` wraps the content key for another run than the header names.
    ``plaintext`` replaces ``meta block + payload`` (e.g. a meta block that is not JSON);
    ``msg_id`` reuses a message id. ``header_changes`` replaces header fields after the honest
    values are computed (then signs)."""
    fed = federation or bundle.federation
    me = sender or bundle.participant
    msg_id = msg_id or new_msg_id()
    plain = encode_plaintext_prefix(meta or {}) + payload if plaintext is None else plaintext
    wrap_for = run if wrap_run is None else wrap_run
    recips = sorted(recipients if recipients is not None else ["coordinator"])
    key = os.urandom(32)
    wrapped = {
        r: base64.b64encode(
            crypto.wrap_key(
                key,
                bundle.roster.participants[r].encryption_key(),
                crypto.wrap_info(fed, round, msg_id, me, r, wrap_for),
            )
        ).decode()
        for r in recips
    }
    keys_bytes = json.dumps(wrapped, sort_keys=True, separators=(",", ":")).encode() if recips else b""
    n = max(1, -(-len(plain) // chunk_size))
    header = Header(
        federation=fed,
        round=round,
        sender=me,
        kind=MessageKind(kind),
        msg_id=msg_id,
        count=n,
        size=len(plain),
        digest=hashlib.sha256(plain).hexdigest(),
        enc=ENC_AEAD if recips else "none",
        recipients=tuple(recips),
        keys_digest=hashlib.sha256(keys_bytes).hexdigest() if recips else "",
        run=run,
    )
    if header_changes:
        header = replace(header, **header_changes)
    hb = header.to_bytes()
    sig = crypto.sign(bundle.sign_key, hb)
    aead = AESGCM(key)
    frames = []
    for i in range(header.count):
        piece = plain[i * chunk_size : (i + 1) * chunk_size]
        final = i == header.count - 1
        body = crypto.seal_chunk(aead, i, piece, chunk_aad(hb, i, final)) if recips else piece
        frames.append(
            (
                topic_for(fed, header.kind, header.sender, header.round, header.msg_id, i),
                encode_frame(hb, sig, i, final, keys_bytes if i == 0 else b"", body),
            )
        )
    return frames


def feed_all(receiver, frames, retained: bool = False):
    """Feed frames; return the delivered messages."""
    out = []
    for topic, data in frames:
        m = receiver.feed(topic, data, retained)
        if m is not None:
            out.append(m)
    return out


def flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x01
    return bytes(b)


class RawClient:
    """A raw paho MQTT 5 client with one participant's certificate: what whoever holds that
    certificate can run without this project's code. The broker makes the client id the
    certificate's CN, so while it is connected the participant's own connection is displaced: use
    a site's certificate while that site's process is not running. ``cert``/``key``: other files
    of the folder (a regional broker's ``bridge.crt``/``bridge.key``)."""

    def __init__(
        self,
        bundle_dir: Path,
        port: int,
        *,
        subscribe: Sequence[str] = (),
        host: str = "localhost",
        cert: str = "client.crt",
        key: str = "client.key",
    ):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.received: list[tuple[str, bytes, bool]] = []
        self.refused: list[str] = []  # PUBACK reason codes other than success
        self._lock = threading.Lock()
        ready = threading.Event()
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"raw-{os.getpid()}", protocol=mqtt.MQTTv5
        )
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(Path(bundle_dir) / "ca.crt"))
        ctx.load_cert_chain(str(Path(bundle_dir) / cert), str(Path(bundle_dir) / key))
        self.c.tls_set_context(ctx)
        pending_sub: list[int] = []

        def on_connect(client, userdata, flags, reason_code, properties):
            if subscribe:
                pending_sub.append(client.subscribe([(t, 1) for t in subscribe])[1])
            else:
                ready.set()

        def on_subscribe(client, userdata, mid, reason_codes, properties):
            ready.set()

        def on_publish(client, userdata, mid, reason_code, properties):
            if reason_code.is_failure:
                with self._lock:
                    self.refused.append(str(reason_code))

        def on_message(client, userdata, msg):
            with self._lock:
                self.received.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

        self.c.on_connect, self.c.on_subscribe = on_connect, on_subscribe
        self.c.on_publish, self.c.on_message = on_publish, on_message
        self.c.connect(host, port, 30, clean_start=True)
        self.c.loop_start()
        if not ready.wait(20):
            self.close()
            raise TimeoutError(f"raw client with {bundle_dir}'s certificate: no CONNACK/SUBACK")

    def publish(self, frames: Iterable[tuple[str, bytes | bytearray]], timeout: float = 30.0) -> int:
        """Publish ``(topic, payload)`` pairs in order at QoS 1 and wait for the broker to take
        each (PUBACK); returns how many. A refusal by the broker (its ACL) fails the caller's test."""
        infos = [self.c.publish(topic, bytes(data), qos=1) for topic, data in frames]
        for info in infos:
            info.wait_for_publish(timeout)
        assert not self.refused, f"the broker refused publishes: {self.refused}"
        return len(infos)

    def messages(self, topic_prefix: str = "") -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return [m for m in self.received if m[0].startswith(topic_prefix)]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()
