"""Client-level DP (DP-FedAvg): the central noise's std, the clip at the sites and the
coordinator, the adaptive clip, site weights, the accountant against an independent one, the
budget stop, and what cannot carry it."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest

from neurofed.coordinator.client_dp import ClientDP
from neurofed.coordinator.errors import CoordinatorError
from neurofed.coordinator.registration import Registrar
from neurofed.coordinator.state import StateStore
from neurofed.coordinator.strategies import make_strategy
from neurofed.models.client_privacy import (
    ClientDPConfig,
    client_epsilon,
    client_weight,
    solve_client_noise,
    update_noise_multiplier,
)
from neurofed.models.dp_noise import SecureGaussian
from neurofed.models.privacy import PrivacyConfigError
from neurofed.wire.memory import MemoryHub
from tests.coordinator.helpers import (
    ShiftTrainer,
    finish,
    initial_weights,
    make_coordinator,
    run_in_thread,
    start_agent,
)

SITES = ("site-a", "site-b", "site-c")


def _client_dp(sites: int = 10, **kw) -> ClientDP:
    return ClientDP(ClientDPConfig(**kw).resolved(sites=sites), {})


@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm"])
def test_central_noise_on_zero_updates_has_the_configured_std(strategy):
    """Five sites send no change: the new model differs from the old by the noise alone, whose
    std per coordinate is z * C / 5 (uniform weights) within 5 %, mean zero. Without the noise
    the model would not move at all."""
    z, clip, n = 1.1, 0.3, 5
    dp = _client_dp(noise_multiplier=z, clip=clip)
    glob = {"w": np.full(200_000, 0.25, np.float32), "step": np.array([3], np.int64)}
    s = make_strategy(strategy)
    s.max_norm, s.mean_noise = dp.clip, dp.add_noise
    s.begin(1, glob)
    dp.begin()
    for i in range(n):
        w = dp.accept(f"s{i}", {"dp_client": {"within_clip": True}}, num_cases=10 + i)
        s.add(f"s{i}", {k: v.copy() for k, v in glob.items()}, w)
    out = s.result()
    noise = out["w"].astype(np.float64) - 0.25
    assert float(noise.std()) == pytest.approx(z * clip / n, rel=0.05)
    assert abs(float(noise.mean())) < 5 * z * clip / n / math.sqrt(noise.size)
    assert int(out["step"][0]) == 3  # counters are not noised


def test_secure_gaussian_is_standard_normal_and_never_repeats():
    a, b = SecureGaussian().standard_normal(100_001), SecureGaussian().standard_normal(100_001)
    assert a.std() == pytest.approx(1.0, rel=0.02) and abs(a.mean()) < 0.02
    assert np.mean(np.abs(a) > 1.96) == pytest.approx(0.05, abs=0.005)  # a Gaussian's tails
    assert not np.array_equal(a, b)  # a fresh key from the OS per stream
    k = bytes(range(32))
    assert np.array_equal(SecureGaussian(k).standard_normal(10), SecureGaussian(k).standard_normal(10))


def test_the_site_clips_its_change_and_reports_only_the_bit():
    import torch

    from neurofed.edge_node.privacy import clip_site_update

    start = {"w": torch.zeros(4, 3), "n": torch.tensor([2])}
    far = {"w": torch.full((4, 3), 5.0), "n": torch.tensor([2])}  # change of norm 5 * sqrt(12)
    out, within = clip_site_update(far, start, 0.5)
    assert not within and float(out["w"].norm()) == pytest.approx(0.5, rel=1e-6)
    assert float(out["w"].norm()) <= 0.5 * (1 + 1e-6)
    near = {"w": torch.full((4, 3), 0.01), "n": torch.tensor([2])}
    out, within = clip_site_update(near, start, 0.5)
    assert within and torch.equal(out["w"], near["w"])


def test_adaptive_clip_moves_to_the_target_quantile_of_the_update_norms():
    """100 sites with log-normal update norms, the clip started 100x too small: with noisy counts
    it settles within 15 % of the norms' median (the target quantile 0.5); a fixed clip stays put."""
    rng = np.random.default_rng(1)  # the synthetic norms only; the count's noise is the kit's own
    dp = _client_dp(noise_multiplier=1.0, clip=0.01, adaptive=True, target_quantile=0.5, sites=100)
    assert dp.config.count_noise == pytest.approx(5.0)  # sites / 20
    history = []
    for _ in range(150):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=100)  # median 1
        dp.begin()
        for i, nrm in enumerate(norms):
            dp.accept(f"s{i}", {"dp_client": {"within_clip": bool(nrm <= dp.clip)}}, 1)
        history.append(dp.close(100)["clip"])
    settled = float(np.mean(history[-50:]))
    assert settled == pytest.approx(1.0, rel=0.15), history[-10:]
    assert dp.rounds == 150
    fixed = _client_dp(noise_multiplier=1.0, clip=0.01)
    fixed.begin()
    fixed.close(100)
    assert fixed.clip == 0.01


