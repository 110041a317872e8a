"""Crafting envelopes by hand for rejection tests: a valid message, then one thing changed."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import replace

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
) -> list[tuple[str, bytes]]:
    """Seal like the real sender, without its role checks, signed with ``bundle``'s key.

    ``header_changes`` replaces header fields after the honest values are computed (then signs)."""
    fed = federation or bundle.federation
    me = sender or bundle.participant
    msg_id = new_msg_id()
    plain = encode_plaintext_prefix(meta or {}) + payload
    recips = sorted(recipients if recipients is not None else ["coordinator"])
    key = os.urandom(32)
    wrapped = {
        r: base64.b64encode(
            crypto.wrap_key(
                key,
                bundle.roster.participants[r].encryption_key(),
                crypto.wrap_info(fed, round, msg_id, me, r),
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
