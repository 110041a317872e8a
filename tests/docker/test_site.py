"""`neurofed site up/status/logs/down` through the Docker SDK, and the image's HEALTHCHECK turning
unhealthy when the edge node's broker goes away. The broker is a real Mosquitto on the host; the
edge container uses host networking (the bundle names the broker `localhost`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from neurofed.procs import free_port

# The first test also waits for the session's image build (minutes when the layer cache is cold).
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(3600)]
FAST_HEALTH = {
    "interval": 2_000_000_000,
    "timeout": 15_000_000_000,
    "retries": 1,
    "start_period": 1_000_000_000,
}


@pytest.fixture
def federation(tmp_path):
    """A provisioned federation with its real broker running on the host."""
    from neurofed.wire.broker import start_broker, stop_broker
    from tests.fixtures.broker import provision_federation, require_mosquitto

    require_mosquitto()
    port = free_port()
    root = provision_federation(tmp_path / "bundles", port=port)
    log = open(tmp_path / "broker.log", "ab")  # noqa: SIM115
    holder = {"proc": start_broker(root / "broker", port, stderr=log)}

    def stop():
        if holder["proc"] is not None:
            stop_broker(holder["proc"])
            holder["proc"] = None

    data = tmp_path / "data" / "site-a"
    data.mkdir(parents=True)
    data.chmod(0o777)  # so that only the read-only mount can refuse the container user a write
    yield {"root": root, "port": port, "data": data, "stop_broker": stop}
    stop()
    log.close()


@pytest.fixture
def site_name(docker_engine):
    name = f"nf-test-{uuid.uuid4().hex[:8]}"
    yield name
    import docker.errors

    try:
        docker_engine.containers.get(name).remove(force=True)
    except docker.errors.NotFound:
        pass
    try:
        docker_engine.volumes.get(f"{name}-state").remove(force=True)
    except docker.errors.NotFound:
        pass


def neurofed(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "neurofed.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def wait_health(container, want: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    state: dict = {}
    while time.monotonic() < deadline:
        container.reload()
        state = container.attrs["State"]
        if (state.get("Health") or {}).get("Status") == want:
            return state
        if state["Status"] in ("exited", "dead"):
            break
        time.sleep(1)
    raise AssertionError(
        f"container did not become {want} in {timeout:.0f} s; state {state.get('Status')}, "
        f"health {state.get('Health')}\nlogs:\n{container.logs(tail=40).decode(errors='replace')}"
    )


def test_site_up_status_logs_down(docker_engine, image, federation, site_name):
    root, data = federation["root"], federation["data"]
    res = neurofed(
        "site", "up", "--bundle", str(root / "site-a"), "--data", str(data), "--image", image,
        "--name", site_name, "--network", "host", "--edge-args", "--threads 1",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert f"started {site_name} (site site-a" in res.stdout

    c = docker_engine.containers.get(site_name)
    attrs = c.attrs
    assert attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    assert attrs["Config"]["Cmd"] == [
        "edge",
        "--bundle",
        "/bundle",
        "--data",
        "/data/site-a",
        "--threads",
        "1",
    ]
    assert attrs["Config"]["Labels"]["io.neurofed.site"] == "site-a"
    mounts = {m["Destination"]: m for m in attrs["Mounts"]}
    assert mounts["/data/site-a"]["Type"] == "bind" and mounts["/data/site-a"]["RW"] is False
    assert mounts["/data/site-a"]["Source"] == str(data.resolve())
    assert mounts["/state"]["Type"] == "volume" and mounts["/state"]["Name"] == f"{site_name}-state"
    assert "/bundle" not in mounts  # copied in, owned by the container user
    assert not attrs["HostConfig"].get("DeviceRequests")

    probe = c.exec_run(
        ["sh", "-c", "stat -c '%u %a' /bundle/client.key /bundle/sign.key; touch /data/site-a/x"],
        demux=True,  # stdout and stderr apart: their interleaving is not ordered
    )
    out, err = ((b or b"").decode() for b in probe.output)
    assert out.splitlines()[:2] == ["10001 600", "10001 600"], probe.output
    assert probe.exit_code != 0 and "Read-only file system" in err, probe.output

    res = neurofed("site", "status")
    assert site_name in res.stdout and "site=site-a" in res.stdout, res.stdout + res.stderr
    res = neurofed("site", "logs", "--name", site_name, "--tail", "20")
    assert res.returncode == 0, res.stderr

    res = neurofed("site", "down", "--name", site_name, "--purge")
    assert res.returncode == 0, res.stderr
    import docker.errors

    with pytest.raises(docker.errors.NotFound):
        docker_engine.containers.get(site_name)
    with pytest.raises(docker.errors.NotFound):
        docker_engine.volumes.get(f"{site_name}-state")
    res = neurofed("site", "status", "--name", site_name)
    assert res.returncode == 1 and "no container named" in res.stderr


def test_healthcheck_turns_unhealthy_when_the_broker_is_unreachable(
    docker_engine, image, federation, site_name
):
    from neurofed.edge_node.launcher import SiteLauncher, SiteSpec

    launcher = SiteLauncher(docker_engine)
    spec = SiteSpec(
        bundle=federation["root"] / "site-a",
        data=federation["data"],
        image=image,
        name=site_name,
        network="host",
        extra_args=["--threads", "1"],
        healthcheck=FAST_HEALTH,
    )
    launcher.up(spec)
    c = docker_engine.containers.get(site_name)
    state = wait_health(c, "healthy", 90)
    assert "broker localhost:" in state["Health"]["Log"][-1]["Output"]

    federation["stop_broker"]()
    state = wait_health(c, "unhealthy", 60)
    assert state["Status"] == "running", "the agent keeps running (and reconnecting) while its broker is down"
    last = state["Health"]["Log"][-1]
    assert last["ExitCode"] == 1 and "unreachable" in last["Output"]
    st = launcher.status(site_name)
    assert st.health == "unhealthy" and "unreachable" in st.health_log
    launcher.down(site_name, purge=True, timeout=10)
