"""What the peers' drivers (``flower_run``, ``flare_run``) share: the task file their apps read,
and starting, stopping and reading the logs of the framework's processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def package_version(venv: Path, module: str) -> str:
    """``module.__version__`` as installed in the peer environment ``venv``."""
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", f"import {module}; print({module}.__version__)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.stdout.strip() or "unknown"


def write_task(
    work: Path, *, data: Path, init: Path, site_names: list[str], rounds: int, timeline: Path, check: Path
) -> Path:
    """``WORK/task.json``: where the data, the initial weights (with their model config) are, and
    where a peer app records its clients' timelines, its round marks and the round-1 check files."""
    from safetensors import safe_open

    from neurofed.models.config import ModelConfig, preset

    with safe_open(str(init), "np") as fh:
        meta = fh.metadata() or {}
    cfg_json = meta.get("neurofed.model_config")
    model_config = json.loads(cfg_json) if cfg_json else preset("small").to_dict()
    ModelConfig.from_dict(model_config)  # fail here, not in ten clients, on a bad config
    task: dict[str, Any] = {
        "repo": str(REPO),
        "data": str(data),
        "model_config": model_config,
        "init_weights": str(init),
        "epochs": 1,
        "rounds": rounds,
        "sites": len(site_names),
        "timeline": str(timeline),
        "check": str(check),
        "marks": str(work / "rounds.jsonl"),
    }
    task_file = work / "task.json"
    task_file.write_text(json.dumps(task, indent=1))
    return task_file


def spawn(args: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    fh = open(log, "ab")  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen(
            args, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    finally:
        fh.close()


def stop(p: subprocess.Popen) -> None:
    """SIGTERM the child's process group, SIGKILL it after 15 s."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(15)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def read_marks(marks: Path) -> dict[int, tuple[float, float]]:
    """Round bounds from a server's ``start``/``end`` marks: round r runs from its start to the
    start of round r+1 (the last round: to its end)."""
    rows = [json.loads(x) for x in marks.read_text().splitlines() if x.strip()] if marks.is_file() else []
    start = {m["round"]: m["t"] for m in rows if m["what"] == "start"}
    stop_ = {m["round"]: m["t"] for m in rows if m["what"] == "end"}
    return {r: (start[r], start.get(r + 1, stop_[r])) for r in sorted(start) if r in stop_}


def check_round1(check: Path, sites: list[str], tol: float = 1e-5) -> dict[str, Any]:
    """Round 1's global weights (``CHECK/global-r1.safetensors``) against the float64
    case-weighted mean of what each client logged sending (``client-r1-SITE.safetensors`` and
    ``.cases``)."""
    from safetensors.numpy import load_file

    from benchmarks.peers.measure import weighted_mean_error

    g = check / "global-r1.safetensors"
    if not g.is_file():
        return {"ok": False, "reason": "the server wrote no round-1 global weights"}
    updates = []
    for s in sites:
        f = check / f"client-r1-{s}.safetensors"
        if f.is_file():
            updates.append((load_file(str(f)), float((check / f"client-r1-{s}.cases").read_text())))
    out = weighted_mean_error(load_file(str(g)), updates, tol=tol)
    out["round"] = 1
    if len(updates) != len(sites):
        out.update(
            ok=False, reason=f"only {len(updates)} of {len(sites)} clients logged their round-1 weights"
        )
    return out
