"""Secure aggregation with real processes on a real broker: four `neurofed edge` processes and
`neurofed coordinator --secure-aggregation`, the tiny UNet on 32^3 synthetic volumes. A site
SIGKILLed right after its masked input is recovered from its neighbours' shares (its input
counts); one SIGKILLed after sharing but before masking is left out and its pairwise masks
removed; a coordinator SIGKILLed once the masked inputs are in restarts the round under a new
attempt with fresh keys, and the round closes exactly once."""

from __future__ import annotations

import pytest

from neurofed.launch.local import wait_for
from tests.test_federation_failures import Fed, federation_data, print_logs_if_failed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def secure_data(tmp_path_factory):
    """Four sites: secure aggregation needs three survivors after one is killed."""
    return federation_data(tmp_path_factory, "secure-data", sites=4, cases=16)


class SecureFed(Fed):
    """The failure tests' federation, its coordinator running secure aggregation."""

    def start_coordinator(self, **kw):
        return super().start_coordinator(
            extra_args=("--secure-aggregation", "--secagg-phase-timeout", "20"), **kw
        )


@pytest.fixture
def sfed(request, tmp_path, secure_data):
    f = SecureFed(tmp_path, secure_data)
    yield f
    f.close()
    print_logs_if_failed(request, f, lines=40)


def _secagg_done(fed: Fed, r: int) -> dict:
    return wait_for(
        lambda: next((e for e in fed.events("secagg-done") if e["round"] == r), None),
        240,
        f"round {r}'s secure sum",
        fed.procs,
    )


@pytest.mark.parametrize(
    ("step", "counted"),
    [("update", True), ("shares", False)],
    ids=["killed-after-its-masked-input", "killed-before-masking"],
)
def test_a_site_killed_in_a_secure_round(sfed, step, counted):
    victim = sfed.sites[-1]
    for s in sfed.sites[:-1]:
        sfed.start_site(s)
    sfed.start_site(victim, NEUROFED_FAULT=f"secagg-after-{step}", NEUROFED_FAULT_ROUND="1")
    sfed.wait_sites_ready()
    coord = sfed.start_coordinator(rounds=1, min_sites=3, timeout=120)
    done = _secagg_done(sfed, 1)
    assert sfed.edges[victim].wait(60) == -9  # it really died at that step
    if counted:  # its self mask came back from its neighbours' shares: its input counts
        assert victim in done["survivors"] and len(done["survivors"]) == 4
    else:  # left out; its pairwise masks were removed from its neighbours' mask-key shares
        assert victim not in done["survivors"] and victim in done["recovered"]
        assert len(done["survivors"]) == 3
    closed = sfed.wait_round(1)
    assert closed["aggregated"] and sorted(closed["sites"]) == sorted(done["survivors"])
    assert coord.wait(240) == 0, coord.tail()
    masked = [e for e in sfed.events("update") if e["round"] == 1]
    assert masked and all(e.get("masked") for e in masked)  # the coordinator never got a plain update


def test_coordinator_killed_in_a_secure_round_restarts_it_with_fresh_keys(sfed):
    for s in sfed.sites:
        sfed.start_site(s)
    sfed.wait_sites_ready()
    first = sfed.start_coordinator(
        rounds=1, min_sites=3, timeout=120, fault="secagg-after-inputs", fault_round=1
    )
    assert first.wait(240) == -9, first.tail()
    second = sfed.start_coordinator(rounds=1, min_sites=3, timeout=120)
    done = _secagg_done(sfed, 1)
    assert second.wait(240) == 0, second.tail()
    attempts = [e["attempt"] for e in sfed.events("secagg-attempt") if e["round"] == 1]
    assert attempts == sorted(set(attempts)) and len(attempts) >= 2  # never the same attempt twice
    assert done["attempt"] == attempts[-1] and len(done["survivors"]) == 4
    assert [e["round"] for e in sfed.events("round") if e.get("train")] == [1]  # closed exactly once


def test_a_post_quantum_federation_runs_a_secure_round(request, tmp_path, secure_data):
    """Provisioned with ``--kem mlkem768-x25519``: the task, the models, the masked updates and
    the site-to-site share bundles are all sealed with the hybrid KEM (a receiver refuses any
    message whose KEM is not its roster's, ``wrong-kem``), and a secure round of four real
    processes completes with every site's input counted."""
    import json

    f = SecureFed(tmp_path, secure_data, kem="mlkem768-x25519")
    try:
        assert json.loads((f.bundles / "coordinator" / "roster.json").read_text())["kem"] == "mlkem768-x25519"
        for s in f.sites:
            f.start_site(s)
        f.wait_sites_ready()
        coord = f.start_coordinator(rounds=1, min_sites=4, timeout=120)
        done = _secagg_done(f, 1)
        assert sorted(done["survivors"]) == f.sites and done["attempt"] == 0
        closed = f.wait_round(1)
        assert closed["aggregated"] and sorted(closed["sites"]) == f.sites
        assert coord.wait(240) == 0, coord.tail()
        # no wire rejection: nothing sealed with another KEM, no wrap that failed to open
        assert [e for e in f.events("reject") if e.get("wire")] == []
    finally:
        f.close()
        print_logs_if_failed(request, f, lines=40)
