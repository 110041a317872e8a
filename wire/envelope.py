"""The envelope: one MQTT payload = one chunk of one message.

Binary layout (all integers big-endian)::

    "NFW\\x02"                      magic + frame version
    u16 len | header JSON           the signed header, identical in every chunk of a message
    64 bytes                        Ed25519 signature over SHA-256("neurofed-sig/1\\0" + header)
    u32 index | u8 flags            chunk index; flags bit 0 = final chunk
    u32 len | keys JSON             chunk 0 only: {recipient: base64(HPKE-wrapped content key)}
    body                            AES-256-GCM(chunk plaintext), or plaintext when enc = "none"

The header carries: v, fed, run (the federation run), round, sender, kind, msg (id), n (chunk count), size (plaintext bytes),
digest (SHA-256 hex of the whole plaintext), enc, recips (sorted recipient ids) and keys_digest
(SHA-256 hex of the keys JSON), and ``kem`` only for an encrypted message of a federation that seals
with the hybrid ``mlkem768-x25519`` (absent = ``x25519``). The chunk's associated data is the header plus index and flags.
``decode_frame`` only parses and type-checks; every failure is ``ProtocolError("malformed-header")``.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass

from neurofed.wire import kem as kems
from neurofed.wire.api import MessageKind
from neurofed.wire.crypto import SIG_LEN
from neurofed.wire.errors import ProtocolError

MAGIC = b"NFW\x02"
VERSION = 2
ENC_AEAD = "aes-256-gcm"
ENC_NONE = "none"
MAX_HEADER = 16 * 1024
MAX_KEYS = 256 * 1024
FLAG_FINAL = 1
_PREFIX = struct.Struct(">H")
_CHUNK = struct.Struct(">IB")
_KEYS = struct.Struct(">I")
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
# A federation run: its start (Unix milliseconds, 13 digits) and 64 random bits. "" only where a
# participant has not taken part in a run yet (a new site's STATUS).
RUN_RE = re.compile(r"^[0-9]{13}-[0-9a-f]{16}$")


def new_run_id(now_ms: int | None = None) -> str:
    """A fresh run id: the start time first, so runs order by it, then 64 random bits."""
    import os
    import time

    ms = int(time.time() * 1000) if now_ms is None else int(now_ms)
    return f"{ms:013d}-{os.urandom(8).hex()}"


def run_started_ms(run: str) -> int:
    """The start time (Unix ms) a run id carries; -1 for "" (no run)."""
    return int(run.split("-", 1)[0]) if RUN_RE.match(run or "") else -1


@dataclass(frozen=True)
class Header:
    """The signed part of an envelope, shared by every chunk of one message."""

    federation: str
    round: int
    sender: str
    kind: MessageKind
    msg_id: str
    count: int
    size: int
    digest: str
    enc: str
    recipients: tuple[str, ...]
    keys_digest: str
    run: str = ""
    v: int = VERSION
    kem: str = kems.DEFAULT  # the KEM that wrapped the content keys (signed: no downgrade)

    def to_bytes(self) -> bytes:
        doc = {
            "v": self.v,
            "fed": self.federation,
            "run": self.run,
            "round": self.round,
            "sender": self.sender,
            "kind": str(self.kind),
            "msg": self.msg_id,
            "n": self.count,
            "size": self.size,
            "digest": self.digest,
            "enc": self.enc,
            "recips": list(self.recipients),
            "keys_digest": self.keys_digest,
        }
        if self.kem != kems.DEFAULT:
            doc["kem"] = self.kem
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Frame:
    header: Header
    header_bytes: bytes
    signature: bytes
    index: int
    final: bool
    keys_bytes: bytes
    body: bytes | memoryview  # a view into the MQTT payload: no copy of the bulk

    @property
    def aad(self) -> bytes:
        return chunk_aad(self.header_bytes, self.index, self.final)


def chunk_aad(header_bytes: bytes, index: int, final: bool) -> bytes:
    return header_bytes + _CHUNK.pack(index, FLAG_FINAL if final else 0)


def frame_head(header_bytes: bytes, signature: bytes, index: int, final: bool, keys_bytes: bytes) -> bytes:
    """Everything of a frame before its body."""
    return b"".join(
        (
            MAGIC,
            _PREFIX.pack(len(header_bytes)),
            header_bytes,
            signature,
            _CHUNK.pack(index, FLAG_FINAL if final else 0),
            _KEYS.pack(len(keys_bytes)),
            keys_bytes,
        )
    )


def encode_frame(
    header_bytes: bytes, signature: bytes, index: int, final: bool, keys_bytes: bytes, body: bytes
) -> bytes:
    return frame_head(header_bytes, signature, index, final, keys_bytes) + bytes(body)


def frame_overhead(header_bytes: bytes, keys_bytes: bytes) -> int:
    return (
        len(MAGIC) + _PREFIX.size + len(header_bytes) + SIG_LEN + _CHUNK.size + _KEYS.size + len(keys_bytes)
    )


def _bad(detail: str) -> ProtocolError:
    return ProtocolError("malformed-header", detail)


def _field(doc: dict, name: str, typ: type) -> object:
    if name not in doc:
        raise _bad(f"header lacks {name!r}")
    value = doc[name]
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise _bad(f"header field {name!r} is not an integer")
    if not isinstance(value, typ):
        raise _bad(f"header field {name!r} is not {typ.__name__}")
    return value


def parse_header(data: bytes) -> Header:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad("header is not JSON") from None
    if not isinstance(doc, dict):
        raise _bad("header is not a JSON object")
    v = _field(doc, "v", int)
    if v != VERSION:
        raise _bad(f"header version {v} is not supported (this node speaks {VERSION})")
    kind_s = _field(doc, "kind", str)
    try:
        kind = MessageKind(kind_s)
    except ValueError:
        raise _bad(f"unknown message kind {kind_s!r}") from None
    rnd, n, size = _field(doc, "round", int), _field(doc, "n", int), _field(doc, "size", int)
    if not (0 <= rnd < 2**31 and 1 <= n < 2**31 and 0 <= size < 2**62):
        raise _bad("round, chunk count or size out of range")
    fed, sender, msg = _field(doc, "fed", str), _field(doc, "sender", str), _field(doc, "msg", str)
    run = _field(doc, "run", str)
    if run and not RUN_RE.match(run):
        raise _bad("header field 'run' is not a run id")
    for name, value in (("fed", fed), ("sender", sender), ("msg", msg)):
        if not ID_RE.match(value):
            raise _bad(f"header field {name!r} has invalid characters")
    digest, keys_digest = _field(doc, "digest", str), _field(doc, "keys_digest", str)
    if not HEX64.match(digest):
        raise _bad("digest is not a SHA-256 hex string")
    enc = _field(doc, "enc", str)
    recips = _field(doc, "recips", list)
    _check_recipients(enc, recips, keys_digest)
    kem = kems.DEFAULT
    if "kem" in doc:
        kem = _field(doc, "kem", str)
        if kem == kems.DEFAULT or kem not in kems.KEMS or enc != ENC_AEAD:
            raise _bad(f"header field 'kem' {kem!r} is not a KEM of an encrypted message")
    if len(doc) != 13 + ("kem" in doc):
        raise _bad("header has unexpected fields")
    return Header(fed, rnd, sender, kind, msg, n, size, digest, enc, tuple(recips), keys_digest, run, v, kem)


def _check_recipients(enc: str, recips: list, keys_digest: str) -> None:
    if enc == ENC_AEAD:
        if not recips or not HEX64.match(keys_digest):
            raise _bad("encrypted message without recipients or keys digest")
    elif enc == ENC_NONE:
        if recips or keys_digest:
            raise _bad("plain message with recipients")
    else:
        raise _bad(f"unknown encryption {enc!r}")
    if not all(isinstance(r, str) and ID_RE.match(r) for r in recips) or len(set(recips)) != len(recips):
        raise _bad("recipient list is invalid")


def decode_frame(data: bytes) -> Frame:
    """Parse one envelope; ProtocolError('malformed-header') if it is not one."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _bad("payload is not bytes")
    if not isinstance(data, bytes):
        data = bytes(data)
    if data[:4] != MAGIC:
        if len(data) >= 4 and data[:3] == MAGIC[:3]:
            raise _bad(f"frame version {data[3]} is not supported (this node speaks {VERSION})")
        raise _bad("not a neurofed envelope (bad magic)")
    pos = 4
    if len(data) < pos + _PREFIX.size:
        raise _bad("envelope truncated in the header length")
    (hlen,) = _PREFIX.unpack_from(data, pos)
    pos += _PREFIX.size
    if hlen > MAX_HEADER or len(data) < pos + hlen + SIG_LEN + _CHUNK.size + _KEYS.size:
        raise _bad("envelope truncated or header too long")
    header_bytes = data[pos : pos + hlen]
    pos += hlen
    signature = data[pos : pos + SIG_LEN]
    pos += SIG_LEN
    index, flags = _CHUNK.unpack_from(data, pos)
    pos += _CHUNK.size
    (klen,) = _KEYS.unpack_from(data, pos)
    pos += _KEYS.size
    if klen > MAX_KEYS or len(data) < pos + klen:
        raise _bad("envelope truncated in the key block")
    keys_bytes = data[pos : pos + klen]
    pos += klen
    if flags & ~FLAG_FINAL:
        raise _bad("unknown chunk flags")
    header = parse_header(header_bytes)
    final = bool(flags & FLAG_FINAL)
    if index >= header.count:
        raise ProtocolError("extra-chunk", f"chunk {index} of a {header.count}-chunk message")
    if final != (index == header.count - 1):
        raise _bad(f"final flag {final} on chunk {index} of {header.count}")
    if (index == 0 and header.enc == ENC_AEAD) != bool(keys_bytes):
        raise _bad("key block must be on chunk 0 of an encrypted message, and only there")
    return Frame(header, header_bytes, signature, index, final, keys_bytes, memoryview(data)[pos:])
