"""The short chaos soak (``neurofed.launch.soak``, ``make soak`` runs the long one): five
``neurofed edge`` processes (each in its own network namespace where they can be made), the
coordinator on a small tmpfs, a real Mosquitto and a real MLflow registry; six rounds of the tiny
UNet on 32^3 volumes, each with one fault from the seeded schedule, which covers every kind once:
a site SIGKILLed and restarted, the coordinator SIGKILLed at a fault point and restarted, the
broker SIGKILLed and restarted without its saved state, a tampered chunk and a replayed update
with a site's certificate, a site's link down past the deadline, the state disk full.

It passes only if the registry holds exactly rounds 1..6 once each, all of the run the first
coordinator started (the restarted one resumed it), every fault landed where it was aimed and a surviving process logged it, and every site's audit log reconciles with the
coordinator's events. The fault-free comparison of the test Dice is left to ``make soak`` (a
second federation does not fit this test's time); the Dice is checked to be a number here."""

from __future__ import annotations

import math

import pytest

from neurofed.launch import chaos
from neurofed.launch.soak import SoakConfig, print_report, run_soak
from tests.fixtures.broker import require_mosquitto
from tests.fixtures.mlflow import mlflow_server, mlflow_server_handle  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow


def test_the_schedule_is_seeded_covers_every_kind_and_spares_the_first_and_last_rounds():
    sites = [f"site-{i:02d}" for i in range(1, 6)]
    for seed in range(30):
        plan = chaos.schedule(6, sites, seed)
        assert plan == chaos.schedule(6, sites, seed)
        assert sorted(f.kind for f in plan) == sorted(chaos.KINDS)
        assert plan[0].kind != "coordinator-kill"
        assert plan[-1].kind != "tamper-replay"
    long = chaos.schedule(20, sites, 1)
    assert {f.kind for f in long} == set(chaos.KINDS) and len(long) == 20
    variants = [f.variant for f in long if f.kind == "broker-kill"]
    assert variants[:2] == ["wipe", "keep"][: len(variants)]


def test_short_soak_one_fault_per_round_loses_nothing(tmp_path, mlflow_server):  # noqa: F811
    require_mosquitto()
    lines: list[str] = []
    rep = run_soak(SoakConfig.short(tmp_path, mlflow=mlflow_server), lines.append)
    print_report(rep, lines.append)
    print("\n".join(lines))
    assert rep.ok, "\n".join(lines)
    assert rep.chaos.rounds_registered == [1, 2, 3, 4, 5, 6]
    assert {o.fault.kind for o in rep.chaos.outcomes} == set(chaos.KINDS)
    for o in rep.chaos.outcomes:
        assert o.skipped or (o.injected and o.landed_ok and o.evidence and o.survived and o.lost == 0)
    assert not math.isnan(rep.chaos.dice)


def test_a_coordinator_that_started_the_federation_over_fails_the_soak(tmp_path):
    """A restarted coordinator that lost its state starts a new federation run: the soak must
    say so from its state and from the registry's run tags, whatever the registry's round tags
    look like (the first run may not have registered anything before it was killed)."""
    import json

    from neurofed.launch.soak import Federation

    data = tmp_path / "data"
    for s in ("site-01", "site-02"):
        (data / s).mkdir(parents=True)
    fed = Federation(SoakConfig.short(tmp_path), tmp_path / "run", data, lambda: tmp_path, 1.0, "f", [])
    fed.mlflow = "http://registry"
    fed.run_id = "run-a"
    fed.state.mkdir(parents=True)
    (fed.state / "run.json").write_text(json.dumps({"run": "run-a"}))
    fed.registry_runs = ["run-a"]
    fed.check_run()
    assert fed.failures == []
    (fed.state / "run.json").write_text(json.dumps({"run": "run-b"}))
    fed.registry_runs = ["run-b"]
    fed.check_run()
    assert len(fed.failures) == 2
    assert "started the federation over" in fed.failures[0] and "run-b" in fed.failures[1]
