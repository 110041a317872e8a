"""Launch ``mlflow server`` for a federation, with zero set-up by default and production stores
by flag.

Why a wrapper and not ``mlflow server`` alone: MLflow's defaults cost 2.6 GB (4 uvicorn workers
and a job runner) on machines that also train; a local ``--default-artifact-root`` makes clients
write to the server's disk, which breaks a coordinator on another host; SQLAlchemy 2.1 reads
``postgresql://`` as psycopg 3; and a taken port or a dead database shows up as a traceback deep
in uvicorn. Here each of those is decided once, checked before start, and reported in one line.

Default: SQLite file ``<state>/mlflow.db`` and artifacts under ``<state>/artifacts``, served by
the server itself (proxied, ``mlflow-artifacts:/``) so any client that can reach the HTTP port can
log models. Production: ``--backend-store-uri postgresql://...`` and
``--artifacts-destination s3://bucket`` with the conventional ``MLFLOW_S3_ENDPOINT_URL`` and
``AWS_*`` variables, which the server process inherits.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

from neurofed.mlflow_server.errors import BackendUnreachableError, PortInUseError, ServerStartError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
DEFAULT_STATE = Path("state/mlflow")
# One worker and no job runner: about 0.5 GB instead of 2.6 GB, /health in about 5 s.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------- URIs
def redact_uri(uri: str) -> str:
    """``uri`` with any password replaced by ``***``: safe to print and log."""
    if "://" not in uri or "@" not in uri.split("://", 1)[1].split("/", 1)[0]:
        return uri
    scheme, rest = uri.split("://", 1)
    netloc, _, tail = rest.partition("/")
    userinfo, _, hostport = netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostport}" + (f"/{tail}" if tail else "")


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def normalise_backend_uri(uri: str) -> str:
    """Pick the PostgreSQL driver that is installed.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3; this kit depends on psycopg2
    (binary wheels everywhere), so a bare URI becomes ``postgresql+psycopg2://`` unless psycopg 3
    is the one installed. ``postgres://`` (Heroku style) is accepted as well. Other URIs pass
    through unchanged.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return uri
    if _installed("psycopg2") or not _installed("psycopg"):
        return f"postgresql+psycopg2://{rest}"
    return f"postgresql+psycopg://{rest}"


def default_backend_uri(state_dir: Path) -> str:
    return f"sqlite:///{(state_dir / 'mlflow.db').resolve()}"


