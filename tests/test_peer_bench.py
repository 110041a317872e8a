"""The peer benchmark's harness: its measurements (fast) and, when the peer environments exist,
tiny neurofed-vs-Flower and neurofed-vs-NVIDIA FLARE runs end to end (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.peers import flare_run, flower_run
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


def test_weighted_mean_check_catches_a_tensor_left_out_of_the_global_model():
    # NVIDIA FLARE leaves out non-torch payloads and reports success: the global model then lacks
    # a tensor that the comparison above would never look at
    rng = np.random.default_rng(2)
    ups = [({"w": rng.standard_normal(3), "b": rng.standard_normal(2)}, 1.0) for _ in range(2)]
    mean = {k: (ups[0][0][k] + ups[1][0][k]) / 2 for k in ("w", "b")}
    assert weighted_mean_error(mean, ups)["ok"]
    res = weighted_mean_error({"w": mean["w"]}, ups)
    assert not res["ok"] and res["tensors_missing_from_global"] == 1, res


def test_flare_job_gets_this_runs_settings(tmp_path):
    task = tmp_path / "task.json"
    job = flare_run.prepare_job(tmp_path / "job", task, clients=3, rounds=2)
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    args = server["workflows"][0]["args"]
    assert (args["num_clients"], args["num_rounds"], args["task_file"]) == (3, 2, str(task))
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    executor = client["executors"][0]["executor"]["args"]
    assert executor["task_script_args"] == f"--task-file {task}"
    assert executor["params_exchange_format"] == "pytorch"  # the clients send torch tensors
    assert (job / "app" / "custom" / "nfflare_train.py").is_file()
    with pytest.raises(ValueError, match="whitespace"):
        flare_run.prepare_job(tmp_path / "job2", tmp_path / "a b" / "task.json", clients=1, rounds=1)


def test_a_peer_without_its_environment_is_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(flare_run, "VENV", tmp_path / "no-venv")
    monkeypatch.setattr(flower_run, "VENV", tmp_path / "no-venv")
    for mod in (flare_run, flower_run):
        res = mod.run(tmp_path / "w", data=tmp_path, init=tmp_path / "init", sites=2, rounds=1)
        assert res["ok"] is False and "scripts/peer_env.sh" in res["skipped"], res


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


def _tiny_peer_compare(tmp_path, name: str, *which: str, sites: int = 2) -> dict:
    """``sites`` x 1 round of 32^3 volumes with the tiny UNet through ``benchmarks.peer_compare``."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.peer_compare",
            "--sites",
            str(sites),
            "--rounds",
            "1",
            "--shape",
            "32",
            "--model",
            "tiny",
            *which,
            "--out",
            str(tmp_path),
            "--name",
            name,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=880,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(flower_run.available() is not None, reason=f"{flower_run.available()}")
def test_tiny_side_by_side(tmp_path):
    res = _tiny_peer_compare(tmp_path, "peer_compare_test", "--frameworks", "neurofed,flower")
    for name in ("neurofed", "flower"):
        fw = res["frameworks"][name]
        assert fw["ok"], fw
        assert fw["averaging_check"]["ok"] and fw["averaging_check"]["clients"] == 2
        assert len(fw["round_wall_s"]) == 1 and 0 <= fw["overhead"][0] < 1
        assert fw["memory"]["peak_sum_rss_gb"] > 0
    assert res["ratios"]["neurofed_vs_flower"]["round_wall_round1"] > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(flare_run.available() is not None, reason=f"{flare_run.available()}")
def test_tiny_side_by_side_with_flare(tmp_path):
    res = _tiny_peer_compare(tmp_path, "peer_compare_flare_test", "--peers", "flare")
    assert set(res["frameworks"]) == {"neurofed", "flare"}
    fw = res["frameworks"]["flare"]
    assert fw["ok"], fw
    check = fw["averaging_check"]
    assert check["ok"] and check["clients"] == 2 and check["max_abs_diff"] <= 1e-5
    assert check["excluded_vars_warnings"] == 0 and check["tensors_missing_from_global"] == 0
    assert fw["threads"] == 2  # every client in its own simulator worker
    assert len(fw["round_wall_s"]) == 1 and 0 <= fw["overhead"][0] < 1
    assert fw["memory"]["peak_sum_rss_gb"] > 0 and fw["memory"]["processes_seen"] >= 3
    assert res["ratios"]["neurofed_vs_flare"]["round_wall_round1"] > 0


