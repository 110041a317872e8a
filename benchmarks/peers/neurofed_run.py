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
    work: Path, *, sites: int, cases_per_site: int, rounds: int, shape: int, model: str
) -> dict[str, Any]:
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
    ]
    with contextlib.redirect_stdout(sys.stderr):  # its JSON goes to our log, ours to stdout
        fo = federation_overhead.main(argv)
    return {"federation_overhead": fo, **measure(work, rounds)}


def measure(work: Path, rounds: int) -> dict[str, Any]:
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
    return {"rounds": rows, **summarise(rows), "averaging_check": check_average(work, site_states, rounds)}


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
