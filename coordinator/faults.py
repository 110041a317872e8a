"""Named fault-injection points, so tests can kill the coordinator between two steps of a round.

``NEUROFED_FAULT=<point>`` (optionally ``NEUROFED_FAULT_ROUND=<r>``) makes the process SIGKILL
itself when it reaches that point: no cleanup, no flushing of anything but the log line, exactly
like a power cut. Points, in the order a round runs them:

- ``after-aggregate``: the new global model exists only in memory;
- ``after-persist``: the snapshot is on disk, registration not yet handed over;
- ``after-register``: the registration worker registered the round (and wrote its ledger);
- ``after-announce``: the next round's task and model are published;
- ``secagg-after-keysets`` / ``secagg-after-inputs``: a secure round's key sets relayed / its
  survivor list relayed (the sites' masked inputs taken in).

The round of a point is the round it belongs to (the aggregated round; for ``after-announce`` the
announced round). Without the variable every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

POINTS = (
    "after-aggregate",
    "after-persist",
    "after-register",
    "after-announce",
    "secagg-after-keysets",
    "secagg-after-inputs",
)
ENV_POINT = "NEUROFED_FAULT"
ENV_ROUND = "NEUROFED_FAULT_ROUND"

log = logging.getLogger(__name__)


def fault_point(point: str, round: int) -> None:
    """SIGKILL this process if ``NEUROFED_FAULT`` names ``point`` (and the round matches)."""
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; known: {', '.join(POINTS)}")
    wanted = os.environ.get(ENV_POINT)
    if wanted != point:
        return
    wanted_round = os.environ.get(ENV_ROUND)
    if wanted_round and int(wanted_round) != round:
        return
    log.critical("fault injection: SIGKILL at %s (round %d)", point, round)
    for h in logging.getLogger().handlers:
        h.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
