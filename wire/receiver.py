"""Receiver side: verify, reassemble and open messages; reject everything else with a reason.

``Receiver.decode(topic, data)`` is the decoder: it returns a ``Message`` when the last chunk of a
valid message arrives, None while a message is incomplete (or for an ignorable duplicate), and
raises ``ProtocolError`` (nothing else) for a violation. ``Receiver.feed`` wraps it for the
transport: it never raises, logs each rejection with its reason and counts it in ``rejections``.

Checks per chunk, cheapest first: size, envelope syntax, federation, topic agreement (kind, sender,
round, message id, chunk index), sender in the roster with the role the kind needs, federation run,
round window, message size limit, recipient, the KEM the roster names, Ed25519 signature (cached per message), replay,
conflicting duplicates. On the last chunk: key unwrap, AES-GCM per chunk (associated data = header +
index + final flag), total size and SHA-256 digest of the whole plaintext.

A chunk can displace or block another only once it authenticates. Until a message opens, a few
candidate bodies are kept per chunk index (a chunk published under the sender's topic by whoever
holds that sender's broker certificate cannot be told from the genuine one before its AES-GCM tag
is checked); a candidate that fails its tag is rejected (``tampered-chunk``) and the message waits
for the genuine one until its timeout, so a forged chunk arriving before or after the genuine one
spoils nothing.

Every rejection is counted by reason and kept as a record (``drain_rejected``: reason, detail, the
sender the header claims, whether its signature had verified, the publisher, kind, round), so the
federation can log and count it; the log lines themselves are rate-limited per publisher and
reason. The publisher is the participant whose topic the message came on (the broker's ACL lets
only that site's certificate, or the coordinator's, publish there): unlike the claimed sender, a
certificate cannot change it from one message to the next to escape the rate limit.

Run binding: every header names the federation run it belongs to. A receiver in run R takes only
messages of R (``other-run``); a site (``follow_newer_runs``) also takes the coordinator's messages
of a run that started later, so it can follow a new run's task. STATUS is exempt (a will is fixed at
connect time). ``seen_path`` persists the ids of the messages that are never retained (UPDATE,
METRICS, RECEIPTS), so the replay window survives a restart.

Memory stays flat in the number of concurrent senders: the ciphertext of an incomplete message
is spooled to an anonymous temporary file (``spool_dir``; deleted when the message is opened, is
dropped, or the process dies), so a coordinator receiving 100 interleaved uploads holds chunk
indexes in memory, not 100 models. Spooling ciphertext reveals nothing a broker could not see.
``spool_in_memory`` keeps the chunks in memory instead: for a site, which receives one model a
round from the coordinator alone (the broker's ACL), writing it to disk and reading it back was
work on every site at the start of every round (1.4 ms for a 2.4 MB model here).
With ``defer_open`` a complete multi-chunk message stays spooled until ``open_ready`` is called,
so the consumer brings bulk messages into memory one at a time. Opening decrypts chunk by chunk
straight into one buffer of the plaintext's size (``payload`` is a read-only memoryview of it). Disk use
is bounded by ``max_pending_messages`` incomplete messages and ``max_pending_bytes`` spooled bytes
(the oldest incomplete message is dropped first); incomplete messages are dropped after
``incomplete_timeout`` seconds (``expire``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import struct
import tempfile
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from neurofed.wire import crypto
from neurofed.wire.api import SENDER_ROLE, Message, MessageKind
from neurofed.wire.bundle import Bundle
from neurofed.wire.envelope import ENC_AEAD, Frame, Header, decode_frame, run_started_ms
from neurofed.wire.envelope import chunk_aad as _chunk_aad
from neurofed.wire.errors import ProtocolError
from neurofed.wire.topics import parse_topic

log = logging.getLogger(__name__)
_META_LEN = struct.Struct(">I")
_COPY_BELOW = 64 * 1024
MAX_CANDIDATES = 4  # bodies kept per chunk index until the message's key authenticates one
_PERSISTED_KINDS = frozenset(
    {MessageKind.UPDATE, MessageKind.METRICS, MessageKind.RECEIPTS, MessageKind.SECAGG, MessageKind.RELAY}
)
# STATUS (a will is fixed at connect time) and ROSTER (the CA's signature and its version order it,
# whichever run published it) carry round 0 and belong to no run
_NO_ROUND_KINDS = frozenset({MessageKind.STATUS, MessageKind.ROSTER})
_FOLLOWED_KINDS = frozenset({MessageKind.TASK, MessageKind.MODEL, MessageKind.RECEIPTS, MessageKind.RELAY})
_LOG_BURST = 5  # log lines per (sender, reason) and minute; the rest are counted, not logged


class _BadChunk(ProtocolError):
    """No candidate body of chunk ``index`` authenticates."""

    def __init__(self, index: int, detail: str) -> None:
        super().__init__("tampered-chunk", detail)
        self.index = index


@dataclass(frozen=True)
class _Chunk:
    """Where one spooled chunk candidate's ciphertext lies, and whether it is the final one."""

    offset: int
    length: int
    final: bool


