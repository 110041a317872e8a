"""NVIDIA FLARE's side: its recommended single-machine deployment, the simulator, driven as a user would.

``nvflare simulator JOB -w WORKSPACE -c site-01,...,site-NN -t NN`` with the hand-written job in
``flare_app/nf_fedavg`` (FLARE's own ``FedAvg`` controller on the server, the Client API script
run in-process by ``ClientAPIExecutor`` on each client). ``-t`` equals the number of clients, the
simulator's best setting here: every client gets its own ``simulator_worker`` process for the whole
run (with fewer threads than clients, the simulator swaps clients through its workers and starts a
new process for each). Server, clients and the CLI all run from the separate FLARE environment
(``scripts/peer_env.sh`` -> ``.cache/flare-venv``), never the kit's; the clients import the kit
from the repository (PYTHONPATH), exactly as the Flower app does.

The server stamps each round's start (model sent) and end (new global model stored); each client
appends its evaluate/train intervals; this module samples the memory of every process under the
``nvflare simulator`` command (server process, multiprocessing manager, client workers), then
checks that FLARE's round-1 global weights are the case-weighted mean of what the clients sent and
that no tensor was left out on the way. Trap (shared/notes.md): FLARE leaves out non-torch
payloads ("vars excluded as they were non-tensor type") and still reports success; the clients
send torch tensors, and the check fails on any such warning or any tensor missing from the global
model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.peers.harness import check_round1, package_version, read_marks, spawn, tail, write_task
from benchmarks.peers.measure import TreeMemory, read_intervals, round_figures, summarise, tree

REPO = Path(__file__).resolve().parents[2]
JOB = Path(__file__).resolve().parent / "flare_app" / "nf_fedavg"
VENV = Path(os.environ.get("NEUROFED_FLARE_VENV", REPO / ".cache" / "flare-venv"))
EXCLUDED = "vars excluded as they were non-tensor type"


def available() -> str | None:
    """None when FLARE can run, else why not (for the JSON's skip reason)."""
    for exe in ("nvflare", "python"):
        if not (VENV / "bin" / exe).is_file():
            return f"{VENV / 'bin' / exe} missing: run scripts/peer_env.sh"
    return None


def nvflare_version() -> str:
    return package_version(VENV, "nvflare")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO),  # benchmarks.peers.measure (the kit itself is installed there)
        PATH=f"{VENV / 'bin'}:{env.get('PATH', '')}",
    )
    return env


def prepare_job(dest: Path, task_file: Path, clients: int, rounds: int) -> Path:
    """A copy of the job with this run's rounds, client count and task file filled in."""
    if any(c.isspace() for c in str(task_file)):
        raise ValueError(f"FLARE splits script arguments on whitespace: move the work folder ({task_file})")
    shutil.copytree(JOB, dest, ignore=shutil.ignore_patterns("__pycache__"))
    server = dest / "app" / "config" / "config_fed_server.json"
    cfg = json.loads(server.read_text())
    args = cfg["workflows"][0]["args"]
    args.update(task_file=str(task_file), num_clients=clients, num_rounds=rounds)
    server.write_text(json.dumps(cfg, indent=4))
    client = dest / "app" / "config" / "config_fed_client.json"
    cfg = json.loads(client.read_text())
    cfg["executors"][0]["executor"]["args"]["task_script_args"] = f"--task-file {task_file}"
    client.write_text(json.dumps(cfg, indent=4))
    return dest


