"""Strategies: identical updates come back unchanged, robust ones resist outliers, server
optimiser state survives a restart, per-site configs are fresh objects."""

from __future__ import annotations

import numpy as np
import pytest

from neurofed.coordinator.errors import CoordinatorError
from neurofed.coordinator.state import Snapshot, StateStore
from neurofed.coordinator.strategies import STRATEGIES, FedAdam, FedAvgM, FedYogi, make_strategy


def _model(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "a.weight": (rng.normal(size=(3, 4)) * scale).astype(np.float32),
        "a.bias": (rng.normal(size=3) * scale).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_identical_updates_return_them(name, tmp_path):
    glob = _model(0)
    upd = _model(1)
    s = make_strategy(name, spill_dir=tmp_path)
    s.begin(1, glob)
    for site, cases in (("a", 3), ("b", 5), ("c", 1)):
        s.add(site, upd, cases, local_steps=4)  # FedNova with equal steps is FedAvg
    out = s.result()
    if name in ("fedadam", "fedyogi"):
        # a server optimiser steps toward the sites' common model; it returns it exactly when the
        # sites agree with the global model (zero pseudo-gradient)
        s2 = make_strategy(name)
        s2.begin(1, glob)
        for site in "abc":
            s2.add(site, glob, 2)
        out2 = s2.result()
        for k in glob:
            np.testing.assert_allclose(out2[k], glob[k], atol=1e-7)
        # and it moves every coordinate toward the update, never away
        d_new = out["a.weight"] - glob["a.weight"]
        d_upd = upd["a.weight"] - glob["a.weight"]
        assert np.all(np.sign(d_new) == np.sign(d_upd))
    else:
        for k in glob:
            np.testing.assert_allclose(out[k], upd[k], rtol=1e-6)
            assert out[k].dtype == glob[k].dtype
    s.close()


@pytest.mark.parametrize("name", ["median", "trimmed-mean"])
def test_robust_strategies_resist_one_huge_site(name, tmp_path):
    glob = _model(0)
    s = make_strategy(name, spill_dir=tmp_path)
    s.begin(1, glob)
    honest = [_model(i) for i in (1, 1, 1, 1)]
    for i, m in enumerate(honest):
        s.add(f"s{i}", m, 4)
    s.add("evil", {k: (v * 1e6 if v.dtype == np.float32 else v) for k, v in honest[0].items()}, 4)
    out = s.result()
    np.testing.assert_allclose(out["a.weight"], honest[0]["a.weight"], rtol=1e-5)
    s.close()
    assert not list(tmp_path.iterdir()), "spill files must be removed"
    fedavg = make_strategy("fedavg")
    fedavg.begin(1, glob)
    for i, m in enumerate(honest):
        fedavg.add(f"s{i}", m, 4)
    fedavg.add("evil", {k: v * 1e6 if v.dtype == np.float32 else v for k, v in honest[0].items()}, 4)
    assert np.abs(fedavg.result()["a.weight"]).max() > 1e4


def test_norm_bound_limits_one_site():
    glob = {"w": np.zeros(10, dtype=np.float32)}
    s = make_strategy("fedavg", max_norm=1.0)
    s.begin(1, glob)
    s.add("big", {"w": np.full(10, 100.0, dtype=np.float32)}, 1)
    s.add("small", {"w": np.full(10, 0.1, dtype=np.float32)}, 1)
    out = s.result()
    assert "big" in s.clipped and "small" not in s.clipped
    assert np.linalg.norm(out["w"]) <= 1.0 + 1e-5


def test_fedprox_sends_mu_and_configs_are_fresh():
    s = make_strategy("fedprox", mu=0.1)
    a = s.configure(1, "a", {"epochs": 2})
    b = s.configure(1, "b", {"epochs": 2})
    assert a == {"epochs": 2, "mu": 0.1} and a is not b
    a["epochs"] = 99
    assert b["epochs"] == 2


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_server_optimiser_state_survives_restart(cls, tmp_path):
    glob = _model(0)
    updates = [[_model(10 + r * 3 + i) for i in range(3)] for r in range(3)]

    def run_round(strategy, weights, r):
        strategy.begin(r + 1, weights)
        for i, u in enumerate(updates[r]):
            strategy.add(f"s{i}", u, i + 1)
        return strategy.result()

    # uninterrupted
    s = cls()
    w = glob
    for r in range(3):
        w = run_round(s, w, r)
    # interrupted after round 2: persisted through the real snapshot file and a fresh object
    s1 = cls()
    w1 = glob
    for r in range(2):
        w1 = run_round(s1, w1, r)
    meta, tensors = s1.state()
    store = StateStore(tmp_path)
    store.save(
        Snapshot(
            round=2, federation="f", weights=w1, model_config={}, strategy_meta=meta, strategy_tensors=tensors
        )
    )
    snap = StateStore(tmp_path).load(federation="f")
    s2 = cls()
    s2.load_state(snap.strategy_meta, snap.strategy_tensors)
    assert s2.t == 2 and set(s2.m) == {"a.weight", "a.bias"}
    w2 = run_round(s2, snap.weights, 2)
    for k in w:
        np.testing.assert_allclose(w2[k], w[k], rtol=1e-5, atol=1e-6)
    # a fresh optimiser (state lost) would give a different model: the state matters
    s3 = cls()
    w3 = run_round(s3, snap.weights, 2)
    assert not np.allclose(w3["a.weight"], w["a.weight"], atol=1e-6)


def test_load_state_refuses_other_strategy():
    meta, tensors = FedAdam().state()
    with pytest.raises(CoordinatorError, match="fedadam"):
        FedYogi().load_state(meta, tensors)


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(CoordinatorError, match="choose one of"):
        make_strategy("fedsgd")


def test_fednova_is_the_normalised_average_and_fedavg_when_steps_agree():
    glob = _model(0)
    sites = {"big": (_model(1), 41, 82), "mid": (_model(2), 9, 18), "small": (_model(3), 5, 10)}
    s = make_strategy("fednova")
    s.begin(1, glob)
    for site, (upd, n, tau) in sites.items():
        s.add(site, upd, n, local_steps=tau)
    out = s.result()
    # Wang et al. 2020, written out directly in float64: w + tau_eff * sum_i p_i (w_i - w) / tau_i
    total = sum(n for _, n, _ in sites.values())
    tau_eff = sum(n * tau for _, n, tau in sites.values()) / total
    for k in ("a.weight", "a.bias"):
        g = glob[k].astype(np.float64)
        want = g + tau_eff * sum(
            (n / total) * (u[k].astype(np.float64) - g) / tau for u, n, tau in sites.values()
        )
        np.testing.assert_allclose(out[k], want.astype(np.float32), rtol=1e-6, atol=1e-7)
        assert out[k].dtype == np.float32
    assert int(out["bn.num_batches_tracked"]) == 7
    # the same updates with equal steps: exactly FedAvg
    nova, avg = make_strategy("fednova"), make_strategy("fedavg")
    for st in (nova, avg):
        st.begin(1, glob)
        for site, (upd, n, _) in sites.items():
            st.add(site, upd, n, local_steps=12)
    a, b = nova.result(), avg.result()
    for k in glob:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_fednova_rejects_an_update_without_local_steps():
    from neurofed.coordinator.checks import check_local_steps
    from neurofed.coordinator.errors import UpdateRejected

    s = make_strategy("fednova")
    s.begin(1, _model(0))
    with pytest.raises(UpdateRejected, match="missing-local-steps"):
        s.add("a", _model(1), 3)
    for bad in (0, -2, 1.5, True, "7"):
        with pytest.raises(UpdateRejected, match="bad-local-steps"):
            check_local_steps(bad)
    assert check_local_steps(None) is None and check_local_steps(7) == 7


def test_server_lr_sets_the_server_optimisers_step_and_is_refused_elsewhere():
    glob = _model(0)
    upd = {k: (v + 1.0 if v.dtype == np.float32 else v) for k, v in glob.items()}
    moved = {}
    for eta in (1e-3, 1e-2):
        s = make_strategy("fedadam", server_lr=eta)
        assert s.eta == eta
        s.begin(1, glob)
        s.add("a", upd, 3)
        out = s.result()
        moved[eta] = float(np.abs(out["a.weight"] - glob["a.weight"]).max())
    # the first Adam step moves each coordinate by about eta (a delta of 1 >> tau)
    assert moved[1e-3] == pytest.approx(1e-3, rel=0.05) and moved[1e-2] == pytest.approx(1e-2, rel=0.05)
    with pytest.raises(CoordinatorError, match="fedavgm, fedadam and fedyogi; fedavg has none"):
        make_strategy("fedavg", server_lr=0.1)
    with pytest.raises(CoordinatorError, match="must be positive"):
        make_strategy("fedyogi", server_lr=0.0)


def test_fedavgm_is_momentum_on_the_fedavg_step_and_survives_restart(tmp_path):
    """Hsu et al.: v = beta v + (mean - global); global += eta v. Checked against the formula
    written out by hand over three rounds, with a restart (snapshot file, fresh object) after two."""
    glob = _model(0)
    updates = [[(_model(20 + r * 3 + i), i + 1) for i in range(3)] for r in range(3)]
    eta, beta = 0.5, 0.8

    def run_round(strategy, weights, r):
        strategy.begin(r + 1, weights)
        for i, (u, n) in enumerate(updates[r]):
            strategy.add(f"s{i}", u, n)
        return strategy.result()

    expect = {k: v.astype(np.float64) for k, v in glob.items() if k != "bn.num_batches_tracked"}
    vel = {k: np.zeros_like(v) for k, v in expect.items()}
    for r in range(3):
        for k in expect:
            mean = sum(n * u[k].astype(np.float64) for u, n in updates[r]) / sum(n for _, n in updates[r])
            vel[k] = beta * vel[k] + (mean - expect[k])
            expect[k] = expect[k] + eta * vel[k]

    s1 = make_strategy("fedavgm", server_lr=eta, server_momentum=beta)
    assert isinstance(s1, FedAvgM)
    w = glob
    for r in range(2):
        w = run_round(s1, w, r)
    meta, tensors = s1.state()
    StateStore(tmp_path).save(
        Snapshot(
            round=2, federation="f", weights=w, model_config={}, strategy_meta=meta, strategy_tensors=tensors
        )
    )
    snap = StateStore(tmp_path).load(federation="f")
    s2 = make_strategy("fedavgm", server_lr=eta, server_momentum=beta)
    s2.load_state(snap.strategy_meta, snap.strategy_tensors)
    out = run_round(s2, snap.weights, 2)
    for k in expect:
        np.testing.assert_allclose(out[k], expect[k], rtol=1e-5, atol=1e-6)
    assert out["bn.num_batches_tracked"] == 7  # counters take the sites' mean, no momentum
    # the buffer matters: a restart that lost it lands elsewhere
    lost = run_round(make_strategy("fedavgm", server_lr=eta, server_momentum=beta), snap.weights, 2)
    assert not np.allclose(lost["a.weight"], expect["a.weight"], atol=1e-4)
    # the default is the momentum measured to work on the study's sites (0.9 diverged there)
    assert (make_strategy("fedavgm").eta, make_strategy("fedavgm").momentum) == (1.0, 0.5)
    # momentum 0 and lr 1 is FedAvg
    plain, avg = make_strategy("fedavgm", server_momentum=0.0), make_strategy("fedavg")
    for r in range(2):
        np.testing.assert_allclose(
            run_round(plain, glob, r)["a.weight"], run_round(avg, glob, r)["a.weight"], rtol=1e-6
        )
    with pytest.raises(CoordinatorError, match="in \\[0, 1\\)"):
        make_strategy("fedavgm", server_momentum=1.0)
    with pytest.raises(CoordinatorError, match="fedavgm's; fedprox has none"):
        make_strategy("fedprox", server_momentum=0.5)
