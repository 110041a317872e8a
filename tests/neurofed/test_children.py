"""A launcher that is SIGKILLed (no ``finally`` runs) leaves no broker or neurofed process behind:
the kernel stops its children (PR_SET_PDEATHSIG). Real processes, a real Mosquitto."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.peers.measure import tree
from neurofed.procs import free_port
from tests.fixtures.broker import provision_federation, require_mosquitto

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent's wait is missing


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _kill_launcher_and_watch(launcher: str, port: int) -> list[int]:
    """Run ``launcher`` (Python code that starts children and sleeps), wait for the broker to
    listen, SIGKILL the launcher; return its descendants as they were."""
    proc = subprocess.Popen([sys.executable, "-c", launcher], cwd=ROOT)
    try:
        end = time.time() + 60
        while not _listening(port):
            assert proc.poll() is None, "the launcher died before the broker listened"
            assert time.time() < end, "the broker never listened"
            time.sleep(0.1)
        family = sorted(tree([proc.pid]) - {proc.pid})
        assert family, "the launcher has children"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        end = time.time() + 20
        while any(_alive(p) for p in family) and time.time() < end:
            time.sleep(0.1)
        return family
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture
def bundle(tmp_path):
    require_mosquitto()
    port = free_port()
    return provision_federation(tmp_path / "bundles", port=port), port


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="as root Mosquitto changes to its own user, which clears the parent-death signal "
    "(prctl(2)); the next test covers root through `neurofed broker`",
)
def test_a_broker_started_by_a_killed_launcher_stops(bundle):
    root, port = bundle
    launcher = (
        "import time\nfrom neurofed.wire.broker import start_broker\n"
        f"start_broker({str(root / 'broker')!r}, {port})\ntime.sleep(120)\n"
    )
    family = _kill_launcher_and_watch(launcher, port)
    left = [p for p in family if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, "Mosquitto outlived its launcher"
    assert not _listening(port)


def test_neurofed_processes_spawned_by_a_killed_launcher_stop_and_take_theirs_along(bundle, tmp_path):
    # neurofed.procs.spawn (the demo's, the experiment's and the benchmarks' way to start
    # neurofed processes) running `neurofed broker`, which runs Mosquitto: two generations
    root, port = bundle
    launcher = (
        "import time\nfrom pathlib import Path\nfrom neurofed.procs import spawn\n"
        f"spawn('broker', ['broker', '--bundle', {str(root / 'broker')!r}], Path({str(tmp_path / 'logs')!r}))\n"
        "time.sleep(120)\n"
    )
    family = _kill_launcher_and_watch(launcher, port)
    assert len(family) == 2, f"neurofed broker and its Mosquitto: {family}"
    left = [p for p in family if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, "a child outlived the launcher"
    assert not _listening(port)
