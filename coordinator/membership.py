"""Live membership on the coordinator's side: it watches its bundle's roster (``neurofed
provision --add-site/--revoke`` re-sign it and copy it into every bundle folder; a coordinator on
another machine gets the two files copied into its bundle), and a newer verified version is
taken at once and published to the sites as a retained ROSTER message (wire/PROTOCOL.md)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from neurofed.wire.errors import ProvisioningError
from neurofed.wire.roster import Roster, verify_roster

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SignedRoster:
    roster: Roster
    data: bytes  # the exact bytes the CA signed
    sig: bytes  # base64 DER ECDSA, as in roster.sig


class RosterWatch:
    """Polls ``bundle/roster.json`` and ``roster.sig`` (at most every ``interval`` seconds) and
    returns a newer roster the CA signed; an older, equal, foreign or half-written one is not
    taken (the next poll reads the files again)."""

    def __init__(self, bundle_dir: Path | str, interval: float = 1.0) -> None:
        from cryptography import x509

        self.dir = Path(bundle_dir)
        self.interval = interval
        self._ca = x509.load_pem_x509_certificate((self.dir / "ca.crt").read_bytes())
        self.current = self._read()
        if self.current is None:
            raise ProvisioningError(f"{self.dir}: roster.json / roster.sig unreadable")
        self._stamp = self._stat()
        self._next = 0.0

    def _stat(self) -> tuple:
        out = []
        for name in ("roster.json", "roster.sig"):
            try:
                st = os.stat(self.dir / name)
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def _read(self) -> SignedRoster | None:
        try:
            data = (self.dir / "roster.json").read_bytes()
            sig = (self.dir / "roster.sig").read_bytes().strip()
            return SignedRoster(verify_roster(data, sig, self._ca, str(self.dir / "roster.json")), data, sig)
        except (OSError, ProvisioningError) as exc:
            log.debug("roster not readable yet: %s", exc)
            return None

    def poll(self, now: float) -> SignedRoster | None:
        if now < self._next:
            return None
        self._next = now + self.interval
        stamp = self._stat()
        if stamp == self._stamp:
            return None
        new = self._read()
        if new is None:
            return None  # half-written (roster.json replaced, roster.sig not yet): read again later
        self._stamp = stamp
        assert self.current is not None
        if new.roster.federation != self.current.roster.federation:
            log.error("%s: roster of federation %r ignored", self.dir, new.roster.federation)
            return None
        if new.roster.version <= self.current.roster.version:
            if new.roster.version < self.current.roster.version:
                log.warning(
                    "%s: roster version %d is older than the one in use (%d); ignored (never downgraded)",
                    self.dir,
                    new.roster.version,
                    self.current.roster.version,
                )
            return None
        self.current = new
        return new
