"""A whole federation on one machine, as real processes: synthetic data, provisioning, a private
Mosquitto, the coordinator and N edge agents, each a separate ``neurofed`` process with one
torch thread. Used by ``neurofed demo``, the failure tests and the overhead benchmark, so all
three exercise exactly the commands a deployment runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.errors import CoordinatorError
from neurofed.children import ending_with_parent


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on, chosen outside the kernel's ephemeral range.

    Why not ``bind(0)``: that port comes from the ephemeral range, and between picking it and a
    server binding it (MLflow takes 5-30 s to start here) any outgoing connection on the machine
    may take it as its source port; CI saw exactly that. Ports below the range are only ever
    taken by listeners, so a bind test is enough.
    """
    import random

    lo, hi = _ephemeral_range()
    spans = [(max(1024, lo - 12000), lo), (hi + 1, 65536)]
    spans = [(a, b) for a, b in spans if b - a >= 500]
    rng = random.SystemRandom()
    for _ in range(200 if spans else 0):
        a, b = rng.choice(spans)
        port = rng.randrange(a, b)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room outside the range: the kernel's pick
        s.bind((host, 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", MLFLOW_DISABLE_TELEMETRY="true"
    )
    for k in ("NEUROFED_FAULT", "NEUROFED_FAULT_ROUND"):
        env.pop(k, None)
    env.update(extra)
    return env


def make_data(out: Path, sites: int, cases: int, shape: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """Synthetic institutions plus the shared splits.json (written once, before any site reads it)."""
    from edge_node.data import discover_cases
    from edge_node.splits import load_or_create_splits, splits_path_for
    from edge_node.synth import synthesize

    summary = synthesize(out, sites=sites, cases=cases, seed=seed, shape=tuple(shape))
    load_or_create_splits(splits_path_for(out), discover_cases(out), seed=seed)
    return summary.to_dict()


def provision_sites(root: Path, federation: str, sites: Sequence[str], port: int) -> Path:
    from wire.provision import provision

    provision(root, federation, list(sites), "localhost", port, days=30)
    return root


@dataclass
class Proc:
    """A child process with its log file."""

    name: str
    popen: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.time)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def spawn(name: str, args: Sequence[str], log_dir: Path, env: dict[str, str] | None = None) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    fh = open(log, "ab")  # noqa: SIM115 - the child owns it
    popen = subprocess.Popen(
        [sys.executable, "-m", "neurofed", *args],
        stdout=fh,
        stderr=subprocess.STDOUT,
        env=env or child_env(),
        start_new_session=True,
        preexec_fn=ending_with_parent(),  # no orphans when the launcher is SIGKILLed
    )
    fh.close()
    return Proc(name, popen, log)


def spawn_site(
    site: str,
    bundles: Path,
    data: Path,
    state_root: Path,
    log_dir: Path,
    *,
    verbose: bool = False,
    env: dict[str, str] | None = None,
    extra: Sequence[str] = (),
) -> Proc:
    """``neurofed edge`` for ``site``: its bundle ``bundles/<site>``, its data ``data/<site>``, its
    state ``state_root/<site>-state`` (``extra``: more ``neurofed edge`` options, e.g. ``--seed``)."""
    args = [
        "edge",
        "--bundle", str(bundles / site),
        "--data", str(data / site),
        "--state", str(state_root / f"{site}-state"),
        *extra,
    ]  # fmt: skip
    return spawn(site, ["-v", *args] if verbose else args, log_dir, env)


class Broker:
    """A private Mosquitto from a provisioned bundle (``root/broker``), restartable."""

    def __init__(self, root: Path, port: int, log: Path) -> None:
        self.root, self.port, self.log = root, port, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        from wire.broker import start_broker

        fh = open(self.log, "ab")  # noqa: SIM115
        self.proc = start_broker(self.root / "broker", self.port, stderr=fh)
        fh.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        from wire.broker import stop_broker

        if self.proc is not None:
            stop_broker(self.proc)
            self.proc = None


def read_events(state_dir: Path) -> list[dict[str, Any]]:
    path = Path(state_dir) / "events.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return out


def wait_for(predicate, timeout: float, what: str, procs: Sequence[Proc] = (), poll: float = 0.3) -> Any:
    """Poll ``predicate`` until truthy; raise with the processes' log tails on timeout."""
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    tails = "\n".join(
        f"--- {p.name} ({'alive' if p.alive() else p.popen.returncode}) ---\n{p.tail()}" for p in procs
    )
    raise CoordinatorError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")
