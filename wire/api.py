"""The contract between the federation (edge node, coordinator) and the wire.

The federation speaks in ``Message`` objects through an ``Endpoint``; it never sees topics,
chunks, keys or paho. Two endpoints implement it: ``neurofed.wire.mqtt.MqttEndpoint`` (the real,
encrypted and signed MQTT 5 transport) and ``neurofed.wire.memory.MemoryHub`` (in-process, for unit tests of
round logic; every behaviour that crosses the wire is also tested on the real broker).

Routing is fixed by kind and role (see wire/PROTOCOL.md):
- coordinator -> every site: TASK (retained: the current round), MODEL (global weights), RECEIPTS,
  RELAY (secure aggregation: key sets, share bundles, survivor list, unmask request)
- site -> coordinator only: UPDATE (weights + case count, or a masked input), METRICS (evaluation
  of a global model), SECAGG (secure aggregation: key set, shares, echo, reveal)
- anyone -> anyone: STATUS (online/offline; signed, not secret)
- coordinator -> every site: ROSTER (retained: the CA-signed roster, versioned; signed, not secret)
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

COORDINATOR = "coordinator"


class MessageKind(enum.StrEnum):
    TASK = "task"
    MODEL = "model"
    RECEIPTS = "receipts"
    UPDATE = "update"
    METRICS = "metrics"
    STATUS = "status"
    SECAGG = "secagg"  # site -> coordinator: a secure-aggregation step (key set, shares, echo, reveal)
    RELAY = "relay"  # coordinator -> sites: what a secure-aggregation step relays to every site
    ROSTER = "roster"


# Who may send each kind: "coordinator" or "site".
SENDER_ROLE: Mapping[MessageKind, str] = {
    MessageKind.TASK: "coordinator",
    MessageKind.MODEL: "coordinator",
    MessageKind.RECEIPTS: "coordinator",
    MessageKind.UPDATE: "site",
    MessageKind.METRICS: "site",
    MessageKind.STATUS: "site",
    MessageKind.SECAGG: "site",
    MessageKind.RELAY: "coordinator",
    MessageKind.ROSTER: "coordinator",
}


@dataclass(frozen=True)
class Message:
    """One verified, decrypted, reassembled message as the federation sees it.

    ``meta`` is a small JSON object (authenticated and, except for STATUS, encrypted with the
    body); ``payload`` is the bulk bytes (safetensors for MODEL and UPDATE, empty otherwise): a
    read-only ``memoryview`` of the decrypted buffer when it is large (no copy), else ``bytes``.
    """

    kind: MessageKind
    federation: str
    round: int
    sender: str
    msg_id: str
    meta: dict[str, Any] = field(default_factory=dict)
    payload: bytes | memoryview = b""
    # SHA-256 (hex) of the plaintext (meta block + payload) that the envelope signed and the
    # receiver verified: what the coordinator logs and a site's audit log records
    digest: str = ""
    # the federation run the sender signed it for ("" from a site that has not joined one yet)
    run: str = ""


SENT_DIGESTS = 64  # digests of sent messages an endpoint keeps for its caller (``sent_digest``)


class Endpoint(ABC):
    """A participant's connection to the federation."""

    participant: str
    federation: str

    @abstractmethod
    def start(self, timeout: float = 30.0) -> None:
        """Connect (and subscribe); raise ``neurofed.wire.errors.TransportError`` if that fails in time."""

    @abstractmethod
    def close(self) -> None:
        """Publish offline status where relevant and disconnect cleanly."""

    @abstractmethod
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
        """Seal, sign, chunk and publish; return the message id once the broker acknowledged every
        chunk (QoS 1). Raises ``neurofed.wire.errors.TransportError`` on timeout or a payload the broker
        cannot take, ``ValueError`` if this participant may not send ``kind``.

        ``wait=False`` returns once the chunks are handed to the client, without waiting for the
        broker: for messages that are repeated anyway (receipts), where a broker round trip per
        message would hold up the caller while the broker is busy relaying updates; and for a
        group of messages that should travel back to back (a round's MODEL and its TASK), followed
        by one :meth:`flush`."""

    @abstractmethod
    def flush(self, timeout: float = 120.0) -> None:
        """Wait until the broker acknowledged every chunk sent so far, then finish what a waiting
        ``send`` finishes after its acknowledgements (a retained MODEL's older rounds are deleted).
        Raises ``neurofed.wire.errors.TransportError`` on timeout. Endpoints that deliver synchronously
        have nothing to wait for."""

    @abstractmethod
    def receive(self, timeout: float | None = None) -> Message | None:
        """The next verified message for this participant, or None after ``timeout`` seconds.
        Rejected messages never come out of here: they are logged and counted in ``rejections``."""

    @abstractmethod
    def wake(self) -> None:
        """Make a ``receive`` waiting in another thread return None now (or the next one, if none
        waits): a participant that waits for messages *or* for its own work to end is woken by the
        work's end instead of polling for it."""

    @abstractmethod
    def set_round_window(self, lowest: int, highest: int) -> None:
        """Accept only messages whose round lies in [lowest, highest] (replay/stale protection)."""

    run: str = ""

    def set_run(self, run: str) -> None:
        """Take part in federation run ``run``: it goes into every message this endpoint sends
        (signed header, key wraps), and other runs' messages are refused (a site still takes a
        coordinator's messages of a run that started later, so it can follow a new run)."""
        self.run = run

    def set_roster(self, roster: Any) -> None:
        """Take a newer verified roster (``neurofed.wire.roster.Roster``) from now on: messages
        are accepted from its participants and encrypted to its sites. Endpoints without a roster
        of their own ignore it."""
        return None

    def sent_digest(self, msg_id: str) -> str | None:
        """The SHA-256 (hex) this endpoint signed for message ``msg_id``, one of the last
        ``SENT_DIGESTS`` it sent, else None: a sender's audit log records it without hashing a
        model-sized payload a second time."""
        return getattr(self, "_sent_digests", {}).get(msg_id)

    def _remember_digest(self, msg_id: str, digest: str) -> None:
        sent = self.__dict__.setdefault("_sent_digests", {})
        sent[msg_id] = digest
        while len(sent) > SENT_DIGESTS:
            sent.pop(next(iter(sent)), None)  # the oldest (dicts keep insertion order)

    def drain_rejected(self) -> list[dict[str, Any]]:
        """Records of the messages rejected since the last call: reason, detail, the sender the
        header claims, whether its signature had verified, the publisher (the participant whose
        topic it came on), kind and round."""
        return []

    @property
    @abstractmethod
    def rejections(self) -> Mapping[str, int]:
        """Counters of rejected messages by reason (e.g. ``bad-signature``, ``replay``)."""

    @property
    def connections(self) -> int:
        """How many times this endpoint has connected to the broker. A change tells a publisher
        of retained messages that the broker may have restarted without them (Mosquitto saves
        retained messages every ``autosave_interval`` seconds, so a broker killed in between
        comes back without the newest): publish them again. Endpoints without a broker
        connection to lose stay at 1."""
        return 1

    def __enter__(self) -> Endpoint:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
