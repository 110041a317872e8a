"""Helpers shared by the benchmarks: machine facts, peak memory, JSON output."""

from __future__ import annotations

import bisect
import json
import os
import platform
import resource
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if "torch" in sys.modules:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(name: str, figures: dict[str, Any]) -> dict[str, Any]:
    """Print the figures as one JSON line and keep them in benchmarks/results/<name>.json."""
    out = {"benchmark": name, "machine": machine(), **figures}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return out


def proc_status_kb(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in KiB from /proc; (0, 0) once it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def union_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals (busy time of sites working in parallel)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) a process has used, from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_idle_s() -> float:
    """Seconds the machine's cores have spent idle (idle + iowait, summed over cores), from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = fh.readline().split()
    return (int(fields[4]) + int(fields[5])) / _TICK


def gaps(window: tuple[float, float], intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The parts of ``window`` that no interval covers (when no site works)."""
    a, b = window
    out, at = [], a
    for s, e in sorted(intervals):
        if e <= at or s >= b:
            continue
        if s > at:
            out.append((at, min(s, b)))
        at = max(at, e)
        if at >= b:
            break
    if at < b:
        out.append((at, b))
    return out


class CpuTrace:
    """Cumulative CPU seconds per group of processes over time, sampled from /proc, so a window's
    CPU use (which process worked while no site did) can be read back after the run."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._times: list[float] = []
        self._last: dict[int, float] = {}
        self._total: dict[str, float] = {}
        self._base: dict[str, float] = {}

    def sample(self, t: float, groups: dict[int, str], totals: dict[str, float] | None = None) -> None:
        """Add the CPU each group's processes used since the last sample; ``totals`` are other
        cumulative seconds (the machine's idle time) kept from their first sample on."""
        for name, value in (totals or {}).items():
            self._total[name] = value - self._base.setdefault(name, value)
        for pid, group in groups.items():
            cpu = proc_cpu_s(pid)
            if cpu is None:
                continue
            self._total[group] = self._total.get(group, 0.0) + cpu - self._last.get(pid, cpu)
            self._last[pid] = cpu
        self.samples.append((t, dict(self._total)))
        self._times.append(t)

    def at(self, t: float) -> dict[str, float]:
        """Cumulative CPU per group at time t (linear between samples)."""
        if not self.samples:
            return {}
        i = bisect.bisect_left(self._times, t)
        if i == 0:
            return dict(self.samples[0][1])
        if i >= len(self.samples):
            return dict(self.samples[-1][1])
        (t0, c0), (t1, c1) = self.samples[i - 1], self.samples[i]
        f = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
        return {g: c0.get(g, 0.0) + f * (c1.get(g, 0.0) - c0.get(g, 0.0)) for g in c1}

    def used(self, windows: Iterable[tuple[float, float]]) -> dict[str, float]:
        """CPU seconds per group summed over the windows."""
        out: dict[str, float] = {}
        for a, b in windows:
            ca, cb = self.at(a), self.at(b)
            for g in cb:
                out[g] = out.get(g, 0.0) + cb[g] - ca.get(g, 0.0)
        return out
