"""Child processes that end with the process that launched them.

``neurofed demo``, ``experiment``, the broker helper and the benchmarks start a broker, a
coordinator and site processes. Their own clean-up (``finally``, atexit) cannot run when they are
SIGKILLed or the OOM killer picks them, and the children then train, hold ports and fill logs for
nobody. On Linux the kernel can send a child a signal when its parent dies (PR_SET_PDEATHSIG);
elsewhere this is a no-op. The signal follows the *thread* that started the child: start
children from a thread that outlives them (the launchers here use their main thread).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from functools import cache

_PR_SET_PDEATHSIG = 1


@cache
def _prctl() -> Callable[..., int] | None:
    # resolved in the parent: between fork and exec the child should only call it, not load
    # anything (another thread of the parent may have held the loader's lock at the fork)
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def ending_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets SIGTERM when this process dies.
    None where the kernel has no such signal."""
    prctl = _prctl()
    if prctl is None:
        return None
    sig = int(signal.SIGTERM)
    return lambda: prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def die_with_parent() -> None:
    """The same from inside the child: SIGTERM when its parent dies (first thing in a pool
    worker)."""
    ask = ending_with_parent()
    if ask is not None:
        ask()
