"""The round state machine over the in-memory hub: full runs, quorum, deadline, rejections, resume."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from neurofed.coordinator import payload as codec
from neurofed.coordinator.registration import Registrar
from neurofed.coordinator.state import StateStore
from neurofed.launch.local import read_events, wait_for
from neurofed.wire.api import MessageKind
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


def _finish(t, box, stop, timeout=60):
    return finish(t, box, stop, timeout)


def test_full_federation_is_fedavg_and_scored_at_the_end(tmp_path):
    hub = MemoryHub("testfed")
    stop = threading.Event()
    trainers = {
        s: ShiftTrainer(shift=i + 1.0, num_train_cases=n, dice=0.3 + 0.1 * i)
        for i, (s, n) in enumerate(zip(SITES, (2, 3, 5), strict=True))
    }
    reg = Registrar(StateStore(tmp_path / "coord"), {})
    coord = make_coordinator(hub, tmp_path / "coord", SITES, rounds=2, registrar=reg)
    agents = {s: start_agent(hub, s, trainers[s], tmp_path, stop)[0] for s in SITES}
    t, box = run_in_thread(coord)
    results = _finish(t, box, stop)
    reg.close()
    assert [r.round for r in results] == [1, 2, 3]
    assert [r.train for r in results] == [True, True, False]
    # each round: the weighted shift (1*2 + 2*3 + 3*5) / 10 = 2.3
    expected = initial_weights()["w"] + 2 * 2.3
    np.testing.assert_allclose(coord.weights["w"], expected, rtol=1e-5)
    assert int(coord.weights["n"][0]) == 0
    assert all(tr.trained == 2 for tr in trainers.values()), "each site trains each round exactly once"
    # the evaluation-only round scored the last model at every site
    assert set(results[-1].metrics) == set(SITES)
    assert results[0].cases == {"site-a": 2, "site-b": 3, "site-c": 5}
    # registration handed over for each training round, in order, exactly once
    assert [j.round for j in reg.done if j.kind == "register"] == [1, 2]
    assert StateStore(tmp_path / "coord").registered() == [1, 2]
    evals = [(j.round, round(j.data["dice"], 4)) for j in reg.done if j.kind == "evaluation"]
    assert evals == [(1, 0.4), (2, 0.4)]  # (0.3*2 + 0.4*2 + 0.5*2) / 6: 2 val cases each
    # audit: per round one UPDATE, then one METRICS (scored beside the upload) per site; the
    # final round only METRICS
    log = agents["site-b"].audit.entries()
    kinds = [(e["kind"], e["round"]) for e in log]
    assert kinds == [("update", 1), ("metrics", 1), ("update", 2), ("metrics", 2), ("metrics", 3)]
    # every site's score of every model reached the coordinator, those after a round closed too
    assert all(set(res.metrics) == set(SITES) for res in results)
    upd = log[0]
    assert upd["fields"]["num_cases"] == 3 and len(upd["sha256"]) == 64 and upd["bytes"] > 100
    # the coordinator logs the digest the wire verified, the same one the site's audit recorded
    logged = {
        (e["site"], e["round"]): e["sha256"]
        for e in read_events(tmp_path / "coord")
        if e["event"] == "update"
    }
    assert all(logged[("site-b", e["round"])] == e["sha256"] for e in log if e["kind"] == "update")
    assert (tmp_path / "site-b" / "status.json").is_file()


def test_deadline_with_quorum_closes_without_the_missing_site(tmp_path):
    hub = MemoryHub("testfed")
    stop = threading.Event()
    coord = make_coordinator(hub, tmp_path / "c", SITES, rounds=1, min_sites=2, timeout=1.5)
    for i, s in enumerate(SITES[:2]):
        start_agent(hub, s, ShiftTrainer(shift=float(i), num_train_cases=1), tmp_path, stop)
    t0 = time.time()
    results = _finish(*run_in_thread(coord), stop)
    assert results[0].sites == ["site-a", "site-b"]
    assert 1.0 < time.time() - t0 < 20


def test_below_quorum_the_deadline_is_extended(tmp_path):
    hub = MemoryHub("testfed")
    stop = threading.Event()
    coord = make_coordinator(hub, tmp_path / "c", SITES, rounds=1, min_sites=2, timeout=1.0, final_eval=False)
    start_agent(hub, "site-a", ShiftTrainer(shift=1.0, num_train_cases=1), tmp_path, stop)
    t, box = run_in_thread(coord)
    time.sleep(2.5)
    assert t.is_alive(), "one site is below quorum: the round must wait"
    start_agent(hub, "site-b", ShiftTrainer(shift=1.0, num_train_cases=1), tmp_path, stop)
    results = _finish(t, box, stop)
    assert results[0].sites == ["site-a", "site-b"] and results[0].extensions >= 1


def _wait_task(ep, round, timeout=10.0):
    end = time.time() + timeout
    task = model = None
    while time.time() < end and (task is None or model is None):
        msg = ep.receive(timeout=0.2)
        if msg is None:
            continue
        if msg.kind is MessageKind.TASK and msg.round == round:
            task = msg
        if msg.kind is MessageKind.MODEL and msg.round == round:
            model = msg
    assert task is not None and model is not None
    return task, model


def _round_one(tmp_path, **kw):
    """A coordinator in round 1 over the hub, with raw endpoints for every site: (coordinator,
    endpoints, thread, result box, TASK, global weights, a valid UPDATE meta)."""
    hub = MemoryHub("testfed")
    coord = make_coordinator(hub, tmp_path / "c", SITES, final_eval=False, **kw)
    eps = {s: hub.endpoint(s) for s in SITES}
    for ep in eps.values():
        ep.start()
        ep.set_run(coord.run_id)  # as a site agent does on taking the run's task
    t, box = run_in_thread(coord)
    task, model = _wait_task(eps["site-a"], 1)
    meta = {"num_cases": 1, "model_digest": task.meta["model_digest"]}
    return coord, eps, t, box, task, codec.decode(model.payload), meta


def test_bad_updates_are_rejected_with_reasons_and_not_counted(tmp_path):
    coord, eps, t, box, task, w, _ = _round_one(tmp_path, rounds=1, min_sites=2, timeout=3.0)
    digest = task.meta["model_digest"]
    good = codec.encode({k: v + 1 if v.dtype == np.float32 else v for k, v in w.items()})
    nan = dict(w, w=np.full_like(w["w"], np.nan))
    wrong_shape = dict(w, w=np.zeros((3, 4), dtype=np.float32))
    wrong_dtype = dict(w, b=w["b"].astype(np.float64))
    meta = {"num_cases": 2, "model_digest": digest}
    a, b, c = eps["site-a"], eps["site-b"], eps["site-c"]
    c.send(MessageKind.UPDATE, 1, meta=meta, payload=codec.encode(nan))
    c.send(MessageKind.UPDATE, 1, meta=meta, payload=codec.encode(wrong_shape))
    c.send(MessageKind.UPDATE, 1, meta=meta, payload=codec.encode(wrong_dtype))
    c.send(MessageKind.UPDATE, 1, meta={"num_cases": 0, "model_digest": digest}, payload=good)
    c.send(MessageKind.UPDATE, 1, meta={"num_cases": 2, "model_digest": "0" * 64}, payload=good)
    c.send(MessageKind.UPDATE, 1, meta=meta, payload=b"not safetensors")
    adam = {"optimizer/step": np.ones(1, np.float32)}  # Adam state where nobody averages it
    c.send(MessageKind.UPDATE, 1, meta=meta, payload=codec.encode(w | adam))
    c.send(MessageKind.UPDATE, 0, meta=meta, payload=good)  # an old round
    a.send(MessageKind.UPDATE, 1, meta=meta, payload=good)
    a.send(MessageKind.UPDATE, 1, meta=meta, payload=good)  # duplicate
    b.send(MessageKind.UPDATE, 1, meta=meta, payload=good)
    t.join(30)
    assert not t.is_alive()
    res = box["results"][0]
    assert res.sites == ["site-a", "site-b"], "rejected updates never count toward quorum"
    reasons = sorted(r for _, r in res.rejected)
    assert reasons == sorted(
        [
            "non-finite",
            "shape-mismatch",
            "dtype-mismatch",
            "bad-num-cases",
            "stale-model",
            "undecodable",
            "unexpected-tensors",
            "old-round",
            "duplicate",
        ]
    )
    np.testing.assert_allclose(coord.weights["w"], w["w"] + 1, rtol=1e-6)
    # the rejections are in the events file too, with the site
    events = (tmp_path / "c" / "events.jsonl").read_text()
    assert '"reason": "non-finite"' in events and '"site": "site-c"' in events


def test_late_update_after_the_deadline_is_rejected(tmp_path):
    coord, eps, t, box, task, w, meta = _round_one(tmp_path, rounds=2, min_sites=2, timeout=1.0)
    good = codec.encode(w)
    eps["site-a"].send(MessageKind.UPDATE, 1, meta=meta, payload=good)
    eps["site-b"].send(MessageKind.UPDATE, 1, meta=meta, payload=good)
    task2, model2 = _wait_task(eps["site-a"], 2)  # round 1 closed at its deadline
    eps["site-c"].send(MessageKind.UPDATE, 1, meta=meta, payload=good)  # after the deadline
    meta2 = {"num_cases": 1, "model_digest": task2.meta["model_digest"]}
    for s in ("site-a", "site-b"):
        eps[s].send(MessageKind.UPDATE, 2, meta=meta2, payload=model2.payload)
    t.join(30)
    assert not t.is_alive()
    r1, r2 = box["results"]
    assert r1.sites == ["site-a", "site-b"]
    assert ("site-c", "late") in r2.rejected
    assert r2.sites == ["site-a", "site-b"]


def test_restart_resumes_from_the_last_persisted_round(tmp_path):
    hub = MemoryHub("testfed")
    stop = threading.Event()
    state = tmp_path / "c"
    coord = make_coordinator(hub, state, SITES[:2], rounds=1, final_eval=False)
    trainers = [ShiftTrainer(shift=1.0, num_train_cases=1), ShiftTrainer(shift=3.0, num_train_cases=1)]
    for s, tr in zip(SITES[:2], trainers, strict=True):
        start_agent(hub, s, tr, tmp_path, stop)
    _finish(*run_in_thread(coord), stop=threading.Event())
    snap = StateStore(state).load(federation="testfed")
    assert snap.round == 1
    np.testing.assert_allclose(snap.weights["w"], initial_weights()["w"] + 2.0, rtol=1e-6)
    # a new coordinator process for 2 rounds picks up at round 2 from the snapshot's weights
    # New agents (the first ones left at "done") start first and find that retained "done": they
    # wait for the next task instead of leaving (they took no part in the run that ended).
    agents = [
        start_agent(hub, s, tr, tmp_path / "again", stop)[0]
        for s, tr in zip(SITES[:2], trainers, strict=True)
    ]
    wait_for(lambda: all("note" in a._status for a in agents), 10, "the agents to see the old end")
    coord2 = make_coordinator(hub, state, SITES[:2], rounds=2, final_eval=False)
    t, box = run_in_thread(coord2)
    results = _finish(t, box, stop)
    assert [r.round for r in results] == [2]
    np.testing.assert_allclose(coord2.weights["w"], initial_weights()["w"] + 4.0, rtol=1e-6)
    assert all(tr.trained == 2 for tr in trainers)


def test_snapshot_refuses_another_federation(tmp_path):
    from neurofed.coordinator.errors import StateError
    from neurofed.coordinator.state import Snapshot

    store = StateStore(tmp_path)
    store.save(Snapshot(round=1, federation="a", weights=initial_weights(), model_config={}))
    with pytest.raises(StateError, match="federation"):
        store.load(federation="b")
    (tmp_path / "snapshot.safetensors").write_bytes(b"garbage")
    with pytest.raises(StateError, match="corrupt"):
        store.load()


class _RecordingTracker:
    """Stands in for mlflow_server.tracking.FederationTracker (tested in tests/mlflow_server and
    against a real server in tests/test_federation_failures.py); records what it was asked."""

    def __init__(self):
        self.calls = []

    def register_round(self, round, weights_path, model_config, *, sites, cases, tags=None):
        assert weights_path.is_file()
        self.calls.append(("register", round))
        return str(round)

    def log_round(self, round, metrics, step=None):
        self.calls.append(("log", round))

    def record_evaluation(self, round, dice, per_site):
        self.calls.append(("evaluation", round))

    def close(self):
        self.calls.append(("close", None))


def test_no_validation_case_at_any_site_queues_no_evaluation_the_registry_must_refuse(tmp_path, caplog):
    """Sites of fewer than four cases keep none for validation and report no Dice. The registry
    takes only a finite one: the evaluation job failed three times a round (and was queued again
    after every restart); now it is not queued, and the site and the coordinator say why."""
    caplog.set_level("WARNING")
    hub = MemoryHub("testfed")
    stop = threading.Event()
    state = tmp_path / "c"
    tracker = _RecordingTracker()
    reg = Registrar(StateStore(state), {}, lambda: tracker)
    coord = make_coordinator(hub, state, SITES[:2], rounds=1, registrar=reg)
    for s in SITES[:2]:
        start_agent(hub, s, ShiftTrainer(shift=1.0, num_train_cases=1, val_cases=0), tmp_path, stop)
    _finish(*run_in_thread(coord), stop)
    reg.close()
    assert ("register", 1) in tracker.calls
    assert [c for c in tracker.calls if c[0] == "evaluation"] == [] and not reg.failed
    assert "no site reported a Dice of model 1" in caplog.text
    assert "no validation cases in this site's split" in caplog.text


def test_resume_hands_over_registrations_and_evaluations_a_crash_lost(tmp_path):
    hub = MemoryHub("testfed")
    stop = threading.Event()
    state = tmp_path / "c"
    coord = make_coordinator(hub, state, SITES[:2], rounds=2)
    for s in SITES[:2]:
        start_agent(hub, s, ShiftTrainer(shift=1.0, num_train_cases=1), tmp_path, stop)
    _finish(*run_in_thread(coord), stop)  # no registrar: as if every hand-over was lost in a crash
    store = StateStore(state)
    assert store.registered() == [] and store.evaluated() == []
    tracker = _RecordingTracker()
    reg = Registrar(store, {}, lambda: tracker)
    coord2 = make_coordinator(hub, state, SITES[:2], rounds=2, registrar=reg)
    assert coord2.run() == []  # finished already: nothing to run again
    reg.close()
    assert [c for c in tracker.calls if c[0] in ("register", "evaluation")] == [
        ("register", 1),
        ("register", 2),
        ("evaluation", 1),
        ("evaluation", 2),
    ]
    assert store.registered() == [1, 2] and store.evaluated() == [1, 2]
    # a third start hands over nothing: the ledger says it is done
    tracker3 = _RecordingTracker()
    reg3 = Registrar(store, {}, lambda: tracker3)
    make_coordinator(hub, state, SITES[:2], rounds=2, registrar=reg3).run()
    reg3.close()
    assert [c for c in tracker3.calls if c[0] in ("register", "evaluation")] == []


def test_a_site_known_offline_is_not_waited_for(tmp_path):
    hub = MemoryHub("testfed")
    stop = threading.Event()
    coord = make_coordinator(hub, tmp_path / "c", SITES, rounds=1, min_sites=2, timeout=60, final_eval=False)
    gone = hub.endpoint("site-c")
    gone.start()
    gone.send(MessageKind.STATUS, 0, meta={"status": "offline", "reason": "lost"})  # as its MQTT will would
    for s in SITES[:2]:
        start_agent(hub, s, ShiftTrainer(shift=1.0, num_train_cases=1), tmp_path, stop)
    t0 = time.time()
    results = _finish(*run_in_thread(coord), stop)
    assert results[0].sites == ["site-a", "site-b"]
    assert time.time() - t0 < 30, "the round closed early instead of waiting for the 60 s deadline"


@pytest.mark.parametrize("choice", ["reset", "continue-local"])
def test_site_optimizer_choice_reaches_every_sites_trainer(tmp_path, choice):
    hub = MemoryHub("testfed")
    stop = threading.Event()
    trainers = {s: ShiftTrainer(shift=1.0, num_train_cases=2) for s in SITES}
    coord = make_coordinator(hub, tmp_path / "coord", SITES, rounds=1, site_optimizer=choice)
    for s in SITES:
        start_agent(hub, s, trainers[s], tmp_path, stop)
    t, box = run_in_thread(coord)
    _finish(t, box, stop)
    assert all(tr.last_keep_optimizer == (choice == "continue-local") for tr in trainers.values())


def test_unknown_site_optimizer_is_refused_with_the_choices(tmp_path):
    from neurofed.coordinator.errors import CoordinatorError

    with pytest.raises(CoordinatorError, match="reset, continue-local"):
        make_coordinator(MemoryHub("x"), tmp_path, SITES, site_optimizer="global")


def test_cosine_lr_schedule_reaches_every_site_round_by_round(tmp_path):
    from neurofed.coordinator.errors import CoordinatorError
    from neurofed.coordinator.rounds import lr_scale

    assert lr_scale("constant", 3, 4) == 1.0
    assert [round(lr_scale("cosine", r, 4), 4) for r in (1, 2, 3, 4)] == [1.0, 0.8536, 0.5, 0.1464]
    with pytest.raises(CoordinatorError, match="constant, cosine"):
        make_coordinator(MemoryHub("x"), tmp_path / "bad", SITES, lr_schedule="step")

    hub = MemoryHub("testfed")
    stop = threading.Event()
    trainers = {s: ShiftTrainer(shift=1.0, num_train_cases=2) for s in SITES}
    coord = make_coordinator(hub, tmp_path / "coord", SITES, rounds=4, lr_schedule="cosine")
    for s in SITES:
        start_agent(hub, s, trainers[s], tmp_path, stop)
    _finish(*run_in_thread(coord), stop)
    expected = [pytest.approx(lr_scale("cosine", r, 4)) for r in (1, 2, 3, 4)]
    assert all(tr.lr_scales == expected for tr in trainers.values())


def test_fp16_sends_changes_that_land_on_the_fp32_weights(tmp_path):
    """--fp16: the model goes out in half precision and each site sends its change in half
    precision; the coordinator adds the weighted change to its own fp32 weights, so after two
    rounds the global model is off by the change's rounding (~1e-6), not the weights' (~1e-3)."""
    hub = MemoryHub("testfed")
    stop = threading.Event()
    shifts = {"site-a": 1e-3, "site-b": 2e-3, "site-c": 4e-3}
    cases = {"site-a": 1, "site-b": 1, "site-c": 2}
    trainers = {s: ShiftTrainer(shift=shifts[s], num_train_cases=cases[s]) for s in SITES}
    coord = make_coordinator(hub, tmp_path / "coord", SITES, rounds=2, fp16=True, final_eval=False)
    agents = {s: start_agent(hub, s, trainers[s], tmp_path, stop)[0] for s in SITES}
    t, box = run_in_thread(coord)
    _finish(t, box, stop)
    w0 = initial_weights()["w"]
    expected = w0 + 2 * (1e-3 + 2e-3 + 2 * 4e-3) / 4
    assert coord.weights["w"].dtype == np.float32
    err = np.abs(coord.weights["w"] - expected).max()
    assert err < 5e-6, err
    # what sending the weights themselves in fp16 would have cost: far above that
    half_err = np.abs(expected.astype(np.float16).astype(np.float32) - expected).max()
    assert half_err > 20 * err, (half_err, err)
    # half the bytes of an fp32 update on the wire, and the site says what it sent
    upd = [e for e in agents["site-b"].audit.entries() if e["kind"] == "update"]
    assert upd and all(e["fields"].get("encoding") == "fp16-delta" for e in upd), upd


def test_update_encodings_are_checked(tmp_path):
    coord, eps, t, box, task, w, meta = _round_one(tmp_path, rounds=1, min_sites=1, timeout=2.0)
    half = {k: np.full_like(v, 0.5) if v.dtype == np.float32 else v for k, v in w.items()}
    nan = dict(half, w=np.full_like(w["w"], np.nan))
    eps["site-c"].send(MessageKind.UPDATE, 1, meta=meta | {"encoding": "zstd"}, payload=codec.encode(w))
    eps["site-b"].send(
        MessageKind.UPDATE, 1, meta=meta | {"encoding": "fp16-delta"}, payload=codec.encode(nan, fp16=True)
    )
    eps["site-a"].send(
        MessageKind.UPDATE, 1, meta=meta | {"encoding": "fp16-delta"}, payload=codec.encode(half, fp16=True)
    )
    t.join(30)
    assert not t.is_alive()
    res = box["results"][0]
    assert res.sites == ["site-a"]
    assert sorted(res.rejected) == [("site-b", "non-finite"), ("site-c", "bad-encoding")]
    np.testing.assert_allclose(coord.weights["w"], w["w"] + 0.5, rtol=1e-6)
    np.testing.assert_array_equal(coord.weights["n"], w["n"])  # counters are not deltas


def test_continue_global_averages_the_sites_adam_state_and_sends_it_with_the_model(tmp_path):
    """continue-global: each site's Adam state rides with its update, the coordinator averages it
    by cases like the weights, persists it beside them (not in the registered model) and sends it
    with the next model, where every site's trainer starts from it."""
    hub = MemoryHub("testfed")
    stop = threading.Event()
    cases = {"site-a": 1, "site-b": 1, "site-c": 2}
    trainers = {s: ShiftTrainer(shift=float(i + 1), num_train_cases=cases[s]) for i, s in enumerate(SITES)}
    coord = make_coordinator(
        hub, tmp_path / "coord", SITES, rounds=2, site_optimizer="continue-global", final_eval=False
    )
    for s in SITES:
        start_agent(hub, s, trainers[s], tmp_path, stop)
    t, box = run_in_thread(coord)
    _finish(t, box, stop)
    mean_shift = (1 * 1 + 2 * 1 + 3 * 2) / 4  # 2.25
    for tr in trainers.values():
        first, second = tr.optimizer_states_in
        assert first is None, "round 1: a fresh Adam everywhere"
        np.testing.assert_allclose(second["optimizer/exp_avg/w"].numpy(), mean_shift)
        np.testing.assert_allclose(second["optimizer/step"].numpy(), [10.0])
    snap = StateStore(tmp_path / "coord").load()
    np.testing.assert_allclose(snap.site_optimizer["optimizer/exp_avg_sq/b"], mean_shift)
    np.testing.assert_allclose(snap.site_optimizer["optimizer/step"], [20.0])
    assert not [k for k in snap.weights if k.startswith("optimizer/")], "the model stays weights only"
    from safetensors.numpy import load_file

    assert set(load_file(StateStore(tmp_path / "coord").round_weights_path(2))) == set(initial_weights())


