"""An in-process stand-in for the MQTT transport, for fast unit tests of round logic.

It routes exactly like the real transport (kind and role decide who receives), keeps the last
retained message per kind for late joiners, and applies the round window, but does no crypto and
no chunking: those are tested on the real broker.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import Counter
from collections.abc import Mapping
from typing import Any

from neurofed.wire.api import COORDINATOR, SENDER_ROLE, Endpoint, Message, MessageKind
from neurofed.wire.envelope import run_started_ms
from neurofed.wire.errors import TransportError
from neurofed.wire.sealing import message_digest

_WAKE = object()  # what ``wake`` queues: ``receive`` returns None for it


class MemoryHub:
    """The 'broker': create one per federation, then ``hub.endpoint(participant)``."""

    def __init__(self, federation: str = "test") -> None:
        self.federation = federation
        self._lock = threading.Lock()
        self._endpoints: dict[str, MemoryEndpoint] = {}
        self._retained: dict[tuple[MessageKind, str], Message] = {}
        self._ids = itertools.count()
        self.sent: list[Message] = []

    def endpoint(self, participant: str) -> MemoryEndpoint:
        return MemoryEndpoint(self, participant)

    def _register(self, ep: MemoryEndpoint) -> None:
        with self._lock:
            self._endpoints[ep.participant] = ep
            retained = list(self._retained.values())
        for msg in retained:
            if self._is_for(msg, ep.participant):
                ep._deliver(msg)

    def _unregister(self, ep: MemoryEndpoint) -> None:
        with self._lock:
            if self._endpoints.get(ep.participant) is ep:
                del self._endpoints[ep.participant]

    @staticmethod
    def _is_for(msg: Message, participant: str) -> bool:
        if msg.sender == participant:
            return False
        if SENDER_ROLE[msg.kind] == "coordinator":
            return participant != COORDINATOR
        if msg.kind is MessageKind.STATUS:
            return True
        return participant == COORDINATOR

    def _publish(self, msg: Message, retain: bool) -> None:
        with self._lock:
            self.sent.append(msg)
            if retain:
                self._retained[(msg.kind, msg.sender)] = msg
            targets = [ep for p, ep in self._endpoints.items() if self._is_for(msg, p)]
        for ep in targets:
            ep._deliver(msg)


class MemoryEndpoint(Endpoint):
    def __init__(self, hub: MemoryHub, participant: str) -> None:
        self.hub = hub
        self.participant = participant
        self.federation = hub.federation
        self._queue: queue.Queue[Message] = queue.Queue()
        self._window = (0, 2**31)
        self._rejections: Counter[str] = Counter()
        self._rejected: list[dict[str, Any]] = []
        self._started = False
        self.run = ""

    def start(self, timeout: float = 30.0) -> None:
        self._started = True
        self.hub._register(self)

    def close(self) -> None:
        self._started = False
        self.hub._unregister(self)

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
        if not self._started:
            raise TransportError(f"{self.participant}: endpoint not started")
        role = "coordinator" if self.participant == COORDINATOR else "site"
        if SENDER_ROLE[MessageKind(kind)] != role:
            raise ValueError(f"{self.participant} ({role}) may not send {kind}")
        msg_id = f"{self.participant}-{next(self.hub._ids)}"
        msg = Message(
            MessageKind(kind),
            self.federation,
            round,
            self.participant,
            msg_id,
            dict(meta or {}),
            payload,
            message_digest(meta, payload),
            self.run,
        )
        self._remember_digest(msg_id, msg.digest)
        self.hub._publish(msg, retain)
        return msg_id

    def flush(self, timeout: float = 120.0) -> None:
        """Delivery is synchronous here: nothing is ever in flight."""
        if not self._started:
            raise TransportError(f"{self.participant}: endpoint not started")

    def _deliver(self, msg: Message) -> None:
        """The receiver's run and round checks (wire/receiver.py), without the cryptography."""
        lo, hi = self._window
        newer = False
        if msg.kind is not MessageKind.STATUS and msg.run != self.run:
            newer = (
                self.participant != COORDINATOR
                and msg.kind in (MessageKind.TASK, MessageKind.MODEL, MessageKind.RECEIPTS, MessageKind.RELAY)
                and run_started_ms(msg.run) > run_started_ms(self.run)
            )
            if not newer:
                self._refuse("other-run", msg)
                return
        if SENDER_ROLE[msg.kind] == "coordinator":
            hi = 2**31 - 1  # the coordinator sets the rounds: its later rounds are taken
        if msg.kind is not MessageKind.STATUS and not newer and not lo <= msg.round <= hi:
            self._refuse("stale-or-future-round", msg)
            return
        self._queue.put(msg)

    def _refuse(self, reason: str, msg: Message) -> None:
        self._rejections[reason] += 1
        self._rejected.append(
            {
                "reason": reason,
                "sender": msg.sender,
                "authenticated": True,
                "publisher": msg.sender,
                "kind": str(msg.kind),
                "round": msg.round,
            }
        )

    def drain_rejected(self) -> list[dict[str, Any]]:
        out, self._rejected = self._rejected, []
        return out

    def receive(self, timeout: float | None = None) -> Message | None:
        try:
            msg = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        return None if msg is _WAKE else msg

    def wake(self) -> None:
        self._queue.put(_WAKE)  # type: ignore[arg-type] - a marker, never handed out

    def set_round_window(self, lowest: int, highest: int) -> None:
        self._window = (lowest, highest)

    @property
    def rejections(self) -> Mapping[str, int]:
        return dict(self._rejections)
