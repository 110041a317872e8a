"""Secure aggregation's cost in a whole federation: the same task run plaintext and with
``--secure-aggregation``, one after the other in one process, through the real stack (every site
and the coordinator a real ``neurofed`` process over a private Mosquitto with mTLS).

Reports the steady round time of each, their ratio (goal <= 1.05, at worst 1.10), the secure
phases' times, the bytes each phase moved, and the coordinator's memory relative to the model.

    .venv/bin/python -m benchmarks.secagg_rounds [--sites 10] [--cases-per-site 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks.common import emit
from benchmarks.federation_overhead import main as overhead


def steady_round_s(result: dict) -> float | None:
    walls = [r["wall_s"] for r in result["rounds"] if r["train"]][1:] or [
        r["wall_s"] for r in result["rounds"] if r["train"]
    ]
    return round(statistics.median(walls), 3) if walls else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--cases-per-site", type=int, default=4)
    ap.add_argument("--shape", type=int, default=64)
    ap.add_argument("--model", choices=("tiny", "small", "default"), default="small")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    common = [
        "--sites", str(args.sites), "--cases-per-site", str(args.cases_per_site), "--shape", str(args.shape),
        "--model", args.model, "--rounds", str(args.rounds),
    ]  # fmt: skip
    plain = overhead(common)
    secure = overhead([*common, "--secure-aggregation"])
    p, s = steady_round_s(plain), steady_round_s(secure)
    result = {
        "benchmark": "secagg_rounds",
        "machine": plain["machine"],
        "config": plain["config"],
        "plain_round_s": p,
        "secure_round_s": s,
        "secure_over_plain": round(s / p, 3) if p and s else None,
        "plain_rounds": [r["wall_s"] for r in plain["rounds"] if r["train"]],
        "secure_rounds": [r["wall_s"] for r in secure["rounds"] if r["train"]],
        "secagg": secure.get("secagg", []),
        "peak_sum_rss_gb": {"plain": plain["peak_sum_rss_gb"], "secure": secure["peak_sum_rss_gb"]},
    }
    return emit("secagg_rounds", result)


if __name__ == "__main__":
    main()
