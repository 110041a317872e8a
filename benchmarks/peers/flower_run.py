"""Flower's side: its recommended multi-process deployment on one machine, driven as a user would.

``flower-superlink --insecure`` (loopback only), one ``flower-supernode`` per site with
``--node-config "site='site-01'"``, and the hand-written app in ``flower_app/`` started with
``flwr run flower_app deployment`` against a SuperLink connection written to ``$FLWR_HOME/config.toml``
(a private FLWR_HOME in the work folder, so the user's own Flower settings are left alone).
All binaries come from the separate peer environment (``scripts/peer_env.sh``), never the kit's.

The ServerApp stamps each round's start and end; each ClientApp appends its train/evaluate
intervals; this module samples the memory of every process under the SuperLink, the SuperNodes
and ``flwr run`` (ServerApp and ClientApp processes included), then checks that the round-1
global weights are the case-weighted mean of what the clients sent.

With ``links`` (an open ``neurofed.launch.links.ShapedLinks``), every SuperNode runs in its site's
network namespace behind the site's shaped veth (its ClientApp processes, its children, with it),
the SuperLink on the host listening on the bridge address; the veth counters are sampled and each
round gets its bytes each way and its time on the wire (``benchmarks.peers.wire``).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.peers.harness import check_round1, package_version, read_marks, write_task
from benchmarks.peers.harness import free_port as _free_port
from benchmarks.peers.harness import spawn as _spawn
from benchmarks.peers.harness import stop as _stop
from benchmarks.peers.harness import tail as _tail
from benchmarks.peers.measure import (
    TreeMemory,
    read_intervals,
    round_figures,
    summarise,
)
from benchmarks.peers.wire import LinkSampler, steady, wire_rows

REPO = Path(__file__).resolve().parents[2]
APP = Path(__file__).resolve().parent / "flower_app"
SECAGG_APP = Path(__file__).resolve().parent / "flower_secagg_app"
VENV = Path(os.environ.get("NEUROFED_PEER_VENV", REPO / ".cache" / "peer-venv"))


def available() -> str | None:
    """None when Flower can run, else why not (for the JSON's skip reason)."""
    for exe in ("flower-superlink", "flower-supernode", "flwr"):
        if not (VENV / "bin" / exe).is_file():
            return f"{VENV / 'bin' / exe} missing: run scripts/peer_env.sh"
    return None


def flwr_version() -> str:
    return package_version(VENV, "flwr")


def _env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env.update(
        FLWR_HOME=str(flwr_home),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO),  # benchmarks.peers.measure (the kit itself is installed there)
        PATH=f"{VENV / 'bin'}:{env.get('PATH', '')}",
        FLWR_TELEMETRY_ENABLED="0",
    )
    return env


def secagg_settings(sites: int, max_cases: int) -> dict[str, Any]:
    """SecAgg+ settings matched to neurofed's defaults: every client a neighbour of every other
    (Flower's ``num_shares`` counts the client's own share, so n shares is the complete graph that
    neurofed uses up to 10 sites), a threshold of about two thirds, and ``max_weight`` the largest
    case count (the finest quantization Flower offers without overflow warnings)."""
    if sites < 3:
        raise ValueError(f"Flower's SecAgg+ needs at least 3 clients (num_shares > 2), got {sites}")
    shares = sites
    return {
        "num-shares": shares,
        "reconstruction-threshold": min(shares - 1, max(2, math.ceil(2 * shares / 3))),
        "max-weight": float(max_cases),
        "clipping-range": 8.0,  # Flower's defaults
        "quantization-range": 2**22,
    }


def secagg_error_bound(settings: dict[str, Any], cases: list[float]) -> float:
    """Per-coordinate bound on |SecAgg+ mean - exact case-weighted mean| for Flower's quantization.

    Each client quantizes ``(w_i / max_weight) * x_i`` (x_i clipped to +-C) to steps of
    ``2C / Q`` with stochastic rounding (error < one step); the server divides the sum by
    ``sum_i w_i / max_weight``. So the mean is off by less than
    ``n * (2C / Q) * max_weight / sum_i w_i`` (plus float32 storage of the result)."""
    step = 2 * settings["clipping-range"] / settings["quantization-range"]
    return len(cases) * step * settings["max-weight"] / sum(cases) + 1e-6