@dataclass
class _Pending:
    """An incomplete message: its signed header in memory, its chunk bodies in a spool file
    (candidates per index, first arrived first, until one authenticates)."""

    header: Header
    header_bytes: bytes
    signature: bytes
    first_seen: float
    spool_dir: str | None = None
    in_memory: bool = False  # keep the chunk bodies themselves (see Receiver's spool_in_memory)
    chunks: dict[int, list[_Chunk]] = field(default_factory=dict)
    keys_bytes: bytes = b""  # chunk 0's key block, checked against the signed keys digest
    nbytes: int = 0
    spool: BinaryIO | None = None
    bodies: dict[tuple[int, int], bytes | memoryview] = field(default_factory=dict)
    key: bytes | None = None  # the content key, once unwrapped
    bad_candidates: int = 0  # candidates that failed while opening, not yet counted

    def store(self, f: Frame) -> None:
        """Add ``f``'s body as a candidate for its index."""
        k = len(self.chunks.setdefault(f.index, []))
        if f.index == 0 and f.keys_bytes:
            self.keys_bytes = f.keys_bytes
        if self.in_memory:
            self.bodies[(f.index, k)] = f.body
            self.chunks[f.index].append(_Chunk(0, len(f.body), f.final))
            self.nbytes += len(f.body)
            return
        if self.spool is None:
            self.spool = tempfile.TemporaryFile(dir=self.spool_dir, prefix="nf-spool-")
        offset = self.spool.seek(0, 2)
        self.spool.write(f.body)
        self.chunks[f.index].append(_Chunk(offset, len(f.body), f.final))
        self.nbytes += len(f.body)

    def body(self, index: int, k: int = 0) -> bytes | memoryview:
        if self.in_memory:
            return self.bodies[(index, k)]
        c = self.chunks[index][k]
        assert self.spool is not None
        self.spool.seek(c.offset)
        data = self.spool.read(c.length)
        if len(data) != c.length:
            raise ProtocolError("internal-error", f"spool file lost chunk {index} of {self.header.msg_id}")
        return data

    def holds(self, f: Frame) -> bool:
        """Whether this exact body is already a candidate for its index."""
        return any(
            bytes(self.body(f.index, k)) == bytes(f.body) for k in range(len(self.chunks.get(f.index, ())))
        )

    def keep_only(self, index: int, k: int | None) -> None:
        """Keep candidate ``k`` of ``index`` (``None``: none of them)."""
        cands = self.chunks.get(index, [])
        if self.in_memory:
            bodies = {j: self.bodies.pop((index, j)) for j in range(len(cands))}
            if k is not None:
                self.bodies[(index, 0)] = bodies[k]
        if k is None:
            self.chunks.pop(index, None)
        else:
            self.chunks[index] = [cands[k]]

    @property
    def complete(self) -> bool:
        return len(self.chunks) == self.header.count

    def close(self) -> None:
        self.bodies.clear()
        if self.spool is not None:
            self.spool.close()
            self.spool = None


