"""Coordinator peak memory against the number of sites (FedAvg should be flat).

For each N in --sites (default 10,50,100): a fresh federation of N sites is provisioned, a private
Mosquitto started, and a real `neurofed coordinator` process (default UNet, 4.8 M parameters,
19 MB in fp32, FedAvg, one round plus the evaluation round) receives N distinct, valid updates sent
concurrently over the real broker by light sender processes (each hosting up to --per-process site
endpoints as threads; no torch, no data). The coordinator's RSS is sampled every 0.1 s; baseline is
its RSS just after announcing round 1 (global model loaded and encoded), where the kernel's
high-water mark is restarted; peak is the high-water mark from there on (the training round and
the evaluation round). Start-up's own peak (loading, encoding and sealing the first model) is
reported apart as ``startup_peak_mb``.

With ``--secure-aggregation`` the coordinator runs SecAgg+ rounds and each site is a real site
agent (``SiteAgent``, threads in the sender processes, over the same broker) whose "training" adds
a little noise to the weights: the whole protocol runs (key sets, shares, masked inputs, echoes,
reveals), and the peak covers the ring sum, the unmasking and the new weights.

    .venv/bin/python -m benchmarks.coordinator_memory [--sites 10,50,100] [--model default]
        [--secure-aggregation --per-process 10 --name coordinator_memory_secagg]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import emit
from benchmarks.common import proc_status_kb as _rss


def _sender(bundles: Path, sites: list[str], init: Path, timeout: float) -> int:
    """Child process: one endpoint per site; send a distinct update for the round, metrics for the
    evaluation round, then leave when the coordinator says done."""
    import numpy as np
    from safetensors.numpy import load_file

    from neurofed.wire.api import MessageKind
    from neurofed.wire.mqtt import MqttEndpoint
    from neurofed.wire.payload import encode_state

    base = load_file(str(init))
    errors: list[str] = []

    def one(site: str, seed: int) -> None:
        ep = MqttEndpoint(bundles / site)
        try:
            ep.start(timeout=120)
            end = time.time() + timeout
            sent_update = sent_metrics = False
            while time.time() < end:
                msg = ep.receive(timeout=1.0)
                if msg is None or msg.kind is not MessageKind.TASK:
                    continue
                if msg.run != ep.run:  # take part in the coordinator's run, as a site agent does
                    ep.set_run(msg.run)
                if msg.meta.get("done"):
                    return
                if msg.meta.get("train") and not sent_update:
                    rng = np.random.default_rng(seed)
                    upd = {
                        k: (v + rng.normal(scale=1e-3, size=v.shape).astype(v.dtype))
                        if v.dtype.kind == "f"
                        else v
                        for k, v in base.items()
                    }
                    payload = encode_state(upd)
                    del upd
                    ep.send(
                        MessageKind.UPDATE,
                        msg.round,
                        meta={"num_cases": 1 + seed % 5, "model_digest": msg.meta["model_digest"]},
                        payload=payload,
                        timeout=600,
                    )
                    del payload
                    sent_update = True
                elif not msg.meta.get("train") and not sent_metrics:
                    ep.send(MessageKind.METRICS, msg.round, meta={"dice": 0.5, "hd95": 1.0, "num_cases": 1})
                    sent_metrics = True
            errors.append(f"{site}: timed out")
        except Exception as exc:  # noqa: BLE001 - reported by the parent
            errors.append(f"{site}: {exc}")
        finally:
            ep.close()

    return _run_sites(sites, one, errors, timeout)


def _run_sites(sites: list[str], one, errors: list[str], timeout: float) -> int:
    """Run ``one(site, seed)`` for every site on its own thread; report the errors; exit code."""
    threads = [threading.Thread(target=one, args=(s, int(s.split("-")[-1])), daemon=True) for s in sites]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 60)
    errors += [f"{s}: still running" for s, t in zip(sites, threads, strict=True) if t.is_alive()]
    for e in errors:
        print(e, file=sys.stderr)
    return 1 if errors else 0


def _secure_sender(bundles: Path, sites: list[str], state: Path, timeout: float) -> int:
    """Child process: one real site agent per site (a thread each) whose trainer adds noise of
    scale 1e-3 to the weights, so every step of the secure protocol is the agent's own."""
    from types import SimpleNamespace

    import torch

    from neurofed.edge_node.agent import SiteAgent
    from neurofed.wire.mqtt import MqttEndpoint

    class NoiseTrainer:
        def __init__(self, seed: int) -> None:
            self.gen = torch.Generator().manual_seed(seed)
            self.num_train_cases = 1 + seed % 5

        def train(self, state_dict, epochs, **kw):
            out = {
                k: v + 1e-3 * torch.randn(v.shape, generator=self.gen) if v.is_floating_point() else v.clone()
                for k, v in state_dict.items()
            }
            return SimpleNamespace(
                state_dict=out, num_cases=self.num_train_cases, loss=0.1, seconds=0.0, optimizer_state=None
            )

        def evaluate(self, state_dict, split="val"):
            return SimpleNamespace(dice=0.5, hd95=1.0, num_cases=1, per_case={}, seconds=0.0)

    errors: list[str] = []

    def one(site: str, seed: int) -> None:
        ep = MqttEndpoint(bundles / site)
        try:
            ep.start(timeout=120)
            b = ep.bundle
            identity = (b.sign_key, {x: b.roster.get(x).signing_key() for x in b.roster.sites}, b.roster.kem)
            SiteAgent(ep, NoiseTrainer(seed), state / site, secure_identity=identity).run()
        except Exception as exc:  # noqa: BLE001 - reported by the parent
            errors.append(f"{site}: {exc}")
        finally:
            ep.close()

    return _run_sites(sites, one, errors, timeout)


