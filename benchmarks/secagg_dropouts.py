"""Secure aggregation under dropouts at every phase, 10 sites, real processes and real SIGKILLs.

For each phase, a fresh federation (10 ``neurofed edge`` processes, ``neurofed coordinator
--secure-aggregation``, a private Mosquitto with mTLS; the tiny UNet on 32^3 synthetic volumes)
runs one secure round while processes die:

- ``before-keys``: 3 sites SIGKILLed once ready, before the round is announced;
- ``after-keyset``: 3 sites die right after sending their key sets;
- ``after-shares``: 3 sites die right after sending their sealed shares (while they train);
- ``after-masked-input``: 3 sites die right after sending their masked input;
- ``after-echo``: 3 sites die in the unmask step (consistency echo sent, no reveal);
- ``after-echo-5-of-10``: 5 sites die there: fewer reveals than the threshold t = 6, so the
  attempt fails and the round is retried with fresh keys over the 5 sites still answering
  (k = 4, t = 3), which completes with their FedAvg;
- ``coordinator-after-keysets`` / ``coordinator-after-inputs``: the coordinator dies at its two
  secure fault points and is started again; the round restarts under a new attempt.

Sites die through the kit's fault points (``NEUROFED_FAULT=secagg-after-<step>``: the process
SIGKILLs itself right after that send) or, before keys, by this script's own SIGKILL. Each row:
whether the round completed, the attempts it took, who was counted, and the aggregate's error:
the largest difference between the round's model change and the float64 case-weighted mean of
the counted sites' own (unclipped, unquantized) deltas, which must stay within the round's stated
quantization bound (plus float32 storage of the model). For ``after-shares`` that mean is the
plaintext FedAvg of the 7 survivors.

    .venv/bin/python -m benchmarks.secagg_dropouts [--sites 10] [--phases after-shares,...]

Prints one JSON object and writes ``benchmarks/results/secagg_dropouts.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import emit

SHAPE = (32, 32, 32)


@dataclass(frozen=True)
class Phase:
    """Who dies where: ``site_fault`` a site fault point (or None), ``victims`` how many sites,
    ``kill_before`` SIGKILL them before the round, ``coordinator_fault`` a coordinator point;
    ``min_attempts`` the attempts the round must take at least; ``below_threshold``: fewer sites
    than the threshold are left, so the round is retried with fresh keys and may keep the model."""

    site_fault: str | None = None
    victims: int = 0
    kill_before: bool = False
    coordinator_fault: str | None = None
    min_attempts: int = 1
    below_threshold: bool = False


PHASES: dict[str, Phase] = {
    "before-keys": Phase(victims=3, kill_before=True),
    "after-keyset": Phase("secagg-after-keyset", 3),
    "after-shares": Phase("secagg-after-shares", 3),
    "after-masked-input": Phase("secagg-after-update", 3),
    "after-echo": Phase("secagg-after-echo", 3),
    "after-echo-5-of-10": Phase("secagg-after-echo", 5, min_attempts=2),
    "coordinator-after-keysets": Phase(coordinator_fault="secagg-after-keysets", min_attempts=2),
    "coordinator-after-inputs": Phase(coordinator_fault="secagg-after-inputs", min_attempts=2),
}


def aggregate_error(work: Path, counted: list[str], error_bound: float) -> dict[str, Any]:
    """The round-1 model change against the case-weighted mean of the counted sites' deltas."""
    import numpy as np
    from safetensors.numpy import load_file

    from neurofed.edge_node.secure import flat_delta

    rounds = work / "coordinator-state" / "rounds"
    g0, g1 = (load_file(str(rounds / f"global-r{r:04d}.safetensors")) for r in (0, 1))
    change = flat_delta(g1, g0).astype(np.float64)
    deltas = []
    for site in counted:
        st = work / f"{site}-state"
        rec = json.loads((st / "agent.json").read_text())["rounds"].get("1", {})
        deltas.append((np.load(st / "secure-delta-r0001.npy").astype(np.float64), float(rec["num_cases"])))
    total = sum(w for _, w in deltas)
    mean = sum(d * (w / total) for d, w in deltas)
    ulp = float(np.spacing(np.float32(max(np.abs(v).max(initial=0.0) for v in g1.values()))))
    err = float(np.abs(change - mean).max(initial=0.0))
    tol = error_bound + 2 * ulp
    return {
        "max_abs_error": err,
        "bound": tol,
        "within_bound": err <= tol,
        "moved": float(np.abs(mean).max()),
    }