# --------------------------------------------------------------------------- checks
def check_port_free(host: str, port: int) -> None:
    """Raise ``PortInUseError`` if something already listens on ``host:port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                why = "is already in use" if exc.errno == errno.EADDRINUSE else "needs root"
                raise PortInUseError(
                    f"port {port} on {host} {why}: another MLflow server may be running there "
                    f"(see `ss -ltnp 'sport = :{port}'`). Stop it, or start this one with "
                    f"--port <free port> (NEUROFED_PORT)."
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise PortInUseError(
                    f"cannot listen on {host}:{port}: {host} is not an address of this machine; "
                    "use --host 127.0.0.1 (local) or --host 0.0.0.0 (all interfaces)"
                ) from None
            raise


def check_backend(uri: str, timeout: float = 5.0) -> None:
    """Connect to the backend store once, so a dead database is one clear line, not a traceback.

    SQLite: the folder must exist and be writable. SQL servers: a real connection through
    SQLAlchemy with a connect timeout (the database itself must exist: MLflow creates the tables,
    not the database).
    """
    shown = redact_uri(uri)
    if uri.startswith("sqlite:"):
        path = uri.split(":///", 1)[-1]
        if path in ("", ":memory:"):
            return
        folder = Path(path).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnreachableError(f"backend store {shown}: cannot create {folder} ({exc})") from None
        if not os.access(folder, os.W_OK):
            raise BackendUnreachableError(
                f"backend store {shown}: folder {folder} is not writable; choose --state elsewhere"
            )
        return
    if uri.startswith("file:") or "://" not in uri:
        return
    try:
        import sqlalchemy
    except ImportError:  # pragma: no cover - mlflow depends on it
        return
    connect_args = {"connect_timeout": int(max(1, timeout))} if "postgres" in uri or "mysql" in uri else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
    except Exception as exc:  # missing driver, malformed URL
        raise BackendUnreachableError(
            f"backend store {shown}: cannot use this URI ({type(exc).__name__}: {exc}); "
            "for PostgreSQL use postgresql://USER[:PASSWORD]@HOST:PORT/DATABASE with psycopg2 installed"
        ) from None
    try:
        with engine.connect():
            pass
    except Exception as exc:
        first = (
            str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        )
        hint = "start the database server, check host, port and credentials"
        if "does not exist" in first:
            hint = "create the database first (e.g. `createdb -h HOST -U USER DATABASE`)"
        raise BackendUnreachableError(f"backend store {shown} is unreachable: {first}; {hint}") from None
    finally:
        engine.dispose()


def check_artifacts_destination(
    dest: str, env: Mapping[str, str] | None = None, timeout: float = 5.0
) -> None:
    """Local folder: create it. ``s3://bucket``: the bucket must answer (through
    ``MLFLOW_S3_ENDPOINT_URL`` when set, as MLflow will use it)."""
    env = os.environ if env is None else env
    if dest.startswith("s3://"):
        bucket = dest[5:].split("/", 1)[0]
        endpoint = env.get("MLFLOW_S3_ENDPOINT_URL") or None
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise BackendUnreachableError(f"artifact store {dest} needs boto3: pip install boto3") from None
        cfg = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1})
        try:
            s3 = boto3.client(
                "s3",
                endpoint_url=endpoint,
                config=cfg,
                aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
                aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
                region_name=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1",
            )
            s3.head_bucket(Bucket=bucket)
        except Exception as exc:
            where = f" at {endpoint}" if endpoint else ""
            raise BackendUnreachableError(
                f"artifact store {dest}{where} is unreachable or the bucket does not exist "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); check "
                "MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and that the bucket exists"
            ) from None
        return
    if "://" in dest and not dest.startswith("file://"):
        return  # gs://, wasbs://, ...: MLflow checks these itself
    folder = Path(dest[7:] if dest.startswith("file://") else dest)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackendUnreachableError(f"artifact store {folder}: cannot create it ({exc})") from None


# --------------------------------------------------------------------------- server
def client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host``."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def health(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:  # noqa: S310 - http(s) only
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class MlflowServer:
    """A running ``mlflow server``: a context manager that starts it, waits for ``/health`` and
    stops it (SIGTERM to its process group, then SIGKILL) on exit.

    >>> with MlflowServer(port=5055, state_dir="state/mlflow") as srv:   # doctest: +SKIP
    ...     FederationTracker(srv.url, "demo", {...})
    """

    def __init__(
        self,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        state_dir: str | os.PathLike[str] = DEFAULT_STATE,
        backend_store_uri: str | None = None,
        artifacts_destination: str | None = None,
        workers: int = 1,
        startup_timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        if workers < 1:
            raise ServerStartError(f"--workers must be at least 1, got {workers}")
        self.host = host
        self.port = int(port)
        self.state_dir = Path(state_dir).resolve()
        self.backend_store_uri = normalise_backend_uri(
            backend_store_uri or default_backend_uri(self.state_dir)
        )
        self.artifacts_destination = artifacts_destination or str(self.state_dir / "artifacts")
        self.workers = workers
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, **SERVER_ENV, **(env or {})}
        self.env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        self.extra_args = tuple(extra_args)
        self.log_path = self.state_dir / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Tracking URI and UI address for a client on this machine."""
        host = client_host(self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--backend-store-uri",
            self.backend_store_uri,
            "--serve-artifacts",
            "--artifacts-destination",
            self.artifacts_destination,
            *self.extra_args,
        ]

    def describe(self) -> str:
        return (
            f"backend {redact_uri(self.backend_store_uri)}, artifacts {self.artifacts_destination} "
            f"(proxied), {self.workers} worker(s), log {self.log_path}"
        )

    def preflight(self) -> None:
        """Every check that can fail before a process is started."""
        check_port_free(self.host, self.port)
        check_backend(self.backend_store_uri)
        check_artifacts_destination(self.artifacts_destination, self.env)

    def start(self, on_wait: Callable[[float], None] | None = None) -> MlflowServer:
        if self._proc is not None:
            return self
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.preflight()
        log.info("starting mlflow server on %s:%d: %s", self.host, self.port, self.describe())
        with self.log_path.open("ab") as fh:
            self._proc = subprocess.Popen(
                self.command(),
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.state_dir,
                start_new_session=True,  # its own process group: uvicorn workers stop with it
            )
        try:
            self._wait_ready(on_wait)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, on_wait: Callable[[float], None] | None) -> None:
        t0 = time.monotonic()
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise ServerStartError(
                    f"mlflow server exited with code {code} before answering /health "
                    f"({self.describe()}); last lines of its log:\n{self.log_tail()}"
                )
            if health(self.url, timeout=1.0):
                log.info("mlflow server ready at %s after %.1f s", self.url, time.monotonic() - t0)
                return
            waited = time.monotonic() - t0
            if waited > self.startup_timeout:
                raise ServerStartError(
                    f"mlflow server did not answer {self.url}/health within {self.startup_timeout:.0f} s "
                    f"({self.describe()}); last lines of its log:\n{self.log_tail()}"
                )
            if on_wait:
                on_wait(waited)
            time.sleep(0.25)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server's process group (uvicorn and its workers), SIGKILL after ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # Workers that outlived uvicorn's master (they share its process group).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
