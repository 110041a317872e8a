"""Sender side: seal, sign and chunk one message into (topic, envelope) pairs.

The plaintext of a message is ``u32 len | meta JSON | payload``. It is hashed once (SHA-256, the
digest goes into the signed header), then encrypted chunk by chunk as the frames are consumed, so a
payload larger than memory allows twice, or larger than MQTT's 256 MiB packet limit, streams.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from neurofed.wire import crypto
from neurofed.wire import kem as kems
from neurofed.wire.api import COORDINATOR, SENDER_ROLE, MessageKind
from neurofed.wire.bundle import Bundle
from neurofed.wire.chunking import chunk_count, iter_chunks
from neurofed.wire.envelope import ENC_AEAD, ENC_NONE, Header, chunk_aad, frame_head
from neurofed.wire.topics import SINGLE_PACKET, topic_for

_META_LEN = struct.Struct(">I")


@dataclass
class SealedMessage:
    msg_id: str
    header: Header
    frames: Iterator[tuple[str, bytes | bytearray]]

    @property
    def count(self) -> int:
        return self.header.count


def new_msg_id() -> str:
    return os.urandom(16).hex()


def default_recipients(bundle: Bundle, kind: MessageKind) -> list[str]:
    if kind in (MessageKind.STATUS, MessageKind.ROSTER):
        # signed, not secret: liveness is no secret from the broker anyway, and the roster holds
        # public keys (a site added since the coordinator's last roster must be able to read it)
        return []
    if SENDER_ROLE[kind] == "coordinator":
        return bundle.roster.sites
    return [COORDINATOR]


def encode_plaintext_prefix(meta: Mapping[str, Any] | None) -> bytes:
    try:
        meta_bytes = json.dumps(
            dict(meta or {}), sort_keys=True, separators=(",", ":"), allow_nan=False
        ).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"message meta must be a JSON object of plain values: {exc}") from None
    return _META_LEN.pack(len(meta_bytes)) + meta_bytes


def message_digest(meta: Mapping[str, Any] | None, payload: bytes | memoryview = b"") -> str:
    """SHA-256 (hex) of a message's plaintext, the meta block and the payload: the digest its
    envelope signs and the receiver verifies (``Message.digest``). A site's audit log records it,
    so the coordinator can log what it verified without hashing the payload a second time."""
    return _plaintext_digest(encode_plaintext_prefix(meta), payload)


def _plaintext_digest(prefix: bytes, payload: bytes | memoryview) -> str:
    h = hashlib.sha256(prefix)
    h.update(payload)
    return h.hexdigest()


def seal_message(
    bundle: Bundle,
    kind: MessageKind,
    round: int,
    meta: Mapping[str, Any] | None = None,
    payload: bytes | memoryview = b"",
    *,
    chunk_size: int = 1024 * 1024,
    recipients: list[str] | None = None,
    msg_id: str | None = None,
    run: str = "",
) -> SealedMessage:
    """Prepare a message of federation run ``run``; its frames are produced (and encrypted)
    lazily. The run is in the signed header and in every key wrap's context; content keys are
    wrapped with the federation's KEM (its roster's), which the signed header names."""
    kind = MessageKind(kind)
    role = "coordinator" if bundle.role == "coordinator" else "site"
    if SENDER_ROLE[kind] != role:
        raise ValueError(f"{bundle.participant} ({role}) may not send {kind} messages")
    if not isinstance(round, int) or not 0 <= round < 2**31:
        raise ValueError(f"round must be an integer in [0, 2^31), got {round!r}")
    msg_id = msg_id or new_msg_id()
    prefix = encode_plaintext_prefix(meta)
    total = len(prefix) + len(memoryview(payload).cast("B"))
    if kind in SINGLE_PACKET:
        chunk_size = max(total, 1)
    digest = _plaintext_digest(prefix, payload)
    recips = sorted(default_recipients(bundle, kind) if recipients is None else recipients)
    for r in recips:
        if bundle.roster.get(r) is None:
            raise ValueError(f"recipient {r!r} is not in the roster of {bundle.federation}")
    fed, me = bundle.federation, bundle.participant
    if recips:
        key = crypto.new_content_key()
        wrapped = {
            r: base64.b64encode(
                crypto.wrap_key(
                    key,
                    bundle.roster.sealing_key(r),
                    crypto.wrap_info(fed, round, msg_id, me, r, run),
                )
            ).decode()
            for r in recips
        }
        keys_bytes = json.dumps(wrapped, sort_keys=True, separators=(",", ":")).encode()
        keys_digest = hashlib.sha256(keys_bytes).hexdigest()
    else:
        key, keys_bytes, keys_digest = b"", b"", ""
    header = Header(
        federation=fed,
        round=round,
        sender=me,
        kind=kind,
        msg_id=msg_id,
        count=chunk_count(total, chunk_size),
        size=total,
        digest=digest,
        enc=ENC_AEAD if recips else ENC_NONE,
        recipients=tuple(recips),
        keys_digest=keys_digest,
        run=run,
        kem=bundle.roster.kem if recips else kems.DEFAULT,
    )
    header_bytes = header.to_bytes()
    signature = crypto.sign(bundle.sign_key, header_bytes)

    def frames() -> Iterator[tuple[str, bytes]]:
        aead = AESGCM(key) if recips else None
        n = header.count
        for i, piece in enumerate(iter_chunks(prefix, payload, chunk_size)):
            final = i == n - 1
            head = frame_head(header_bytes, signature, i, final, keys_bytes if i == 0 else b"")
            if aead is None:
                frame: bytes | bytearray = head + bytes(piece)
            else:
                # one buffer per frame, the ciphertext written into its tail: no joined copy
                frame = bytearray(len(head) + len(piece) + crypto.TAG_LEN)
                frame[: len(head)] = head
                crypto.seal_chunk_into(
                    aead, i, piece, chunk_aad(header_bytes, i, final), memoryview(frame)[len(head) :]
                )
            yield topic_for(fed, kind, me, round, msg_id, i), frame

    return SealedMessage(msg_id, header, frames())
