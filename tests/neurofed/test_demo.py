"""`neurofed demo` end to end (what `make demo` runs), small: real processes, broker, encryption,
MLflow; and the robust strategies (median, trimmed mean) through the real stack."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from neurofed.launch.local import read_events

pytestmark = pytest.mark.slow


def run_demo(tmp_path: Path, *args: str) -> tuple[str, Path]:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "neurofed", "demo", "--sites", "2", "--rounds", "1", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    [run] = list(out.glob("run-*"))  # each demo run gets its own folder next to the reusable data
    return text, run


def test_demo_runs_a_federation_registers_it_and_points_at_the_onnx(tmp_path):
    text, out = run_demo(tmp_path, "--strategy", "median")
    # the federation ran: round 1 aggregated from both sites, then the evaluation-only round
    events = read_events(out / "coordinator-state")
    closed = [e for e in events if e["event"] == "round"]
    assert [e["round"] for e in closed] == [1, 2]
    assert sorted(closed[0]["sites"]) == ["site-01", "site-02"] and closed[0]["aggregated"]
    assert (out / "coordinator-state" / "rounds" / "global-r0001.safetensors").is_file()
    # what the user is told at the end: Dice by round, the MLflow UI, the champion's ONNX file
    assert re.search(r"mean Dice by round: r0 [0-9.]+, r1 [0-9.]+", text), text[-3000:]
    m = re.search(r"ONNX of the champion: (\S+)", text)
    assert m and Path(m.group(1)).is_file() and Path(m.group(1)).stat().st_size > 10_000, text[-3000:]
    _the_printed_registry_command_serves_the_champion_with_its_onnx(text, tmp_path)
    # each site's audit log holds what it sent, never a scan
    import json

    for site in ("site-01", "site-02"):
        [audit] = list(out.glob(f"**/{site}-state/audit.jsonl"))
        kinds = {json.loads(line)["kind"] for line in audit.read_text().splitlines()}
        assert {"update", "metrics"} <= kinds, kinds


def _the_printed_registry_command_serves_the_champion_with_its_onnx(text: str, tmp_path: Path) -> None:
    """Follow the demo's last words: the command it prints serves the registry with its artifacts,
    so ``models:/demo-unet@champion`` downloads with its ONNX file (a bare ``mlflow ui`` on the
    SQLite file would list the version but serve none of its files)."""
    from neurofed.mlflow_server.resolve import resolve_model
    from neurofed.procs import free_port, wait_for

    m = re.search(r"neurofed mlflow-server --state (\S+)", text)
    assert m, text[-3000:]
    m_infer = re.search(r"--model (models:/\S+@champion)", text)
    assert m_infer, text[-3000:]
    port = free_port()
    log = open(tmp_path / "registry.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "neurofed", "mlflow-server", "--state", m.group(1), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        import urllib.request

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(healthy, 180, "the demo's registry to answer")
        resolved = resolve_model(
            m_infer.group(1), tmp_path / "fetched", tracking_uri=f"http://127.0.0.1:{port}"
        )
        assert resolved.onnx_path.is_file() and resolved.onnx_path.stat().st_size > 10_000
        assert resolved.sha256  # the registered digest came with it and was checked
    finally:
        server.terminate()
        server.wait(30)
        log.close()


@pytest.mark.parametrize("strategy", ["trimmed-mean", "fednova"])
def test_strategy_runs_through_the_real_stack(tmp_path, strategy):
    """Trimmed mean spills to disk; FedNova needs each site's local_steps from the UPDATE's
    encrypted meta: an update without it would be rejected and the round not aggregated."""
    _, out = run_demo(tmp_path, "--strategy", strategy, "--no-mlflow")
    events = read_events(out / "coordinator-state")
    closed = [e for e in events if e["event"] == "round"]
    assert closed[0]["aggregated"] and len(closed[0]["sites"]) == 2
    assert not [e for e in events if e["event"] == "reject"], events


def test_fp16_changes_cross_the_real_stack(tmp_path):
    """--fp16 through the broker: half-size updates that say they are changes, accepted and
    aggregated, and a global model kept in fp32."""
    from safetensors.numpy import load_file

    _, out = run_demo(tmp_path, "--fp16", "--no-mlflow")
    events = read_events(out / "coordinator-state")
    closed = [e for e in events if e["event"] == "round"]
    assert closed[0]["aggregated"] and len(closed[0]["sites"]) == 2
    assert not [e for e in events if e["event"] == "reject"], events
    glob = load_file(out / "coordinator-state" / "rounds" / "global-r0001.safetensors")
    fp32_bytes = sum(a.nbytes for a in glob.values())
    assert all(a.dtype.name == "float32" for a in glob.values())
    sizes = [e["bytes"] for e in events if e["event"] == "update"]
    assert len(sizes) == 2 and all(0.45 * fp32_bytes < b < 0.55 * fp32_bytes for b in sizes), (
        sizes,
        fp32_bytes,
    )
    import json

    [audit] = list(out.glob("**/site-01-state/audit.jsonl"))
    sent = [json.loads(x) for x in audit.read_text().splitlines()]
    assert [e["fields"]["encoding"] for e in sent if e["kind"] == "update"] == ["fp16-delta"]


def test_continue_global_adam_state_crosses_the_real_stack(tmp_path):
    """continue-global through the broker: updates carry Adam's moments (about 3x the bytes),
    the coordinator averages them into its snapshot, the registered round's weights stay a model."""
    from safetensors.numpy import load_file

    _, out = run_demo(tmp_path, "--rounds", "2", "--site-optimizer", "continue-global", "--no-mlflow")
    events = read_events(out / "coordinator-state")
    closed = [e for e in events if e["event"] == "round" and e["train"]]
    assert [e["aggregated"] for e in closed] == [True, True]
    assert not [e for e in events if e["event"] == "reject"], events
    glob = load_file(out / "coordinator-state" / "rounds" / "global-r0002.safetensors")
    assert not [k for k in glob if k.startswith("optimizer/")]
    model_bytes = sum(a.nbytes for a in glob.values())
    sizes = [e["bytes"] for e in events if e["event"] == "update"]
    assert len(sizes) == 4 and all(2.8 * model_bytes < b < 3.2 * model_bytes for b in sizes), sizes
    snap = load_file(out / "coordinator-state" / "snapshot.safetensors")
    steps = snap["site-optimizer/optimizer/step"]
    assert steps.shape == (1,) and steps[0] > 0
    assert all((v >= 0).all() for k, v in snap.items() if "/exp_avg_sq/" in k)


