"""SIGTERM as a request to stop, not a kill.

``docker stop``, systemd, a launcher's teardown, ``timeout`` and the kernel's parent-death signal
(``neurofed.children``) all send SIGTERM. Python's default is to die on the spot: no ``finally``,
no goodbye to the broker (no offline status, no DISCONNECT: Mosquitto logs that the client "closed
its connection" and publishes its will). Here SIGTERM unwinds like Ctrl-C, and once the process is
on its way out a second one does not cut the goodbye short (launchers send SIGTERM to sites that
are already leaving after the federation's end).
"""

from __future__ import annotations

import signal
from collections.abc import Callable


def exit_on_sigterm() -> None:
    """From now on SIGTERM raises ``SystemExit(143)`` in the main thread (``finally`` blocks run),
    once: the handler ignores further SIGTERMs while the process unwinds."""

    def stop(signum: int, frame: object) -> None:
        leaving()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def leaving(note: Callable[[], None] | None = None) -> None:
    """Already on the way out: ignore SIGTERM so the clean-up finishes (its own timeouts bound
    it; a launcher that cannot wait sends SIGKILL). ``note`` is called on each SIGTERM ignored
    (a log line saying why and for how long), in the main thread, between two of its steps."""
    if note is None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return

    def ignore(signum: int, frame: object) -> None:
        note()

    signal.signal(signal.SIGTERM, ignore)
