"""Provisioning bridged brokers (no broker): the files ``neurofed provision --bridge`` writes, how
membership changes reach them, and the command line's refusals. Real brokers and rounds across a
bridge: tests/test_bridged_brokers.py."""

from __future__ import annotations

import stat

import pytest
from cryptography import x509

from neurofed.cli import main
from neurofed.wire.bridge import IN_TOPICS, OUT_TOPICS
from neurofed.wire.bundle import check_broker_bundle, load_bundle
from neurofed.wire.errors import ProvisioningError
from neurofed.wire.provision import add_bridge, add_site, provision, revoke


@pytest.fixture
def root(tmp_path):
    provision(tmp_path / "b", "fed1", ["site-a", "site-b", "site-c"], "central.example.org", 8883, days=10)
    add_bridge(tmp_path / "b", "east", ["site-a", "site-b"], "east.example.org", 8884)
    return tmp_path / "b"


def _users(acl: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    user = None
    for line in acl.splitlines():
        if line.startswith("user "):
            user = line.split()[1]
            out[user] = []
        elif line.startswith("topic ") and user:
            out[user].append(line[len("topic ") :])
    return out


def test_the_regional_broker_bundle_and_the_bridge_identity(root):
    east = root / "broker.east"
    assert check_broker_bundle(east) == east / "mosquitto.conf"
    assert stat.S_IMODE((east / "bridge.key").stat().st_mode) == 0o600
    cn = x509.load_pem_x509_certificate((east / "bridge.crt").read_bytes()).subject
    assert cn.rfc4514_string() == "CN=bridge.east"
    server = x509.load_pem_x509_certificate((east / "server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "east.example.org" in names.get_values_for_type(x509.DNSName)
    conf = (east / "mosquitto.conf").read_text()
    for line in (
        "listener 8884",
        "require_certificate true",
        "use_identity_as_username true",
        "crlfile crl.pem",
        "connection central",
        "address central.example.org:8883",
        "bridge_protocol_version mqttv50",
        "cleansession false",
        "remote_clientid bridge.east",
        "bridge_cafile ca.crt",
        "bridge_certfile bridge.crt",
        "bridge_keyfile bridge.key",
    ):
        assert line + "\n" in conf, line
    central = (root / "broker" / "mosquitto.conf").read_text()
    limit = [x for x in central.splitlines() if x.startswith(("max_packet_size", "max_queued_messages"))]
    assert limit and all(x + "\n" in conf for x in limit), "the same limits on both brokers"
    topics = sorted(x for x in conf.splitlines() if x.startswith("topic "))
    assert topics == sorted(
        [f"topic nf/fed1/{t} out 1" for t in OUT_TOPICS] + [f"topic nf/fed1/{t} in 1" for t in IN_TOPICS]
    )
    assert (east / "crl.pem").read_bytes() == (root / "broker" / "crl.pem").read_bytes()


def test_each_acl_gives_exactly_the_bridged_directions(root):
    central = _users((root / "broker" / "acl").read_text())
    assert sorted(central) == ["bridge.east", "coordinator", "site-c"], "moved sites connect regionally only"
    assert sorted(central["bridge.east"]) == sorted(
        [f"read nf/fed1/{t}" for t in IN_TOPICS]
        + [f"write nf/fed1/{k}/{s}/#" for s in ("site-a", "site-b") for k in ("update", "metrics", "secagg")]
        + ["write nf/fed1/status/site-a", "write nf/fed1/status/site-b"]
    )
    regional = _users((root / "broker.east" / "acl").read_text())
    assert sorted(regional) == ["site-a", "site-b"], "no coordinator, no other region's site"
    assert "write nf/fed1/update/site-a/#" in regional["site-a"]
    assert not [
        t for t in regional["site-a"] if "site-b" in t or t.startswith(("read nf/fed1/update", "readwrite"))
    ]
    assert load_bundle(root / "site-a").broker_host == "east.example.org"
    assert load_bundle(root / "site-a").broker_port == 8884
    assert (load_bundle(root / "site-c").broker_host, load_bundle(root / "coordinator").broker_port) == (
        "central.example.org",
        8883,
    )


def test_membership_changes_reach_the_regional_broker(root):
    add_site(root, "site-d", region="east")
    assert load_bundle(root / "site-d").broker_port == 8884
    assert "site-d" in _users((root / "broker.east" / "acl").read_text())
    assert "write nf/fed1/update/site-d/#" in _users((root / "broker" / "acl").read_text())["bridge.east"]
    revoke(root, "site-a")
    central = _users((root / "broker" / "acl").read_text())
    assert not [t for t in central["bridge.east"] if "site-a" in t], "the bridge no longer speaks for a"
    assert "site-a" not in _users((root / "broker.east" / "acl").read_text())
    crl = x509.load_pem_x509_crl((root / "broker.east" / "crl.pem").read_bytes())
    serial = x509.load_pem_x509_certificate((root / "site-a" / "client.crt").read_bytes()).serial_number
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    with pytest.raises(ProvisioningError, match="no bridged broker for region 'west'"):
        add_site(root, "site-e", region="west")


def test_bad_bridges_are_refused_with_what_to_do(root):
    with pytest.raises(ProvisioningError, match="already has a bridged broker"):
        add_bridge(root, "east", ["site-c"], "e2.example.org", 8885)
    with pytest.raises(ProvisioningError, match="already connects to region 'east'"):
        add_bridge(root, "west", ["site-a"], "west.example.org", 8885)
    with pytest.raises(ProvisioningError, match="not a site"):
        add_bridge(root, "west", ["site-x"], "west.example.org", 8885)
    with pytest.raises(ProvisioningError, match="already another broker"):
        add_bridge(root, "west", ["site-c"], "central.example.org", 8883)
    with pytest.raises(ProvisioningError, match="region 'W.1'"):
        add_bridge(root, "W.1", ["site-c"], "west.example.org", 8885)
    with pytest.raises(ProvisioningError, match="site id 'bridge.east'"):
        add_site(root, "bridge.east")  # the bridge's identity can never be a site's


def test_the_command_line(tmp_path, capsys):
    out = tmp_path / "c"
    args = ["provision", "--out", str(out), "--federation", "f", "--sites", "a,b,c", "--broker-host", "h"]
    assert (
        main([*args, "--bridge", "east", "--bridge-sites", "a,b", "--bridge-host", "e", "--bridge-port", "9"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "region east: broker e:9" in printed and "bridge.east" in printed
    assert load_bundle(out / "a").broker_port == 9 and load_bundle(out / "c").broker_host == "h"
    assert main(["provision", "--out", str(out), "--add-site", "d", "--bridge", "east"]) == 0
    assert load_bundle(out / "d").broker_host == "e"
    assert main(["provision", "--out", str(out), "--bridge", "west", "--bridge-sites", "c"]) != 0
    assert "--bridge-host" in capsys.readouterr().err
    assert main(["provision", "--out", str(out), "--revoke", "a", "--bridge", "east"]) != 0
    assert main(["provision", "--out", str(out), "--bridge-sites", "c"]) != 0
    assert "go with --bridge" in capsys.readouterr().err


@pytest.mark.slow
def test_a_regional_site_revoked_live_is_cut_off_on_its_own_broker(tmp_path):
    """``revoke_live`` for a site on a bridged broker: both brokers reloaded (same PIDs), the
    site's connection on the regional broker closed, its next handshake refused there, nobody
    else disconnected: not the other regional site, the coordinator, nor the bridge."""
    from neurofed.launch.local import wait_for
    from neurofed.procs import free_port
    from neurofed.wire.broker import start_broker, stop_broker
    from neurofed.wire.errors import TransportError
    from neurofed.wire.membership import revoke_live
    from neurofed.wire.mqtt import MqttEndpoint
    from tests.fixtures.broker import connection_ends, require_mosquitto

    require_mosquitto()
    root, p1, p2 = tmp_path / "b", free_port(), free_port()
    provision(root, "livefed", ["site-a", "site-b", "site-c"], "localhost", p1, days=10)
    add_bridge(root, "east", ["site-a", "site-b"], "localhost", p2)
    logs = {n: tmp_path / f"{n}.log" for n in ("central", "east")}
    with open(logs["central"], "wb") as f1, open(logs["east"], "wb") as f2:
        central = start_broker(root / "broker", p1, stderr=f1)
        east = start_broker(root / "broker.east", p2, stderr=f2)
    eps = []
    try:
        wait_for(lambda: "as bridge.east" in logs["central"].read_text(), 30, "the bridge")
        for who in ("coordinator", "site-a", "site-b"):
            eps.append(MqttEndpoint(root / who))
            eps[-1].start(timeout=20)
        before = {n: len(p.read_text()) for n, p in logs.items()}
        change = revoke_live(root, "site-a")
        print(
            f"regional revocation: reloaded after {change.reloaded_s:.2f} s, closed after {change.closed_s:.2f} s"
        )
        assert change.broker_pid == central.pid and change.closed_s < 5.0
        after = {n: p.read_text(errors="replace")[before[n] :] for n, p in logs.items()}
        assert "Client site-a already connected, closing old connection" in after["east"], after["east"]
        for who, log in (("site-b", "east"), ("bridge.east.local", "east"), ("coordinator", "central")):
            assert not connection_ends(after[log], who), f"{who} was disconnected:\n{after[log]}"
        assert not connection_ends(after["central"], "bridge.east"), after["central"]
        assert central.poll() is None and east.poll() is None, "the same broker processes"
        with pytest.raises(TransportError):
            MqttEndpoint(root / "site-a").start(timeout=5)
        assert "certificate verify failed" in logs["east"].read_text(errors="replace")[before["east"] :]
    finally:
        for ep in eps:
            ep.close()
        stop_broker(east)
        stop_broker(central)