def test_demo_with_int8_compression_sends_a_quarter_of_the_bytes(tmp_path):
    """``neurofed demo --compression int8``: real processes, broker and encryption; each site's
    update is an 8-bit change (about 0.25x the fp32 weights), the evaluation round's model an 8-bit
    delta, and the sites rebuilt the model the coordinator named (no stale-model rejection). The
    federation is provisioned with the post-quantum hybrid KEM (``--kem``), so every message of
    the run was sealed with it."""
    import json

    text, out = run_demo(tmp_path, "--no-mlflow", "--compression", "int8", "--kem", "mlkem768-x25519")
    assert "sealing KEM mlkem768-x25519" in text, text[-3000:]
    roster = json.loads((out / "bundles" / "coordinator" / "roster.json").read_text())
    assert roster["kem"] == "mlkem768-x25519"
    events = read_events(out / "coordinator-state")
    closed = [e for e in events if e["event"] == "round"]
    assert sorted(closed[0]["sites"]) == ["site-01", "site-02"] and closed[0]["aggregated"], text[-3000:]
    assert not closed[0]["rejected"] and sorted(closed[1]["metrics"]) == ["site-01", "site-02"]
    fp32 = (out / "coordinator-state" / "rounds" / "global-r0001.safetensors").stat().st_size
    updates = [e["bytes"] for e in events if e["event"] == "update"]
    assert len(updates) == 2 and max(updates) <= 0.3 * fp32, (updates, fp32)
    announced = [e for e in events if e["event"] == "announce"]
    assert [e["model_encoding"] for e in announced] == ["full", "int8-delta"]
    assert announced[1]["model_bytes"] <= 0.3 * fp32