def _ours(pid: int) -> bool:
    """A process of this run's FLARE environment (guards against a recycled pid)."""
    try:
        return str(VENV).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _stop_tree(pids: set[int]) -> None:
    """SIGTERM, then SIGKILL, every process of the run (the simulator starts its client workers
    in sessions of their own, so the command's process group does not reach them)."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
        for pid in [p for p in pids if _ours(p)]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.time() + wait
        while time.time() < end and any(os.path.exists(f"/proc/{p}") for p in pids):
            time.sleep(0.2)


def run(
    work: Path,
    *,
    data: Path,
    init: Path,
    sites: int,
    rounds: int,
    timeout: float = 900,
    threads: int | None = None,
    **_: Any,
) -> dict[str, Any]:
    why = available()
    if why:
        return {"ok": False, "skipped": why}
    if work.exists():
        shutil.rmtree(work)
    logs, check, timeline = work / "logs", work / "check", work / "timeline"
    for d in (logs, check, timeline):
        d.mkdir(parents=True)
    site_names = sorted(p.name for p in data.iterdir() if p.is_dir())[:sites]
    threads = min(threads or len(site_names), len(site_names))
    task_file = write_task(
        work, data=data, init=init, site_names=site_names, rounds=rounds, timeline=timeline, check=check
    )
    job = prepare_job(work / "job", task_file, len(site_names), rounds)
    ws = work / "workspace"
    cmd = [
        str(VENV / "bin" / "nvflare"),
        "simulator",
        str(job),
        "-w",
        str(ws),
        "-c",
        ",".join(site_names),
        "-t",
        str(threads),
    ]
    log = logs / "simulator.log"
    proc: subprocess.Popen | None = None
    t0 = time.time()
    with TreeMemory(lambda: [proc.pid] if proc else []) as mem:
        try:
            started = time.time()
            proc = spawn(cmd, log, _env(), work)
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                done = len(read_marks(work / "rounds.jsonl"))
                raise TimeoutError(
                    f"nvflare simulator did not finish in {timeout:.0f} s ({done} of {rounds} rounds done):\n"
                    + tail(log)
                ) from None
            if rc != 0:
                raise RuntimeError(f"nvflare simulator exited with {rc}:\n{tail(log)}")
        except Exception as exc:  # noqa: BLE001 - report it in the JSON, keep the other frameworks
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-3000:], "logs": str(logs)}
        finally:
            if proc is not None:  # what is left of the run: its live tree, and any orphans of it
                _stop_tree(tree([proc.pid]) | {p for p in mem.hwm_kb if _ours(p)})
                if proc.poll() is None:
                    proc.wait(10)
    total = time.time() - t0
    workers = (
        "one worker process per client for the whole run"
        if threads == len(site_names)
        else "clients take turns on the workers, a new process each time"
    )
    bounds = read_marks(work / "rounds.jsonl")
    rows = round_figures(bounds, read_intervals(sorted(timeline.glob("*.jsonl"))))
    res: dict[str, Any] = {
        "version": nvflare_version(),
        "deployment": f"nvflare simulator, {len(site_names)} clients, -t {threads} ({workers}); "
        "FLARE's FedAvg controller on the server, the Client API script in-process on each client, "
        "server_expected_format numpy",
        "threads": threads,
        "rounds": rows,
        **summarise(rows),
        "memory": mem.figures(),
        "startup_s": round(bounds[1][0] - started, 2) if 1 in bounds else None,
        "total_s": round(total, 1),
        "averaging_check": check_average(check, site_names, ws),
    }
    res["ok"] = bool(res["averaging_check"].get("ok")) and len(rows) == rounds
    return res


def check_average(check: Path, sites: list[str], workspace: Path) -> dict[str, Any]:
    """The shared round-1 check (the float64 case-weighted mean of what the clients sent, to 1e-5,
    with every tensor they sent present in the global model), plus: FLARE's FedAvg received each
    client's case count as its weight, and no log says that FLARE excluded variables (its trap)."""
    out = check_round1(check, sites)
    weights = check / "server-weights-r1.jsonl"
    if weights.is_file():  # the case counts reached FLARE's FedAvg as its weights
        got = {r["client"]: r["weight"] for r in map(json.loads, weights.read_text().splitlines())}
        cases = {s: check / f"client-r1-{s}.cases" for s in sites}
        sent = {s: float(f.read_text()) for s, f in cases.items() if f.is_file()}
        out["server_weights"] = got
        if {k: float(v or 0) for k, v in got.items()} != sent:
            out.update(ok=False, reason=f"FLARE weighted by {got}, the clients' case counts are {sent}")
    else:
        out.update(ok=False, reason="the server logged no round-1 weights")
    warnings = 0
    for f in workspace.rglob("log.txt"):  # each site's full log
        warnings += f.read_text(errors="replace").count(EXCLUDED)
    out["excluded_vars_warnings"] = warnings
    if warnings:
        out.update(ok=False, reason=f"FLARE logged '{EXCLUDED}' {warnings} times")
    return out
