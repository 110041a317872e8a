"""Receiver side: verify, reassemble and open messages; reject everything else with a reason.

``Receiver.decode(topic, data)`` is the decoder: it returns a ``Message`` when the last chunk of a
valid message arrives, None while a message is incomplete (or for an ignorable duplicate), and
raises ``ProtocolError`` (nothing else) for a violation. ``Receiver.feed`` wraps it for the
transport: it never raises, logs each rejection with its reason and counts it in ``rejections``.

Checks per chunk, cheapest first: size, envelope syntax, federation, topic agreement (kind, sender,
round, message id, chunk index), sender in the roster with the role the kind needs, round window,
message size limit, recipient, Ed25519 signature (cached per message), replay, conflicting
duplicates. On the last chunk: key unwrap, AES-GCM per chunk (associated data = header + index +
final flag), total size and SHA-256 digest of the whole plaintext.

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
from neurofed.wire.envelope import ENC_AEAD, Frame, Header, decode_frame
from neurofed.wire.envelope import chunk_aad as _chunk_aad
from neurofed.wire.errors import ProtocolError
from neurofed.wire.topics import parse_topic

log = logging.getLogger(__name__)
_META_LEN = struct.Struct(">I")
_COPY_BELOW = 64 * 1024


@dataclass(frozen=True)
class _Chunk:
    """Where one spooled chunk's ciphertext lies, and what its AEAD needs besides the body."""

    offset: int
    length: int
    final: bool
    keys_bytes: bytes


