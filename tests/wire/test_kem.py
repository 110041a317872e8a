"""The post-quantum option: a federation provisioned with ``--kem mlkem768-x25519`` seals every
content key with the hybrid ML-KEM-768+X25519 HPKE KEM, its roster and every message header say
so, and anything sealed with the other KEM, a bundle without its hybrid key, or a tampered wrap is
refused with a reason."""

from __future__ import annotations

import base64
import dataclasses
import json
import os

import numpy as np
import pytest

from neurofed.wire import crypto
from neurofed.wire import kem as kems
from neurofed.wire.api import MessageKind
from neurofed.wire.bundle import load_bundle
from neurofed.wire.envelope import decode_frame
from neurofed.wire.errors import ProtocolError, ProvisioningError
from neurofed.wire.provision import add_site, provision
from neurofed.wire.receiver import Receiver
from neurofed.wire.sealing import seal_message
from tests.wire.helpers import feed_all, flip

PQ = kems.MLKEM768_X25519
INFO = crypto.wrap_info("fed", 1, "m" * 32, "site-a", "coordinator", "")


@pytest.fixture(scope="module")
def pq(tmp_path_factory):
    """A hybrid-KEM federation (sites a, b; c added later) and an x25519 one of the same name."""
    root = tmp_path_factory.mktemp("pqfed")
    provision(root / "pq", "testfed", ["site-a", "site-b"], "localhost", 18990, kem=PQ)
    add_site(root / "pq", "site-c")
    provision(root / "classic", "testfed", ["site-a"], "localhost", 18991)
    return root


def _bundles(root, fed="pq"):
    return {p: load_bundle(root / fed / p) for p in ("coordinator", "site-a", "site-b", "site-c")}


# --- key wrap ----------------------------------------------------------------------------------


def test_hybrid_wrap_round_trip_and_size():
    pair = kems.HybridKeyPair.generate()
    key = crypto.new_content_key()
    wrapped = crypto.wrap_key(key, pair.private_key().public_key(), INFO)
    assert len(wrapped) == kems.wrapped_len(PQ) == 1120 + 32 + 16
    assert crypto.unwrap_key(wrapped, pair.private_key(), INFO) == key
    # the raw roster form of the public key wraps to the same private key
    again = crypto.wrap_key(key, kems.hybrid_public_key(pair.public_bytes()), INFO)
    assert crypto.unwrap_key(again, pair.private_key(), INFO) == key
    # and the key pair survives its two storage forms (kem.key PEM, a secure round's raw state)
    for copy in (kems.HybridKeyPair.from_pem(pair.to_pem()), kems.HybridKeyPair.from_raw(pair.raw())):
        assert copy.public_bytes() == pair.public_bytes()
        assert crypto.unwrap_key(wrapped, copy.private_key(), INFO) == key


def test_a_wrap_of_the_other_kem_is_refused_with_a_reason():
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    pair, x = kems.HybridKeyPair.generate(), X25519PrivateKey.generate()
    key = crypto.new_content_key()
    classic = crypto.wrap_key(key, x.public_key(), INFO)
    hybrid = crypto.wrap_key(key, pair.private_key().public_key(), INFO)
    with pytest.raises(ProtocolError, match="x25519 wrap is 80") as e:
        crypto.unwrap_key(hybrid, x, INFO)
    assert e.value.reason == "bad-key-wrap"
    with pytest.raises(ProtocolError, match="mlkem768-x25519 wrap is 1168") as e:
        crypto.unwrap_key(classic, pair.private_key(), INFO)
    assert e.value.reason == "bad-key-wrap"


