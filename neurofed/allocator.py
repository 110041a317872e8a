"""glibc malloc settings for the federation's long-running processes.

Every round a site and the coordinator allocate and free buffers of a model's size many times
over (encoding, sealing, TLS reads, opening, decoding). glibc serves allocations of 128 KiB and
more with a fresh ``mmap`` and returns them to the kernel when freed, or trims the heap when more
than a few MiB lie free at its top, so each of those buffers is page-faulted in again, 4 KiB at
a time. On the 2-core VM this kit is measured on that made encoding a 4.8 MB state dict take
9 ms instead of 1.4 ms, and reading TLS in 1 MiB requests cost 4.5 ms of CPU per MiB instead of
2.3. Serving allocations below ``MMAP_THRESHOLD`` from the heap and keeping up to
``TRIM_THRESHOLD`` of freed heap removes that cost; the price is up to ``TRIM_THRESHOLD`` of
freed memory kept per process (measured in the federation benchmark's summed RSS).

That price is per arena, and glibc gives each thread that allocates its own arena (up to eight
per core). A site sends its update from a worker thread while its main thread scores the model,
and paho reads on a thread of its own: with an arena each, model-sized buffers are freed into one
arena and allocated afresh in another (the ten-site federation's summed RSS 0.15-0.2 GB higher
with the small UNet, 0.4-0.6 GB with the default one). A secure-aggregation round trains and
scores on a worker thread while the main thread answers the protocol, and a second arena's heaps
hold at most 64 MiB each: beside the model and optimiser state, a convolution's large transient
buffers (torch's 3D unfold, tens of MB) take a fresh heap that is unmapped again when freed, so
every step page-faults and zeroes them anew (measured with perf, 10 sites on 2 cores: 6 % of the
whole federation's CPU in a steady secure round, and 0.35 GB more peak RSS than the plaintext
federation). ``ARENA_MAX`` 1 keeps every thread's allocations in the main arena, which grows with
``brk`` and keeps ``TRIM_THRESHOLD`` free: page zeroing is then 1 % of the CPU, a secure round
1.08x the plaintext one instead of 1.11x, and its peak RSS the plaintext federation's (6.34
against 6.36 GB). The threads' large allocations share one lock; small ones come from each
thread's cache as before.

``mallopt`` applies to the running process (no re-exec), only on glibc; anything else, or
``NEUROFED_MALLOC_TUNING=0``, or glibc tunables the operator already set (``GLIBC_TUNABLES``,
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``), leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD = 32 * 1024 * 1024  # above the small UNet's 4.8 MB and the default's 19 MB buffers
TRIM_THRESHOLD = 64 * 1024 * 1024
ARENA_MAX = 1  # every thread in the main arena (see the module docstring)
_OPERATOR_KNOBS = (
    "GLIBC_TUNABLES",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_ARENA_MAX",
)


def tune_malloc(env: dict[str, str] | None = None) -> bool:
    """Apply the thresholds above; True if they were applied."""
    env = dict(os.environ) if env is None else env
    if env.get("NEUROFED_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(k in env for k in _OPERATOR_KNOBS):
        log.debug("malloc: leaving the operator's glibc settings as they are")
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return False
    gnu_get_libc_version.restype = ctypes.c_char_p
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = (
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        and mallopt(M_ARENA_MAX, ARENA_MAX) == 1
    )
    log.debug(
        "malloc: mmap threshold %d, trim threshold %d, %d arenas (glibc %s): %s",
        MMAP_THRESHOLD,
        TRIM_THRESHOLD,
        ARENA_MAX,
        gnu_get_libc_version().decode(),
        "set" if ok else "refused",
    )
    return ok
