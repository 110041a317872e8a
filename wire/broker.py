"""Run Mosquitto from a broker bundle.

The bundle's ``mosquitto.conf`` uses paths relative to the bundle folder, so Mosquitto runs with
that folder as its working directory. Started as root, Mosquitto 2.0 drops to the ``mosquitto``
user and exits if it cannot read its files or write its data folder: ``prepare_bundle`` hands the
key, the data folder and the persistence file to that user. Logs go to stderr and no pid file is
written, so nothing needs a root-owned folder.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

from neurofed.children import ending_with_parent
from neurofed.wire.bridge import BRIDGE_KEY
from neurofed.wire.bundle import check_broker_bundle
from neurofed.wire.errors import TransportError

INSTALL_HINT = (
    "Mosquitto is not installed: `sudo apt-get install mosquitto mosquitto-clients` (Debian/Ubuntu), "
    "`brew install mosquitto` (macOS), or run the broker service of compose.yaml"
)


def find_mosquitto() -> str:
    """Path to the mosquitto binary; TransportError with install instructions if absent."""
    exe = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )
    if not exe:
        raise TransportError(INSTALL_HINT)
    return exe


def prepare_bundle(bundle: Path | str) -> Path:
    """Make the bundle usable by the user Mosquitto will run as; return the config path."""
    bundle = Path(bundle).resolve()
    conf = check_broker_bundle(bundle)
    data = bundle / "data"
    data.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("mosquitto")
        except KeyError:
            pw = None
        if pw is not None:
            keys = [
                bundle / "server.key",
                *([bundle / BRIDGE_KEY] if (bundle / BRIDGE_KEY).is_file() else []),
            ]
            for p in (data, *data.iterdir(), *keys):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            os.chmod(bundle, 0o755)
    return conf


def broker_command(bundle: Path | str) -> tuple[list[str], Path]:
    """The command line and working directory to run the broker in the foreground.

    The config is named relative to the working directory (the bundle): Mosquitto reads it again
    on SIGHUP by the name it was given, after changing to its own user when started as root, and
    that user cannot reach an absolute path through a private parent folder (a root-owned 0700
    temporary folder, a home directory); the bundle folder itself it can read."""
    conf = prepare_bundle(bundle)
    return [find_mosquitto(), "-c", conf.name], conf.parent


def wait_for_port(host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TransportError(f"mosquitto exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TransportError(f"mosquitto did not listen on {host}:{port} within {timeout:.0f} s")


def popen_broker(bundle: Path | str, **popen_kw) -> subprocess.Popen:
    """Mosquitto from ``bundle`` as a child that ends when this process dies, however it dies
    (``neurofed.children``). Not as root: Mosquitto started as root reads its files, then
    changes to its own user, and that change clears the kernel's parent-death signal; run as
    root, ``neurofed broker`` (which forwards signals and ends with its own parent) is the way to
    have both."""
    cmd, cwd = broker_command(bundle)
    proc = subprocess.Popen(cmd, cwd=cwd, preexec_fn=ending_with_parent(), **popen_kw)
    try:  # for `neurofed provision --live`: whom to send SIGHUP
        (Path(cwd) / PID_FILE).write_text(f"{proc.pid}\n")
    except OSError:
        pass
    return proc


PID_FILE = "broker.pid"


def broker_pid(bundle: Path | str) -> int:
    """The PID of the Mosquitto running from ``bundle`` (its ``broker.pid``, checked against the
    process's command line); TransportError if none runs."""
    bundle = Path(bundle).resolve()
    try:
        pid = int((bundle / PID_FILE).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        raise TransportError(
            f"no running broker found for {bundle} (no {PID_FILE} or the process is gone); give "
            "--broker-pid, or send SIGHUP yourself (docker kill -s HUP <broker container>)"
        ) from None
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        cwd = None
    if not cmdline or not cmdline[0].endswith(b"mosquitto") or cwd != bundle:
        raise TransportError(f"process {pid} in {bundle / PID_FILE} is not this bundle's Mosquitto")
    return pid


def reload_broker(bundle: Path | str | None = None, pid: int | None = None) -> int:
    """SIGHUP: Mosquitto 2.0 reads its ACL file and CRL again (measured on 2.0.11; connections
    stay open, including those of a certificate just revoked). Returns the PID signalled."""
    import signal

    if pid is None:
        if bundle is None:
            raise TransportError("reload_broker needs the broker's bundle or its PID")
        pid = broker_pid(bundle)
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise TransportError(f"cannot signal broker process {pid}: {exc}") from None
    return pid


def start_broker(bundle: Path | str, port: int, stderr=None, timeout: float = 10.0) -> subprocess.Popen:
    """Start Mosquitto in the background (tests, demo) and wait until it listens on ``port``."""
    proc = popen_broker(bundle, stdout=subprocess.DEVNULL, stderr=stderr or subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, timeout, proc)
    except TransportError:
        proc.kill()
        proc.wait(5)
        raise
    return proc


def stop_broker(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM (Mosquitto saves its persistence file on the way out), then kill after ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
