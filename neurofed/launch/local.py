"""A whole federation on one machine, as real processes: synthetic data, provisioning, a private
Mosquitto, the coordinator and N edge agents, each a separate ``neurofed`` process with one
torch thread. Used by ``neurofed demo``, the experiment's federated arms, the failure tests and
the overhead benchmark, so all of them exercise exactly the commands a deployment runs.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neurofed.procs import LaunchTimeout, Proc, child_env, free_port, spawn, wait_for

__all__ = [
    "Broker",
    "LaunchTimeout",
    "Proc",
    "child_env",
    "free_port",
    "make_data",
    "provision_sites",
    "read_events",
    "spawn",
    "spawn_site",
    "wait_for",
]


def make_data(out: Path, sites: int, cases: int, shape: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """Synthetic institutions plus the shared splits.json (written once, before any site reads it)."""
    from neurofed.edge_node.data import discover_cases
    from neurofed.edge_node.splits import load_or_create_splits, splits_path_for
    from neurofed.edge_node.synth import synthesize

    summary = synthesize(out, sites=sites, cases=cases, seed=seed, shape=tuple(shape))
    load_or_create_splits(splits_path_for(out), discover_cases(out), seed=seed)
    return summary.to_dict()


def provision_sites(
    root: Path,
    federation: str,
    sites: Sequence[str],
    port: int,
    host: str = "localhost",
    kem: str = "x25519",
) -> Path:
    """Bundles for ``sites`` and a coordinator, the broker reached at ``host`` (a shaped run's
    bridge address, see ``neurofed.launch.links``), sealing with ``kem``."""
    from neurofed.wire.provision import provision

    provision(root, federation, list(sites), host, port, days=30, kem=kem)
    return root


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
        from neurofed.wire.broker import start_broker

        fh = open(self.log, "ab")  # noqa: SIM115
        self.proc = start_broker(self.root / "broker", self.port, stderr=fh)
        fh.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        from neurofed.wire.broker import stop_broker

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
