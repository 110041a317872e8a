"""Bridged brokers with real processes: the coordinator on a central Mosquitto, two sites on a
regional Mosquitto bridged to it (MQTT 5 over mutual TLS, the bridge's own certificate, as
``neurofed provision --bridge`` writes them), one site on the central broker.

- rounds run across the bridge and each makes its registry version, with every site in it;
- on the regional broker a site can neither read another site's update nor publish one in its
  name (the regional ACL refuses it; nothing reaches the coordinator), while its own update
  crosses the bridge;
- a message injected with the bridge's own certificate on the central broker, claiming to be a
  regional site, is rejected by the coordinator with its reason (signatures hold end to end):
  the bridge's identity can carry the region's sites' topics, never speak for them.

The tiny UNet on 32^3 volumes, three sites of three cases, two rounds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neurofed.launch.local import Broker, free_port, wait_for
from neurofed.wire.api import MessageKind
from neurofed.wire.bundle import load_bundle
from neurofed.wire.provision import add_bridge, provision
from tests.test_federation_failures import Fed, federation_data, print_logs_if_failed
from tests.wire.helpers import RawClient, flip, forge

pytestmark = pytest.mark.slow

REGION = "east"


@pytest.fixture(scope="module")
def bridge_data(tmp_path_factory):
    return federation_data(tmp_path_factory, "bridge-data", sites=3, cases=9)


class RegionalBroker(Broker):
    """The regional Mosquitto, from ``bundles/broker.<region>``."""

    def start(self) -> None:
        from neurofed.wire.broker import start_broker

        with open(self.log, "ab") as fh:
            self.proc = start_broker(self.root / f"broker.{REGION}", self.port, stderr=fh)


class BridgedFed(Fed):
    """``Fed`` (its helpers for processes and events) with the sites ``regional`` on a bridged
    regional broker and the others, and the coordinator, on the central one."""

    def __init__(self, tmp: Path, data, regional: list[str]) -> None:
        self.tmp = tmp
        self.data_root, self.summary = data
        self.sites = sorted(self.summary["sites"])
        self.federation = "bridgefed"
        self.port, self.regional_port = free_port(), free_port()
        self.bundles = tmp / "bundles"
        provision(self.bundles, self.federation, self.sites, "localhost", self.port, days=30)
        add_bridge(self.bundles, REGION, regional, "localhost", self.regional_port)
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.state = tmp / "coordinator-state"
        self.broker = Broker(self.bundles, self.port, self.logs / "mosquitto.log")
        self.regional = RegionalBroker(self.bundles, self.regional_port, self.logs / "mosquitto-east.log")
        self.broker.start()
        self.regional.start()
        self.procs, self.coord, self.edges, self._n = [], None, {}, 0

    def close(self) -> None:
        super().close()
        self.regional.kill()


def _bridge_up(log: Path) -> bool:
    return "as bridge.east" in log.read_text(errors="replace") if log.is_file() else False


def _publish_refused(client: RawClient, frames) -> list[str]:
    """Publish and return the broker's refusals (PUBACK reason codes) instead of failing."""
    try:
        client.publish(frames)
    except AssertionError:
        pass
    return list(client.refused)


@pytest.fixture
def bfed(request, tmp_path, bridge_data):
    sites = sorted(bridge_data[1]["sites"])
    f = BridgedFed(tmp_path, bridge_data, regional=sites[:2])
    yield f
    f.close()
    print_logs_if_failed(request, f)


def _run_of(state: Path) -> str:
    path = state / "run.json"
    return json.loads(path.read_text())["run"] if path.is_file() else ""