def test_flower_secagg_settings_match_neurofeds_graph_and_refuse_two_clients():
    s = flower_run.secagg_settings(10, 4)
    # n shares (Flower counts the client's own) is neurofed's complete graph at 10 sites
    assert s["num-shares"] == 10 and s["reconstruction-threshold"] == 7 and s["max-weight"] == 4.0
    assert flower_run.secagg_settings(3, 2)["reconstruction-threshold"] == 2
    with pytest.raises(ValueError, match="at least 3"):
        flower_run.secagg_settings(2, 4)


def test_flower_secagg_bound_is_what_its_quantization_can_reach():
    s = flower_run.secagg_settings(10, 4)
    step = 2 * 8.0 / 2**22
    # ten clients of 4 cases: ten steps of (w/max_weight) x, divided by the summed ratios (10)
    assert flower_run.secagg_error_bound(s, [4.0] * 10) == pytest.approx(step + 1e-6)
    # Flower's default max_weight of 1000 for the same clients is 250x coarser
    coarse = {**s, "max-weight": 1000.0}
    assert flower_run.secagg_error_bound(coarse, [4.0] * 10) > 200 * step


def test_weighted_mean_check_takes_a_stated_tolerance():
    rng = np.random.default_rng(3)
    ups = _clients(rng)
    total = sum(w for _, w in ups)
    mean = sum(u["w"].astype(np.float64) * w for u, w in ups) / total
    off = {"w": (mean + 3e-5).astype(np.float32)}  # SecAgg+-sized quantization error
    assert not weighted_mean_error(off, ups)["ok"]
    assert weighted_mean_error(off, ups, tol=5e-5)["ok"]
    assert not weighted_mean_error({"w": ups[0][0]["w"]}, ups, tol=5e-5)["ok"]


def test_make_bench_peers_runs_the_plain_frameworks_and_secure_arms_only_when_asked():
    from benchmarks.peer_compare import chosen_frameworks

    assert chosen_frameworks(None, None, False) == ["neurofed", "flower", "flare"]
    assert chosen_frameworks(None, "flower", True) == [
        "neurofed",
        "flower",
        "neurofed-secure",
        "flower-secagg",
    ]
    assert chosen_frameworks("neurofed,flare", None, True) == ["neurofed", "flare", "neurofed-secure"]


def test_secure_figures_pair_each_secure_arm_with_its_plain_one():
    from benchmarks.peer_compare import secure_figures

    def arm(wall):
        return {
            "ok": True,
            "wall_steady_mean_s": wall,
            "wall_round1_s": wall,
            "wall_total_s": 3 * wall,
            "overhead_steady_mean": 0.1,
            "memory": {"peak_sum_rss_gb": 1.0},
        }

    res = {
        "neurofed": arm(2.0),
        "neurofed-secure": arm(2.2),
        "flower": arm(10.0),
        "flower-secagg": arm(40.0),
    }
    out = secure_figures(res)
    assert out["neurofed_secure_vs_flower_secagg"]["round_wall_steady"] == pytest.approx(0.055)
    assert out["neurofed_secure_over_plain"]["round_wall_steady"] == pytest.approx(1.1)
    assert out["flower_secure_over_plain"]["round_wall_steady"] == pytest.approx(4.0)
    res["flower-secagg"] = {"ok": False, "error": "x"}
    assert "skipped" in secure_figures(res)["neurofed_secure_vs_flower_secagg"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(flower_run.available() is not None, reason=f"{flower_run.available()}")
def test_tiny_flower_secagg_arm_aggregates_fedavg_within_its_bound(tmp_path):
    """3 sites x 1 round through Flower's SecAggPlusWorkflow + secaggplus_mod: the unmasked
    aggregate is the clients' case-weighted mean within SecAgg+'s quantization bound (neurofed's
    own secure arm is tested with real processes in tests/test_secure_federation.py)."""
    res = _tiny_peer_compare(
        tmp_path, "peer_compare_secagg_test", "--frameworks", "neurofed,flower-secagg", sites=3
    )
    assert set(res["frameworks"]) == {"neurofed", "flower-secagg"}
    fl = res["frameworks"]["flower-secagg"]
    assert fl["ok"], fl
    check = fl["averaging_check"]
    assert check["ok"] and check["clients"] == 3 and check["mean_differs_from_first_client"]
    assert check["max_abs_diff"] <= check["tolerance"] < 1e-4
    assert "SecAggPlusWorkflow" in fl["deployment"] and fl["secagg"]["num-shares"] == 3
    assert len(fl["round_wall_s"]) == 1 and fl["memory"]["peak_sum_rss_gb"] > 0
    assert "neurofed_secure_vs_flower_secagg" not in res["secure_aggregation"]  # no neurofed-secure arm
