"""A real Docker engine and the project image, built once per session and cached across sessions.

No image registry is reachable on the machines this runs on, so the harness does what a hospital
without one would do: install ``docker.io`` when the engine is missing, start ``dockerd`` itself
when none runs (root only), build the base image from a debootstrapped Debian
(scripts/build_base_image.sh; skipped when the tag exists), build the wheelhouse on the host
(scripts/build_wheelhouse.sh into ``wheelhouse/``, gitignored; reused while its stamp matches), and
build the project image with ``--network none``: the air-gapped path. Docker's layer cache keeps a
code-only change to the final small layers. Tests skip (with the reason) only where no engine can
be started at all.

``NEUROFED_TEST_IMAGE=TAG NEUROFED_TEST_SKIP_BUILD=1`` runs the tests against an existing image.
Build figures (seconds, image size) are written to ``.cache/docker/build.json`` for the README.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "docker"
BASE_TAG = os.environ.get("NEUROFED_TEST_BASE_IMAGE", "local/debian-python:bookworm")
IMAGE_TAG = os.environ.get("NEUROFED_TEST_IMAGE", "neurofed:test")
SOCKET = Path("/var/run/docker.sock")


def _log(msg: str) -> None:
    print(f"[docker harness] {msg}", file=sys.stderr, flush=True)


def _run(
    cmd: list[str], timeout: float, env: dict[str, str] | None = None, **kw
) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, **kw
    )


def docker_cli() -> str | None:
    return shutil.which("docker")


def engine_answers() -> bool:
    cli = docker_cli()
    if not cli:
        return False
    try:
        return _run([cli, "info", "--format", "{{.ServerVersion}}"], 20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _apt_install(*packages: str, timeout: float = 300) -> str | None:
    """Install Debian packages (waiting for another apt to finish); None on success, else why not."""
    if os.geteuid() != 0:
        return f"not root: cannot apt-get install {' '.join(packages)}"
    if not shutil.which("apt-get"):
        return "no apt-get on this machine"
    deadline = time.monotonic() + timeout
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    updated = False
    while True:
        res = _run(["apt-get", "install", "-y", "-qq", *packages], timeout, env)
        if res.returncode == 0:
            return None
        text = res.stderr + res.stdout
        if "Could not get lock" in text or "is held by process" in text:
            if time.monotonic() > deadline:
                return "dpkg stayed locked by another installer"
            time.sleep(5)
            continue
        if not updated:
            _run(["apt-get", "update", "-qq"], timeout, env)
            updated = True
            continue
        return f"apt-get install {' '.join(packages)} failed: {text.strip()[-300:]}"


def ensure_engine() -> str | None:
    """Make a Docker engine answer; None when one does, else the reason none can."""
    if engine_answers():
        return None
    if not shutil.which("dockerd") and not Path("/usr/sbin/dockerd").exists():
        _log("installing docker.io")
        why = _apt_install("docker.io")
        if why:
            return why
    if not docker_cli():
        return "docker.io installed but no docker command on PATH"
    if os.geteuid() != 0:
        return "no Docker engine runs and starting dockerd needs root"
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    CACHE.mkdir(parents=True, exist_ok=True)
    log = CACHE / "dockerd.log"
    _log(f"starting {dockerd} (log {log})")
    # Detached into its own session: the engine (and its layer cache) outlives this test session,
    # so the next session starts warm. Stop it with `kill $(cat /var/run/docker.pid)`.
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [dockerd], stdout=fh, stderr=fh, stdin=subprocess.DEVNULL, start_new_session=True
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-600:]
            return f"dockerd exited with code {proc.returncode}: {tail}"
        if SOCKET.exists() and engine_answers():
            return None
        time.sleep(1)
    return f"dockerd did not answer within 60 s (log {log})"


def build_base_image() -> None:
    if _run(["docker", "image", "inspect", BASE_TAG], 30).returncode == 0:
        return
    if not shutil.which("debootstrap"):
        why = _apt_install("debootstrap")
        if why:
            pytest.fail(f"cannot build the base image: {why}")
    _log(f"building base image {BASE_TAG} with debootstrap (about 1-2 minutes)")
    res = _run(["bash", str(ROOT / "scripts" / "build_base_image.sh"), BASE_TAG], 900)
    if res.returncode != 0:
        pytest.fail(f"scripts/build_base_image.sh failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")


def build_wheelhouse() -> Path:
    """wheelhouse/ for the image, pinned to the versions in this test environment."""
    wheelhouse = ROOT / "wheelhouse"
    CACHE.mkdir(parents=True, exist_ok=True)
    constraints = CACHE / "constraints.txt"
    freeze = _run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], 120)
    pins = [ln for ln in freeze.stdout.splitlines() if ln and not ln.startswith(("neurofed", "-e ", "#"))]
    constraints.write_text("\n".join(pins) + "\n")
    env = {"PYTHON": sys.executable, "TORCH_INDEX": "", "CONSTRAINTS": str(constraints), "ORT_FLAVOR": "cpu"}
    res = _run(["bash", str(ROOT / "scripts" / "build_wheelhouse.sh"), str(wheelhouse)], 1200, env)
    if res.returncode != 0:
        pytest.fail(f"scripts/build_wheelhouse.sh failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return wheelhouse


def build_image() -> dict:
    """docker build --network none (air-gapped) from the wheelhouse; returns timing and size."""
    t0 = time.monotonic()
    cmd = [
        "docker", "build", "--network", "none", "--build-arg", f"BASE_IMAGE={BASE_TAG}",
        "--build-arg", "ORT_FLAVOR=cpu", "-t", IMAGE_TAG, str(ROOT),
    ]  # fmt: skip
    res = _run(cmd, 1800, {"DOCKER_BUILDKIT": "0"})
    seconds = time.monotonic() - t0
    if res.returncode != 0:
        pytest.fail(f"docker build failed after {seconds:.0f} s:\n{res.stdout[-4000:]}\n{res.stderr[-3000:]}")
    size = int(_run(["docker", "image", "inspect", "-f", "{{.Size}}", IMAGE_TAG], 30).stdout.strip() or 0)
    cached = res.stdout.count("Using cache")
    steps = res.stdout.count("\nStep ") + res.stdout.startswith("Step ")
    info = {
        "image": IMAGE_TAG,
        "base_image": BASE_TAG,
        "build_seconds": round(seconds, 1),
        "size_bytes": size,
        "size_gb": round(size / 1e9, 2),
        "steps": steps,
        "steps_from_cache": cached,
        "cpu_count": os.cpu_count(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    history = CACHE / "build.json"
    runs = json.loads(history.read_text()) if history.exists() else []
    history.write_text(json.dumps((runs + [info])[-20:], indent=1))
    _log(f"image {IMAGE_TAG}: {info['size_gb']} GB, built in {seconds:.0f} s ({cached} cached steps)")
    return info


@pytest.fixture(scope="session")
def docker_engine():
    """A Docker engine that answers; skips the Docker tests only where none can be started."""
    why = ensure_engine()
    if why:
        pytest.skip(f"no Docker engine: {why}")
    import docker

    client = docker.from_env(timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="session")
def base_image(docker_engine) -> str:
    build_base_image()
    return BASE_TAG


@pytest.fixture(scope="session")
def image_build(base_image) -> dict:
    if os.environ.get("NEUROFED_TEST_SKIP_BUILD") == "1":  # iterate on tests against an image as it is
        size = _run(["docker", "image", "inspect", "-f", "{{.Size}}", IMAGE_TAG], 30).stdout.strip()
        if size:
            return {"image": IMAGE_TAG, "size_bytes": int(size), "size_gb": round(int(size) / 1e9, 2),
                    "build_seconds": 0.0, "steps": 0, "steps_from_cache": 0}  # fmt: skip
    build_wheelhouse()
    return build_image()


@pytest.fixture(scope="session")
def image(image_build) -> str:
    return image_build["image"]
