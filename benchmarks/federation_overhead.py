"""Federation overhead and whole-federation memory, through the real stack on this machine.

N sites x C synthetic cases (64^3 by default), UNet channels (8, 16, 32, 64, 128), 1 local epoch,
FedAvg; the coordinator and every site are real `neurofed` processes (one torch thread each), over
a private Mosquitto with mTLS, encryption and signatures.

overhead(round) = 1 - |union of the sites' train and evaluate intervals| / round wall time, where
the round runs from the coordinator's announcement to its close (aggregation, persistence and the
next announcement follow; registration is off the critical path). Peak memory is the peak of the
summed RSS of every process (coordinator, sites, broker), sampled every 0.25 s, and the sum of the
processes' own high-water marks (VmHWM). CPU seconds per process group (coordinator, broker,
sites) are sampled every 0.05 s, so each round says what ran while no site worked.

    .venv/bin/python -m benchmarks.federation_overhead [--sites 10] [--cases-per-site 4]
        [--shape 64] [--model small] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import CpuTrace, emit, gaps, machine_idle_s
from benchmarks.common import proc_status_kb as _rss_kb
from benchmarks.common import union_seconds as _union


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--cases-per-site", type=int, default=4)
    ap.add_argument("--shape", type=int, default=64)
    ap.add_argument("--model", default="small", choices=("tiny", "small", "default"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument(
        "--fp16", action="store_true", help="send models and updates in half precision (coordinator --fp16)"
    )
    ap.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="the coordinator runs SecAgg+ (coordinator --secure-aggregation)",
    )
    ap.add_argument(
        "--compression",
        choices=("none", "fp16", "int8", "int8-topk"),
        default=None,
        help="coordinator --compression (default none; --fp16 is fp16)",
    )
    ap.add_argument("--topk-density", type=float, default=None, help="coordinator --topk-density")
    ap.add_argument(
        "--uplink-mbit",
        type=float,
        default=None,
        help="run each site in its own network namespace, its uplink shaped to this rate (tc tbf; "
        "bandwidth only, no added latency); needs root",
    )
    ap.add_argument("--downlink-mbit", type=float, default=None, help="each site's shaped downlink rate")
    ap.add_argument("--name", default=None, help="results file name (default from the settings)")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    return ap.parse_args(argv)


@dataclass
class FederationRun:
    """What one federation of real processes left behind for the figures."""

    work: Path
    sites: list[str]
    summary: dict
    cfg: dict
    rc: int
    setup_s: float
    cpu: CpuTrace
    peak_sum_rss_kb: int
    hwm: dict[int, int]
    # shaped runs: (time, {site: (bytes to the site, bytes from it)}) every 0.1 s
    link_samples: list | None = None
    links: dict | None = None


def run_federation(args: argparse.Namespace) -> FederationRun:
    """Data, provisioning, a private broker, N edge processes and the coordinator, sampled for
    memory (every 0.25 s) and CPU per process group (every 0.05 s) until the coordinator exits."""
    from neurofed.coordinator.init_weights import initial_weights
    from neurofed.coordinator.state import StateStore
    from neurofed.launch.local import (
        Broker,
        child_env,
        free_port,
        make_data,
        provision_sites,
        spawn,
        spawn_site,
        wait_for,
    )
    from neurofed.models.config import preset

    work = Path(args.out or tempfile.mkdtemp(prefix="nf-overhead-"))
    shape = (args.shape,) * 3
    t0 = time.time()
    summary = make_data(work / "data", args.sites, args.sites * args.cases_per_site, shape)
    sites = sorted(summary["sites"])
    cfg = preset(args.model, patch_size=shape, spacing=tuple(summary["spacing"])).to_dict()
    init = StateStore(work / "init").write_round_weights(0, initial_weights(cfg), cfg)
    port = free_port()
    links = None
    if shaped(args):
        from neurofed.launch.links import ShapedLinks

        links = ShapedLinks(sites, args.uplink_mbit, args.downlink_mbit).open()
    try:
        provision_sites(work / "bundles", "bench", sites, port, links.broker_host if links else "localhost")
        logs = work / "logs"
        logs.mkdir(exist_ok=True)
        broker = Broker(work / "bundles", port, logs / "mosquitto.log")
        broker.start()
    except BaseException:
        if links:
            links.close()
        raise
    setup_s = time.time() - t0
    link_samples: list = []

    procs = []
    peak = {"sum_rss_kb": 0}
    hwm: dict[int, int] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pids = [p.popen.pid for p in procs if p.alive()] + ([broker.proc.pid] if broker.proc else [])
            total = 0
            for pid in pids:
                rss, h = _rss_kb(pid)
                total += rss
                hwm[pid] = max(hwm.get(pid, 0), h)
            peak["sum_rss_kb"] = max(peak["sum_rss_kb"], total)
            time.sleep(0.25)

    # CPU per group of processes, to say what ran while no site worked (the wire, the coordinator)
    cpu = CpuTrace()

    def sample_cpu() -> None:
        while not stop.is_set():
            groups = {
                p.popen.pid: "coordinator" if p.name == "coordinator" else "sites" for p in procs if p.alive()
            }
            if broker.proc:
                groups[broker.proc.pid] = "broker"
            cpu.sample(time.time(), groups, {"machine_idle": machine_idle_s()})
            if links is not None and (not link_samples or time.time() - link_samples[-1][0] >= 0.1):
                link_samples.append((time.time(), links.counters()))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu_sampler = threading.Thread(target=sample_cpu, daemon=True)
    cpu_sampler.start()
    try:
        for s in sites:
            if links is not None:
                procs.append(links.spawn(s, site_args(s, work), logs))
            else:
                procs.append(spawn_site(s, work / "bundles", work / "data", work, logs))
        wait_for(
            lambda: all((work / f"{s}-state" / "status.json").is_file() for s in sites), 600, "sites", procs
        )
        coord = spawn("coordinator", coordinator_args(args, work, summary, init), logs, child_env())
        procs.append(coord)
        rc = coord.wait(3600)
    finally:
        stop.set()
        sampler.join(2)
        cpu_sampler.join(2)
        for p in procs:
            p.stop(10)
        broker.stop()
        if links is not None:
            links.close()
    link_info = None
    if links is not None:
        link_info = {
            "uplink_mbit": args.uplink_mbit,
            "downlink_mbit": args.downlink_mbit,
            "shaping": "tc tbf per veth, bandwidth only (no added latency or loss)",
            "broker_host": links.broker_host,
        }
    return FederationRun(
        work, sites, summary, cfg, rc, setup_s, cpu, peak["sum_rss_kb"], hwm, link_samples or None, link_info
    )


def shaped(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "uplink_mbit", None) or getattr(args, "downlink_mbit", None))


def site_args(site: str, work: Path) -> list[str]:
    """``neurofed edge`` for a site (what launch.local.spawn_site runs)."""
    return [
        "edge",
        "--bundle", str(work / "bundles" / site),
        "--data", str(work / "data" / site),
        "--state", str(work / f"{site}-state"),
    ]  # fmt: skip


def compression_of(args: argparse.Namespace) -> str:
    return "fp16" if args.fp16 else (getattr(args, "compression", None) or "none")


def link_rows(run: FederationRun, events: list[dict]) -> list[dict]:
    """Per round: bytes down to and up from the sites, read from the veth counters from the
    previous round's close to this round's close (the round's model out, its updates in: windows
    that do not overlap, so no byte counts twice), and the time the links carried traffic in that
    window (any site's link above 5 % of its rate in a 0.1-s sample). ``round_s`` runs from the
    round's announcement to the next one."""
    samples = run.link_samples or []
    if not samples or run.links is None:
        return []
    announce = {e["round"]: e["t"] for e in events if e["event"] == "announce"}
    closed = {e["round"]: e["t"] for e in events if e["event"] == "round"}
    rates = {
        "down": (run.links["downlink_mbit"] or 0) * 1e6 / 8,
        "up": (run.links["uplink_mbit"] or 0) * 1e6 / 8,
    }

    def at(t: float) -> dict:
        best = min(samples, key=lambda s: abs(s[0] - t))
        return best[1]

    rows = []
    for r in sorted(closed):
        if r not in announce:
            continue
        a, end = announce[r], announce.get(r + 1, closed[r])
        # from the previous round's close: the announcement event is written once the model is
        # out, so round r's model travels before it; the next model goes after this close
        w0, w1 = closed.get(r - 1, samples[0][0]), closed[r]
        c0, c1 = at(w0), at(w1)
        down = sum(c1[s][0] - c0[s][0] for s in c1)
        up = sum(c1[s][1] - c0[s][1] for s in c1)
        busy = 0.0
        window = [s for s in samples if w0 <= s[0] <= w1]
        for (t0, x0), (t1, x1) in zip(window, window[1:], strict=False):
            dt = t1 - t0
            if dt <= 0:
                continue
            hot = any(
                (x1[s][0] - x0[s][0]) / dt > 0.05 * rates["down"] > 0
                or (x1[s][1] - x0[s][1]) / dt > 0.05 * rates["up"] > 0
                for s in x1
            )
            busy += dt if hot else 0.0
        rows.append(
            {
                "round": r,
                "round_s": round(end - a, 3),
                "bytes_down": down,
                "bytes_up": up,
                "wire_s": round(busy, 2),
                "wire_share": round(busy / (end - a), 3) if end > a else None,
            }
        )
    return rows


def coordinator_args(args: argparse.Namespace, work: Path, summary: dict, init: Path) -> list[str]:
    return [
        "-v", "coordinator",
        "--bundle", str(work / "bundles" / "coordinator"),
        "--rounds", str(args.rounds),
        "--round-timeout", "1800",
        "--strategy", "fedavg",
        "--local-epochs", str(args.epochs),
        "--model-size", args.model,
        "--patch-size", str(args.shape),
        "--spacing", str(summary["spacing"][0]),
        "--init-weights", str(init),
        "--state", str(work / "coordinator-state"),
    ] + (["--compression", compression_of(args)]) + (
        ["--topk-density", str(args.topk_density)] if getattr(args, "topk_density", None) else []
    ) + (["--secure-aggregation"] if getattr(args, "secure_aggregation", False) else []
    )  # fmt: skip


def read_timelines(work: Path, sites: list[str]) -> tuple[list[dict], list[dict]]:
    """The sites' work intervals (training and scoring) and their upload steps (encode, send,
    store beside the send)."""
    intervals: list[dict] = []
    uploads: list[dict] = []
    for s in sites:
        tl = work / f"{s}-state" / "timeline.jsonl"
        if tl.is_file():
            for rec in map(json.loads, tl.read_text().splitlines()):
                (intervals if rec.get("what", "train") in ("train", "evaluate") else uploads).append(rec)
    return intervals, uploads


def round_rows(run: FederationRun, events: list[dict], rounds: int) -> list[dict]:
    """One row per round: wall and busy time, the overhead, and where the idle time went."""
    announce = {e["round"]: e["t"] for e in events if e["event"] == "announce"}
    closed = {e["round"]: e["t"] for e in events if e["event"] == "round"}
    intervals, uploads = read_timelines(run.work, run.sites)
    rows = []
    for r in sorted(closed):
        if r not in announce:
            continue
        a, b = announce[r], closed[r]
        nxt = announce.get(r + 1, b)  # aggregation + persistence + announcement of r+1 count too
        # any round's work inside the window counts: a site may start round r+1 before the
        # coordinator has logged its announcement (the broker's acknowledgement comes after)
        inside = [
            (max(a, i["start"]), min(nxt, i["end"])) for i in intervals if i["end"] > a and i["start"] < nxt
        ]
        busy = _union(inside)
        wall = nxt - a
        row = {
            "round": r,
            "wall_s": round(wall, 3),
            "busy_s": round(busy, 3),
            "overhead": round(1 - busy / wall, 4) if wall > 0 else None,
            "train": r <= rounds,
        }
        _add_breakdown(row, events, intervals, uploads, run.cpu, (a, b, nxt), gaps((a, nxt), inside))
        rows.append(row)
    return rows


def _add_breakdown(
    row: dict,
    events: list[dict],
    intervals: list[dict],
    uploads: list[dict],
    cpu: CpuTrace,
    window: tuple[float, float, float],
    idle_windows: list,
) -> None:
    """The round's stages outside its own work, the CPU that ran while no site worked, and the
    last site's way to the coordinator."""
    r = row["round"]
    a, b, nxt = window
    wall, busy = row["wall_s"], row["busy_s"]
    mine = [i for i in intervals if i["round"] == r]
    # what the round closes on: updates in a training round (the sites' scores of the model
    # follow, beside the upload), metrics in the evaluation-only round
    closes_on = "update" if row["train"] else "metrics"
    got = [e["t"] for e in events if e.get("round") == r and e["event"] == closes_on]
    # the round's own work: training (the evaluation-only round: scoring)
    own = [i for i in mine if i.get("what", "train") == ("train" if row["train"] else "evaluate")]
    if not (own and got):
        return
    first, last = min(i["start"] for i in own), max(i["end"] for i in own)
    # the round's stages outside its own work: announcement until the first site starts,
    # the last site's end until the coordinator holds every result, closing (aggregate +
    # persist), announcing the next round (encode, seal, publish). ``idle`` is the time no
    # site works at all: less than their sum where the sites' scores of the model (sent
    # after the update) run during them.
    row["breakdown_s"] = {
        "start": round(first - a, 3),
        "last_result": round(max(got) - last, 3),
        "close": round(b - max(got), 3),
        "announce_next": round(nxt - b, 3),
        "idle": round(wall - busy, 3),
    }
    # What ran while no site worked, in CPU seconds, and how many of the machine's cores
    # that kept busy: near all of them says the idle time is work (moving and opening
    # updates and the next model), not waiting.
    used = cpu.used(idle_windows)
    used.pop("machine_idle", None)
    idle_s = wall - busy
    # the whole round's CPU per group: where a mode's extra work goes on a machine whose
    # cores the sites' training already fills
    # ("machine_idle": core-seconds no process used; near 0 says the round is CPU-bound)
    row["cpu_s"] = {g: round(v, 3) for g, v in sorted(cpu.used([(a, nxt)]).items())}
    row["idle_cpu_s"] = {g: round(v, 3) for g, v in sorted(used.items())}
    row["idle_cpu_cores"] = round(sum(used.values()) / idle_s, 2) if idle_s > 0.05 else None
    # from the close until the first site trains the next round: no site can work, the
    # next model is on its way (encode, seal, publish, the broker's fan-out, opening)
    nxt_train = [i["start"] for i in intervals if i["round"] == r + 1 and i.get("what", "train") == "train"]
    if nxt_train:
        row["breakdown_s"]["next_model_s"] = round(min(nxt_train) - b, 3)
    last_site = max((i for i in mine if i.get("what") == "train"), key=lambda i: i["end"], default=None)
    if last_site is not None:
        _add_last_site(row, events, uploads, last_site)
    ann = next((e for e in events if e["event"] == "announce" and e["round"] == r + 1), None)
    if ann is not None and "model_s" in ann:
        row["announce_next_s"] = {k: ann[k] for k in ("encode_s", "model_s", "task_s", "acked_s") if k in ann}


def _add_last_site(row: dict, events: list[dict], uploads: list[dict], last_site: dict) -> None:
    """The last site to finish training: its encode, store and send, and the wire's delivery."""
    r = row["round"]
    ups = {u["what"]: u for u in uploads if u["round"] == r and u["site"] == last_site["site"]}
    arrived = [
        e["t"]
        for e in events
        if e.get("round") == r and e["event"] == "update" and e.get("site") == last_site["site"]
    ]
    if "encode" in ups and "send" in ups and arrived:
        row["last_site_s"] = {
            "encode": round(ups["encode"]["end"] - ups["encode"]["start"], 3),
            "to_send": round(ups["send"]["start"] - ups["encode"]["end"], 3),
            "send": round(ups["send"]["end"] - ups["send"]["start"], 3),
            "coordinator_has_it": round(arrived[0] - ups["send"]["end"], 3),
        }
        if "store" in ups:  # the update file's write + fsync, while it is sent
            row["last_site_s"]["store_beside_send"] = round(ups["store"]["end"] - ups["store"]["start"], 3)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from neurofed.launch.local import read_events

    run = run_federation(args)
    events = read_events(run.work / "coordinator-state")
    rounds = round_rows(run, events, args.rounds)
    train_rounds = [x for x in rounds if x["train"]]
    steady = train_rounds[1:] or train_rounds
    result = {
        "benchmark": "federation_overhead",
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "config": {
            "sites": len(run.sites),
            "cases": run.summary["sites"],
            "shape": [args.shape] * 3,
            "model": args.model,
            "channels": run.cfg["channels"],
            "rounds": args.rounds,
            "local_epochs": args.epochs,
            "strategy": "fedavg",
            "fp16": args.fp16,
            "secure_aggregation": args.secure_aggregation,
            "compression": compression_of(args),
            "links": run.links,
        },
        "coordinator_exit": run.rc,
        "setup_s": round(run.setup_s, 1),
        "rounds": rounds,
        "overhead_round1": train_rounds[0]["overhead"] if train_rounds else None,
        "overhead_steady_mean": round(sum(x["overhead"] for x in steady) / len(steady), 4)
        if steady
        else None,
        # what the idle time is made of in steady rounds: the next model's way to the sites, and
        # how many of the machine's cores were busy while no site worked
        "next_model_s_steady_median": _median(
            [x["breakdown_s"].get("next_model_s") for x in steady if "breakdown_s" in x]
        ),
        "idle_cpu_cores_steady_median": _median([x.get("idle_cpu_cores") for x in steady]),
        "peak_sum_rss_gb": round(run.peak_sum_rss_kb / 1024**2, 3),
        "sum_of_process_hwm_gb": round(sum(run.hwm.values()) / 1024**2, 3),
        "processes": len(run.hwm),
    }
    if run.links is not None:
        result["link_rounds"] = link_rows(run, events)
    # the peers' task keeps the plain name; other models get their own file
    name = "federation_overhead" if args.model == "small" else f"federation_overhead_{args.model}"
    if args.secure_aggregation:
        result["secagg"] = [
            {k: e.get(k) for k in ("round", "attempt", "phase_s", "bytes_in", "bytes_out")}
            for e in events
            if e.get("event") == "secagg-done"
        ]
    name += {"none": "", "fp16": "_fp16"}.get(compression_of(args), "_" + compression_of(args))
    if args.secure_aggregation:
        name += "_secagg"
    if shaped(args):
        name += f"_links_{args.uplink_mbit:g}_{args.downlink_mbit:g}"
    return emit(args.name or name, result)


def _median(values: list) -> float | None:
    import statistics

    v = [x for x in values if x is not None]
    return round(statistics.median(v), 3) if v else None


if __name__ == "__main__":
    main()
