"""Rounds over shaped hospital links, uncompressed against compressed, through the real stack.

Each site runs in its own network namespace behind a veth pair shaped with ``tc tbf``
(``neurofed.launch.links``; default 20 Mbit/s up, 100 Mbit/s down per site); broker and
coordinator on the host. Bandwidth only: no latency or loss is added (``netem`` is not available
on these machines). One federation per ``--compression`` value, everything else equal; per mode
the steady rounds (2 and later: round 1 sends the whole model in every mode) give the round time,
the time the links carried traffic, and bytes down and up per round from the veth counters,
each against ``none`` (fp32).

    .venv/bin/python -m benchmarks.links [--sites 4] [--model default] [--rounds 3]
        [--uplink-mbit 20] [--downlink-mbit 100] [--modes none,fp16,int8,int8-topk]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess

from benchmarks import federation_overhead as fo
from benchmarks.common import emit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--cases-per-site", type=int, default=2)
    ap.add_argument("--shape", type=int, default=64)
    ap.add_argument("--model", default="default", choices=("tiny", "small", "default"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--uplink-mbit", type=float, default=20.0)
    ap.add_argument("--downlink-mbit", type=float, default=100.0)
    ap.add_argument("--modes", default="none,fp16,int8,int8-topk")
    ap.add_argument("--topk-density", type=float, default=None)
    ap.add_argument("--name", default=None, help="results file (default links_<model>_<sites>sites)")
    return ap.parse_args(argv)


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")


def one_mode(args: argparse.Namespace, mode: str) -> dict:
    from neurofed.launch.local import read_events

    fargs = argparse.Namespace(
        sites=args.sites, cases_per_site=args.cases_per_site, shape=args.shape, model=args.model,
        rounds=args.rounds, epochs=args.epochs, fp16=False, compression=mode,
        topk_density=args.topk_density if mode == "int8-topk" else None,
        uplink_mbit=args.uplink_mbit, downlink_mbit=args.downlink_mbit, out=None, name=None,
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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from neurofed.coordinator.init_weights import initial_weights
    from neurofed.models.config import preset
    from neurofed.wire.compression import canonical

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    fp32_model = len(canonical(initial_weights(preset(args.model, patch_size=(args.shape,) * 3).to_dict())))
    runs = {m: one_mode(args, m) for m in modes}
    base = runs.get("none")
    for r in runs.values():
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
            },  # fmt: skip
            "modes": runs,
        },
    )


if __name__ == "__main__":
    main()
