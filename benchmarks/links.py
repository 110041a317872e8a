"""Rounds over shaped hospital links, uncompressed against compressed, through the real stack.

Each site runs in its own network namespace behind a veth pair shaped with ``tc tbf``
(``neurofed.launch.links``; default 20 Mbit/s up, 100 Mbit/s down per site); broker and
coordinator on the host. Bandwidth only: no latency or loss is added (``netem`` is not available
on these machines). One federation per ``--compression`` value, everything else equal; per mode
the steady rounds (2 and later: round 1 sends the whole model in every mode) give the round time,
the time the links carried traffic, and bytes down and up per round from the veth counters,
each against ``none`` (fp32).

``--peers flower`` runs Flower 1.42 on the same data, initial weights and links in the same run
(``benchmarks.peers.flower_run``: each SuperNode in its site's namespace, the SuperLink on the
host), plain fp32 (Flower has no built-in update compression). ``--peers flare`` records why NVIDIA
FLARE is not shaped (``benchmarks.peers.flare_links``) and whether its quantization filters run.

Local training is kept small by default (10 sites x 2 synthetic 32^3 cases: one training step and
one scored case per site and round) so that on a small CPU the wire, not training, sets the round.

    .venv/bin/python -m benchmarks.links [--sites 10] [--shape 32] [--model default] [--rounds 3]
        [--uplink-mbit 20] [--downlink-mbit 100] [--modes none,fp16,int8,int8-topk]
        [--peers flower,flare]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import federation_overhead as fo
from benchmarks.common import emit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--cases-per-site", type=int, default=2)
    ap.add_argument("--shape", type=int, default=32, help="cube edge of the synthetic cases (multiple of 16)")
    ap.add_argument("--model", default="default", choices=("tiny", "small", "default"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--uplink-mbit", type=float, default=20.0)
    ap.add_argument("--downlink-mbit", type=float, default=100.0)
    ap.add_argument("--modes", default="none,fp16,int8,int8-topk")
    ap.add_argument("--topk-density", type=float, default=None)
    ap.add_argument(
        "--peers",
        default="",
        help="comma list of flower, flare: Flower 1.42 under the same shaping; FLARE's shaping status",
    )
    ap.add_argument("--peer-timeout", type=float, default=1800, help="seconds allowed to a peer's whole run")
    ap.add_argument("--out", default=None, help="work folder, kept (default: a temporary one, removed)")
    ap.add_argument("--name", default=None, help="results file (default links_<model>_<sites>sites)")
    return ap.parse_args(argv)


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")


def one_mode(args: argparse.Namespace, mode: str, work: Path) -> dict:
    from neurofed.launch.local import read_events

    fargs = argparse.Namespace(
        sites=args.sites, cases_per_site=args.cases_per_site, shape=args.shape, model=args.model,
        rounds=args.rounds, epochs=args.epochs, fp16=False, compression=mode,
        topk_density=args.topk_density if mode == "int8-topk" else None,
        uplink_mbit=args.uplink_mbit, downlink_mbit=args.downlink_mbit, out=str(work), name=None,
    )  # fmt: skip
    run = fo.run_federation(fargs)
    events = read_events(run.work / "coordinator-state")
    links = [x for x in fo.link_rows(run, events) if x["round"] <= args.rounds]
    busy = {x["round"]: x for x in fo.round_rows(run, events, args.rounds)}
    steady = links[1:] or links

    def med(key: str) -> float:
        return statistics.median(x[key] for x in steady)

    updates = [e["bytes"] for e in events if e["event"] == "update" and e["round"] > 1]
    announced = [e for e in events if e["event"] == "announce" and 1 < e["round"] <= args.rounds]
    return {
        "coordinator_exit": run.rc,
        "rounds": [dict(x, busy_s=busy.get(x["round"], {}).get("busy_s")) for x in links],
        "steady_round_s": round(med("round_s"), 2),
        "steady_wire_s": round(med("wire_s"), 2),
        "steady_bytes_down": int(med("bytes_down")),
        "steady_bytes_up": int(med("bytes_up")),
        "update_payload_bytes": int(statistics.median(updates)) if updates else None,
        "model_payload_bytes": int(statistics.median(e["model_bytes"] for e in announced))
        if announced
        else None,
        "model_encoding": announced[0]["model_encoding"] if announced else None,
    }


def peers_of(spec: str) -> list[str]:
    peers = [p.strip() for p in spec.split(",") if p.strip()]
    bad = [p for p in peers if p not in ("flower", "flare")]
    if bad:
        raise SystemExit(f"--peers: unknown {bad}; choose from flower, flare")
    return peers


def flower_mode(args: argparse.Namespace, data: Path, init: Path, work: Path) -> dict[str, Any]:
    """Flower on the same data and initial weights, its SuperNodes behind the same shaped links."""
    from benchmarks.peers import flower_run
    from neurofed.launch.links import ShapedLinks

    why = flower_run.available()
    if why:
        return {"ok": False, "skipped": why}
    sites = sorted(p.name for p in data.iterdir() if p.is_dir())[: args.sites]
    with ShapedLinks(sites, args.uplink_mbit, args.downlink_mbit) as links:
        res = flower_run.run(
            work,
            data=data,
            init=init,
            sites=args.sites,
            rounds=args.rounds,
            timeout=args.peer_timeout,
            links=links,
        )
    res["encoding"] = "fp32 (Flower has no built-in update compression or quantization mod)"
    return res


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    peers = peers_of(args.peers)
    from neurofed.coordinator.init_weights import initial_weights
    from neurofed.models.config import preset
    from neurofed.wire.compression import canonical

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    fp32_model = len(canonical(initial_weights(preset(args.model, patch_size=(args.shape,) * 3).to_dict())))
    load_before = os.getloadavg()
    t_start = time.time()
    root = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="nf-links-"))
    runs: dict[str, dict] = {}
    peer_runs: dict[str, dict] = {}
    try:
        for m in modes:
            print(f"[links] neurofed --compression {m}: {args.sites} sites", file=sys.stderr)
            runs[m] = one_mode(args, m, root / m)
        if "flower" in peers and modes:
            print("[links] Flower", file=sys.stderr)
            first = root / modes[0]
            peer_runs["flower"] = flower_mode(
                args, first / "data", first / "init" / "rounds" / "global-r0000.safetensors", root / "flower"
            )
        if "flare" in peers:
            from benchmarks.peers import flare_links

            peer_runs["flare"] = flare_links.status()
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    base = runs.get("none")
    for r in [*runs.values(), *(x for x in peer_runs.values() if "steady_round_s" in x)]:
        if "steady_bytes_down" not in r:
            continue
        r["bytes_per_round"] = r["steady_bytes_down"] + r["steady_bytes_up"]
        if base:
            r["bytes_vs_fp32"] = round(
                r["bytes_per_round"] / (base["steady_bytes_down"] + base["steady_bytes_up"]), 4
            )
            r["round_time_vs_fp32"] = round(r["steady_round_s"] / base["steady_round_s"], 3)
            r["fp32_round_time_over_this"] = round(base["steady_round_s"] / r["steady_round_s"], 2)
    return emit(
        args.name or f"links_{args.model}_{args.sites}sites",
        {
            "cpu_model": cpu_model(),
            "config": {
                "sites": args.sites,
                "cases_per_site": args.cases_per_site,
                "shape": args.shape,
                "model": args.model,
                "fp32_model_bytes": fp32_model,
                "rounds": args.rounds,
                "local_epochs": args.epochs,
                "uplink_mbit": args.uplink_mbit,
                "downlink_mbit": args.downlink_mbit,
                "topk_density": args.topk_density or 0.1,
                "shaping": "tc tbf per site veth, bandwidth only: no added latency or loss (netem unavailable)",
                "steady": "median of rounds 2.. (round 1 sends the whole fp32 model in every mode)",
                "local_training": f"{args.epochs} local epoch per round on each site's training cases "
                f"({args.cases_per_site} synthetic {args.shape}^3 cases per site, 2 crops per case, batch 2; "
                "with 2 cases: 1 training case, one optimiser step), kept small so the wire sets the round",
                "peers_vs_fp32": "a peer's bytes_vs_fp32 and round ratios are against neurofed's none (fp32)",
            },  # fmt: skip
            "modes": runs,
            "peers": peer_runs,
            "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
            "total_s": round(time.time() - t_start, 1),
        },
    )


if __name__ == "__main__":
    main()
