"""The site's append-only record of everything it sent out: the privacy officer's evidence.

One JSON object per line in ``STATE/audit.jsonl``: time, kind, round, message id, number of bytes
and SHA-256 of the message (its meta block and payload: the digest its envelope signs, which the
coordinator verifies and logs in its events for each update), and the small fields that went with
it (case counts, Dice, the model digest). Weights themselves are not copied here; the digest is
enough to prove which update left the building, and with which case count. Each line is flushed
and fsynced before the send is reported done, and the file is only ever opened for appending.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from neurofed.wire.sealing import message_digest


class AuditLog:
    """Append-only JSONL writer (thread-safe); ``entries()`` reads it back."""

    def __init__(self, path: str | os.PathLike[str], site: str) -> None:
        self.path = Path(path)
        self.site = site
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(
        self,
        kind: str,
        round: int,
        *,
        msg_id: str,
        payload: bytes = b"",
        meta: Mapping[str, Any] | None = None,
        resend: bool = False,
        digest: str | None = None,
    ) -> dict[str, Any]:
        """Append one send. ``digest``: the message's SHA-256 as the wire signed it
        (``Endpoint.sent_digest``), so a model-sized payload is not hashed again; without it the
        digest is computed here, the same way."""
        meta = dict(meta or {})
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "unix": round_ts(time.time()),
            "site": self.site,
            "kind": kind,
            "round": int(round),
            "msg_id": msg_id,
            "bytes": len(payload) if payload else len(json.dumps(meta, sort_keys=True, default=str).encode()),
            "sha256": digest or message_digest(meta, payload),
            "resend": resend,
            "fields": meta,
        }
        line = json.dumps(entry, sort_keys=True, default=str) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        return entry

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def round_ts(t: float) -> float:
    return float(f"{t:.3f}")
