"""The project image, built air-gapped from the wheelhouse on a local base: it runs, as non-root,
with empty mount points, one onnxruntime, and no secret from the build context."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

# The first test also waits for the session's image build (minutes when the layer cache is cold).
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(3600)]
ROOT = Path(__file__).resolve().parents[2]


def docker(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def test_help_runs_in_the_container(image):
    res = docker("run", "--rm", image, "--help", timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: neurofed")
    for role in ("edge", "coordinator", "broker", "mlflow-server", "infer", "health", "site"):
        assert role in res.stdout, f"sub-command {role} missing from the image's CLI"


def test_non_root_empty_mounts_one_onnxruntime(image):
    script = (
        "id -u; ls -A /bundle /data | tr -d '\\n'; echo; "
        "test ! -e /wheels && test ! -e /src && test ! -e /dist && echo clean; "
        "pip list 2>/dev/null | grep -ci '^onnxruntime'; "
        "python -c 'import onnxruntime, torch; print(torch.__version__, onnxruntime.get_available_providers()[-1])'; "
        "command -v mosquitto || ls /usr/sbin/mosquitto"
    )
    res = docker("run", "--rm", "--entrypoint", "sh", image, "-c", script, timeout=120)
    assert res.returncode == 0, res.stderr
    uid, mounts, clean, n_ort, versions, mosquitto = res.stdout.splitlines()[:6]
    assert uid == "10001"
    assert mounts == "/bundle:/data:", f"mount points must be empty in the image: {mounts!r}"
    assert clean == "clean"
    assert n_ort == "1", "exactly one onnxruntime distribution (cpu or gpu), never both"
    assert versions.endswith("CPUExecutionProvider")
    assert mosquitto.endswith("mosquitto")


def test_image_labels_health_and_entrypoint(docker_engine, image):
    cfg = docker_engine.images.get(image).attrs["Config"]
    assert cfg["Entrypoint"] == ["neurofed"]
    assert cfg["User"] == "10001:10001"
    assert cfg["Healthcheck"]["Test"][-3:] == ["python", "-m", "neurofed.commands.health"]
    assert "/state" in cfg["Volumes"]
    assert cfg["Labels"]["io.neurofed.ort-flavor"] == "cpu"
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert not [k for k in env if any(w in k.upper() for w in ("KEY", "SECRET", "TOKEN", "PASSWORD"))]


def test_dockerignore_keeps_secrets_out_of_the_build(base_image, tmp_path):
    """Build a throw-away image from a context full of secrets next to allowed code, with the
    project's .dockerignore: only the allowed, non-secret files reach the image."""
    ctx = tmp_path / "ctx"
    files = {
        "neurofed/__init__.py": "ok",
        "wire/bundle.py": "ok",
        "wheelhouse/demo-1.0-py3-none-any.whl": "ok",
        "wire/leftover/client.key": "SECRET",
        "neurofed/ca.pem": "SECRET",
        "models/server.crt": "SECRET",
        "bundles/site-01/sign.key": "SECRET",
        "bundles/site-01/bundle.toml": "SECRET",
        "demo/bundles/coordinator/enc.key": "SECRET",
        ".venv/lib/x.py": "SECRET",
        "data/site-01/case/flair.nii.gz": "SECRET",
        "state/agent.json": "SECRET",
        ".cache/docker/dockerd.log": "SECRET",
        "mlruns/0/meta.yaml": "SECRET",
    }
    for rel, text in files.items():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx / rel).write_text(text)
    shutil.copy(ROOT / ".dockerignore", ctx / ".dockerignore")
    (ctx / "Dockerfile").write_text(f"FROM {base_image}\nCOPY . /ctx/\n")
    tag = f"neurofed-ignore-check:{uuid.uuid4().hex[:8]}"
    res = subprocess.run(
        ["docker", "build", "--network", "none", "-q", "-t", tag, str(ctx)],
        capture_output=True, text=True, timeout=300, env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/local/bin:/usr/bin:/bin"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    try:
        listing = docker("run", "--rm", tag, "sh", "-c", "cd /ctx && find . -type f | sort", timeout=120)
        found = {p.removeprefix("./") for p in listing.stdout.split()}
    finally:
        docker("rmi", "-f", tag)
    assert {"neurofed/__init__.py", "wire/bundle.py", "wheelhouse/demo-1.0-py3-none-any.whl"} <= found
    leaked = {rel for rel, text in files.items() if text == "SECRET"} & found
    assert not leaked, f"secrets reached the image: {sorted(leaked)}"


def test_build_figures_recorded(image_build):
    """Size and build time of the air-gapped build (printed; see .cache/docker/build.json)."""
    print(f"\nimage {image_build['image']}: {image_build['size_gb']} GB, built in {image_build['build_seconds']} s "
          f"({image_build['steps_from_cache']}/{image_build['steps']} steps cached)")  # fmt: skip
    assert 0.3e9 < image_build["size_bytes"] < 3.5e9