def test_continue_global_checks_the_optimizer_state(tmp_path):
    coord, eps, t, box, task, w, meta = _round_one(
        tmp_path, rounds=1, min_sites=1, timeout=2.0, site_optimizer="continue-global"
    )
    assert task.meta["site_optimizer"] == "continue-global"
    from neurofed.wire.payload import OPTIMIZER_STEP, optimizer_names

    opt = {
        n: np.ones(1, np.float32) if n == OPTIMIZER_STEP else np.ones_like(w[n.split("/", 2)[2]])
        for n in optimizer_names(w)
    }
    negative = dict(opt, **{"optimizer/exp_avg_sq/w": -np.ones_like(w["w"])})
    eps["site-c"].send(MessageKind.UPDATE, 1, meta=meta, payload=codec.encode(w))  # no Adam state
    eps["site-b"].send(MessageKind.UPDATE, 1, meta=meta, payload=codec.encode(w | negative))
    eps["site-a"].send(MessageKind.UPDATE, 1, meta=meta, payload=codec.encode(w | opt))
    t.join(30)
    assert not t.is_alive()
    res = box["results"][0]
    assert res.sites == ["site-a"]
    assert sorted(res.rejected) == [("site-b", "bad-optimizer-state"), ("site-c", "missing-optimizer-state")]
    np.testing.assert_allclose(coord.site_optimizer["optimizer/exp_avg/w"], 1.0)


