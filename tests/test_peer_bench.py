"""The peer benchmark's harness: its measurements (fast) and, when the peer environment exists,
a tiny neurofed-vs-Flower run end to end (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.peers import flower_run
from benchmarks.peers.measure import TreeMemory, round_figures, summarise, union_seconds, weighted_mean_error

REPO = Path(__file__).resolve().parents[1]


def test_union_merges_overlaps_and_gaps():
    assert union_seconds([(0, 2), (1, 3), (5, 6)]) == pytest.approx(4.0)
    assert union_seconds([(0, 10), (2, 3)]) == pytest.approx(10.0)
    assert union_seconds([]) == 0.0


def test_round_figures_clip_intervals_to_the_round():
    bounds = {1: (0.0, 10.0), 2: (10.0, 20.0)}
    intervals = [
        {"start": 1.0, "end": 4.0},
        {"start": 2.0, "end": 6.0},
        {"start": 9.0, "end": 12.0},  # straddles: 1 s in round 1, 2 s in round 2
    ]
    rows = round_figures(bounds, intervals)
    assert rows[0]["busy_s"] == pytest.approx(6.0)
    assert rows[0]["overhead"] == pytest.approx(0.4)
    assert rows[1]["busy_s"] == pytest.approx(2.0)
    s = summarise(rows)
    assert s["overhead_round1"] == pytest.approx(0.4)
    assert s["overhead_steady_mean"] == pytest.approx(0.8)


def _clients(rng, n=3):
    return [
        ({"w": rng.standard_normal((4, 5)).astype(np.float32), "step": np.array(7)}, float(k + 1))
        for k in range(n)
    ]


def test_weighted_mean_check_accepts_a_real_fedavg():
    rng = np.random.default_rng(0)
    ups = _clients(rng)
    total = sum(w for _, w in ups)
    mean = sum(u["w"].astype(np.float64) * w for u, w in ups) / total
    res = weighted_mean_error({"w": mean.astype(np.float32), "step": np.array(7)}, ups)
    assert res["ok"], res
    assert res["max_abs_diff"] < 1e-6


def test_weighted_mean_check_catches_dropped_payloads_and_wrong_weights():
    rng = np.random.default_rng(1)
    ups = _clients(rng)
    # what a framework that silently dropped the updates would report: the first client's weights
    assert not weighted_mean_error({"w": ups[0][0]["w"]}, ups)["ok"]
    # an unweighted mean is not FedAvg with unequal case counts
    plain = np.mean([u["w"] for u, _ in ups], axis=0)
    assert not weighted_mean_error({"w": plain}, ups)["ok"]
    assert not weighted_mean_error({"w": plain}, [])["ok"]


def test_tree_memory_sees_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(50 * 2**20); time.sleep(3)"])
    try:
        mem = TreeMemory(lambda: [os.getpid()])
        import time

        time.sleep(1.0)
        mem.sample()
        assert mem.peak_sum_kb > 50 * 1024  # this process plus the child's 50 MB
        assert child.pid in mem.hwm_kb
    finally:
        child.kill()
        child.wait(10)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(flower_run.available() is not None, reason=f"{flower_run.available()}")
def test_tiny_side_by_side(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.peer_compare",
            "--sites",
            "2",
            "--rounds",
            "1",
            "--shape",
            "32",
            "--model",
            "tiny",
            "--frameworks",
            "neurofed,flower",
            "--out",
            str(tmp_path),
            "--name",
            "peer_compare_test",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=880,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for name in ("neurofed", "flower"):
        fw = res["frameworks"][name]
        assert fw["ok"], fw
        assert fw["averaging_check"]["ok"] and fw["averaging_check"]["clients"] == 2
        assert len(fw["round_wall_s"]) == 1 and 0 <= fw["overhead"][0] < 1
        assert fw["memory"]["peak_sum_rss_gb"] > 0
    assert res["ratios"]["neurofed_vs_flower"]["round_wall_round1"] > 0
