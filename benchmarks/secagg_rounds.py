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

from benchmarks.common import RESULTS, emit
from benchmarks.federation_overhead import main as overhead


def steady_round_s(result: dict) -> float | None:
    """Median wall seconds of the steady rounds (every training round after the first)."""
    walls = steady_rounds(result)
    return round(statistics.median(walls), 3) if walls else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--cases-per-site", type=int, default=4)
    ap.add_argument("--shape", type=int, default=64)
    ap.add_argument("--model", choices=("tiny", "small", "default"), default="small")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--repeat", type=int, default=1,
        help="run the pair this many times and report the median over every steady round of each "
        "mode and the median of the pairs' own ratios: one pair on a shared 2-core machine varies by "
        "several percent. Pairs alternate which mode runs first (plain-secure, secure-plain, ...), so "
        "a machine that speeds up or slows down over the run favours neither mode",
    )  # fmt: skip
    ap.add_argument(
        "--name", default="secagg_rounds", help="results file name (benchmarks/results/NAME.json)"
    )
    args = ap.parse_args(argv)
    common = [
        "--sites", str(args.sites), "--cases-per-site", str(args.cases_per_site), "--shape", str(args.shape),
        "--model", args.model, "--rounds", str(args.rounds),
    ]  # fmt: skip
    pairs, orders = [], []
    for i in range(max(1, args.repeat)):
        secure_first = i % 2 == 1
        runs = {}
        for mode in ("secure", "plain") if secure_first else ("plain", "secure"):
            flag = ["--secure-aggregation"] if mode == "secure" else []
            runs[mode] = overhead([*common, *flag, "--name", f"{args.name}_{mode}"])
        pairs.append((runs["plain"], runs["secure"]))
        orders.append("secure-plain" if secure_first else "plain-secure")
    for mode in ("plain", "secure"):  # each run's own file: the pairs below hold their figures
        (RESULTS / f"{args.name}_{mode}.json").unlink(missing_ok=True)
    plain_steady = [w for plain, _ in pairs for w in steady_rounds(plain)]
    secure_steady = [w for _, secure in pairs for w in steady_rounds(secure)]
    p = round(statistics.median(plain_steady), 3) if plain_steady else None
    s = round(statistics.median(secure_steady), 3) if secure_steady else None
    plain, secure = pairs[-1]
    ratios = [r for r in (_pair_ratio(a, b) for a, b in pairs) if r is not None]
    result = {
        "benchmark": "secagg_rounds",
        "machine": plain["machine"],
        "config": plain["config"],
        "repeat": len(pairs),
        "plain_round_s": p,
        "secure_round_s": s,
        "secure_over_plain": round(s / p, 3) if p and s else None,
        # the pairs' own ratios: their median, and their spread (how far one pair can be trusted)
        "pair_ratio_median": round(statistics.median(ratios), 3) if ratios else None,
        "pair_ratio_range": [min(ratios), max(ratios)] if ratios else None,
        "pairs": [
            {
                "order": order,
                "plain_round_s": steady_round_s(a),
                "secure_round_s": steady_round_s(b),
                "secure_over_plain": _pair_ratio(a, b),
                "plain_rounds": [r["wall_s"] for r in a["rounds"] if r["train"]],
                "secure_rounds": [r["wall_s"] for r in b["rounds"] if r["train"]],
                # CPU seconds per process group in each training round: the secure mode's extra work
                "plain_cpu_s": [r.get("cpu_s") for r in a["rounds"] if r["train"]],
                "secure_cpu_s": [r.get("cpu_s") for r in b["rounds"] if r["train"]],
            }
            for (a, b), order in zip(pairs, orders, strict=True)
        ],
        "steady_cpu_s_median": {
            mode: _median_cpu([r.get("cpu_s") for run in runs for r in _steady(run)])
            for mode, runs in (("plain", [a for a, _ in pairs]), ("secure", [b for _, b in pairs]))
        },
        "secagg": secure.get("secagg", []),
        "peak_sum_rss_gb": {"plain": plain["peak_sum_rss_gb"], "secure": secure["peak_sum_rss_gb"]},
    }
    return emit(args.name, result)


def _pair_ratio(plain: dict, secure: dict) -> float | None:
    p, s = steady_round_s(plain), steady_round_s(secure)
    return round(s / p, 3) if p and s else None


def _steady(result: dict) -> list[dict]:
    train = [r for r in result["rounds"] if r["train"]]
    return train[1:] or train


def steady_rounds(result: dict) -> list[float]:
    """Wall seconds of the steady rounds (every training round after the first)."""
    return [r["wall_s"] for r in _steady(result)]


def _median_cpu(rows: list[dict | None]) -> dict[str, float]:
    groups = sorted({g for row in rows if row for g in row})
    return {g: round(statistics.median(row.get(g, 0.0) for row in rows if row), 3) for g in groups}


if __name__ == "__main__":
    main()