@dataclass
class _Pending:
    """An incomplete message: its signed header in memory, its chunk bodies in a spool file."""

    header: Header
    header_bytes: bytes
    signature: bytes
    first_seen: float
    spool_dir: str | None = None
    in_memory: bool = False  # keep the chunk bodies themselves (see Receiver's spool_in_memory)
    chunks: dict[int, _Chunk] = field(default_factory=dict)
    nbytes: int = 0
    spool: BinaryIO | None = None
    bodies: dict[int, bytes | memoryview] = field(default_factory=dict)

    def store(self, f: Frame) -> None:
        if self.in_memory:
            self.bodies[f.index] = f.body
            self.chunks[f.index] = _Chunk(0, len(f.body), f.final, f.keys_bytes)
            self.nbytes += len(f.body)
            return
        if self.spool is None:
            self.spool = tempfile.TemporaryFile(dir=self.spool_dir, prefix="nf-spool-")
        offset = self.spool.seek(0, 2)
        self.spool.write(f.body)
        self.chunks[f.index] = _Chunk(offset, len(f.body), f.final, f.keys_bytes)
        self.nbytes += len(f.body)

    def body(self, index: int) -> bytes | memoryview:
        if self.in_memory:
            return self.bodies[index]
        c = self.chunks[index]
        assert self.spool is not None
        self.spool.seek(c.offset)
        data = self.spool.read(c.length)
        if len(data) != c.length:
            raise ProtocolError("internal-error", f"spool file lost chunk {index} of {self.header.msg_id}")
        return data

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
    ) -> None:
        self.bundle = bundle
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
        self._lock = threading.Lock()

    # -- public -------------------------------------------------------------------------------
    def set_round_window(self, lowest: int, highest: int) -> None:
        self.window = (lowest, highest)

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
                self._pending_bytes -= p.nbytes
                p.close()

    def feed(self, topic: str, data: bytes, retained: bool = False) -> Message | None:
        """Decode, logging and counting any rejection; never raises. ``retained``: the broker says
        this is a copy (retained, or a DUP redelivery), so a message already taken is ignored
        quietly instead of counted as a replay (it is never delivered twice either way)."""
        if not data:  # an empty retained publish clears a topic; nothing to decode
            return None
        try:
            return self.decode(topic, data, retained)
        except ProtocolError as exc:
            self._reject(exc.reason, f"{topic}: {exc.detail}")
        except Exception:  # a decoder bug must not take the transport thread down
            log.exception("internal error decoding %s", topic)
            self.rejections["internal-error"] += 1
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
                    self._reject(
                        "incomplete-timeout",
                        f"{p.header.kind} {msg_id} from {p.header.sender}: {len(p.chunks)}/{p.header.count} "
                        f"chunks after {self.incomplete_timeout:.0f} s",
                    )
                    dropped += 1
        return dropped

    def decode(self, topic: str, data: bytes, retained: bool = False) -> Message | None:
        with self._lock:
            return self._decode(topic, data, retained)

    # -- internals ------------------------------------------------------------------------------
    def _reject(self, reason: str, detail: str) -> None:
        self.rejections[reason] += 1
        log.warning("%s rejected a message: %s (%s)", self.participant, reason, detail)

    def _remember(self, msg_id: str) -> None:
        self._done[msg_id] = None
        while len(self._done) > self.seen_capacity:
            self._done.popitem(last=False)

    def _drop(self, msg_id: str) -> None:
        p = self._pending.pop(msg_id, None)
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

    def _decode(self, topic: str, data: bytes, retained: bool) -> Message | None:  # noqa: C901, PLR0915 - the frame's checks in protocol order
        if len(data) > self.max_frame_bytes:
            raise ProtocolError("over-size-limit", f"envelope of {len(data)} bytes")
        f = decode_frame(data)
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
        lo, hi = self.window
        if h.kind is not MessageKind.STATUS and not lo <= h.round <= hi:
            raise ProtocolError("stale-or-future-round", f"round {h.round} outside [{lo}, {hi}]")
        if h.size > self.max_message_bytes:
            raise ProtocolError("over-size-limit", f"{h.size} bytes > limit {self.max_message_bytes}")
        if h.enc == ENC_AEAD and self.participant not in h.recipients:
            raise ProtocolError(
                "not-a-recipient", f"{h.kind} {h.msg_id} is not addressed to {self.participant}"
            )
        if h.msg_id in self._done:
            if retained:  # retained copies on every (re)subscription; DUP redeliveries after a reconnect
                log.debug("ignoring another copy of %s", h.msg_id)
                return None
            raise ProtocolError("replay", f"message id {h.msg_id} was already received")
        p = self._pending.get(h.msg_id)
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
            self._drop(h.msg_id)
            raise ProtocolError("chunk-conflict", f"message {h.msg_id} arrived with two different headers")
        if f.index == 0 and f.keys_bytes and hashlib.sha256(f.keys_bytes).hexdigest() != h.keys_digest:
            raise ProtocolError("tampered-keys", f"key block of {h.msg_id} does not match the signed header")
        old = p.chunks.get(f.index)
        if old is not None:
            if p.body(f.index) == f.body and old.keys_bytes == f.keys_bytes:
                log.debug("duplicate chunk %d of %s ignored", f.index, h.msg_id)
                return None
            self._drop(h.msg_id)
            raise ProtocolError(
                "chunk-conflict", f"chunk {f.index} of {h.msg_id} arrived twice with different content"
            )
        if h.count == 1:
            self._remember(h.msg_id)
            return self._open(p, {0: f})
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
        if len(p.chunks) < h.count:
            return None
        self._remember(h.msg_id)
        if self.defer_open:
            # complete: leave it spooled until the caller asks for it (``open_ready``)
            del self._pending[h.msg_id]
            self._ready.append(p)
            return None
        try:
            return self._open(p)
        finally:
            self._drop(h.msg_id)

    @property
    def ready_count(self) -> int:
        """Complete multi-chunk messages waiting, spooled, for ``open_ready`` (``defer_open``)."""
        return len(self._ready)

    def open_ready(self) -> Message | None:
        """Open the oldest complete spooled message; None if there is none or it fails its checks
        (logged and counted like any rejection). The caller decides when a bulk message comes
        into memory, so it can hold one at a time however many arrived."""
        with self._lock:
            if not self._ready:
                return None
            p = self._ready.popleft()
        try:
            return self._open(p)
        except ProtocolError as exc:
            self._reject(
                exc.reason, f"{p.header.kind} {p.header.msg_id} from {p.header.sender}: {exc.detail}"
            )
            return None
        finally:
            with self._lock:
                self._pending_bytes -= p.nbytes
            p.close()

    def _open(self, p: _Pending, frames: Mapping[int, Frame] | None = None) -> Message:
        """Decrypt chunk by chunk straight into one plaintext-sized buffer, hash, and split meta
        from payload: peak memory is the plaintext plus one chunk. ``frames`` holds the bodies of a
        single-chunk message (never spooled); otherwise they are read back from the spool."""
        h = p.header

        def body(i: int) -> bytes | memoryview:
            return frames[i].body if frames is not None else p.body(i)

        def chunk_aad(i: int) -> bytes:
            final = frames[i].final if frames is not None else p.chunks[i].final
            return _chunk_aad(p.header_bytes, i, final)

        keys_bytes = frames[0].keys_bytes if frames is not None else p.chunks[0].keys_bytes
        aead = None
        if h.enc == ENC_AEAD:
            try:
                wrapped = json.loads(keys_bytes)[self.participant]
                wrapped = base64.b64decode(wrapped, validate=True)
            except (ValueError, KeyError, TypeError, binascii.Error):
                raise ProtocolError("tampered-keys", f"no readable key for {self.participant}") from None
            info = crypto.wrap_info(h.federation, h.round, h.msg_id, h.sender, self.participant)
            aead = AESGCM(crypto.unwrap_key(wrapped, self.bundle.enc_key, info))
        buf = bytearray(h.size)
        view = memoryview(buf)
        digest = hashlib.sha256()
        size = 0
        for i in range(h.count):
            data = body(i)
            n = len(data) - crypto.TAG_LEN if aead else len(data)
            if n < 0 or size + n > h.size:
                raise ProtocolError("size-mismatch", f"more than the {h.size} bytes the header says")
            out = view[size : size + n]
            if aead:
                crypto.open_chunk_into(aead, i, data, chunk_aad(i), out)
            else:
                out[:] = data
            digest.update(out)
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
        return Message(h.kind, h.federation, h.round, h.sender, h.msg_id, meta, payload, h.digest)


def counters(receiver: Receiver) -> Mapping[str, int]:
    return dict(receiver.rejections)
