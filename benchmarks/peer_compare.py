"""neurofed side by side with Flower (and NVIDIA FLARE): the same FedAvg task, measured in one run.

Task (issue 8): N sites x C synthetic 64^3 cases (``neurofed.edge_node.synth``, identical for everyone),
UNet channels (8, 16, 32, 64, 128) (``ModelConfig.small()``), 1 local epoch, R rounds, FedAvg,
every client training with the kit's own ``LocalTrainer`` from the same initial weights, one torch
thread per process (OMP_NUM_THREADS=1) everywhere. Each framework runs in its own recommended
multi-process deployment on this machine:

* neurofed: coordinator + one ``neurofed edge`` process per site over a private Mosquitto (mTLS,
  every message sealed and signed), via ``benchmarks.federation_overhead``;
* Flower: ``flower-superlink`` + one ``flower-supernode`` per site, the app started with
  ``flwr run`` against a local SuperLink connection in ``$FLWR_HOME/config.toml`` (insecure, loopback);
* NVIDIA FLARE: its simulator (``nvflare simulator``, FLARE's single-machine deployment) with one
  client per site and as many simulator threads as clients, so every client keeps its own worker
  process; FLARE's FedAvg controller and the Client API script in ``peers/flare_app`` (via
  ``benchmarks.peers.flare_run``).

With ``--secure-aggregation`` each side's secure arm runs next to its plaintext one, on the same
data and initial weights: ``neurofed-secure`` (``--secure-aggregation``: SecAgg+ with the
consistency round, AES-256-CTR masks, sealed Shamir shares) and ``flower-secagg`` (Flower's
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` with ``secaggplus_mod`` on the legacy
NumPyClient/Strategy API, ``peers/flower_secagg_app``; every client a neighbour of every other,
threshold about two thirds, ``max_weight`` the largest case count). Each secure aggregate is checked
against the float64 case-weighted mean within its own quantization bound; the figures add
neurofed-secure / Flower-SecAgg+ and each framework's secure / plain round time.

A peer whose environment is missing is reported as skipped, with the reason, never left out.

Before a framework's timings are reported, its averaging is checked: its global weights after a
round must equal the float64 case-weighted mean of the weights its clients logged (1e-5).
Figures (see ``benchmarks.peers.measure``): per-round wall time, the round's non-training overhead
share, the summed peak memory of all its processes, and the ratios neurofed / peer.

    scripts/peer_env.sh [--no-flare]                 # the peers' own virtual environments, once
    .venv/bin/python -m benchmarks.peer_compare [--sites 10] [--rounds 3] [--peers flower,flare]
    .venv/bin/python -m benchmarks.peer_compare --peers flower --secure-aggregation   # make bench-peers-secagg

Prints one JSON object and writes ``benchmarks/results/peer_compare.json``. The machine is shared:
treat single timings as +-30 %.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FRAMEWORKS = ("neurofed", "flower", "flare", "neurofed-secure", "flower-secagg")
PLAIN_FRAMEWORKS = FRAMEWORKS[:3]
# what --secure-aggregation adds: each side's secure arm next to its plain one
SECURE_ARMS = {"neurofed": "neurofed-secure", "flower": "flower-secagg"}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(nf: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    """neurofed / peer: below 1 means neurofed is faster, leaner or has less overhead."""
    if not nf.get("ok") or not peer.get("ok"):
        return {"skipped": "needs both runs to have succeeded"}
    return {
        "round_wall_steady": _ratio(nf["wall_steady_mean_s"], peer["wall_steady_mean_s"]),
        "round_wall_round1": _ratio(nf["wall_round1_s"], peer["wall_round1_s"]),
        "wall_total": _ratio(nf["wall_total_s"], peer["wall_total_s"]),
        "overhead_steady": _ratio(nf["overhead_steady_mean"], peer["overhead_steady_mean"]),
        "peak_sum_rss": _ratio(nf["memory"]["peak_sum_rss_gb"], peer["memory"]["peak_sum_rss_gb"]),
    }


def chosen_frameworks(frameworks: str | None, peers: str | None, secure: bool) -> list[str]:
    """The arms to run: ``--peers`` next to neurofed, else ``--frameworks``, else the three plain
    frameworks; ``--secure-aggregation`` adds each one's secure arm."""
    spec = f"neurofed,{peers}" if peers else frameworks or ",".join(PLAIN_FRAMEWORKS)
    wanted = [f.strip() for f in spec.split(",") if f.strip()]
    if secure:
        wanted += [SECURE_ARMS[f] for f in wanted if f in SECURE_ARMS and SECURE_ARMS[f] not in wanted]
    return wanted


def secure_figures(results: dict[str, Any]) -> dict[str, Any]:
    """The secure-aggregation side by side: neurofed's secure round against Flower SecAgg+'s
    (goal <= 0.1), and each framework's secure round against its own plaintext one."""
    out: dict[str, Any] = {}
    nf, fl = results.get("neurofed-secure"), results.get("flower-secagg")
    if nf is not None and fl is not None:
        out["neurofed_secure_vs_flower_secagg"] = ratios(nf, fl)
    for plain, secure in SECURE_ARMS.items():
        if plain in results and secure in results:
            out[f"{plain}_secure_over_plain"] = ratios(results[secure], results[plain])
    return out


