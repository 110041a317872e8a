"""``neurofed health``: exit 0 when this node's role can do its job, 1 (with the reason) otherwise.

Docker's HEALTHCHECK runs it inside the container, so "healthy" must mean more than "the process
exists": an edge node or coordinator that cannot reach its broker, a broker whose TLS listener is
down, an MLflow server whose /health does not answer, or an agent whose heartbeat file has gone
stale all report unhealthy. The role, bundle and state folder default to what the container's own
command line says (``/proc/1/cmdline``: ``neurofed edge --bundle /bundle ...``), so the image needs one
HEALTHCHECK for every role. Standard library only (plus ``neurofed.wire.bundle`` for participant bundles):
it runs every 30 s and must start fast.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

from neurofed.errors import NeurofedError

NAME = "health"
ROLES = ("edge", "coordinator", "broker", "mlflow-server")
ONE_SHOT = ("infer", "export", "provision", "synth", "train", "check-data", "demo", "site", "health")
HEARTBEAT_FILE = "heartbeat"
DEFAULT_STATE_DIR = "/state"
EXAMPLE = """\
examples:
  neurofed health                                   # inside the container: role from its command line
  neurofed health --role edge --bundle bundles/site-01 --state-dir state/site-01
  neurofed health --role mlflow-server --mlflow-url http://127.0.0.1:5000

Checks: edge/coordinator: the bundle loads, an mTLS handshake with the broker succeeds, and the
heartbeat file STATE/heartbeat (when the agent writes one) is younger than --max-age seconds.
broker: its TLS listener accepts connections. mlflow-server: GET /health answers OK.
Prints one line; exit status 0 healthy, 1 unhealthy, 2 bad arguments.
"""


class HealthError(NeurofedError):
    """The role is not healthy; the message says which dependency failed and how."""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="check this node's role is healthy (broker/MLflow reachable, heartbeat fresh)",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--role", choices=ROLES, help="role to check (default: read from the container's command)")
    p.add_argument("--bundle", help="provisioning bundle folder (default: the role's --bundle, else /bundle)")
    p.add_argument(
        "--state-dir", help="state folder holding the heartbeat (default: $NEUROFED_STATE_DIR or /state)"
    )
    p.add_argument(
        "--mlflow-url", help="MLflow server URL for role mlflow-server (default from its --host/--port)"
    )
    p.add_argument(
        "--max-age", type=float, default=600.0, help="seconds after which a heartbeat is stale (default 600)"
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per network check (default 5)")
    p.set_defaults(func=run)
    return p


# -- where the role's settings come from ---------------------------------------------------------
def _proc_cmdlines(proc: Path = Path("/proc")) -> Iterable[list[str]]:
    """Command lines of this container's processes, PID 1 first (it is the role under Docker)."""
    pids = ["1"]
    try:
        pids += sorted((p.name for p in proc.iterdir() if p.name.isdigit() and p.name != "1"), key=int)
    except OSError:
        pass
    for pid in pids:
        try:
            raw = (proc / pid / "cmdline").read_bytes()
        except OSError:
            continue
        if raw:
            yield [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]