def test_dp_for_patients_and_hospitals_runs_through_the_cli_and_reports_both(tmp_path):
    """Sample-level DP-SGD and client-level DP-FedAvg from the demo's flags, together, over real
    processes. Patients: the task carries dp, every site solves its noise for the planned rounds,
    reports epsilon with its UPDATE and METRICS (the coordinator rejects an update without it),
    every step is in the site's ledger, and the summary gives the largest epsilon. Hospitals: the
    task carries the round's clip, each site clips its change and reports only whether it fitted,
    the coordinator adds the noise, adapts the clip and charges each round; the summary says the
    accountant's epsilon."""
    import json

    from neurofed.models.client_privacy import client_epsilon, update_noise_multiplier

    text, out = run_demo(
        tmp_path, "--no-mlflow", "--rounds", "2", "--dp-target-epsilon", "8", "--dp-max-grad-norm", "1.0",
        "--dp-client-noise-multiplier", "0.8", "--dp-client-adaptive-clip", "--max-norm", "0.05",
    )  # fmt: skip
    events = read_events(out / "coordinator-state")
    assert not [e for e in events if e["event"] == "reject"], events
    closed = [e for e in events if e["event"] == "round" and e["train"]]
    assert [e["aggregated"] for e in closed] == [True, True]
    assert all(sorted(e["sites"]) == ["site-01", "site-02"] for e in closed)

    # patients: each site spent its budget over the two planned rounds, not more
    spent = {e["site"]: e["epsilon"] for e in events if e["event"] == "update"}  # the last round's
    assert set(spent) == {"site-01", "site-02"} and all(7.0 < v <= 8.0 for v in spent.values()), spent
    m = re.search(r"epsilon ([0-9.]+) \(largest of any site", text)
    assert m and float(m.group(1)) == pytest.approx(max(spent.values()), abs=1e-3), text[-3000:]

    # hospitals: the clip adapted after round 1, epsilon is the accountant's after 2 rounds
    first, second = (e["dp_client"] for e in closed)
    assert first["clip"] == 0.05 and second["clip"] == first["next_clip"] != 0.05
    assert second["epsilon"] == pytest.approx(client_epsilon(0.8, 1.0, 2, 1e-5), rel=1e-5)
    # 2 sites: the count's noise is 1.25 z, and the update's multiplier makes up the rest of z
    assert first["count_noise"] == pytest.approx(1.0)
    assert first["update_noise_multiplier"] == pytest.approx(update_noise_multiplier(0.8, 1.0), rel=1e-5)
    m = re.search(r"client-level DP-FedAvg, unit: hospital\): epsilon ([0-9.]+)", text)
    assert m and float(m.group(1)) == pytest.approx(second["epsilon"], abs=1e-3), text[-3000:]

    for site in ("site-01", "site-02"):
        [audit] = list(out.glob(f"**/{site}-state/audit.jsonl"))
        sent = [json.loads(x) for x in audit.read_text().splitlines()]
        updates = [e["fields"] for e in sent if e["kind"] == "update"]
        assert len(updates) == 2 and updates[-1]["dp"]["epsilon"] == pytest.approx(spent[site])
        assert updates[0]["dp"]["epsilon"] < updates[1]["dp"]["epsilon"]  # every round is charged
        # the METRICS sent after each round's training carry that round's report
        for r, update in enumerate(updates, start=1):
            trained = [e["fields"] for e in sent if e["kind"] == "metrics" and e["round"] == r]
            assert trained[0]["dp"] == update["dp"] and update["dp"]["noise_multiplier"] > 0
        state = json.loads(next(out.glob(f"**/{site}-state/agent.json")).read_text())
        assert sum(n for _, _, n in state["dp"]["history"]) == updates[-1]["dp"]["steps"]
        # the hospital's report is the bit, never the norm
        assert [u["dp_client"]["clip"] for u in updates] == [first["clip"], second["clip"]]
        assert all(set(u["dp_client"]) == {"within_clip", "clip"} for u in updates)
