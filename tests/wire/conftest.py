"""Wire test fixtures. The broker fixtures come from tests/fixtures/broker.py (a pytest plugin
listed in tests/conftest.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.fixture(scope="session")
def fed(tmp_path_factory):
    """Bundles of three federations: testfed (the real one), otherfed (same site names, other CA),
    and a rogue 'testfed' provisioned by someone else (site-x, unknown to the real roster)."""
    from neurofed.wire.bundle import load_bundle
    from neurofed.wire.provision import provision

    root = tmp_path_factory.mktemp("wirefed")
    provision(root / "testfed", "testfed", ["site-a", "site-b", "site-c"], "localhost", 18999)
    provision(root / "otherfed", "otherfed", ["site-a"], "localhost", 18998)
    provision(root / "rogue", "testfed", ["site-x"], "localhost", 18997)
    b = {p: load_bundle(root / "testfed" / p) for p in ("coordinator", "site-a", "site-b", "site-c")}
    return SimpleNamespace(
        root=root,
        coordinator=b["coordinator"],
        a=b["site-a"],
        b=b["site-b"],
        c=b["site-c"],
        other_a=load_bundle(root / "otherfed" / "site-a"),
        rogue_x=load_bundle(root / "rogue" / "site-x"),
    )
