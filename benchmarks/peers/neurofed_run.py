"""neurofed's side of the comparison: ``benchmarks.federation_overhead`` (room E's benchmark of the
real stack: coordinator and site agents as ``neurofed`` processes, private Mosquitto with mTLS,
sealed and signed messages), run in this process, then re-measured from its files with the same
definitions the peers get (:mod:`benchmarks.peers.measure`) and checked for real averaging.

It also leaves behind what the peers reuse so that every framework sees identical inputs: the
synthetic data (``WORK/data``, with its ``splits.json``) and the initial weights.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.peers.measure import read_intervals, round_figures, summarise, weighted_mean_error


def init_weights_path(work: Path) -> Path:
    return work / "init" / "rounds" / "global-r0000.safetensors"


def run(
    work: Path, *, sites: int, cases_per_site: int, rounds: int, shape: int, model: str, secure: bool = False
) -> dict[str, Any]:
    """The federation (``secure``: with ``--secure-aggregation``) and its figures."""
    from benchmarks import federation_overhead

    argv = [
        "--sites",
        str(sites),
        "--cases-per-site",
        str(cases_per_site),
        "--rounds",
        str(rounds),
        "--shape",
        str(shape),
        "--model",
        model,
        "--out",
        str(work),
        *(["--secure-aggregation", "--name", "federation_overhead_peers_secagg"] if secure else []),
    ]
    with contextlib.redirect_stdout(sys.stderr):  # its JSON goes to our log, ours to stdout
        fo = federation_overhead.main(argv)
    return {"federation_overhead": fo, **measure(work, rounds, secure=secure)}


def measure(work: Path, rounds: int, secure: bool = False) -> dict[str, Any]:
    from neurofed.launch.local import read_events

    events = read_events(work / "coordinator-state")
    announce = {e["round"]: e["t"] for e in events if e["event"] == "announce"}
    closed = {e["round"]: e["t"] for e in events if e["event"] == "round"}
    bounds = {}
    for r in range(1, rounds + 1):
        if r in announce and r in closed:
            bounds[r] = (announce[r], announce.get(r + 1, closed[r]))
    site_states = sorted(p for p in work.glob("*-state") if p.name != "coordinator-state")
    intervals = read_intervals(p / "timeline.jsonl" for p in site_states)
    rows = round_figures(bounds, intervals)
    check = check_secure_average(work, site_states, rounds, events) if secure else None
    return {
        "rounds": rows,
        **summarise(rows),
        "averaging_check": check or check_average(work, site_states, rounds),
    }


def check_secure_average(
    work: Path, site_states: list[Path], rnd: int, events: list[dict[str, Any]]
) -> dict[str, Any]:
    """Under secure aggregation no plaintext update leaves a site: each keeps its round's
    (unclipped) float delta until the next round. Round ``rnd``'s model change must equal the
    case-weighted mean of those deltas within the round's stated quantization bound (the
    coordinator's ``secagg-done`` event), plus float32 storage of the model."""
    import numpy as np
    from safetensors.numpy import load_file

    from neurofed.edge_node.secure import flat_delta

    rounds_dir = work / "coordinator-state" / "rounds"
    before, after = (rounds_dir / f"global-r{r:04d}.safetensors" for r in (rnd - 1, rnd))
    if not (before.is_file() and after.is_file()):
        return {"ok": False, "reason": f"{before.name} or {after.name} missing"}
    done = [e for e in events if e.get("event") == "secagg-done" and e.get("round") == rnd]
    if not done:
        return {"ok": False, "reason": f"no secagg-done event for round {rnd}"}
    g0, g1 = load_file(str(before)), load_file(str(after))
    change = flat_delta(g1, g0).astype(np.float64)
    deltas = []
    for st in site_states:
        f = st / f"secure-delta-r{rnd:04d}.npy"
        rec = json.loads((st / "agent.json").read_text())["rounds"].get(str(rnd), {})
        if f.is_file() and rec.get("num_cases"):
            deltas.append((np.load(f, allow_pickle=False).astype(np.float64), float(rec["num_cases"])))
    if not deltas:
        return {"ok": False, "reason": "no site kept its secure delta"}
    total = sum(w for _, w in deltas)
    mean = sum(d * (w / total) for d, w in deltas)
    # the stored model is float32: one ulp of the largest weight on top of the quantization bound
    ulp = float(np.spacing(np.float32(max(np.abs(v).max(initial=0.0) for v in g1.values()))))
    tol = float(done[-1]["error_bound"]) + 2 * ulp
    err = float(np.abs(change - mean).max(initial=0.0))
    ok = err <= tol and len(deltas) == len(site_states) and float(np.abs(mean).max(initial=0.0)) > 0
    return {
        "ok": bool(ok),
        "round": rnd,
        "clients": len(deltas),
        "max_abs_diff": err,
        "tolerance": tol,
        "error_bound": done[-1]["error_bound"],
        "checked": "model change vs case-weighted mean of the sites' float deltas",
    }


def check_average(work: Path, site_states: list[Path], rnd: int) -> dict[str, Any]:
    """Round ``rnd``'s global weights against the case-weighted mean of the updates the sites
    stored for that round (the agents keep the last two rounds' updates)."""
    from safetensors.numpy import load_file

    glob = work / "coordinator-state" / "rounds" / f"global-r{rnd:04d}.safetensors"
    if not glob.is_file():
        return {"ok": False, "reason": f"{glob} missing"}
    updates = []
    for st in site_states:
        upd = st / f"update-r{rnd:04d}.safetensors"
        rec = json.loads((st / "agent.json").read_text())["rounds"].get(str(rnd), {})
        if upd.is_file() and rec.get("num_cases"):
            updates.append((load_file(str(upd)), float(rec["num_cases"])))
    out = weighted_mean_error(load_file(str(glob)), updates)
    out["round"] = rnd
    return out