def test_optimizer_state_is_refused_where_the_federation_does_not_average_it(tmp_path):
    from neurofed.coordinator.errors import CoordinatorError

    with pytest.raises(CoordinatorError, match="underflow in half precision"):
        make_coordinator(MemoryHub("f"), tmp_path / "c", SITES, site_optimizer="continue-global", fp16=True)


def test_fractional_local_epochs_reach_every_sites_trainer(tmp_path):
    hub = MemoryHub("testfed")
    stop = threading.Event()
    trainers = {s: ShiftTrainer(shift=1.0, num_train_cases=1) for s in SITES}
    coord = make_coordinator(hub, tmp_path / "coord", SITES, rounds=1, local_epochs=0.5, final_eval=False)
    for s in SITES:
        start_agent(hub, s, trainers[s], tmp_path, stop)
    t, box = run_in_thread(coord)
    _finish(t, box, stop)
    assert {tr.last_epochs for tr in trainers.values()} == {0.5}


def _metrics(dice, evaluated):
    return {"dice": dice, "hd95": 2.0, "num_cases": 1, "evaluated_round": evaluated}


def _wait_receipts(ep, round, pred, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        msg = ep.receive(timeout=0.2)
        if msg is not None and msg.kind is MessageKind.RECEIPTS and msg.round == round and pred(msg.meta):
            return msg.meta
    raise AssertionError(f"no RECEIPTS {round} as expected")


def test_scores_sent_after_a_round_closed_are_kept_forwarded_and_survive_a_restart(tmp_path):
    """Sites send their update first and their score of the round's model after: a training round
    closes on updates, and the scores still on their way are taken during the next round,
    persisted with the snapshot, named in the receipts, and forwarded to the tracker."""
    import shutil

    tracker = _RecordingTracker()
    reg = Registrar(StateStore(tmp_path / "c"), {}, lambda: tracker)
    coord, eps, t, box, task, w, meta = _round_one(tmp_path, rounds=2, min_sites=3, timeout=20, registrar=reg)
    a, b, c = eps["site-a"], eps["site-b"], eps["site-c"]
    a.send(MessageKind.METRICS, 1, meta=_metrics(0.2, 0))  # before its update: held at the close
    for ep in eps.values():
        ep.send(MessageKind.UPDATE, 1, meta=meta, payload=codec.encode(w))
    task2, model2 = _wait_task(c, 2)  # round 1 closed on the three updates
    # the snapshot of round 1 holds the score that had arrived, to be completed
    snap = StateStore(tmp_path / "c").load(federation="testfed")
    assert snap.extra["evaluating"]["round"] == 1 and list(snap.extra["evaluating"]["metrics"]) == ["site-a"]
    saved = tmp_path / "crashed"  # the state as a coordinator killed now would leave it
    # (not the registration worker's temporary files, which come and go meanwhile)
    shutil.copytree(tmp_path / "c", saved, ignore=shutil.ignore_patterns("*.tmp"))
    # round 2's receipts say whose round-1 scores the coordinator still lacks
    got = _wait_receipts(c, 2, lambda m: "evaluated" in m)
    assert got["evaluated"] == {"round": 1, "sites": ["site-a"]}
    b.send(MessageKind.METRICS, 1, meta=_metrics(0.4, 0))  # after round 1 closed: kept
    b.send(MessageKind.METRICS, 1, meta=_metrics(0.4, 0))  # twice: a duplicate
    c.send(MessageKind.METRICS, 0, meta=_metrics(0.4, -1))  # two rounds back: refused
    meta2 = {"num_cases": 1, "model_digest": task2.meta["model_digest"]}
    for ep in eps.values():
        ep.send(MessageKind.UPDATE, 2, meta=meta2, payload=model2.payload)
    for i, ep in enumerate(eps.values()):  # after the last round closed: still waited for
        ep.send(MessageKind.METRICS, 2, meta=_metrics(0.5 + 0.1 * i, 1))
    t.join(30)
    assert not t.is_alive() and "error" not in box, box.get("error")
    reg.close()
    r1, r2 = box["results"]
    assert sorted(r1.metrics) == ["site-a", "site-b"] and sorted(r2.metrics) == list(SITES)
    assert ("site-b", "duplicate") in r2.rejected and ("site-c", "old-round") in r2.rejected
    evals = {e["round"]: e for e in read_events(tmp_path / "c") if e["event"] == "evaluation"}
    assert sorted(evals) == [0, 1]
    assert evals[0]["per_site"] == {"site-a": 0.2, "site-b": 0.4}
    assert evals[1]["dice"] == pytest.approx(0.6)
    assert ("evaluation", 1) in tracker.calls  # model 1's score, recorded on its version
    assert "evaluating" not in StateStore(tmp_path / "c").load(federation="testfed").extra

    # a coordinator restarted from the state saved above still waits for those scores
    hub = MemoryHub("testfed")
    coord2 = make_coordinator(hub, saved, SITES, rounds=2, final_eval=False, timeout=20)
    eps2 = {s: hub.endpoint(s) for s in SITES}
    for ep in eps2.values():
        ep.start()
        ep.set_run(coord2.run_id)  # the restarted coordinator keeps its state's run
    t2, box2 = run_in_thread(coord2)
    task2b, model2b = _wait_task(eps2["site-c"], 2)
    got = _wait_receipts(eps2["site-c"], 2, lambda m: "evaluated" in m)
    assert got["evaluated"] == {"round": 1, "sites": ["site-a"]}
    eps2["site-c"].send(MessageKind.METRICS, 1, meta=_metrics(0.3, 0))
    meta2 = {"num_cases": 1, "model_digest": task2b.meta["model_digest"]}
    for ep in eps2.values():
        ep.send(MessageKind.UPDATE, 2, meta=meta2, payload=model2b.payload)
        ep.send(MessageKind.METRICS, 2, meta=_metrics(0.5, 1))
    t2.join(30)
    assert not t2.is_alive() and "error" not in box2, box2.get("error")
    evals = [e for e in read_events(saved) if e["event"] == "evaluation" and e["round"] == 0]
    assert evals[-1]["per_site"] == {"site-a": 0.2, "site-c": 0.3}


def test_sites_whose_privacy_budget_is_spent_leave_and_training_ends(tmp_path):
    """DP through the round machine: every site plans and charges its DP-SGD steps, reports epsilon
    with its update (the round's dp summary and MLflow metrics take the largest); a budget that
    pays for one round only makes each site leave in round 2 with a STATUS, and the coordinator,
    left with no site, ends training instead of waiting for ever."""
    from neurofed.edge_node.privacy import epsilon
    from neurofed.models.privacy import DPConfig

    # 4 cases, batch 2: sampling rate 0.5, 2 steps a round; the budget fits 2 steps, not 4
    budget = (epsilon([(1.0, 0.5, 2)], 1e-5) + epsilon([(1.0, 0.5, 4)], 1e-5)) / 2
    dp = DPConfig(noise_multiplier=1.0, target_epsilon=budget, rounds=3).to_task()
    hub = MemoryHub("testfed")
    stop = threading.Event()
    trainers = {s: ShiftTrainer(shift=1.0, num_train_cases=4) for s in SITES[:2]}
    coord = make_coordinator(hub, tmp_path / "c", SITES[:2], rounds=3, timeout=60, dp=dp)
    for s, tr in trainers.items():
        start_agent(hub, s, tr, tmp_path, stop)
    t0 = time.time()
    results = _finish(*run_in_thread(coord), stop)
    assert time.time() - t0 < 30
    # round 2 closes with nobody left (no update, the model kept); round 3 never opens
    assert [(r.round, r.aggregated) for r in results if r.train] == [(1, True), (2, False)]
    assert set(results[0].dp) == {"site-a", "site-b"}
    assert all(tr.trained == 1 and tr.dp_steps[0].steps == 2 for tr in trainers.values())
    assert sorted(coord.retired) == ["site-a", "site-b"]
    info = coord._extra_state["rounds"]["1"]["dp"]
    assert info["epsilon"] == pytest.approx(epsilon([(1.0, 0.5, 2)], 1e-5), rel=1e-6)
    assert info["noise_multiplier"] == 1.0 and info["unit"] == "patient"
    assert coord._tags(1)["dp.epsilon"] == str(info["epsilon"])
    metrics = coord._privacy_metrics(results[0])
    assert metrics["dp_epsilon"] == info["epsilon"] and "dp_epsilon/site-a" in metrics
    events = [json.loads(x) for x in (tmp_path / "c" / "events.jsonl").read_text().splitlines()]
    assert {e["site"] for e in events if e["event"] == "left"} == {"site-a", "site-b"}
    assert [e for e in events if e["event"] == "training-ended"]
    # each site's ledger holds the one round it trained, and says the budget is spent
    for s in trainers:
        state = json.loads((tmp_path / s / "agent.json").read_text())
        assert state["dp"]["history"] == [[1.0, 0.5, 2]] and state["dp"]["spent"] is True