@pytest.mark.parametrize(
    "where", [0, 500, 1119, 1125, 1160], ids=["mlkem", "mlkem-mid", "x25519-end", "sealed", "tag"]
)
def test_tampered_hybrid_wrap_does_not_open(where):
    """A flipped bit anywhere (ML-KEM ciphertext, X25519 share, sealed key, tag) fails, as does
    another context: the hybrid KEM needs both halves intact."""
    pair = kems.HybridKeyPair.generate()
    wrapped = crypto.wrap_key(crypto.new_content_key(), pair.private_key().public_key(), INFO)
    with pytest.raises(ProtocolError) as e:
        crypto.unwrap_key(flip(wrapped, where), pair.private_key(), INFO)
    assert e.value.reason == "bad-key-wrap"
    other = crypto.wrap_info("fed", 2, "m" * 32, "site-a", "coordinator", "")
    with pytest.raises(ProtocolError):
        crypto.unwrap_key(wrapped, pair.private_key(), other)


# --- provisioning and bundles ------------------------------------------------------------------


def test_provisioned_hybrid_federation_records_its_kem_and_keys(pq):
    roster = json.loads((pq / "pq" / "coordinator" / "roster.json").read_text())
    assert roster["kem"] == PQ
    for pid in ("coordinator", "site-a", "site-b", "site-c"):  # site-c came with --add-site
        assert len(base64.b64decode(roster["participants"][pid]["kem_key"])) == kems.HYBRID_PUBLIC_LEN
        assert (pq / "pq" / pid / "kem.key").stat().st_mode & 0o777 == 0o600
    b = _bundles(pq)
    assert all(x.kem == PQ and x.kem_key is not None for x in b.values())
    # an x25519 federation's roster has no kem field: rosters written before the option keep
    # their exact signed bytes, and load as x25519
    classic = json.loads((pq / "classic" / "coordinator" / "roster.json").read_text())
    assert "kem" not in classic and "kem_key" not in classic["participants"]["site-a"]
    assert load_bundle(pq / "classic" / "site-a").kem == kems.X25519
    assert not (pq / "classic" / "site-a" / "kem.key").exists()


def test_a_bundle_without_or_with_a_wrong_hybrid_key_is_refused(pq, tmp_path):
    import shutil

    site = tmp_path / "site-a"
    shutil.copytree(pq / "pq" / "site-a", site)
    (site / "kem.key").unlink()
    with pytest.raises(ProvisioningError, match=r"seals with mlkem768-x25519.*no kem\.key"):
        load_bundle(site)
    shutil.copy2(pq / "pq" / "site-b" / "kem.key", site / "kem.key")  # another site's key
    with pytest.raises(ProvisioningError, match="kem.key does not match the roster"):
        load_bundle(site)
    os.chmod(site / "kem.key", 0o644)
    with pytest.raises(ProvisioningError, match="readable by others"):
        load_bundle(site)
    os.chmod(site / "kem.key", 0o600)
    (site / "kem.key").write_bytes((pq / "pq" / "site-a" / "enc.key").read_bytes())
    with pytest.raises(ProvisioningError, match="not a readable ML-KEM-768"):
        load_bundle(site)


def test_unknown_kem_and_kem_on_add_site_are_refused(tmp_path, capsys):
    with pytest.raises(ProvisioningError, match="--kem 'mlkem512' is not one of x25519, mlkem768-x25519"):
        provision(tmp_path / "f", "testfed", ["site-a"], "localhost", 18992, kem="mlkem512")
    from neurofed.cli import main

    assert main(["provision", "--out", str(tmp_path / "g"), "--federation", "g", "--sites", "site-a",
                 "--broker-host", "localhost", "--kem", "mlkem768-x25519"]) == 0  # fmt: skip
    assert load_bundle(tmp_path / "g" / "site-a").kem == PQ
    assert main(["provision", "--out", str(tmp_path / "g"), "--add-site", "site-b", "--kem", "x25519"]) != 0
    assert "--add-site and --revoke keep the federation's KEM" in capsys.readouterr().err
    assert not (tmp_path / "g" / "site-b").exists()


# --- messages ----------------------------------------------------------------------------------


