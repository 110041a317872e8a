"""Starting the tracking server: URIs, preflight errors a user can cause, and the CLI's life cycle."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from neurofed.mlflow_server.errors import BackendUnreachableError, PortInUseError
from neurofed.mlflow_server.server import (
    MlflowServer,
    check_artifacts_destination,
    check_backend,
    health,
    normalise_backend_uri,
    redact_uri,
)
from tests.fixtures.mlflow import free_port

REPO = Path(__file__).resolve().parents[2]


def test_postgres_uri_gets_the_installed_driver() -> None:
    pytest.importorskip("psycopg2")
    assert normalise_backend_uri("postgresql://u@h:5432/db") == "postgresql+psycopg2://u@h:5432/db"
    assert normalise_backend_uri("postgres://u@h/db") == "postgresql+psycopg2://u@h/db"
    # Explicit drivers and other stores pass through untouched.
    assert normalise_backend_uri("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_backend_uri("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_redact_hides_passwords_only() -> None:
    assert redact_uri("postgresql://mlflow:s3cret@db:5432/m") == "postgresql://mlflow:***@db:5432/m"
    assert redact_uri("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert "s3cret" not in redact_uri("postgresql+psycopg2://a:s3cret@h/d")


def test_default_state_is_sqlite_and_local_artifacts(tmp_path: Path) -> None:
    srv = MlflowServer(port=free_port(), state_dir=tmp_path / "st")
    cmd = srv.command()
    assert (
        cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{(tmp_path / 'st' / 'mlflow.db').resolve()}"
    )
    assert cmd[cmd.index("--artifacts-destination") + 1] == str((tmp_path / "st" / "artifacts").resolve())
    assert "--serve-artifacts" in cmd and cmd[cmd.index("--workers") + 1] == "1"
    assert srv.env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_port_taken_is_refused_before_starting(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(PortInUseError, match=f"port {port} on 127.0.0.1 is already in use.*--port"):
            MlflowServer(port=port, state_dir=tmp_path).start()
        assert time.monotonic() - t0 < 5, "a taken port must be reported at once, not after a start-up"
    assert not (tmp_path / "server.log").exists(), "no server process should have been started"


def test_cli_reports_port_taken_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from neurofed.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        code = main(["mlflow-server", "--port", str(s.getsockname()[1]), "--state", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert "neurofed mlflow-server: error: port" in err and "Traceback" not in err


def test_unreachable_postgres_is_a_clear_error_without_password() -> None:
    pytest.importorskip("psycopg2")
    port = free_port()  # nothing listens there
    uri = normalise_backend_uri(f"postgresql://mlflow:hunter2@127.0.0.1:{port}/mlflow")
    with pytest.raises(BackendUnreachableError) as info:
        check_backend(uri, timeout=2)
    msg = str(info.value)
    assert "unreachable" in msg and f"127.0.0.1:{port}" in msg and "start the database server" in msg
    assert "hunter2" not in msg


def test_missing_postgres_database_says_create_it() -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres", connect_timeout=2).close()
    except psycopg2.OperationalError as exc:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 ({exc})")
    with pytest.raises(BackendUnreachableError, match="does not exist.*createdb"):
        check_backend(normalise_backend_uri("postgresql://postgres@127.0.0.1:5432/nf_no_such_db_x"))


def test_server_start_with_dead_backend_starts_nothing(tmp_path: Path) -> None:
    pytest.importorskip("psycopg2")
    srv = MlflowServer(
        port=free_port(), state_dir=tmp_path, backend_store_uri=f"postgresql://u@127.0.0.1:{free_port()}/db"
    )
    with pytest.raises(BackendUnreachableError):
        srv.start()
    assert not srv.alive()


def test_unreachable_s3_endpoint_is_a_clear_error() -> None:
    pytest.importorskip("boto3")
    env = {
        "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
    }
    with pytest.raises(BackendUnreachableError, match="s3://bucket.*MLFLOW_S3_ENDPOINT_URL"):
        check_artifacts_destination("s3://bucket", env, timeout=1)


@pytest.mark.slow
def test_shared_server_answers_health(mlflow_server: str) -> None:
    assert health(mlflow_server)
    with urllib.request.urlopen(f"{mlflow_server}/health", timeout=5) as resp:  # noqa: S310
        assert resp.read().strip() == b"OK"


@pytest.mark.slow
def test_cli_starts_prints_address_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "neurofed", "mlflow-server", "--port", str(port), "--state", str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 180
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("MLflow UI:"):
                break
        assert any(f"MLflow UI: http://127.0.0.1:{port}" in ln for ln in lines), "".join(lines)
        assert health(f"http://127.0.0.1:{port}")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, "".join(lines) + out
    assert "MLflow server stopped." in out
    assert not health(f"http://127.0.0.1:{port}", timeout=1), "server still answers after SIGTERM"
    with socket.socket() as s:  # the port is free again: no orphaned uvicorn worker holds it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    assert (tmp_path / "mlflow.db").is_file()