def _neurofed(work: Path, a: argparse.Namespace, secure: bool = False) -> dict[str, Any]:
    from benchmarks.peers import neurofed_run

    res = neurofed_run.run(
        work,
        sites=a.sites,
        cases_per_site=a.cases_per_site,
        rounds=a.rounds,
        shape=a.shape,
        model=a.model,
        secure=secure,
    )
    fo = res.pop("federation_overhead")
    res["memory"] = {
        "peak_sum_rss_gb": fo["peak_sum_rss_gb"],
        "sum_of_process_hwm_gb": fo["sum_of_process_hwm_gb"],
        "processes_seen": fo["processes"],
    }
    res["setup_s"] = fo["setup_s"]
    res["deployment"] = "coordinator + 1 edge process per site + private Mosquitto (mTLS, sealed+signed)" + (
        "; --secure-aggregation (SecAgg+ with the consistency round)" if secure else ""
    )
    if secure:
        res["secagg"] = fo.get("secagg", [])
    res["ok"] = (
        fo["coordinator_exit"] == 0
        and res["averaging_check"].get("ok", False)
        and len(res["rounds"]) == a.rounds
    )
    if not res["ok"]:
        res["error"] = f"coordinator exit {fo['coordinator_exit']}, averaging {res['averaging_check']}"
    return res


def _say_if_skipped(name: str, res: dict[str, Any]) -> None:
    why = res.get("skipped") or res.get("error")
    if why:
        print(f"[peer_compare] {name}: {'skipped' if 'skipped' in res else 'failed'}: {why}", file=sys.stderr)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--cases-per-site", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--shape", type=int, default=64, help="cube edge of the synthetic volumes (multiple of 16)"
    )
    ap.add_argument("--model", default="small", choices=("tiny", "small", "default"))
    ap.add_argument(
        "--frameworks", default=None, help="comma list of neurofed, flower, flare (default: all three)"
    )
    ap.add_argument(
        "--peers", default=None, help="comma list of flower, flare to run next to neurofed (default: both)"
    )
    ap.add_argument(
        "--flare-threads",
        type=int,
        default=None,
        help="FLARE simulator threads (default: one per site, every client in its own worker process)",
    )
    ap.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="also run each framework's secure aggregation next to its plaintext FedAvg: "
        "neurofed --secure-aggregation and Flower's SecAggPlusWorkflow + secaggplus_mod (3+ sites)",
    )
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed to each peer's whole run")
    ap.add_argument("--out", help="work folder (kept); default: a temporary one, removed afterwards")
    ap.add_argument("--name", default="peer_compare", help="results file name (benchmarks/results/NAME.json)")
    a = ap.parse_args(argv)
    if a.frameworks and a.peers:
        ap.error("--frameworks and --peers: give one of them")
    wanted = chosen_frameworks(a.frameworks, a.peers, a.secure_aggregation)
    bad = [f for f in wanted if f not in FRAMEWORKS]
    if bad or "neurofed" not in wanted:
        ap.error(
            f"--frameworks: {bad or 'neurofed is required (the peers reuse its data)'}; choose from {FRAMEWORKS}"
        )
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from benchmarks.common import emit
    from benchmarks.peers import flower_run, neurofed_run

    work = Path(a.out or tempfile.mkdtemp(prefix="nf-peers-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results: dict[str, Any] = {}
    try:
        print(
            f"[peer_compare] neurofed: {a.sites} sites x {a.cases_per_site} cases, {a.rounds} rounds",
            file=sys.stderr,
        )
        results["neurofed"] = _neurofed(work / "neurofed", a)
        if "neurofed-secure" in wanted:
            print("[peer_compare] neurofed --secure-aggregation", file=sys.stderr)
            results["neurofed-secure"] = _neurofed(work / "neurofed-secure", a, secure=True)
        data = work / "neurofed" / "data"
        init = neurofed_run.init_weights_path(work / "neurofed")
        common = dict(
            data=data,
            init=init,
            sites=a.sites,
            rounds=a.rounds,
            shape=a.shape,
            model=a.model,
            timeout=a.timeout,
        )
        if "flower" in wanted:
            print("[peer_compare] Flower", file=sys.stderr)
            results["flower"] = flower_run.run(work / "flower", **common)
            _say_if_skipped("Flower", results["flower"])
        if "flower-secagg" in wanted:
            print("[peer_compare] Flower SecAgg+", file=sys.stderr)
            settings = flower_run.secagg_settings(a.sites, a.cases_per_site)
            results["flower-secagg"] = flower_run.run(work / "flower-secagg", secagg=settings, **common)
            _say_if_skipped("Flower SecAgg+", results["flower-secagg"])
        if "flare" in wanted:
            from benchmarks.peers import flare_run

            print("[peer_compare] NVIDIA FLARE", file=sys.stderr)
            results["flare"] = flare_run.run(work / "flare", threads=a.flare_threads, **common)
            _say_if_skipped("NVIDIA FLARE", results["flare"])
    finally:
        if not a.out:
            shutil.rmtree(work, ignore_errors=True)
    nf = results["neurofed"]
    figures = {
        "task": {
            "sites": a.sites,
            "cases_per_site": a.cases_per_site,
            "shape": [a.shape] * 3,
            "model": a.model,
            "local_epochs": 1,
            "rounds": a.rounds,
            "strategy": "fedavg",
            "torch_threads_per_process": 1,
        },
        "frameworks": results,
        "ratios": {f"neurofed_vs_{k}": ratios(nf, v) for k, v in results.items() if k in ("flower", "flare")},
        **(
            {"secure_aggregation": secure_figures(results)}
            if any(arm in results for arm in SECURE_ARMS.values())
            else {}
        ),
        "total_s": round(time.time() - t0, 1),
        "note": "2-core machine shared with other work while measured: single timings are noisy (+-30 %)",
    }
    return emit(a.name, figures)


if __name__ == "__main__":
    main()