def role_from_argv(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """``(role, options)`` when ``argv`` runs ``neurofed <role> ...`` (directly or via python -m)."""
    for i, arg in enumerate(argv):
        base = os.path.basename(arg)
        if base == "neurofed" or (arg == "neurofed.cli" and i > 0 and argv[i - 1] == "-m"):
            rest = [a for a in argv[i + 1 :]]
            while rest and rest[0].startswith("-"):  # global options before the role: -v, --config X
                rest = rest[2:] if rest[0] == "--config" else rest[1:]
            if rest and rest[0] in ROLES:
                return rest[0], rest[1:]
            return None
    return None


def option(args: Sequence[str], *names: str) -> str | None:
    """The value of the first of ``names`` given in ``args`` (``--x V`` or ``--x=V``)."""
    for i, a in enumerate(args):
        for name in names:
            if a == name and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(name + "="):
                return a.split("=", 1)[1]
    return None


def detect_role(cmdlines: Iterable[list[str]] | None = None) -> tuple[str, list[str]] | None:
    for argv in _proc_cmdlines() if cmdlines is None else cmdlines:
        found = role_from_argv(argv)
        if found:
            return found
    return None


# -- the checks ---------------------------------------------------------------------------------
def check_tls_broker(host: str, port: int, *, ca: Path, cert: Path, key: Path, timeout: float = 5.0) -> str:
    """An mTLS handshake with the broker using the participant's own certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                version = tls.version()
    except ssl.SSLCertVerificationError as exc:
        raise HealthError(
            f"broker {host}:{port} presented a certificate the bundle's CA does not accept ({exc.verify_message}); "
            "is this the right federation's bundle?"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise HealthError(
            f"broker {host}:{port} unreachable ({exc.__class__.__name__}: {exc}); "
            "check the broker runs and the network/firewall lets this node reach it"
        ) from None
    return f"broker {host}:{port} {version} handshake {1000 * (time.monotonic() - t0):.0f} ms"


def check_tcp(host: str, port: int, timeout: float = 5.0) -> str:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise HealthError(
            f"nothing accepts connections on {host}:{port} ({exc}); is the service running?"
        ) from None
    return f"{host}:{port} accepts connections"


def check_heartbeat(state_dir: Path, max_age: float, now: float | None = None) -> str:
    """A stale heartbeat means the agent is hung even though its process lives. No file: not checked
    (an agent that does not write one, or one that has not started yet)."""
    hb = state_dir / HEARTBEAT_FILE
    try:
        age = (time.time() if now is None else now) - hb.stat().st_mtime
    except FileNotFoundError:
        return f"no heartbeat file in {state_dir}"
    if age > max_age:
        raise HealthError(
            f"heartbeat {hb} last written {age:.0f} s ago (more than {max_age:.0f} s): the agent is stuck; "
            "see the container's logs"
        )
    return f"heartbeat {age:.0f} s old"


def check_mlflow(url: str, timeout: float = 5.0) -> str:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as resp:  # noqa: S310
            body = resp.read(64).decode(errors="replace").strip()
            status = resp.status
    except (urllib.error.URLError, OSError) as exc:
        raise HealthError(f"MLflow server {url} does not answer /health ({exc}); is it running?") from None
    if status != 200 or body != "OK":
        raise HealthError(f"MLflow server {url}/health answered {status} {body!r}, not 200 OK")
    return f"MLflow {url} OK"


def broker_listener_port(bundle: Path) -> int:
    """The first ``listener PORT`` of the broker bundle's mosquitto.conf."""
    conf = bundle / "mosquitto.conf"
    try:
        lines = conf.read_text().splitlines()
    except OSError as exc:
        raise HealthError(f"cannot read {conf} ({exc}); mount the broker bundle at /bundle") from None
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "listener" and parts[1].isdigit():
            return int(parts[1])
    raise HealthError(f"{conf} has no `listener PORT` line")


def touch_heartbeat(state_dir: str | os.PathLike[str]) -> None:
    """For agents: mark "alive and making progress" (call at least every --max-age seconds)."""
    path = Path(state_dir) / HEARTBEAT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def check_role(
    role: str,
    *,
    bundle: Path,
    state_dir: Path,
    mlflow_url: str | None,
    max_age: float,
    timeout: float,
) -> list[str]:
    """Run the role's checks; return what was checked, or raise HealthError on the first failure."""
    if role in ("edge", "coordinator"):
        from neurofed.wire.bundle import load_bundle
        from neurofed.wire.errors import WireError

        try:
            b = load_bundle(bundle)
        except WireError as exc:
            raise HealthError(f"bundle {bundle}: {exc}") from None
        found = [f"{role} {b.participant} of {b.federation}"]
        found.append(
            check_tls_broker(
                b.broker_host,
                b.broker_port,
                ca=b.ca_cert,
                cert=b.client_cert,
                key=b.client_key,
                timeout=timeout,
            )
        )
        found.append(check_heartbeat(state_dir, max_age))
        return found
    if role == "broker":
        return ["broker", check_tcp("127.0.0.1", broker_listener_port(bundle), timeout)]
    if role == "mlflow-server":
        return ["mlflow-server", check_mlflow(mlflow_url or "http://127.0.0.1:5000", timeout)]
    raise HealthError(f"unknown role {role!r}; give --role {'|'.join(ROLES)}")


def run(args: argparse.Namespace) -> int:
    role, role_args = args.role, []
    if role is None:
        found = detect_role()
        if found is None:
            print("healthy: no long-running neurofed role in this container (one-shot command)")
            return 0
        role, role_args = found
    bundle = Path(args.bundle or option(role_args, "--bundle") or "/bundle")
    state = args.state_dir or option(role_args, "--state-dir", "--state")
    env = os.environ.get("NEUROFED_STATE_DIR") or os.environ.get("NEUROFED_STATE")
    state = state or env or DEFAULT_STATE_DIR
    url = args.mlflow_url
    if url is None and role == "mlflow-server":
        host = option(role_args, "--host") or "127.0.0.1"
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        url = f"http://{host}:{option(role_args, '--port') or 5000}"
    try:
        found = check_role(
            role,
            bundle=bundle,
            state_dir=Path(state),
            mlflow_url=url,
            max_age=args.max_age,
            timeout=args.timeout,
        )
    except HealthError as exc:
        print(f"unhealthy: {role}: {exc}", flush=True)
        return 1
    print("healthy: " + "; ".join(found), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m neurofed.commands.health``: what the image's HEALTHCHECK runs (skips loading
    every other sub-command)."""
    parser = argparse.ArgumentParser(prog="neurofed")
    p = register(parser.add_subparsers(dest="command"))
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
