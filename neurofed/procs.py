"""Ports and child processes for launching the kit's own commands on one machine.

The bottom layer every room, the launcher, the benchmarks and the tests may import: a free TCP
port outside the ephemeral range, one-thread child environments, and ``neurofed`` child processes
that end with their launcher.
"""

from __future__ import annotations

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

from neurofed.children import ending_with_parent
from neurofed.errors import NeurofedError


class LaunchTimeout(NeurofedError):
    """A launched process did not reach the state it was waited for in time."""


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
    raise LaunchTimeout(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")
