"""`neurofed broker` as an operator runs it (systemd, a supervisor, `docker stop`): a stop signal
reaches Mosquitto, which exits cleanly and saves its data, instead of outliving its wrapper."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from coordinator.local import free_port
from tests.fixtures.broker import provision_federation, require_mosquitto


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_reaches_mosquitto_which_saves_its_data_and_frees_the_port(tmp_path, sig):
    require_mosquitto()
    port = free_port()
    root = provision_federation(tmp_path / "bundles", port=port)
    db = root / "broker" / "data" / "mosquitto.db"
    log = open(tmp_path / "broker.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "neurofed", "broker", "--bundle", str(root / "broker")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        # "running" is logged once Mosquitto handles signals; it opens its port a moment earlier
        deadline = time.monotonic() + 30
        while not (_port_open(port) and " running" in (tmp_path / "broker.log").read_text()):
            assert proc.poll() is None, (tmp_path / "broker.log").read_text()
            assert time.monotonic() < deadline, "the broker did not start"
            time.sleep(0.2)
        assert not db.exists(), "nothing saved yet (autosave is every 30 s)"
        proc.send_signal(sig)
        assert proc.wait(15) == 0, (tmp_path / "broker.log").read_text()
        # the port is free at once: no Mosquitto left behind, and it saved on its way out
        assert not _port_open(port), "Mosquitto outlived `neurofed broker`"
        assert db.is_file(), "Mosquitto did not save its persistence file: it was not stopped cleanly"
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["pkill", "-f", f"{root / 'broker'}"], check=False)
        log.close()