def model_unchanged(work: Path) -> bool:
    """Round 1 kept the initial model (a round whose every secure attempt failed)."""
    import numpy as np
    from safetensors.numpy import load_file

    rounds = work / "coordinator-state" / "rounds"
    g0, g1 = (load_file(str(rounds / f"global-r{r:04d}.safetensors")) for r in (0, 1))
    return g0.keys() == g1.keys() and all(np.array_equal(g0[k], g1[k]) for k in g0)


class Federation:
    """One phase's processes: broker, sites, coordinator(s); all stopped by :meth:`close`."""

    def __init__(self, work: Path, data: Path, summary: dict[str, Any], init: str, sites: list[str]) -> None:
        from neurofed.launch.local import Broker, provision_sites
        from neurofed.procs import free_port

        self.work, self.data, self.summary, self.init, self.sites = work, data, summary, init, sites
        self.port = free_port()
        self.bundles = provision_sites(work / "bundles", "dropfed", sites, self.port)
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.state = work / "coordinator-state"
        self.broker = Broker(self.bundles, self.port, self.logs / "mosquitto.log")
        self.broker.start()
        self.procs: list[Any] = []
        self.edges: dict[str, Any] = {}

    def start_site(self, site: str, **env: str) -> None:
        from neurofed.launch.local import spawn_site
        from neurofed.procs import child_env

        p = spawn_site(
            site, self.bundles, self.data, self.work, self.logs, verbose=True, env=child_env(**env)
        )
        self.edges[site] = p
        self.procs.append(p)

    def wait_ready(self, timeout: float = 600) -> None:
        from neurofed.procs import wait_for

        wait_for(
            lambda: all((self.work / f"{s}-state" / "status.json").is_file() for s in self.sites),
            timeout,
            "the edge agents to start",
            self.procs,
        )

    def start_coordinator(self, fault: str | None = None) -> Any:
        from neurofed.procs import child_env, spawn

        args = [
            "-v", "coordinator", "--bundle", str(self.bundles / "coordinator"), "--rounds", "1",
            "--min-sites", "3", "--round-timeout", "300", "--state", str(self.state),
            "--model-size", "tiny", "--patch-size", str(SHAPE[0]),
            "--spacing", str(self.summary["spacing"][0]), "--init-weights", self.init,
            "--secure-aggregation", "--secagg-phase-timeout", "30", "--linger", "0",
        ]  # fmt: skip
        env = child_env(**({"NEUROFED_FAULT": fault, "NEUROFED_FAULT_ROUND": "1"} if fault else {}))
        p = spawn(f"coordinator-{len(self.procs)}", args, self.logs, env)
        self.procs.append(p)
        return p

    def events(self, kind: str) -> list[dict[str, Any]]:
        from neurofed.launch.local import read_events

        return [e for e in read_events(self.state) if e["event"] == kind]

    def close(self) -> None:
        for p in self.procs[::-1]:
            p.stop(10)
        self.broker.stop()


