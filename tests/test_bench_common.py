"""The federation benchmarks' accounting: idle windows and CPU per process group, read from a
real process's /proc entries, and how the secure-round benchmark pairs its runs."""

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


def _kernel_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` from /proc (fields 14 and 15), in seconds."""
    import os

    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_cpu_trace_sees_a_busy_process_use_cpu_and_a_sleeping_one_not():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        trace = CpuTrace()
        groups = {busy.pid: "busy", idle.pid: "idle"}
        t0 = time.time()
        kernel = {}  # the kernel's own count at the window's edges, read here independently
        while time.time() - t0 < 1.5:
            now = time.time()
            trace.sample(now, groups)
            if now >= t0 + 0.5 and "start" not in kernel:
                kernel["start"] = (now, _kernel_cpu_s(busy.pid))
            time.sleep(0.05)
        t1 = time.time()
        trace.sample(t1, groups)
        kernel["end"] = (t1, _kernel_cpu_s(busy.pid))
        (ts, cs), (te, ce) = kernel["start"], kernel["end"]
        used = trace.used([(ts, te)])
        # what the trace charges the spinning process is what the kernel gave it (however loaded
        # the machine is), within a clock tick; the sleeping one gets nothing
        assert ce - cs > 0.02, "the spinning process got no CPU at all"
        assert used["busy"] == pytest.approx(ce - cs, abs=0.015)
        assert used["idle"] < 0.05
        mid = (ts + te) / 2
        halves = trace.used([(ts, mid), (mid, te)])
        assert halves["busy"] == pytest.approx(used["busy"], abs=1e-9)  # windows add up
    finally:
        busy.kill()
        idle.kill()
        busy.wait()
        idle.wait()
    assert proc_cpu_s(busy.pid) is None  # gone: no figure rather than a stale one


def test_secure_round_pairs_alternate_which_mode_runs_first(monkeypatch, tmp_path):
    """The pairs run plaintext-secure, secure-plaintext, ...: a host whose speed drifts during the
    run would otherwise favour the mode that always runs second. The federation runs are stood in
    for by their result rows (the orchestration is what is tested here; the runs themselves are
    the real-stack benchmark's)."""
    from benchmarks import secagg_rounds

    calls = []

    def fake_run(argv):
        secure = "--secure-aggregation" in argv
        calls.append("secure" if secure else "plain")
        wall = 1.2 if secure else 1.0
        rounds = [{"train": True, "wall_s": 5.0}] + [{"train": True, "wall_s": wall} for _ in range(3)]
        return {"machine": {}, "config": {}, "rounds": rounds, "peak_sum_rss_gb": 1.0}

    monkeypatch.setattr(secagg_rounds, "overhead", fake_run)
    monkeypatch.setattr(secagg_rounds, "RESULTS", tmp_path)
    monkeypatch.setattr(secagg_rounds, "emit", lambda name, result: result)
    for mode in ("plain", "secure"):
        (tmp_path / f"t_{mode}.json").write_text("{}")
    out = secagg_rounds.main(["--repeat", "4", "--name", "t"])
    assert calls == ["plain", "secure", "secure", "plain", "plain", "secure", "secure", "plain"]
    assert [p["order"] for p in out["pairs"]] == ["plain-secure", "secure-plain"] * 2
    assert out["secure_over_plain"] == out["pair_ratio_median"] == 1.2
    assert out["pair_ratio_range"] == [1.2, 1.2]
    assert not list(tmp_path.glob("t_*.json"))  # the single runs' files: their figures are in the pairs


@pytest.mark.slow
@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "secure"])
def test_coordinator_memory_benchmark_gets_every_update_through(tmp_path, monkeypatch, secure):
    """`benchmarks.coordinator_memory` end to end at 3 sites (tiny model, a real broker and
    coordinator): every update is accepted and the memory is read. Its light senders must join
    the coordinator's run (run binding refuses run-less updates) and the coordinator must not
    wait for spacing reports that light senders never send; either left the benchmark waiting
    out its deadline with no update taken."""
    from benchmarks import coordinator_memory

    emitted: dict = {}
    monkeypatch.setattr(coordinator_memory, "emit", lambda name, result: emitted.setdefault(name, result))
    argv = ["--sites", "3", "--model", "tiny", "--timeout", "60", "--out", str(tmp_path), "--name", "t"]
    coordinator_memory.main([*argv, "--secure-aggregation"] if secure else argv)
    [row] = emitted["t"]["results"]
    assert row["coordinator_exit"] == 0 and row["updates_accepted"] == 3, row
    assert row["secure_aggregation"] is secure
    assert row["round_seconds"] < 60 and row["peak_mb"] >= row["baseline_mb"] > 0, row