def test_the_updates_noise_accounts_for_the_counts_noise():
    """z_delta with the count's noise (sensitivity 1/2) composes to exactly the Gaussian of z."""
    from dp_accounting import ComposedDpEvent, GaussianDpEvent
    from dp_accounting.rdp import RdpAccountant

    z, sb = 1.0, 2.0
    zd = update_noise_multiplier(z, sb)
    assert zd > z
    both, one = RdpAccountant(), RdpAccountant()
    both.compose(ComposedDpEvent([GaussianDpEvent(zd), GaussianDpEvent(2 * sb)]))
    one.compose(GaussianDpEvent(z))
    assert both.get_epsilon(1e-5) == pytest.approx(one.get_epsilon(1e-5), rel=1e-9)
    with pytest.raises(PrivacyConfigError, match="count's noise"):
        update_noise_multiplier(1.0, 0.4)


@pytest.mark.parametrize(
    ("z", "q", "rounds"), [(1.0, 1.0, 10), (0.8, 1.0, 50), (2.0, 0.3, 100), (5.0, 1.0, 3)]
)
def test_client_epsilon_matches_opacus_rdp(z, q, rounds):
    """The kit's client-level epsilon (dp-accounting RDP) against Opacus's RDP accountant: within 1 %."""
    from opacus.accountants import RDPAccountant

    ref = RDPAccountant()
    ref.history = [(z, q, rounds)]
    assert client_epsilon(z, q, rounds, 1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=0.01)


def test_the_noise_is_solved_for_a_target_over_the_planned_rounds():
    z = solve_client_noise(4.0, 1e-5, 1.0, 20)
    assert client_epsilon(z, 1.0, 20, 1e-5) <= 4.0 < client_epsilon(z * 0.99, 1.0, 20, 1e-5)
    cfg = ClientDPConfig(target_epsilon=4.0, rounds=20).resolved(sites=5)
    assert cfg.noise_multiplier == pytest.approx(z)


def test_weights_are_uniform_or_capped_never_above_one():
    assert client_weight(500, "uniform", 64) == 1.0
    assert client_weight(16, "capped", 64) == 0.25 and client_weight(500, "capped", 64) == 1.0


@pytest.mark.parametrize("strategy", ["median", "trimmed-mean", "fednova"])
def test_strategies_without_a_bounded_mean_are_refused(strategy):
    from neurofed.coordinator.client_dp import refuse_unsound

    with pytest.raises(CoordinatorError, match="client-level DP needs a mean"):
        refuse_unsound(strategy, site_optimizer="reset", sample_dp=False)
    with pytest.raises(CoordinatorError, match="continue-global"):
        refuse_unsound("fedavg", site_optimizer="continue-global", sample_dp=False)


