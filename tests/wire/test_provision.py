"""Provisioning, bundles and the payload codec (no broker)."""

from __future__ import annotations

import shutil
import stat

import numpy as np
import pytest

from neurofed.cli import main
from neurofed.wire.bundle import load_bundle
from neurofed.wire.errors import ProtocolError, ProvisioningError
from neurofed.wire.payload import decode_state, encode_state
from neurofed.wire.provision import add_site, provision, revoke


@pytest.fixture
def root(tmp_path):
    provision(tmp_path / "b", "fed1", ["site-a", "site-b"], "broker.example.org", 8883, days=10)
    return tmp_path / "b"


def test_layout_and_permissions(root):
    assert sorted(p.name for p in root.iterdir()) == [".ca", "broker", "coordinator", "site-a", "site-b"]
    for bundle in ("coordinator", "site-a"):
        for key in ("client.key", "sign.key", "enc.key"):
            assert stat.S_IMODE((root / bundle / key).stat().st_mode) == 0o600
        assert not (root / bundle / "ca.key").exists()
    assert stat.S_IMODE((root / "broker" / "server.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((root / ".ca").stat().st_mode) == 0o700
    assert [p.parent.name for p in root.glob("*/ca.key")] == [".ca"]  # the CA key is in no bundle
    conf = (root / "broker" / "mosquitto.conf").read_text()
    for line in (
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "allow_anonymous false",
        "crlfile crl.pem",
        "persistence true",
        "max_packet_size",
    ):
        assert line in conf
    assert int(conf.split("max_queued_messages ")[1].split()[0]) > 1000
    acl = (root / "broker" / "acl").read_text()
    assert "topic write nf/fed1/update/site-a/#" in acl and "topic write nf/fed1/update/site-b/#" in acl
    b = load_bundle(root / "site-a")
    assert b.role == "site" and b.roster.sites == ["site-a", "site-b"] and b.broker_port == 8883
    assert "PRIVATE" not in repr(b)


def test_tampered_roster_is_refused(root):
    p = root / "site-a" / "roster.json"
    p.write_bytes(p.read_bytes().replace(b'"site-b"', b'"site-z"'))
    with pytest.raises(ProvisioningError, match="signature does not verify"):
        load_bundle(root / "site-a")


def test_missing_file_is_named(root):
    (root / "site-a" / "enc.key").unlink()
    with pytest.raises(ProvisioningError, match="lacks enc.key"):
        load_bundle(root / "site-a")
    with pytest.raises(ProvisioningError, match="broker's bundle"):
        load_bundle(root / "broker")


def test_add_site_keeps_existing_bundles(root):
    before = (root / "site-a" / "client.crt").read_bytes(), (root / "site-a" / "sign.key").read_bytes()
    add_site(root, "site-c")
    assert (
        (root / "site-a" / "client.crt").read_bytes(),
        (root / "site-a" / "sign.key").read_bytes(),
    ) == before
    for p in ("coordinator", "site-a", "site-c"):
        assert load_bundle(root / p).roster.sites == ["site-a", "site-b", "site-c"]
    assert "update/site-c/#" in (root / "broker" / "acl").read_text()
    with pytest.raises(ProvisioningError, match="already"):
        add_site(root, "site-c")


def test_revoke_updates_crl_roster_and_acl(root):
    from cryptography import x509

    serial = x509.load_pem_x509_certificate((root / "site-b" / "client.crt").read_bytes()).serial_number
    stale = root.parent / "old-b"
    shutil.copytree(root / "site-b", stale)
    revoke(root, "site-b")
    crl = x509.load_pem_x509_crl((root / "broker" / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert load_bundle(root / "coordinator").roster.sites == ["site-a"]
    assert "site-b" not in (root / "broker" / "acl").read_text()
    with pytest.raises(ProvisioningError, match="revoked"):
        shutil.copy(root / "coordinator" / "roster.json", stale / "roster.json")
        shutil.copy(root / "coordinator" / "roster.sig", stale / "roster.sig")
        load_bundle(stale)


@pytest.mark.parametrize("sites", [["coordinator"], ["broker"], ["Bad Name"], ["a", "a"], []])
def test_bad_site_ids(tmp_path, sites):
    with pytest.raises(ProvisioningError):
        provision(tmp_path / "x", "fed", sites, "h")


def test_certificate_common_names_are_unique_per_broker(root):
    """The broker makes the certificate CN the client id: no two certificates a broker accepts may
    share a CN, so ids already used, reserved or revoked are refused."""
    from cryptography import x509

    revoke(root, "site-b")
    for taken in ("site-a", "site-b", "coordinator", "broker"):
        with pytest.raises(ProvisioningError):
            add_site(root, taken)
    add_site(root, "site-c")
    cns = [
        x509.load_pem_x509_certificate((root / p / f).read_bytes()).subject.rfc4514_string()
        for p, f in [("broker", "server.crt")]
        + [(p, "client.crt") for p in ("coordinator", "site-a", "site-c")]
    ]
    assert cns == ["CN=broker", "CN=coordinator", "CN=site-a", "CN=site-c"]


def test_refuses_to_overwrite(root):
    with pytest.raises(ProvisioningError, match="already holds"):
        provision(root, "fed1", ["site-a"], "h")


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(["provision", "--federation", "f", "--sites", "s1,s2", "--broker-host", "h", "--out", str(out)])
        == 0
    )
    assert main(["provision", "--out", str(out), "--add-site", "s3"]) == 0
    assert main(["provision", "--out", str(out), "--revoke", "s1"]) == 0
    assert main(["provision", "--out", str(out), "--revoke", "nobody"]) == 1
    text = capsys.readouterr()
    assert "is not a site" in text.err
    assert "PRIVATE KEY" not in text.out + text.err
    assert main(["broker", "--bundle", str(tmp_path / "nope")]) == 1


def test_payload_round_trip_and_fp16():
    state = {"w": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "n": np.arange(3)}
    out = decode_state(encode_state(state))
    assert all(np.array_equal(out[k], state[k]) and out[k].dtype == state[k].dtype for k in state)
    half = encode_state(state, fp16=True)
    assert len(half) < len(encode_state(state))
    out = decode_state(half)
    assert out["w"].dtype == np.float32 and np.allclose(out["w"], state["w"], atol=1e-2)
    assert out["n"].dtype == state["n"].dtype


def test_payload_from_torch():
    torch = pytest.importorskip("torch")
    out = decode_state(encode_state({"t": torch.ones(2, 3)}))
    assert isinstance(out["t"], np.ndarray) and out["t"].sum() == 6


def test_payload_rejects_garbage():
    with pytest.raises(ProtocolError):
        decode_state(b"\x00" * 3)
    with pytest.raises(ProtocolError):
        decode_state(b"\xff" * 64)