def run(
    work: Path,
    *,
    data: Path,
    init: Path,
    sites: int,
    rounds: int,
    timeout: float = 900,
    secagg: dict[str, Any] | None = None,
    links: Any = None,
    **_: Any,
) -> dict[str, Any]:
    """Flower's deployment on this task; with ``secagg`` (see :func:`secagg_settings`) the
    ``flower_secagg_app`` (``SecAggPlusWorkflow`` + ``secaggplus_mod``) instead of plain FedAvg."""
    why = available()
    if why:
        return {"ok": False, "skipped": why}
    if work.exists():
        shutil.rmtree(work)
    logs, check, timeline = work / "logs", work / "check", work / "timeline"
    for d in (logs, check, timeline):
        d.mkdir(parents=True)
    flwr_home = work / "flwr-home"
    flwr_home.mkdir()
    site_names = sorted(p.name for p in data.iterdir() if p.is_dir())[:sites]
    task_file = write_task(
        work, data=data, init=init, site_names=site_names, rounds=rounds, timeline=timeline, check=check
    )

    port = _free_port()  # Flower 1.42: one HTTP API (Fleet, Control, ServerAppIO) on the SuperLink
    host = links.broker_host if links is not None else "127.0.0.1"
    if links is not None and list(links.sites) != site_names:
        raise ValueError(f"shaped links are for {links.sites}, the data has {site_names}")
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "deployment"\n\n'
        f'[superlink.deployment]\naddress = "{host}:{port}"\ninsecure = true\n'
    )
    env = _env(flwr_home)
    bin_ = VENV / "bin"
    procs: list[subprocess.Popen] = []
    t0 = time.time()
    runp: subprocess.Popen | None = None
    sampler = LinkSampler(links.counters if links is not None else dict)
    with TreeMemory(lambda: [p.pid for p in procs] + ([runp.pid] if runp else [])) as mem, sampler:
        try:
            procs.append(
                _spawn(
                    [
                        str(bin_ / "flower-superlink"),
                        "--insecure",
                        "--host",
                        host,
                        "--port",
                        str(port),
                        "--disable-runtime-dependency-installation",
                    ],
                    logs / "superlink.log",
                    env,
                    work,
                )
            )
            _wait_port(host, port, 120, procs[0], logs / "superlink.log")
            for s in site_names:
                node = [
                    str(bin_ / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"{host}:{port}",
                    # the ClientAppIo API, inside the site's namespace when shaped
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(_free_port()),
                    "--node-config",
                    f"site='{s}'",
                ]
                procs.append(
                    _spawn(
                        links.command(s, node) if links is not None else node,
                        logs / f"supernode-{s}.log",
                        env,
                        work,
                    )
                )
            started = time.time()
            runp = _spawn(
                [
                    str(bin_ / "flwr"),
                    "run",
                    str(SECAGG_APP if secagg else APP),
                    "deployment",
                    "--stream",
                    "--run-config",
                    " ".join([f"task-file='{task_file}'", *_secagg_config(secagg)]),
                ],
                logs / "flwr-run.log",
                env,
                work,
            )
            marks = work / "rounds.jsonl"
            deadline = time.time() + timeout
            while time.time() < deadline:
                if (
                    marks.is_file()
                    and sum(1 for x in marks.read_text().splitlines() if '"end"' in x) >= rounds
                ):
                    break
                dead = [p for p in procs if p.poll() is not None]
                if dead:
                    raise RuntimeError(
                        f"a Flower process exited early ({dead[0].args[0]}):\n"
                        + _tail(logs / "superlink.log")
                    )
                time.sleep(0.5)
            else:
                raise TimeoutError(
                    f"Flower did not finish {rounds} rounds in {timeout:.0f} s:\n{_tail(logs / 'flwr-run.log')}"
                    f"\n{_tail(logs / 'superlink.log')}"
                )
            # the final global weights are written after the last round's evaluation
            end = time.time() + 60
            while time.time() < end and not (check / "global-final.safetensors").is_file():
                time.sleep(0.5)
        except Exception as exc:  # noqa: BLE001 - report it in the JSON, keep the other frameworks
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-3000:], "logs": str(logs)}
        finally:
            for p in ([runp] if runp else []) + procs[::-1]:
                _stop(p)
    total = time.time() - t0
    bounds = read_marks(work / "rounds.jsonl")
    rows = round_figures(bounds, read_intervals(sorted(timeline.glob("*.jsonl"))))
    check_res = check_round1(check, site_names)
    if secagg:
        cases = [float((check / f"client-r1-{s}.cases").read_text()) for s in site_names
                 if (check / f"client-r1-{s}.cases").is_file()]  # fmt: skip
        bound = secagg_error_bound(secagg, cases) if cases else 0.0
        check_res = check_round1(check, site_names, tol=bound)
        check_res["tolerance"] = bound
    res: dict[str, Any] = {
        "version": flwr_version(),
        "deployment": f"flower-superlink + {len(site_names)} flower-supernode (insecure, "
        + ("each in its site's network namespace behind the shaped veth" if links is not None else "loopback")
        + ") + flwr run; a ServerApp process and a ClientApp process per message"
        + ("; SecAggPlusWorkflow + secaggplus_mod (legacy NumPyClient/Strategy API)" if secagg else ""),
        **({"secagg": secagg} if secagg else {}),
        "rounds": rows,
        **summarise(rows),
        "memory": mem.figures(),
        "startup_s": round(bounds[1][0] - started, 2) if 1 in bounds else None,
        "total_s": round(total, 1),
        "averaging_check": check_res,
    }
    res["replies"] = replies(logs / "flwr-run.log")
    failed = [x for x in res["replies"] if x["failures"]]
    if failed:
        res["error"] = f"Flower reported failed client replies: {failed}"
    if links is not None:
        res["links"] = wire_rows(sampler.samples, bounds, links.uplink_mbit, links.downlink_mbit)
        res.update(steady(res["links"]))
    res["ok"] = bool(res["averaging_check"].get("ok")) and len(rows) == rounds and not failed
    return res


def _secagg_config(secagg: dict[str, Any] | None) -> list[str]:
    if not secagg:
        return []
    return [
        f"num-shares={int(secagg['num-shares'])}",
        f"reconstruction-threshold={int(secagg['reconstruction-threshold'])}",
        f"max-weight={float(secagg['max-weight'])}",
    ]


def replies(log: Path) -> list[dict[str, Any]]:
    """Flower's own count of client replies and failures per train/evaluate step, in order, from
    the ``flwr run`` log (a round whose replies failed or timed out is not a full round)."""
    pat = re.compile(r"aggregate_(train|fit|evaluate): received (\d+) results and (\d+) failures", re.I)
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    return [
        {"step": m.group(1), "results": int(m.group(2)), "failures": int(m.group(3))}
        for m in pat.finditer(text)
    ]


def _wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {proc.returncode}:\n{_tail(log)}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"flower-superlink did not listen on {port} within {timeout:.0f} s:\n{_tail(log)}")