def measure(
    n: int, work: Path, init: Path, model: str, per_process: int, timeout: float, secure: bool = False
) -> dict:
    from neurofed.launch.local import Broker, child_env, free_port, provision_sites, read_events, spawn

    sites = [f"site-{i:03d}" for i in range(1, n + 1)]
    port = free_port()
    root = work / f"n{n}"
    provision_sites(root / "bundles", f"mem{n}", sites, port)
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    broker = Broker(root / "bundles", port, logs / "mosquitto.log")
    broker.start()
    senders = []
    try:
        for i in range(0, n, per_process):
            group = sites[i : i + per_process]
            fh = open(logs / f"sender-{i}.log", "wb")  # noqa: SIM115
            sender = (
                ["--secure-sender", str(root / "bundles"), ",".join(group), str(root / "site-state")]
                if secure
                else ["--sender", str(root / "bundles"), ",".join(group), str(init)]
            )
            senders.append(
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.coordinator_memory", *sender, str(timeout)],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=child_env(),
                )
            )
            fh.close()
        time.sleep(2.0)
        coord = spawn(
            "coordinator",
            [
                "-v",
                "coordinator",
                "--bundle",
                str(root / "bundles" / "coordinator"),
                "--rounds",
                "1",
                "--round-timeout",
                str(timeout),
                "--model-size",
                model,
                "--init-weights",
                str(init),
                "--state",
                str(root / "state"),
                "--spacing",  # given: without it the coordinator waits for the sites' reports
                "1",
                *(["--secure-aggregation"] if secure else []),
            ],
            logs,
            child_env(),
        )
        baseline = None
        startup_peak = round_peak = peak_rss = 0
        round_done = False
        t0 = time.time()
        while coord.alive() and time.time() - t0 < timeout * 3:
            rss, hwm = _rss(coord.popen.pid)
            events = read_events(root / "state")
            if baseline is None and any(e["event"] == "announce" for e in events):
                # the kernel's high-water mark restarts here, so the peak below is exactly the
                # round's (receiving, checking, folding, aggregating, persisting), not start-up's
                startup_peak, baseline = hwm, rss
                _reset_hwm(coord.popen.pid)
                rss, hwm = _rss(coord.popen.pid)
            if baseline is not None:
                peak_rss = max(peak_rss, rss, hwm)
                if not round_done:
                    round_peak = max(round_peak, rss, hwm)
                    round_done = any(e["event"] == "round" for e in events)
            time.sleep(0.1)
        rc = coord.wait(60)
    finally:
        for p in senders:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.stop()
    events = read_events(root / "state")
    r1 = next((e for e in events if e["event"] == "round" and e["round"] == 1), {})
    return {
        "sites": n,
        "secure_aggregation": secure,
        "coordinator_exit": rc,
        "updates_accepted": len(r1.get("sites", [])),
        "round_seconds": r1.get("seconds"),
        "startup_peak_mb": round(startup_peak / 1024, 1),
        "baseline_mb": round((baseline or 0) / 1024, 1),
        "round_peak_mb": round(round_peak / 1024, 1),
        "peak_mb": round(peak_rss / 1024, 1),
        "above_baseline_mb": round((peak_rss - (baseline or 0)) / 1024, 1),
    }


def _reset_hwm(pid: int) -> None:
    """Restart VmHWM at the current RSS (Linux >= 4.0: write 5 to /proc/PID/clear_refs)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux or not allowed: the peak then includes start-up (said in the docstring)


def main(argv: list[str] | None = None) -> dict:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--sender":
        sys.exit(_sender(Path(sys.argv[2]), sys.argv[3].split(","), Path(sys.argv[4]), float(sys.argv[5])))
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--secure-sender":
        sys.exit(
            _secure_sender(Path(sys.argv[2]), sys.argv[3].split(","), Path(sys.argv[4]), float(sys.argv[5]))
        )
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", default="10,50,100", help="comma-separated site counts")
    ap.add_argument("--model", default="default", choices=("tiny", "small", "default"))
    ap.add_argument("--per-process", type=int, default=20, help="site endpoints per sender process")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--secure-aggregation", action="store_true",
        help="SecAgg+ rounds, each site a real site agent (use fewer --per-process: each holds the model)",
    )  # fmt: skip
    ap.add_argument(
        "--name", default="coordinator_memory", help="results file name (benchmarks/results/NAME.json)"
    )
    args = ap.parse_args(argv)

    from neurofed.coordinator.init_weights import initial_weights
    from neurofed.coordinator.state import StateStore
    from neurofed.models.config import preset

    work = Path(args.out or tempfile.mkdtemp(prefix="nf-coordmem-"))
    cfg = preset(args.model).to_dict()
    weights = initial_weights(cfg)
    model_mb = sum(v.nbytes for v in weights.values()) / 1024**2
    init = StateStore(work / "init").write_round_weights(0, weights, cfg)
    del weights
    rows = [
        measure(int(n), work, init, args.model, args.per_process, args.timeout, args.secure_aggregation)
        for n in args.sites.split(",")
    ]
    for r in rows:
        r["above_baseline_x_model"] = round(r["above_baseline_mb"] / model_mb, 2)
    result = {
        "benchmark": "coordinator_memory",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "model": args.model,
        "model_mb": round(model_mb, 2),
        "strategy": "fedavg",
        "secure_aggregation": args.secure_aggregation,
        "init_sha256": hashlib.sha256(Path(init).read_bytes()).hexdigest()[:16],
        "results": rows,
    }
    return emit(args.name, result)


if __name__ == "__main__":
    main()