def test_rounds_run_across_a_bridge_and_per_site_rules_hold_end_to_end(bfed, mlflow_server):
    import mlflow

    from neurofed.mlflow_server.names import TAG_RUN, TAG_SITES
    from neurofed.mlflow_server.registry import model_name

    fed = bfed
    a, b, c = fed.sites  # a and b on the regional broker, c on the central one
    assert load_bundle(fed.bundles / a).broker_port == fed.regional_port
    assert load_bundle(fed.bundles / c).broker_port == fed.port
    central_log, regional_log = fed.logs / "mosquitto.log", fed.logs / "mosquitto-east.log"
    wait_for(lambda: _bridge_up(central_log), 30, "the bridge to connect")
    for s in fed.sites:
        fed.start_site(s)
    coord = fed.start_coordinator(rounds=2, min_sites=3, timeout=120, mlflow=mlflow_server)

    # While the sites start (torch and MONAI take seconds): forgeries through the bridge's own
    # identity. Whoever holds the bridge's certificate connects to the central broker (displacing
    # the bridge, which comes back) and publishes, on site a's topic in the federation's run, an
    # UPDATE claiming to be a but signed with another key (site c's), and one signed by a whose
    # chunk was changed after signing. The central ACL lets the bridge publish on a's topics; the
    # coordinator's checks refuse both, with their reasons.
    run = wait_for(lambda: _run_of(fed.state), 120, "the coordinator's run", fed.procs)
    wait_for(lambda: fed.events("announce"), 120, "round 1", fed.procs, poll=0.1)
    bundle_a, bundle_c = load_bundle(fed.bundles / a), load_bundle(fed.bundles / c)
    wrong_key = forge(bundle_c, MessageKind.UPDATE, 1, b"x" * 64, sender=a, run=run)
    assert all(f"/update/{a}/" in t for t, _ in wrong_key)
    tampered = [
        (t, flip(d, len(d) - 1)) for t, d in forge(bundle_a, MessageKind.UPDATE, 1, b"y" * 64, run=run)
    ]
    thief = RawClient(fed.bundles / f"broker.{REGION}", fed.port, cert="bridge.crt", key="bridge.key")
    try:
        thief.publish(wrong_key + tampered)  # taken by the central broker: the bridge may do this
    finally:
        thief.close()
    expected = {"bad-signature": 1, "tampered-chunk": 1}

    def forged() -> list[dict]:
        return [e for e in fed.events("reject") if e.get("wire") and e["publisher"] == a]

    wait_for(lambda: len(forged()) >= 2, 60, "the forgeries' rejections", fed.procs)
    assert sorted((e["reason"], e["site"], e["round"]) for e in forged()) == [
        ("bad-signature", a, 1),
        ("tampered-chunk", a, 1),
    ]

    # the rounds, across the bridge: every site in each, each round a registry version
    assert coord.wait(300) == 0, coord.tail()
    r1, r2 = fed.round_closed(1), fed.round_closed(2)
    assert r1["sites"] == r2["sites"] == [a, b, c]
    assert r1["rejected_by_reason"] == expected, "the forgeries counted in round 1, nothing taken"
    assert {e["site"] for e in fed.events("update")} == {a, b, c}
    client = mlflow.MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    versions = {
        int(v.tags["round"]): v.tags[TAG_SITES]
        for v in client.search_model_versions(f"name = '{model_name(fed.federation)}'")
        if v.tags.get(TAG_RUN) == run
    }
    assert versions == {1: f"{a},{b},{c}", 2: f"{a},{b},{c}"}
    # the regional sites spoke to the regional broker only; on the central broker their
    # messages arrived under the bridge's identity
    central, regional = central_log.read_text(errors="replace"), regional_log.read_text(errors="replace")
    assert f"as {a} " in regional and f"as {b} " in regional and f"as {c} " not in regional
    assert f"as {a} " not in central and f"as {b} " not in central and f"as {c} " in central
    assert "Client bridge.east already connected, closing old connection" in central, "the thief's takeover"

    # per-site rules on the regional broker (the sites' processes have ended, so their
    # certificates can be used here without displacing them): b's own update crosses the
    # bridge to the coordinator's identity; a, subscribed to every site's kinds, reads none of
    # it; b publishing in a's name is refused by the regional broker and goes nowhere
    p = f"nf/{fed.federation}"
    coordinator = RawClient(fed.bundles / "coordinator", fed.port, subscribe=[f"{p}/update/#"])
    spy = RawClient(
        fed.bundles / a, fed.regional_port, subscribe=[f"{p}/update/#", f"{p}/metrics/#", f"{p}/secagg/#"]
    )
    impostor = RawClient(fed.bundles / b, fed.regional_port)
    try:
        bundle_b = load_bundle(fed.bundles / b)
        own = forge(bundle_b, MessageKind.UPDATE, 3, b"b" * 64, run=run)
        assert impostor.publish(own) == len(own)
        wait_for(lambda: coordinator.messages(f"{p}/update/{b}/"), 30, "b's update through the bridge")
        as_a = forge(bundle_b, MessageKind.UPDATE, 3, b"b" * 64, sender=a, run=run)
        assert all(f"/update/{a}/" in t for t, _ in as_a)
        refused = _publish_refused(impostor, as_a)
        assert refused and all("authori" in r.lower() for r in refused), refused
        impostor.refused.clear()
        impostor.publish(forge(bundle_b, MessageKind.UPDATE, 3, b"m" * 64, run=run))  # a marker: once
        # it is through, the refused message (sent before it on the same connection) went nowhere
        wait_for(lambda: len(coordinator.messages(f"{p}/update/{b}/")) >= 2, 30, "the marker")
    finally:
        for cl in (coordinator, spy, impostor):
            cl.close()
    assert not coordinator.messages(f"{p}/update/{a}/"), "something came through in a's name"
    assert spy.messages() == [], "a site read another site's update on the regional broker"