def test_messages_of_a_hybrid_federation_round_trip_and_name_their_kem(pq):
    b = _bundles(pq)
    data = os.urandom(20_000)
    fr = list(
        seal_message(b["site-a"], MessageKind.UPDATE, 3, {"num_cases": 2}, data, chunk_size=4000).frames
    )
    h = decode_frame(fr[0][1])
    assert h.header.kem == PQ and b'"kem":"mlkem768-x25519"' in h.header_bytes
    wrapped = base64.b64decode(json.loads(h.keys_bytes)["coordinator"])
    assert len(wrapped) == kems.wrapped_len(PQ)
    r = Receiver(b["coordinator"])
    assert [m.payload for m in feed_all(r, fr)] == [data] and not r.rejections
    model = list(seal_message(b["coordinator"], MessageKind.MODEL, 3, {}, data, chunk_size=4000).frames)
    for site in ("site-a", "site-b", "site-c"):
        r = Receiver(b[site])
        assert [m.payload for m in feed_all(r, model)] == [data] and not r.rejections


def test_a_message_sealed_with_the_other_kem_is_refused_as_wrong_kem(pq):
    """Both directions: an x25519-sealed update in the hybrid federation (a downgrade, or a sender
    provisioned for another KEM) and a hybrid-sealed one where the roster says x25519."""
    b = _bundles(pq)
    downgraded = dataclasses.replace(
        b["site-a"], roster=dataclasses.replace(b["site-a"].roster, kem=kems.X25519)
    )
    r = Receiver(b["coordinator"])
    assert feed_all(r, list(seal_message(downgraded, MessageKind.UPDATE, 1, {}, b"x").frames)) == []
    assert r.rejections == {"wrong-kem": 1}
    rec = r.drain_rejected()[0]
    assert "sealed with x25519" in rec["detail"] and "seals with mlkem768-x25519" in rec["detail"]
    coord_x = dataclasses.replace(
        b["coordinator"], roster=dataclasses.replace(b["coordinator"].roster, kem=kems.X25519)
    )
    r = Receiver(coord_x)
    assert feed_all(r, list(seal_message(b["site-a"], MessageKind.UPDATE, 1, {}, b"x").frames)) == []
    assert r.rejections == {"wrong-kem": 1}


def test_a_header_stripped_of_its_kem_is_refused_before_any_unwrap(pq):
    """Removing ``kem`` from the signed header (so a receiver would try its x25519 key) is caught
    by the header's KEM against the roster's, before the signature or wrap is looked at."""
    b = _bundles(pq)
    ((topic, frame),) = list(seal_message(b["site-a"], MessageKind.UPDATE, 1, {}, b"x").frames)
    r = Receiver(b["coordinator"])
    # remove the kem field and ship the hybrid wraps under an x25519-looking header
    stripped = bytes(frame).replace(b',"kem":"mlkem768-x25519"', b"")
    hlen = int.from_bytes(bytes(frame)[4:6], "big")
    stripped = stripped[:4] + (hlen - len(b',"kem":"mlkem768-x25519"')).to_bytes(2, "big") + stripped[6:]
    assert decode_frame(stripped).header.kem == kems.X25519
    assert feed_all(r, [(topic, stripped)]) == []
    assert set(r.rejections) == {"wrong-kem"}  # refused before any cryptography


# --- secure aggregation's share bundles ----------------------------------------------------------


