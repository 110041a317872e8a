"""`neurofed broker` as an operator runs it (systemd, a supervisor, `docker stop`): a stop signal
reaches Mosquitto, which exits cleanly and saves its data, instead of outliving its wrapper."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from neurofed.procs import free_port, wait_for
from neurofed.wire.broker import wait_for_port
from neurofed.wire.errors import TransportError
from tests.fixtures.broker import provision_federation, require_mosquitto


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
        wait_for_port("127.0.0.1", port, 30, proc)
        # "running" is logged once Mosquitto handles signals; it opens its port a moment earlier
        wait_for(
            lambda: " running" in (tmp_path / "broker.log").read_text(), 30, "Mosquitto's 'running' line"
        )
        assert not db.exists(), "nothing saved yet (autosave is every 30 s)"
        proc.send_signal(sig)
        assert proc.wait(15) == 0, (tmp_path / "broker.log").read_text()
        # the port is free at once (no Mosquitto left behind), and Mosquitto saved on its way out
        with pytest.raises(TransportError):
            wait_for_port("127.0.0.1", port, 1.0)
        assert db.is_file(), "Mosquitto did not save its persistence file: it was not stopped cleanly"
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["pkill", "-f", f"{root / 'broker'}"], check=False)
        log.close()