class Receiver:
    def __init__(
        self,
        bundle: Bundle,
        *,
        max_message_bytes: int = 2 * 1024**3,
        max_pending_bytes: int = 3 * 1024**3,
        max_pending_messages: int = 512,
        max_frame_bytes: int = 64 * 1024 * 1024,
        incomplete_timeout: float = 300.0,
        seen_capacity: int = 200_000,
        spool_dir: str | Path | None = None,
        spool_in_memory: bool = False,
        defer_open: bool = False,
        clock: Callable[[], float] = time.monotonic,
        run: str | None = None,
        follow_newer_runs: bool = False,
        seen_path: str | Path | None = None,
    ) -> None:
        self.bundle = bundle
        self.run = run
        self.follow_newer_runs = follow_newer_runs
        self.defer_open = defer_open
        self.spool_dir = str(spool_dir) if spool_dir is not None else None
        self.spool_in_memory = spool_in_memory
        self.federation = bundle.federation
        self.participant = bundle.participant
        self.max_message_bytes = max_message_bytes
        self.max_pending_bytes = max_pending_bytes
        self.max_pending_messages = max_pending_messages
        self.max_frame_bytes = max_frame_bytes
        self.incomplete_timeout = incomplete_timeout
        self.seen_capacity = seen_capacity
        self.clock = clock
        self.window = (0, 2**31 - 1)
        self.rejections: Counter[str] = Counter()
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._ready: deque[_Pending] = deque()
        self._pending_bytes = 0
        self._done: OrderedDict[str, None] = OrderedDict()  # completed or rejected message ids
        self._ready_ids: dict[str, _Pending] = {}  # complete, waiting for open_ready
        self._lock = threading.Lock()
        self._rejected: deque[dict[str, object]] = deque(maxlen=10_000)
        self._log_budget: dict[
            tuple[str, str], list[float]
        ] = {}  # (publisher, reason): [window start, lines, quiet]
        self._current: dict[str, object] = {}  # what the frame being decoded claims (for rejections)
        self._seen_path = Path(seen_path) if seen_path is not None else None
        self._seen_file = None
        if self._seen_path is not None:
            self._load_seen()

    # -- public -------------------------------------------------------------------------------
    def set_round_window(self, lowest: int, highest: int) -> None:
        self.window = (lowest, highest)

    def set_run(self, run: str) -> None:
        """Take part in federation run ``run`` from now on: other runs' messages are refused."""
        self.run = run

    def drain_rejected(self) -> list[dict[str, object]]:
        """The rejection records since the last call (oldest first; at most the last 10,000)."""
        with self._lock:
            out = list(self._rejected)
            self._rejected.clear()
        return out

    @property
    def pending_bytes(self) -> int:
        """Ciphertext bytes of incomplete messages (spooled to disk, or held with ``spool_in_memory``)."""
        return self._pending_bytes

    def close(self) -> None:
        """Drop every incomplete or unopened message and its spool file."""
        with self._lock:
            for msg_id in list(self._pending):
                self._drop(msg_id)
            while self._ready:
                p = self._ready.popleft()
                self._ready_ids.pop(p.header.msg_id, None)
                self._pending_bytes -= p.nbytes
                p.close()
            if self._seen_file is not None:
                self._seen_file.close()
                self._seen_file = None

    def feed(self, topic: str, data: bytes, retained: bool = False) -> Message | None:
        """Decode, logging and counting any rejection; never raises. ``retained``: the broker says
        this is a copy (retained, or a DUP redelivery), so a message already taken is ignored
        quietly instead of counted as a replay (it is never delivered twice either way)."""
        if not data:  # an empty retained publish clears a topic; nothing to decode
            return None
        try:
            return self.decode(topic, data, retained)
        except ProtocolError as exc:
            with self._lock:
                self._reject(exc.reason, f"{topic}: {exc.detail}")
        except Exception:  # a decoder bug must not take the transport thread down
            log.exception("internal error decoding %s", topic)
            with self._lock:
                self._reject("internal-error", topic)
        return None

    def expire(self, now: float | None = None) -> int:
        """Drop incomplete messages older than the timeout (truncated streams); return how many."""
        now = self.clock() if now is None else now
        dropped = 0
        with self._lock:
            for msg_id in list(self._pending):
                p = self._pending[msg_id]
                if now - p.first_seen > self.incomplete_timeout:
                    self._drop(msg_id)
                    self._current = {
                        "sender": p.header.sender,
                        "publisher": p.header.sender,  # its chunks came on its topic
                        "kind": str(p.header.kind),
                        "round": p.header.round,
                    }
                    self._reject(
                        "incomplete-timeout",
                        f"{p.header.kind} {msg_id} from {p.header.sender}: {len(p.chunks)}/{p.header.count} "
                        f"chunks after {self.incomplete_timeout:.0f} s",
                    )
                    dropped += 1
        return dropped

    def decode(self, topic: str, data: bytes, retained: bool = False) -> Message | None:
        with self._lock:
            self._current = {"topic": topic}
            return self._decode(topic, data, retained)

    # -- internals ------------------------------------------------------------------------------
    def _reject(self, reason: str, detail: str) -> None:
        """Count, record and (rate-limited per publisher and reason) log one rejection."""
        self.rejections[reason] += 1
        cur = self._current
        sender = str(cur.get("sender", "?"))
        publisher = cur["publisher"] if "publisher" in cur else _topic_sender(cur.get("topic"))
        self._rejected.append(
            {
                "t": time.time(),
                "reason": reason,
                "detail": detail[:500],
                "sender": sender,
                "authenticated": bool(cur.get("authenticated", False)),
                "publisher": publisher,
                "kind": cur.get("kind"),
                "round": cur.get("round"),
            }
        )
        now = self.clock()
        who = publisher or "?"
        budget = self._log_budget.setdefault((who, reason), [now, 0, 0])
        if now - budget[0] >= 60.0:
            if budget[2]:
                log.warning(
                    "%s: %d more %s rejections of messages from %s in the last minute (counted, not logged)",
                    self.participant, budget[2], reason, who,
                )  # fmt: skip
            budget[:] = [now, 0, 0]
        if budget[1] < _LOG_BURST:
            budget[1] += 1
            log.warning("%s rejected a message: %s (%s)", self.participant, reason, detail)
        else:
            budget[2] += 1

    def _remember(self, msg_id: str) -> None:
        self._done[msg_id] = None
        while len(self._done) > self.seen_capacity:
            self._done.popitem(last=False)

    def _persist_seen(self, h: Header) -> None:
        """Record a delivered message's id on disk (kinds that are never retained only: a
        retained TASK or MODEL comes again after a restart and must be taken again)."""
        if self._seen_path is None or h.kind not in _PERSISTED_KINDS:
            return
        try:
            if self._seen_file is None:
                self._seen_path.parent.mkdir(parents=True, exist_ok=True)
                self._seen_file = open(self._seen_path, "a", buffering=1)  # noqa: SIM115 - kept open
            self._seen_file.write(f"{h.run} {h.msg_id}\n")
        except OSError as exc:  # a full disk must not stop the wire: the window stays in memory
            log.warning("%s: cannot record message ids in %s (%s)", self.participant, self._seen_path, exc)

    def _load_seen(self) -> None:
        assert self._seen_path is not None
        try:
            lines = self._seen_path.read_text().splitlines()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("%s: cannot read %s (%s)", self.participant, self._seen_path, exc)
            return
        ids = [ln.split(" ", 1)[-1] for ln in lines[-self.seen_capacity :] if ln.strip()]
        for msg_id in ids:
            self._remember(msg_id)
        if len(lines) > 2 * self.seen_capacity:  # compact: keep what the window holds
            tmp = self._seen_path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in lines[-self.seen_capacity :]))
            tmp.replace(self._seen_path)

    def _drop(self, msg_id: str) -> None:
        p = self._pending.pop(msg_id, None)
        if p is None and msg_id in self._ready_ids:
            p = self._ready_ids.pop(msg_id)
            self._ready.remove(p)
        if p is not None:
            self._pending_bytes -= p.nbytes
            p.close()
            self._remember(msg_id)

    def _check_topic(self, topic: str, f: Frame) -> None:
        h = f.header
        try:
            t = parse_topic(topic)
        except ProtocolError:
            raise ProtocolError(
                "topic-mismatch", f"envelope arrived on a non-neurofed topic {topic!r}"
            ) from None
        if t.federation != self.federation:
            raise ProtocolError("wrong-federation", f"topic is for federation {t.federation!r}")
        if t.sender is not None and t.sender != h.sender:
            raise ProtocolError(
                "sender-topic-mismatch", f"{h.sender!r} signed a message on {t.sender!r}'s topic"
            )
        if (
            t.kind is not h.kind
            or (t.round is not None and t.round != h.round)
            or (t.msg_id is not None and t.msg_id != h.msg_id)
            or (t.index is not None and t.index != f.index)
        ):
            raise ProtocolError(
                "topic-mismatch", f"header ({h.kind} r{h.round} {h.msg_id}#{f.index}) disagrees"
            )

    def _decode(self, topic: str, data: bytes, retained: bool) -> Message | None:
        if len(data) > self.max_frame_bytes:
            raise ProtocolError("over-size-limit", f"envelope of {len(data)} bytes")
        f = decode_frame(data)
        h = f.header
        self._current.update(sender=h.sender, kind=str(h.kind), round=h.round, authenticated=False)
        sender = self._admit(topic, f)
        p = self._pending.get(h.msg_id) or self._ready_ids.get(h.msg_id)
        if p is None and h.msg_id in self._done:
            if retained:  # retained copies on every (re)subscription; DUP redeliveries after a reconnect
                log.debug("ignoring another copy of %s", h.msg_id)
                return None
            raise ProtocolError("replay", f"message id {h.msg_id} was already received")
        if p is None:
            crypto.verify(sender.signing_key(), f.signature, f.header_bytes)
            if h.count > 1 and len(self._pending) >= self.max_pending_messages:
                oldest = next(iter(self._pending))
                self._drop(oldest)
                self._reject("memory-budget", f"dropped incomplete message {oldest} (too many in flight)")
            p = _Pending(h, f.header_bytes, f.signature, self.clock(), self.spool_dir, self.spool_in_memory)
            if h.count > 1:
                self._pending[h.msg_id] = p
        elif f.header_bytes != p.header_bytes or f.signature != p.signature:
            # the same message id with another header: a forgery (bad signature) or equivocation
            crypto.verify(sender.signing_key(), f.signature, f.header_bytes)
            self._current["authenticated"] = True
            self._drop(h.msg_id)
            raise ProtocolError("chunk-conflict", f"message {h.msg_id} arrived with two different headers")
        self._current["authenticated"] = True
        if f.index == 0 and f.keys_bytes and hashlib.sha256(f.keys_bytes).hexdigest() != h.keys_digest:
            raise ProtocolError("tampered-keys", f"key block of {h.msg_id} does not match the signed header")
        if h.count == 1:
            msg = self._open(p, {0: f})  # a failure leaves the id free for the genuine message
            self._delivered(h)
            return msg
        if f.index in p.chunks:
            if p.holds(f):
                log.debug("duplicate chunk %d of %s ignored", f.index, h.msg_id)
                return None
            self._add_candidate(p, f)
            return None
        if h.msg_id in self._ready_ids:  # complete already: only another candidate can arrive
            return None
        self._store(p, f)
        if not p.complete:
            return None
        self._remember(h.msg_id)
        if self.defer_open:
            # complete: leave it spooled until the caller asks for it (``open_ready``)
            del self._pending[h.msg_id]
            self._ready.append(p)
            self._ready_ids[h.msg_id] = p
            return None
        return self._open_complete(p)

    def _admit(self, topic: str, f: Frame):
        """The checks before any cryptography: federation, topic, roster and role, run, round
        window, size and recipient. Returns the sender's roster entry."""
        h = f.header
        if h.federation != self.federation:
            raise ProtocolError(
                "wrong-federation", f"message for {h.federation!r}, this is {self.federation!r}"
            )
        self._check_topic(topic, f)
        sender = self.bundle.roster.get(h.sender)
        if sender is None:
            raise ProtocolError("unknown-sender", f"{h.sender!r} is not in the roster (or was revoked)")
        if sender.role != SENDER_ROLE[h.kind]:
            raise ProtocolError("sender-role", f"{h.sender!r} ({sender.role}) may not send {h.kind}")
        newer_run = self._check_run(h)
        lo, hi = self.window
        # the coordinator sets the rounds: its later rounds are taken (a site that was away for
        # several rounds must find the current task), its earlier ones are stale
        if SENDER_ROLE[h.kind] == "coordinator":
            hi = 2**31 - 1
        if h.kind not in _NO_ROUND_KINDS and not newer_run and not lo <= h.round <= hi:
            raise ProtocolError("stale-or-future-round", f"round {h.round} outside [{lo}, {hi}]")
        if h.size > self.max_message_bytes:
            raise ProtocolError("over-size-limit", f"{h.size} bytes > limit {self.max_message_bytes}")
        if h.enc == ENC_AEAD and self.participant not in h.recipients:
            raise ProtocolError(
                "not-a-recipient", f"{h.kind} {h.msg_id} is not addressed to {self.participant}"
            )
        if h.enc == ENC_AEAD and h.kem != self.bundle.roster.kem:
            raise ProtocolError(
                "wrong-kem",
                f"{h.kind} {h.msg_id} is sealed with {h.kem}, but federation {self.federation!r} "
                f"seals with {self.bundle.roster.kem} (its signed roster); the sender was provisioned "
                "for another federation, or the message was downgraded",
            )
        return sender

    def _check_run(self, h: Header) -> bool:
        """Refuse another run's message (``other-run``). Returns True for a coordinator's message of
        a run that started after this site's (taken by a site that follows newer runs)."""
        if h.kind in _NO_ROUND_KINDS or h.run == (self.run or ""):
            return False
        if (
            self.follow_newer_runs
            and h.kind in _FOLLOWED_KINDS
            and run_started_ms(h.run) > run_started_ms(self.run or "")
        ):
            return True
        raise ProtocolError(
            "other-run",
            f"{h.kind} {h.msg_id} belongs to run {h.run or '(none)'}, this is {self.run or '(none)'}",
        )

    def _store(self, p: _Pending, f: Frame) -> None:
        """Spool a chunk's first candidate within the budget."""
        h = p.header
        if self._pending_bytes + len(f.body) > self.max_pending_bytes:
            while self._pending and self._pending_bytes + len(f.body) > self.max_pending_bytes:
                oldest = next(iter(self._pending))
                self._drop(oldest)
                if oldest == h.msg_id:
                    raise ProtocolError("memory-budget", f"{h.msg_id} does not fit the receive buffer")
                self._reject("memory-budget", f"dropped incomplete message {oldest} to stay in budget")
        try:
            p.store(f)
        except OSError as exc:  # a full or unwritable spool disk: drop the message, say why
            self._drop(h.msg_id)
            raise ProtocolError("memory-budget", f"cannot spool {h.msg_id} to disk ({exc})") from None
        self._pending_bytes += len(f.body)

    def _add_candidate(self, p: _Pending, f: Frame) -> None:
        """Another body for a chunk index already held. Once the message's key is known it is
        checked now (and the index keeps only the body that authenticates); before that it is
        kept beside the first, up to ``MAX_CANDIDATES``, and the tag decides on opening."""
        h = p.header
        key = self._content_key(p) if p.keys_bytes else None
        if key is not None:
            if not self._authentic(AESGCM(key), p.header_bytes, f.index, f.final, f.body):
                raise ProtocolError(
                    "tampered-chunk",
                    f"chunk {f.index} of {h.msg_id} fails authentication (the held one kept)",
                )
            for k in range(len(p.chunks[f.index])):  # the new one is genuine: are the held ones?
                if self._authentic(AESGCM(key), p.header_bytes, f.index, f.final, p.body(f.index, k)):
                    return  # cannot differ from a genuine body under the same key and nonce
            p.keep_only(f.index, None)
            self._store(p, f)
            self._reject(
                "tampered-chunk", f"chunk {f.index} of {h.msg_id}: the held body failed authentication"
            )
            return
        if len(p.chunks[f.index]) >= MAX_CANDIDATES:
            raise ProtocolError(
                "chunk-conflict",
                f"chunk {f.index} of {h.msg_id}: more than {MAX_CANDIDATES} different bodies",
            )
        self._store(p, f)

    def _authentic(
        self, aead: AESGCM, header_bytes: bytes, index: int, final: bool, body: bytes | memoryview
    ) -> bool:
        if len(body) < crypto.TAG_LEN:
            return False
        scratch = bytearray(len(body) - crypto.TAG_LEN)
        try:
            crypto.open_chunk_into(
                aead, index, body, _chunk_aad(header_bytes, index, final), memoryview(scratch)
            )
        except ProtocolError:
            return False
        return True

    def _content_key(self, p: _Pending) -> bytes:
        """Unwrap (once) the content key from the message's signed key block."""
        if p.key is None:
            h = p.header
            try:
                wrapped = json.loads(p.keys_bytes)[self.participant]
                wrapped = base64.b64decode(wrapped, validate=True)
            except (ValueError, KeyError, TypeError, binascii.Error):
                raise ProtocolError("tampered-keys", f"no readable key for {self.participant}") from None
            info = crypto.wrap_info(h.federation, h.round, h.msg_id, h.sender, self.participant, h.run)
            p.key = crypto.unwrap_key(wrapped, self.bundle.open_key, info)
        return p.key

    def _open_complete(self, p: _Pending) -> Message | None:
        """Open a complete message (the caller holds the lock)."""
        try:
            msg = self._open(p)
        except ProtocolError as exc:
            self._settle(p, exc)
            raise
        self._settle(p, None)
        return msg

    def _settle(self, p: _Pending, err: ProtocolError | None) -> None:
        """After an opening attempt (the caller holds the lock): deliver, or drop the message, or
        (no authentic body for a chunk) send it back to waiting for one until its timeout."""
        h = p.header
        self._ready_ids.pop(h.msg_id, None)
        for _ in range(p.bad_candidates):
            self._reject("tampered-chunk", f"{h.kind} {h.msg_id}: a chunk candidate failed authentication")
        p.bad_candidates = 0
        if isinstance(err, _BadChunk):
            p.keep_only(err.index, None)
            self._done.pop(h.msg_id, None)
            self._pending[h.msg_id] = p
            return
        self._pending.pop(h.msg_id, None)
        self._pending_bytes -= p.nbytes
        p.close()
        self._remember(h.msg_id)
        if err is None:
            self._persist_seen(h)

    def _delivered(self, h: Header) -> None:
        self._remember(h.msg_id)
        self._persist_seen(h)

    @property
    def ready_count(self) -> int:
        """Complete multi-chunk messages waiting, spooled, for ``open_ready`` (``defer_open``)."""
        return len(self._ready)

    def open_ready(self) -> Message | None:
        """Open the oldest complete spooled message; None if there is none or it fails its checks
        (logged and counted like any rejection). The caller decides when a bulk message comes
        into memory, so it can hold one at a time however many arrived. The decryption runs
        outside the lock, so the transport goes on taking in chunks meanwhile."""
        with self._lock:
            if not self._ready:
                return None
            p = self._ready.popleft()
            self._ready_ids.pop(p.header.msg_id, None)
        h = p.header
        msg: Message | None = None
        err: ProtocolError | None = None
        try:
            msg = self._open(p)
        except ProtocolError as exc:
            err = exc
        with self._lock:
            self._current = {
                "sender": h.sender,
                "publisher": h.sender,  # its chunks came on its topic
                "kind": str(h.kind),
                "round": h.round,
                "authenticated": True,
            }
            self._settle(p, err)
            if err is not None:
                self._reject(err.reason, f"{h.kind} {h.msg_id} from {h.sender}: {err.detail}")
        return msg

    def _open(self, p: _Pending, frames: Mapping[int, Frame] | None = None) -> Message:
        """Decrypt chunk by chunk straight into one plaintext-sized buffer, hash, and split meta
        from payload: peak memory is the plaintext plus one chunk. ``frames`` holds the bodies of a
        single-chunk message (never spooled); otherwise they are read back from the spool, trying
        each index's candidates in arrival order until one authenticates."""
        h = p.header
        if frames is not None:
            p.keys_bytes = frames[0].keys_bytes
        aead = AESGCM(self._content_key(p)) if h.enc == ENC_AEAD else None
        buf = bytearray(h.size)
        view = memoryview(buf)
        digest = hashlib.sha256()
        size = 0
        for i in range(h.count):
            if frames is not None:
                cands = [(frames[i].body, frames[i].final)]
            else:
                cands = [(p.body(i, k), c.final) for k, c in enumerate(p.chunks[i])]
            n = self._open_chunk(p, aead, i, cands, view, size)
            digest.update(view[size : size + n])
            size += n
        if size != h.size:
            raise ProtocolError("size-mismatch", f"{size} bytes, header says {h.size}")
        if digest.hexdigest() != h.digest:
            raise ProtocolError(
                "digest-mismatch", f"plaintext of {h.msg_id} does not match its signed digest"
            )
        try:
            (mlen,) = _META_LEN.unpack_from(view, 0)
            if 4 + mlen > size:
                raise ValueError("meta length beyond the end")
            meta = json.loads(bytes(view[4 : 4 + mlen]))
            if not isinstance(meta, dict):
                raise ValueError("meta is not a JSON object")
        except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ProtocolError("malformed-body", f"meta block unreadable ({exc})") from None
        rest = size - 4 - mlen
        # small payloads as bytes (what most callers compare against); bulk ones without a copy
        payload = bytes(view[4 + mlen :]) if rest <= _COPY_BELOW else view[4 + mlen :].toreadonly()
        return Message(h.kind, h.federation, h.round, h.sender, h.msg_id, meta, payload, h.digest, h.run)

    def _open_chunk(
        self,
        p: _Pending,
        aead: AESGCM | None,
        i: int,
        cands: list[tuple[bytes | memoryview, bool]],
        view: memoryview,
        size: int,
    ) -> int:
        """Decrypt the first candidate of chunk ``i`` that authenticates into ``view[size:]``;
        return its plaintext length. Candidates that fail are counted; none left: ``_BadChunk``."""
        h = p.header
        for k, (data, final) in enumerate(cands):
            n = len(data) - crypto.TAG_LEN if aead else len(data)
            if n < 0 or size + n > h.size:
                if len(cands) == 1:
                    raise ProtocolError("size-mismatch", f"more than the {h.size} bytes the header says")
                continue
            out = view[size : size + n]
            if aead is None:
                out[:] = data
                return n
            try:
                crypto.open_chunk_into(aead, i, data, _chunk_aad(p.header_bytes, i, final), out)
            except ProtocolError:
                if k < len(cands) - 1:
                    self._reject(
                        "tampered-chunk", f"chunk {i} of {h.msg_id}: a candidate failed authentication"
                    )
                continue
            if len(cands) > 1:  # the others differ from an authentic body: not authentic
                p.bad_candidates += len(cands) - 1 - k
                p.keep_only(i, k)
            return n
        raise _BadChunk(i, f"chunk {i} of {h.msg_id} fails authentication")


def _topic_sender(topic: object) -> str | None:
    """The participant a topic names (the coordinator for its own kinds), None if it names none."""
    if not isinstance(topic, str):
        return None
    try:
        return parse_topic(topic).sender
    except ProtocolError:
        return None


def counters(receiver: Receiver) -> Mapping[str, int]:
    return dict(receiver.rejections)
