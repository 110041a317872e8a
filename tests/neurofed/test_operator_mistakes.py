"""Operator mistakes end in one line naming what is wrong, not a traceback: a bundle whose TLS key
is not its certificate's, and a site started on another site's data folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from neurofed.cli import main
from neurofed.wire.bundle import load_bundle
from neurofed.wire.errors import ProvisioningError
from neurofed.wire.provision import provision


@pytest.fixture
def bundles(tmp_path) -> Path:
    provision(tmp_path / "b", "fed1", ["site-a", "site-b"], "localhost", 18883, days=10)
    return tmp_path / "b"


@pytest.fixture
def data(tmp_path) -> Path:
    """DATA/sites.csv with site-a's and site-b's case folders (only the names are read)."""
    root = tmp_path / "data"
    (root / "site-a" / "case-001").mkdir(parents=True)
    (root / "site-b" / "case-002").mkdir(parents=True)
    (root / "sites.csv").write_text("case,site\ncase-001,site-a\ncase-002,site-b\n")
    return root


def neurofed(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "neurofed", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_a_key_that_is_not_the_certificates_is_one_line_naming_both(bundles, data, tmp_path):
    shutil.copy(bundles / "site-b" / "client.key", bundles / "site-a" / "client.key")
    with pytest.raises(ProvisioningError, match="client.key is not the private key of .*client.crt"):
        load_bundle(bundles / "site-a")
    r = neurofed("edge", "--bundle", str(bundles / "site-a"), "--data", str(data / "site-a"), cwd=tmp_path)
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert str(bundles / "site-a" / "client.key") in line and str(bundles / "site-a" / "client.crt") in line
    assert "SSL" not in line


def test_the_brokers_key_is_checked_too(bundles, capsys):
    shutil.copy(bundles / "coordinator" / "client.key", bundles / "broker" / "server.key")
    assert main(["broker", "--bundle", str(bundles / "broker")]) == 1
    line = one_line(capsys.readouterr().err)
    assert "server.key is not the private key of" in line and "server.crt" in line


def test_edge_refuses_another_sites_data_folder_in_one_line(bundles, data, tmp_path):
    r = neurofed("edge", "--bundle", str(bundles / "site-b"), "--data", str(data / "site-a"), cwd=tmp_path)
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert f"{data / 'site-a'} belongs to site-a, not to site-b" in line
    assert str(bundles / "site-b") in line and "--data-site-mismatch-ok" in line


def test_the_override_only_warns(bundles, data, capsys):
    from neurofed.commands.edge import check_data_site

    check_data_site(data / "site-a", "site-b", ["site-a", "site-b"], str(bundles / "site-b"), True)
    assert "warning" in one_line(capsys.readouterr().err)
    check_data_site(data / "site-b", "site-b", ["site-a", "site-b"], str(bundles / "site-b"), False)
    assert capsys.readouterr().err == ""


def test_site_up_refuses_another_sites_data_before_docker(bundles, data, capsys):
    argv = ["site", "up", "--bundle", str(bundles / "site-b"), "--data", str(data / "site-a")]
    assert main(argv) == 1
    assert "belongs to site-a, not to site-b" in one_line(capsys.readouterr().err)
