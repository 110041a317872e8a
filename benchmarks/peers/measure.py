"""What every framework's run is measured with: client timelines, round overhead, summed process
memory, and the check that a framework really averaged.

Definitions (the same for every framework, and the same as ``benchmarks.federation_overhead``):

* round wall time: from the server starting round r (sending the task/model) to it starting round
  r+1 (for the last round: to the end of its last client reply being aggregated);
* overhead share: ``1 - |union of all clients' train and evaluate intervals in the round| / wall``,
  the intervals being ``time.time()`` taken around ``LocalTrainer.train`` / ``.evaluate`` by each
  client and appended to ``TIMELINE_DIR/<site>.jsonl``;
* peak memory: the peak over time of the summed RSS of the whole process tree (sampled every
  0.25 s), and the sum of every process's own high-water mark (VmHWM) seen in the tree.

Standard library and numpy only: the Flower app imports this module inside the peer environment.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from benchmarks.common import proc_status_kb as _status_kb
from benchmarks.common import union_seconds


def record_interval(
    timeline_dir: str | os.PathLike[str], site: str, what: str, rnd: int, t0: float, t1: float
) -> None:
    """Append one client interval (one JSON line; O_APPEND keeps concurrent writers whole)."""
    d = Path(timeline_dir)
    d.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"site": site, "what": what, "round": int(rnd), "start": t0, "end": t1}) + "\n"
    with open(d / f"{site}.jsonl", "a") as fh:
        fh.write(line)


def read_intervals(paths: Iterable[Path]) -> list[dict]:
    out: list[dict] = []
    for p in paths:
        if Path(p).is_file():
            out += [json.loads(x) for x in Path(p).read_text().splitlines() if x.strip()]
    return out


def round_figures(bounds: Mapping[int, tuple[float, float]], intervals: Sequence[Mapping]) -> list[dict]:
    """Per round: wall time, busy time (union of client intervals clipped to the round) and the
    overhead share. ``bounds[r] = (start, end)``; intervals are attributed by time, not by label,
    so a framework that labels rounds differently is measured the same way."""
    rows = []
    for r in sorted(bounds):
        a, b = bounds[r]
        busy = union_seconds(
            (max(a, i["start"]), min(b, i["end"])) for i in intervals if i["end"] > a and i["start"] < b
        )
        wall = b - a
        rows.append(
            {
                "round": r,
                "wall_s": round(wall, 3),
                "busy_s": round(busy, 3),
                "overhead": round(1 - busy / wall, 4) if wall > 0 else None,
            }
        )
    return rows


def summarise(rounds: Sequence[Mapping]) -> dict:
    """Round 1 (start-up included) and the steady state (rounds 2..) as means."""
    if not rounds:
        return {"round_wall_s": [], "overhead": []}
    steady = list(rounds[1:]) or list(rounds)
    return {
        "round_wall_s": [x["wall_s"] for x in rounds],
        "overhead": [x["overhead"] for x in rounds],
        "wall_round1_s": rounds[0]["wall_s"],
        "wall_steady_mean_s": round(sum(x["wall_s"] for x in steady) / len(steady), 3),
        "overhead_round1": rounds[0]["overhead"],
        "overhead_steady_mean": round(sum(x["overhead"] for x in steady) / len(steady), 4),
        "wall_total_s": round(sum(x["wall_s"] for x in rounds), 3),
    }


# -- memory of a process tree -------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree(roots: Iterable[int]) -> set[int]:
    """The given pids and all their descendants that are alive now."""
    kids = _children_map()
    seen: set[int] = set()
    stack = [p for p in roots if p]
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        stack += kids.get(p, [])
    return seen


class TreeMemory:
    """Samples the summed RSS of the process trees under ``roots()`` every ``period`` seconds.

    ``roots`` is a callable so that processes started later (clients, the server app) are seen.
    Each process's high-water mark (VmHWM) is kept by pid, so short-lived processes that come and
    go between samples still count with their own peak once seen.
    """

    def __init__(self, roots, period: float = 0.25) -> None:
        self.roots, self.period = roots, period
        self.peak_sum_kb = 0
        self.hwm_kb: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def sample(self) -> None:
        total = 0
        for pid in tree(self.roots()):
            rss, hwm = _status_kb(pid)
            total += rss
            if hwm:
                self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), hwm)
        self.peak_sum_kb = max(self.peak_sum_kb, total)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def figures(self) -> dict:
        return {
            "peak_sum_rss_gb": round(self.peak_sum_kb / 1024**2, 3),
            "sum_of_process_hwm_gb": round(sum(self.hwm_kb.values()) / 1024**2, 3),
            "processes_seen": len(self.hwm_kb),
        }


# -- did it really average? -------------------------------------------------------------------------
def weighted_mean_error(
    global_weights: Mapping[str, np.ndarray],
    updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
    tol: float = 1e-5,
) -> dict:
    """Largest absolute and relative difference between ``global_weights`` and the float64
    case-weighted mean of the clients' ``updates`` (floating tensors only). A framework that
    dropped the clients' payloads, or averaged something else, shows up here as a large error;
    one that dropped some of their tensors, as ``tensors_missing_from_global``."""
    if not updates:
        return {"ok": False, "reason": "no client updates recorded"}
    total = float(sum(w for _, w in updates))
    max_abs = max_rel = 0.0
    checked = moved = 0
    first = updates[0][0]
    # a tensor the clients sent but the global model lacks was dropped on the way (NVIDIA FLARE
    # leaves out non-torch payloads and reports success): compared below it would never be
    missing = sorted(
        k
        for k, v in first.items()
        if np.issubdtype(np.asarray(v).dtype, np.floating) and k not in global_weights
    )
    for name, g in global_weights.items():
        g = np.asarray(g)
        if not np.issubdtype(g.dtype, np.floating):
            continue
        if name not in first:
            return {"ok": False, "reason": f"tensor {name} missing from the client updates"}
        acc = np.zeros(g.shape, dtype=np.float64)
        for upd, w in updates:
            acc += np.asarray(upd[name], dtype=np.float64) * (w / total)
        diff = np.abs(g.astype(np.float64) - acc)
        max_abs = max(max_abs, float(diff.max(initial=0.0)))
        max_rel = max(max_rel, float(diff.max(initial=0.0) / (np.abs(acc).max(initial=0.0) + 1e-12)))
        checked += g.size
        moved += int(np.count_nonzero(np.asarray(first[name], dtype=np.float64) != acc))
    ok = checked > 0 and max_abs <= tol and moved > 0 and not missing
    return {
        "ok": bool(ok),
        **(
            {"reason": f"{len(missing)} client tensors missing from the global model: {missing[:5]}"}
            if missing
            else {}
        ),
        "max_abs_diff": max_abs,
        "max_rel_diff": max_rel,
        "values_checked": int(checked),
        "tensors_missing_from_global": len(missing),
        "clients": len(updates),
        "weights": [float(w) for _, w in updates],
        "mean_differs_from_first_client": moved > 0,
    }


def now() -> float:
    return time.time()
