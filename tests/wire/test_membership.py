"""Live membership without a broker: the ROSTER message's rules (CA-signed, same federation,
newer only, whatever run or round), the coordinator's watch of its bundle's roster, and the
``--live`` command line. The real-broker test is in tests/test_federation_failures.py."""

from __future__ import annotations

import shutil

import pytest
from cryptography import x509

from neurofed.wire.api import Message, MessageKind
from neurofed.wire.errors import ProvisioningError, TransportError
from neurofed.wire.provision import add_site, provision, revoke
from neurofed.wire.roster import roster_from_meta, roster_meta


@pytest.fixture
def bundles(tmp_path):
    provision(tmp_path / "b", "livefed", ["site-a", "site-b"], "localhost", 18990, days=30)
    return tmp_path / "b"


def _signed(bundle_dir):
    return (bundle_dir / "roster.json").read_bytes(), (bundle_dir / "roster.sig").read_bytes()


def _ca(bundle_dir):
    return x509.load_pem_x509_certificate((bundle_dir / "ca.crt").read_bytes())


def test_roster_message_is_checked_against_the_ca_and_the_federation(bundles, tmp_path):
    data, sig = _signed(bundles / "coordinator")
    assert roster_from_meta(roster_meta(data, sig), _ca(bundles / "site-a"), "livefed").version == 1
    with pytest.raises(ProvisioningError, match="signature does not verify"):
        roster_from_meta(
            roster_meta(data.replace(b"site-b", b"site-x"), sig), _ca(bundles / "site-a"), "livefed"
        )
    with pytest.raises(ProvisioningError, match="federation"):
        roster_from_meta(roster_meta(data, sig), _ca(bundles / "site-a"), "otherfed")
    provision(tmp_path / "o", "livefed", ["site-a"], "localhost", 18991, days=30)  # another CA
    with pytest.raises(ProvisioningError, match="signature does not verify"):
        roster_from_meta(
            roster_meta(*_signed(tmp_path / "o" / "coordinator")), _ca(bundles / "site-a"), "livefed"
        )


def test_an_endpoint_takes_newer_rosters_only(bundles):
    from neurofed.wire.mqtt import MqttEndpoint

    v1 = _signed(bundles / "site-a")
    add_site(bundles, "site-c")
    v2 = _signed(bundles / "site-a")
    revoke(bundles, "site-b")
    v3 = _signed(bundles / "site-a")
    ep = MqttEndpoint(bundles / "site-a")  # not started: the roster logic needs no broker

    def offer(signed):
        meta = roster_meta(*signed)
        ep._take_roster(Message(MessageKind.ROSTER, "livefed", 0, "coordinator", "0" * 32, meta))
        return ep.bundle.roster.version

    ep.set_roster(roster_from_meta(roster_meta(*v1), _ca(bundles / "site-a"), "livefed"))
    assert offer(v2) == 2 and ep.receiver.bundle.roster.get("site-c") is not None
    assert offer(v3) == 3 and ep.receiver.bundle.roster.get("site-b") is None
    assert offer(v1) == 3 and offer(v2) == 3, "never downgraded"
    forged = (v3[0].replace(b'"version":3', b'"version":9'), v3[1])
    assert offer(forged) == 3, "a roster the CA did not sign is refused"


def test_roster_messages_belong_to_no_run_or_round(bundles):
    from neurofed.wire.bundle import load_bundle
    from neurofed.wire.envelope import new_run_id
    from neurofed.wire.receiver import Receiver
    from neurofed.wire.sealing import seal_message

    coord, site = load_bundle(bundles / "coordinator"), load_bundle(bundles / "site-a")
    sealed = seal_message(
        coord,
        MessageKind.ROSTER,
        0,
        roster_meta(*_signed(bundles / "coordinator")),
        run=new_run_id(1_700_000_000_000),
    )
    topic, frame = next(sealed.frames)
    assert topic == "nf/livefed/roster" and sealed.header.enc == "none" and not sealed.header.recipients
    rx = Receiver(site, run=new_run_id(1_800_000_000_000))
    rx.set_round_window(7, 8)
    msg = rx.feed(topic, bytes(frame))
    assert msg is not None and msg.kind is MessageKind.ROSTER and rx.rejections == {}
    with pytest.raises(ValueError):  # only the coordinator sends it
        seal_message(site, MessageKind.ROSTER, 0, {})


def test_the_coordinator_watch_takes_a_newer_roster_once_and_never_an_older_one(bundles, tmp_path):
    from neurofed.coordinator.membership import RosterWatch

    coord = bundles / "coordinator"
    old = tmp_path / "old"
    old.mkdir()
    for f in ("roster.json", "roster.sig"):
        shutil.copy(coord / f, old / f)
    w = RosterWatch(coord, interval=0)
    assert w.poll(0) is None
    add_site(bundles, "site-c")
    new = w.poll(1)
    assert new is not None and new.roster.version == 2 and "site-c" in new.roster.sites
    assert w.poll(2) is None, "taken once"
    (coord / "roster.json").write_bytes((old / "roster.json").read_bytes())
    assert w.poll(3) is None, "a half-written pair (old roster, new signature) is not taken"
    (coord / "roster.sig").write_bytes((old / "roster.sig").read_bytes())
    assert w.poll(4) is None and w.current.roster.version == 2, "an older roster is never taken"


def test_live_without_a_running_broker_says_what_to_do(bundles, capsys):
    from neurofed.cli import main

    assert main(["provision", "--out", str(bundles), "--revoke", "site-a", "--live"]) != 0
    err = capsys.readouterr().err
    assert "no running broker found" in err and "--broker-pid" in err
    assert "site-a" in _signed(bundles / "coordinator")[0].decode(), "nothing changed"
    with pytest.raises(TransportError):
        from neurofed.wire.broker import broker_pid

        broker_pid(bundles / "broker")


def test_a_site_on_a_broker_whose_acl_predates_roster_still_starts(broker):
    """An ACL written before ROSTER existed has no read on the roster topic. Mosquitto 2.0.11
    grants the subscription anyway and filters what it delivers (a broker that refuses it gets a
    warning from the site, which runs on): the site starts, without live roster changes."""
    from neurofed.wire.mqtt import MqttEndpoint

    acl = broker.root / "broker" / "acl"
    acl.write_text("\n".join(line for line in acl.read_text().splitlines() if not line.endswith("/roster")))
    broker.restart()
    ep = MqttEndpoint(broker.bundle("site-a"))
    ep.start(timeout=20)
    ep.close()