def run_phase(
    name: str, phase: Phase, work: Path, data: Path, summary: dict, init: str, sites: list[str]
) -> dict[str, Any]:
    from neurofed.procs import wait_for

    fed = Federation(work, data, summary, init, sites)
    victims = sites[-phase.victims :] if phase.victims else []
    row: dict[str, Any] = {"victims": victims}
    try:
        for s in sites:
            env = {"NEUROFED_FAULT": phase.site_fault, "NEUROFED_FAULT_ROUND": "1"}
            fed.start_site(s, **(env if s in victims and phase.site_fault else {}))
        fed.wait_ready()
        if phase.kill_before:
            for s in victims:
                fed.edges[s].popen.send_signal(signal.SIGKILL)
                fed.edges[s].wait(10)
        t0 = time.time()
        coord = fed.start_coordinator(phase.coordinator_fault)
        if phase.coordinator_fault:
            row["coordinator_exit_first"] = coord.wait(600)
            fed.start_coordinator()
        closed = wait_for(
            lambda: next((e for e in fed.events("round") if e["round"] == 1), None),
            600,
            "round 1 to close",
            fed.procs,
        )
        row["time_s"] = round(time.time() - t0, 1)
        # what follows (the final evaluation round) waits for the dead sites: not part of the figure
        done = [e for e in fed.events("secagg-done") if e["round"] == 1]
        attempts = sorted({e["attempt"] for e in fed.events("secagg-attempt") if e["round"] == 1})
        row["victims_exit"] = {s: fed.edges[s].popen.poll() for s in victims}
        row.update(
            completed=bool(closed.get("aggregated")) and bool(done),
            attempts=len(attempts),
            rounds_closed=len([e for e in fed.events("round") if e.get("train") and e["round"] == 1]),
        )
        if done:
            d = done[-1]
            row.update(
                survivors=len(d["survivors"]),
                recovered=len(d["recovered"]),
                left_out=len(d["left_out"]),
                error_bound=d["error_bound"],
                phase_s=d["phase_s"],
            )
            row["aggregate"] = aggregate_error(work, sorted(d["survivors"]), float(d["error_bound"]))
        elif phase.below_threshold:  # every attempt failed: the round must keep the previous model
            row["model_kept"] = model_unchanged(work)
            row["retries"] = [e["reason"] for e in fed.events("secagg-retry") if e["round"] == 1]
        sound = row.get("aggregate", {}).get("within_bound") or (
            phase.below_threshold and not row["completed"] and row.get("model_kept")
        )
        row["ok"] = bool(
            (row["completed"] or phase.below_threshold)
            and row["rounds_closed"] == 1
            and row["attempts"] >= phase.min_attempts
            and sound
            and all(code == -signal.SIGKILL for code in row["victims_exit"].values())
            and row.get("coordinator_exit_first", -signal.SIGKILL) == -signal.SIGKILL
        )
    except Exception as exc:  # noqa: BLE001 - one phase's failure is a row, the others still run
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[-2000:])
    finally:
        fed.close()
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--cases-per-site", type=int, default=4)
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {', '.join(PHASES)}")
    ap.add_argument("--out", help="work folder (kept); default: a temporary one, removed afterwards")
    ap.add_argument(
        "--name", default="secagg_dropouts", help="results file name (benchmarks/results/NAME.json)"
    )
    a = ap.parse_args(argv)
    names = [p.strip() for p in a.phases.split(",") if p.strip()]
    bad = [p for p in names if p not in PHASES]
    if bad:
        ap.error(f"--phases: unknown {bad}; choose from {', '.join(PHASES)}")
    if a.sites < 8:
        ap.error("--sites: at least 8 (5 sites die in one phase and 3 must survive)")
    from neurofed.coordinator.init_weights import initial_weights
    from neurofed.coordinator.state import StateStore
    from neurofed.launch.local import make_data
    from neurofed.models.config import ModelConfig

    root = Path(a.out or tempfile.mkdtemp(prefix="nf-secagg-drop-")).resolve()
    t0 = time.time()
    rows: dict[str, Any] = {}
    try:
        data = root / "data"
        summary = make_data(data, sites=a.sites, cases=a.cases_per_site * a.sites, shape=SHAPE)
        cfg = ModelConfig.tiny(patch_size=SHAPE, spacing=tuple(summary["spacing"])).to_dict()
        store = StateStore(root / "init")
        store.write_round_weights(0, initial_weights(cfg), cfg)
        init = str(store.round_weights_path(0))
        sites = sorted(summary["sites"])
        for name in names:
            print(f"[secagg_dropouts] {name}", flush=True, file=__import__("sys").stderr)
            rows[name] = run_phase(name, PHASES[name], root / name, data, summary, init, sites)
    finally:
        if not a.out:
            shutil.rmtree(root, ignore_errors=True)
    result = {
        "benchmark": "secagg_dropouts",
        "task": {"sites": a.sites, "cases_per_site": a.cases_per_site, "shape": list(SHAPE), "model": "tiny"},
        "phases": rows,
        "all_ok": all(r.get("ok") for r in rows.values()),
        "total_s": round(time.time() - t0, 1),
        "note": "real processes and SIGKILLs; time_s from the coordinator's start to the round's close "
        "(including the restart for coordinator faults); 2-core machine shared with other work",
    }
    return emit(a.name, result)


if __name__ == "__main__":
    main()