def test_a_dp_fedavg_federation_clips_weights_charges_and_stops_at_its_budget(tmp_path):
    """Through the round machine: the task carries the round's clip; each site clips its change
    (norm 6.9 -> 0.5) and reports the bit; capped weights; the mean moves by the clip (noise
    almost nil); each round is charged, MLflow metrics and registry tags carry epsilon; a budget
    that pays for two rounds ends training after round 2 and keeps the model."""
    z = 0.5
    budget = (client_epsilon(z, 1.0, 2, 1e-5) + client_epsilon(z, 1.0, 3, 1e-5)) / 2
    cfg = ClientDPConfig(
        noise_multiplier=z, target_epsilon=budget, clip=0.5, weighting="capped", weight_cap=4, rounds=4
    ).resolved(sites=3)
    hub = MemoryHub("testfed")
    stop = threading.Event()
    trainers = {s: ShiftTrainer(shift=2.0, num_train_cases=n) for s, n in zip(SITES, (2, 4, 9), strict=True)}
    reg = Registrar(StateStore(tmp_path / "c"), {})
    coord = make_coordinator(
        hub, tmp_path / "c", SITES, rounds=4, timeout=60, dp_client=cfg.to_dict(), registrar=reg
    )
    agents = {s: start_agent(hub, s, tr, tmp_path, stop)[0] for s, tr in trainers.items()}
    results = finish(*run_in_thread(coord), stop)
    reg.close()
    trained = [r for r in results if r.train]
    assert [r.round for r in trained] == [1, 2]  # round 3 would exceed the budget
    events = [json.loads(x) for x in (tmp_path / "c" / "events.jsonl").read_text().splitlines()]
    ended = [e for e in events if e["event"] == "training-ended"]
    assert ended and ended[0]["reason"] == "client-privacy-budget-spent"
    info = coord._extra_state["rounds"]["2"]["dp_client"]
    assert info["epsilon"] == pytest.approx(client_epsilon(z, 1.0, 2, 1e-5), rel=1e-6)
    assert info["epsilon"] <= budget and info["clip"] == 0.5 and info["weights"] == "capped"
    assert coord._tags(2)["dp.client.epsilon"] == str(info["epsilon"])
    logged: dict[int, dict] = {}
    for j in reg.done:
        if j.kind == "log":
            logged.setdefault(j.round, {}).update(j.data["metrics"])
    assert logged[2]["dp_client/epsilon"] == info["epsilon"] and logged[2]["dp_client/clip"] == 0.5
    assert logged[1]["dp_client/epsilon"] < logged[2]["dp_client/epsilon"]
    assert [j.round for j in reg.done if j.kind == "register"] == [1, 2]  # the model is kept
    for s in SITES:
        [upd, *_] = [e["fields"] for e in agents[s].audit.entries() if e["kind"] == "update"]
        assert upd["dp_client"] == {"within_clip": False, "clip": 0.5}
    # every site moved every float by +2 (norm 2 * sqrt(16) = 8): clipped to 0.5 each, so the mean
    # change is 0.5 in that direction plus noise of std 0.5 * 0.5 / (0.5 + 1 + 1) per coordinate
    start = initial_weights()
    delta = np.concatenate([(coord.weights[k].astype(np.float64) - start[k]).ravel() for k in ("w", "b")])
    unit = np.ones_like(delta) / math.sqrt(delta.size)
    along = float(delta @ unit)
    assert along == pytest.approx(2 * 0.5, abs=6 * 0.1)  # two rounds of the clip
    assert float(np.linalg.norm(delta - along * unit)) < 6 * 0.1 * math.sqrt(delta.size)


def test_a_restarted_coordinator_keeps_the_ledger_and_the_adapted_clip(tmp_path):
    """Each round is charged in the snapshot that holds its model: a new coordinator process on
    the same state goes on from round 2 with round 1 charged once and the clip round 1 adapted."""
    from tests.coordinator.test_rounds import wait_for

    cfg = ClientDPConfig(noise_multiplier=1.0, clip=0.5, adaptive=True, rounds=2).resolved(sites=2)
    hub = MemoryHub("testfed")
    stop = threading.Event()
    state = tmp_path / "c"
    trainers = [ShiftTrainer(shift=0.01, num_train_cases=1), ShiftTrainer(shift=0.02, num_train_cases=1)]
    coord = make_coordinator(hub, state, SITES[:2], rounds=1, final_eval=False, dp_client=cfg.to_dict())
    for s, tr in zip(SITES[:2], trainers, strict=True):
        start_agent(hub, s, tr, tmp_path, stop)
    finish(*run_in_thread(coord), threading.Event())
    ledger = dict(coord._extra_state["dp_client"])
    assert ledger["rounds"] == 1 and ledger["clip"] != 0.5
    agents = [
        start_agent(hub, s, tr, tmp_path / "again", stop)[0]
        for s, tr in zip(SITES[:2], trainers, strict=True)
    ]
    wait_for(lambda: all("note" in a._status for a in agents), 10, "the agents to see the old end")
    coord2 = make_coordinator(hub, state, SITES[:2], rounds=2, final_eval=False, dp_client=cfg.to_dict())
    results = finish(*run_in_thread(coord2), stop)
    assert [r.round for r in results] == [2]
    second = coord2._extra_state["rounds"]["2"]["dp_client"]
    assert second["rounds"] == 2 and second["clip"] == ledger["clip"]  # the task carried it
    assert second["epsilon"] == pytest.approx(client_epsilon(1.0, 1.0, 2, 1e-5), rel=1e-6)
    sent = [e["fields"]["dp_client"]["clip"] for e in agents[0].audit.entries() if e["kind"] == "update"]
    assert sent == [ledger["clip"]]
