"""The federation benchmark's accounting: idle windows and CPU per process group, read from a
real process's /proc entries."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from benchmarks.common import CpuTrace, gaps, proc_cpu_s


def test_gaps_are_the_parts_of_the_window_no_interval_covers():
    assert gaps((0, 10), [(1, 3), (2, 4), (6, 7)]) == [(0, 1), (4, 6), (7, 10)]
    assert gaps((0, 10), [(-5, 12)]) == []
    assert gaps((0, 10), []) == [(0, 10)]
    assert gaps((2, 5), [(0, 3), (4, 9)]) == [(3, 4)]


def test_cpu_trace_sees_a_busy_process_use_cpu_and_a_sleeping_one_not():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        trace = CpuTrace()
        groups = {busy.pid: "busy", idle.pid: "idle"}
        t0 = time.time()
        while time.time() - t0 < 1.5:
            trace.sample(time.time(), groups)
            time.sleep(0.05)
        t1 = time.time()
        used = trace.used([(t0 + 0.5, t1)])
        # the spinning process had most of a core (the machine has at least one to give)
        assert used["busy"] > 0.4 * (t1 - t0 - 0.5)
        assert used["idle"] < 0.05
        halves = trace.used([(t0 + 0.5, t0 + 1.0), (t0 + 1.0, t1)])
        assert halves["busy"] == pytest.approx(used["busy"], abs=1e-9)  # windows add up
    finally:
        busy.kill()
        idle.kill()
        busy.wait()
        idle.wait()
    assert proc_cpu_s(busy.pid) is None  # gone: no figure rather than a stale one