def test_secure_aggregation_seals_shares_with_the_hybrid_kem_and_refuses_a_downgrade():
    from tests.wire.secagg_helpers import Fed, fedavg, run_round

    fed = Fed.make(4)
    cfg = fed.config(256, kem=PQ)
    assert cfg.to_dict()["kem"] == PQ and "kem" not in fed.config(256).to_dict()
    rng = np.random.default_rng(0)
    updates = {s: rng.normal(0, 0.01, 256).astype(np.float32) for s in fed.sites}
    weights = {s: 3 for s in fed.sites}
    result, _server, clients, _ = run_round(fed, cfg, updates, weights)
    assert np.max(np.abs(result.mean - fedavg(updates, weights, fed.sites, 10.0))) < cfg.error_bound + 1e-15
    from neurofed.wire.secagg.messages import KeySet

    a, b = fed.sites[:2]
    ks = KeySet.from_bytes(clients[a].make_keyset())
    assert len(ks.share_kem_key) == kems.HYBRID_PUBLIC_LEN
    # a bundle is the HPKE hybrid ciphertext of the X25519-authenticated one
    bundle = clients[a].make_shares({s: clients[s].make_keyset() for s in fed.sites})[b]
    assert len(bundle) > kems.ENC_LEN[PQ]
    # a site whose roster says x25519 refuses a round that seals with the hybrid KEM, and one
    # whose roster says hybrid refuses an x25519 round (a coordinator cannot downgrade the shares)
    from neurofed.wire.secagg import SecAggClient

    for config, own in ((cfg, kems.X25519), (fed.config(256), PQ)):
        with pytest.raises(ProtocolError) as e:
            SecAggClient(a, config, fed.identities[a], fed.roster, kem=own)
        assert e.value.reason == "secagg-wrong-kem"
    # a key set without the hybrid key does not verify in a hybrid round
    classic = fed.clients(fed.config(256))[a].make_keyset()
    bare = KeySet.from_bytes(classic)
    bare = dataclasses.replace(bare, context=cfg.context, config_digest=cfg.digest).signed(fed.identities[a])
    with pytest.raises(ProtocolError, match="no ML-KEM-768\\+X25519 share key") as e:
        bare.verify(cfg, fed.roster, sender=a)
    assert e.value.reason == "secagg-wrong-kem"


def test_a_tampered_hybrid_share_bundle_does_not_open():
    from tests.wire.secagg_helpers import Fed

    fed = Fed.make(3)
    cfg = fed.config(64, kem=PQ)
    clients = fed.clients(cfg)
    keysets = {s: c.make_keyset() for s, c in clients.items()}
    a, b = fed.sites[:2]
    bundles = {s: clients[s].make_shares(keysets) for s in fed.sites}
    received = {s: bundles[s][b] for s in fed.sites if s != b}
    bad = dict(received, **{a: flip(received[a], 40)})
    with pytest.raises(ProtocolError) as e:
        clients[b].mask(np.zeros(64, np.float32), 1, bad)
    assert e.value.reason == "secagg-bad-share-bundle"
    clients[b].mask(np.zeros(64, np.float32), 1, received)  # the genuine ones open


def test_a_roster_message_naming_another_kem_is_ignored(pq, caplog):
    """Even CA-signed and newer, a ROSTER cannot switch a running participant to another KEM: the
    KEM is fixed at provisioning (a downgrade through the roster is refused with a warning)."""
    from cryptography.hazmat.primitives import serialization

    from neurofed.wire.api import Message
    from neurofed.wire.mqtt import MqttEndpoint
    from neurofed.wire.roster import roster_meta, sign_roster

    site = load_bundle(pq / "pq" / "site-a")
    ca_key = serialization.load_pem_private_key((pq / "pq" / ".ca" / "ca.key").read_bytes(), None)
    ep = MqttEndpoint(site)  # not started: nothing connects
    for kem, version, applied in ((kems.X25519, 50, False), (PQ, 51, True)):
        r = dataclasses.replace(site.roster, kem=kem, version=version)
        meta = roster_meta(r.to_json(), sign_roster(r, ca_key))
        ep._take_roster(Message(MessageKind.ROSTER, "testfed", 0, "coordinator", "m" * 32, meta))
        assert (ep.bundle.roster.version == version) is applied
    assert ep.bundle.roster.kem == PQ
    assert "seals with x25519, this federation with mlkem768-x25519" in caplog.text
