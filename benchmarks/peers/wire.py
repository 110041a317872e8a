"""Bytes and time on shaped links for a peer framework's rounds, from the sites' veth counters.

A thread samples ``ShapedLinks.counters()`` every 0.1 s while the peer runs; :func:`wire_rows`
then gives each round (bounded by the peer's own start marks) the bytes sent to and received from
the sites and the time any site's link ran above 5 % of its rate: the same rules
``benchmarks.federation_overhead.link_rows`` applies to neurofed, so the figures compare.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

Counters = dict[str, tuple[int, int]]


class LinkSampler:
    """``counters()`` every ``period`` seconds in a daemon thread, as (time, counters) pairs."""

    def __init__(self, counters: Callable[[], Counters], period: float = 0.1) -> None:
        self._counters = counters
        self.period = period
        self.samples: list[tuple[float, Counters]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self._counters()))
            self._stop.wait(self.period)

    def __enter__(self) -> LinkSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self.samples.append((time.time(), self._counters()))


def wire_rows(
    samples: list[tuple[float, Counters]],
    bounds: Mapping[int, tuple[float, float]],
    uplink_mbit: float | None,
    downlink_mbit: float | None,
) -> list[dict[str, Any]]:
    """Per round ``r`` in ``bounds`` (start, end): bytes down/up on the site links and wire time."""
    if not samples:
        return []
    rates = {"down": (downlink_mbit or 0) * 1e6 / 8, "up": (uplink_mbit or 0) * 1e6 / 8}

    def at(t: float) -> Counters:
        return min(samples, key=lambda s: abs(s[0] - t))[1]

    rows = []
    for r in sorted(bounds):
        a, b = bounds[r]
        c0, c1 = at(a), at(b)
        window = [s for s in samples if a <= s[0] <= b]
        busy = 0.0
        for (t0, x0), (t1, x1) in zip(window, window[1:], strict=False):
            dt = t1 - t0
            if dt > 0 and any(
                (x1[s][0] - x0[s][0]) / dt > 0.05 * rates["down"] > 0
                or (x1[s][1] - x0[s][1]) / dt > 0.05 * rates["up"] > 0
                for s in x1
            ):
                busy += dt
        rows.append(
            {
                "round": r,
                "round_s": round(b - a, 3),
                "bytes_down": sum(c1[s][0] - c0[s][0] for s in c1),
                "bytes_up": sum(c1[s][1] - c0[s][1] for s in c1),
                "wire_s": round(busy, 2),
                "wire_share": round(busy / (b - a), 3) if b > a else None,
            }
        )
    return rows


def steady(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds 2.. (round 1 includes start-up), as benchmarks.links reports them."""
    st = rows[1:] or rows
    if not st:
        return {}
    med = {k: statistics.median(x[k] for x in st) for k in ("round_s", "wire_s", "bytes_down", "bytes_up")}
    return {
        "steady_round_s": round(med["round_s"], 2),
        "steady_wire_s": round(med["wire_s"], 2),
        "steady_bytes_down": int(med["bytes_down"]),
        "steady_bytes_up": int(med["bytes_up"]),
    }
