"""Secure aggregation through the round state machine and the site agent, over the in-memory hub
(the wire itself is tested on a real broker in tests/test_secure_federation.py): the unmasked sum
equals plaintext FedAvg within the quantization bound, dropouts at each phase, retries with fresh
keys, refusals at start, and an attacker holding everything the coordinator holds."""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from neurofed.coordinator.errors import CoordinatorError
from neurofed.coordinator.rounds import Coordinator, RoundConfig
from neurofed.coordinator.secure import SecureSettings, refuse_unsound
from neurofed.coordinator.state import StateStore
from neurofed.coordinator.strategies import make_strategy
from neurofed.edge_node.agent import WORK_NICE, SiteAgent
from neurofed.launch.local import read_events
from neurofed.wire.api import COORDINATOR, MessageKind
from neurofed.wire.memory import MemoryEndpoint, MemoryHub
from neurofed.wire.payload import decode_state
from tests.coordinator.helpers import MODEL_CONFIG, ShiftTrainer, initial_weights

SITES = ("site-a", "site-b", "site-c", "site-d")
STEPS = {"site-a": 2, "site-b": 3, "site-c": 5, "site-d": 7}


class StepTrainer(ShiftTrainer):
    """ShiftTrainer that also says how many optimiser steps it took (FedNova needs them)."""

    def train(self, state_dict, epochs, **kw):
        out = super().train(state_dict, epochs, **kw)
        out.steps = self.steps
        return out


SHIFTS = {"site-a": 0.1, "site-b": 0.2, "site-c": -0.3, "site-d": 0.5}
CASES = {"site-a": 1, "site-b": 2, "site-c": 3, "site-d": 4}
SIX = (*SITES, "site-e", "site-f")
ALL_SHIFTS = SHIFTS | {"site-e": -0.2, "site-f": 0.4}
ALL_CASES = CASES | {"site-e": 2, "site-f": 5}
ALL_STEPS = STEPS | {"site-e": 4, "site-f": 6}


class DroppingEndpoint(MemoryEndpoint):
    """A site that dies right after it sent ``after`` (a message kind or a SECAGG step)."""

    def __init__(self, hub: MemoryHub, participant: str, after: str) -> None:
        super().__init__(hub, participant)
        self.after, self.dead = after, False

    def revive(self) -> None:
        """The site is back (same process, same state): it gets the retained TASK again."""
        self.dead = False
        self.hub._register(self)

    def send(self, kind, round, **kw):  # noqa: A002 - the Endpoint signature
        if self.dead:
            return "dropped"
        out = super().send(kind, round, **kw)
        step = (kw.get("meta") or {}).get("step")
        if str(kind) == self.after or step == self.after:
            self.dead = True
            self.hub._unregister(self)
        return out


def _federation(
    tmp_path: Path,
    *,
    drop: dict[str, str] | None = None,
    strategy="fedavg",
    rounds=1,
    dp_client=None,
    sites=SITES,
    endpoints: dict | None = None,
    trainer_cls=None,
    endpoint_cls=None,
    registrar=None,
    **settings,
):
    hub = MemoryHub("testfed")
    keys = {s: Ed25519PrivateKey.generate() for s in sites}
    roster = {s: k.public_key() for s, k in keys.items()}
    ep = hub.endpoint(COORDINATOR)
    ep.start()
    cfg = RoundConfig(
        rounds=rounds,
        expected_sites=sites,
        min_sites=3,
        round_timeout=settings.pop("round_timeout", 20.0),
        receipt_interval=0.5,
        final_eval=False,
        dp_client=dp_client,
        secure=SecureSettings(phase_timeout=settings.pop("phase_timeout", 5.0), **settings),
    )
    coord = Coordinator(
        ep,
        make_strategy(strategy),
        StateStore(tmp_path / "coordinator"),
        cfg,
        model_config=MODEL_CONFIG,
        initial_weights=initial_weights,
        roster_keys=roster,
        registrar=registrar,
    )
    stop = threading.Event()
    agents = {}
    for s in sites:
        if drop and s in drop:
            sep = DroppingEndpoint(hub, s, drop[s])
        elif endpoint_cls is not None:
            sep = endpoint_cls(hub, s)
        else:
            sep = hub.endpoint(s)
        sep.start()
        if endpoints is not None:
            endpoints[s] = sep
        trainer = (trainer_cls or StepTrainer)(shift=ALL_SHIFTS[s], num_train_cases=ALL_CASES[s])
        trainer.steps, trainer.site = ALL_STEPS[s], s
        agent = SiteAgent(sep, trainer, tmp_path / s, secure_identity=(keys[s], roster))
        threading.Thread(target=agent.run, kwargs={"stop": stop}, daemon=True, name=s).start()
        agents[s] = agent
    return hub, coord, stop


def _run(coord: Coordinator, stop: threading.Event, timeout: float = 60.0):
    box: dict = {}

    def target() -> None:
        try:
            box["results"] = coord.run()
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    stop.set()
    assert not t.is_alive(), "the secure federation did not finish"
    if "error" in box:
        raise box["error"]
    return box["results"]


def _fedavg(sites) -> dict[str, np.ndarray]:
    w0 = initial_weights()
    n = sum(ALL_CASES[s] for s in sites)
    mean_shift = sum(ALL_CASES[s] * ALL_SHIFTS[s] for s in sites) / n
    return {k: (v + mean_shift if v.dtype.kind == "f" else v) for k, v in w0.items()}


def _assert_close(coord: Coordinator, expected: dict[str, np.ndarray], bound: float) -> None:
    for k, v in expected.items():
        got = coord.weights[k]
        assert got.dtype == v.dtype and got.shape == v.shape
        np.testing.assert_allclose(got.astype(np.float64), v.astype(np.float64), atol=bound + 1e-6, rtol=0)


def test_the_unmasked_sum_is_plaintext_fedavg_within_the_quantization_bound(tmp_path):
    hub, coord, stop = _federation(tmp_path)
    [res] = _run(coord, stop)
    assert res.aggregated and res.sites == sorted(SITES)
    sec = coord._secure
    bound = sec.attempt.config.error_bound
    assert 0 < bound < 1e-4
    _assert_close(coord, _fedavg(SITES), bound)
    assert not [m for m in hub.sent if m.kind is MessageKind.UPDATE and m.meta.get("encoding") != "secagg"]


def test_answers_that_come_after_the_sum_is_unmasked_are_not_rejections(tmp_path):
    """6 sites (k=5, t=4): the sum is unmasked as soon as the reveals held remove every mask, and
    the slower survivors' reveals follow. They are expected, not faults: no round counts them as
    rejected (an operator read "rejected" in every secure round's summary)."""
    hub, coord, stop = _federation(tmp_path, sites=SIX, rounds=5)
    results = _run(coord, stop)
    assert [r.aggregated for r in results] == [True] * 5
    reveals = [m for m in hub.sent if m.kind is MessageKind.SECAGG and m.meta.get("step") == "reveal"]
    assert len(reveals) == 5 * len(SIX), "every survivor revealed, some after the unmasking"
    assert [r.rejected for r in results] == [[]] * 5


def test_sites_answer_the_protocol_while_they_train_and_score(tmp_path):
    """Training and scoring run beside the relays, so the protocol's round trips hide behind the
    work: three sites start training before the fourth's key set is in, and the round's sum is
    unmasked while every site is still scoring the model (a site that trained or scored on the
    thread that answers the relays would hold both up, here for the gates' 10 s)."""
    training = {s: threading.Event() for s in SITES}
    unmasked = threading.Event()
    seen: dict[str, bool] = {}

    nice: dict[str, int] = {}

    def own_nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    class GatedTrainer(StepTrainer):
        def train(self, state_dict, epochs, **kw):
            nice[self.site] = own_nice()
            training[self.site].set()
            return super().train(state_dict, epochs, **kw)

        def evaluate(self, state_dict, split="val"):
            seen[self.site] = unmasked.wait(10.0)
            return super().evaluate(state_dict, split)

    class LateKeys(MemoryEndpoint):
        """site-d's key set goes once the other three train."""

        def send(self, kind, round, **kw):  # noqa: A002 - the Endpoint signature
            if self.participant == "site-d" and (kw.get("meta") or {}).get("step") == "keyset":
                seen["others trained first"] = all(training[s].wait(10.0) for s in SITES[:3])
            return super().send(kind, round, **kw)

    hub, coord, stop = _federation(tmp_path, trainer_cls=GatedTrainer, endpoint_cls=LateKeys)

    def watch() -> None:
        while not stop.is_set() and not unmasked.is_set():
            if coord._secure is not None and coord._secure.result is not None:
                unmasked.set()
            stop.wait(0.01)

    threading.Thread(target=watch, daemon=True).start()
    [res] = _run(coord, stop)
    assert res.aggregated and res.sites == sorted(SITES)
    assert seen == {"others trained first": True, **dict.fromkeys(SITES, True)}
    # the work runs below the priority of the thread that answers the protocol
    assert nice == dict.fromkeys(SITES, own_nice() + WORK_NICE)
    _assert_close(coord, _fedavg(SITES), coord._secure.attempt.config.error_bound)


def test_a_retry_announced_while_sites_train_gets_their_fresh_key_sets_at_once(tmp_path):
    """Two sites die after their key sets, so the shares phase fails and the coordinator retries
    with fresh keys while the other two still train: they take up the new attempt and send its
    key set before their training ends (a site that trained on the thread that answers the
    coordinator would read the retry only afterwards, and on a slow site miss its keys phase)."""
    keyed = {s: threading.Event() for s in SITES[:2]}
    seen: dict[str, bool] = {}

    class SlowTrainer(StepTrainer):
        def train(self, state_dict, epochs, **kw):
            if self.site in keyed:
                seen[self.site] = keyed[self.site].wait(10.0)
            return super().train(state_dict, epochs, **kw)

    class Keys(MemoryEndpoint):
        def send(self, kind, round, **kw):  # noqa: A002 - the Endpoint signature
            out = super().send(kind, round, **kw)
            meta = kw.get("meta") or {}
            if meta.get("step") == "keyset" and meta.get("attempt") == 1:
                keyed[self.participant].set()
            return out

    drop = dict.fromkeys(SITES[2:], "keyset")
    hub, coord, stop = _federation(
        tmp_path, drop=drop, trainer_cls=SlowTrainer, endpoint_cls=Keys, phase_timeout=1.0, max_attempts=2
    )
    [res] = _run(coord, stop)
    assert seen == dict.fromkeys(SITES[:2], True)
    assert not res.aggregated  # two sites cannot make a secure sum: the model stays
    retry = [m for m in hub.sent if m.kind is MessageKind.SECAGG and m.meta.get("attempt") == 1]
    assert {m.sender for m in retry if m.meta["step"] == "keyset"} == set(SITES[:2])


def test_a_secure_version_is_tagged_with_its_threshold_and_the_run_logs_each_phase_time(tmp_path):
    """The registry side of a secure round: the version says it was made by secure aggregation
    and under which threshold; the round's MLflow metrics hold every phase's time (what the
    registrar hands to MLflow; tests/mlflow_server shows tags and metrics landing there)."""
    from neurofed.coordinator.registration import Registrar

    reg = Registrar(StateStore(tmp_path / "coordinator"), {})
    hub, coord, stop = _federation(tmp_path, registrar=reg)
    [res] = _run(coord, stop)
    reg.close()
    assert res.aggregated
    cfg = coord._secure.attempt.config
    [version] = [j for j in reg.done if j.kind == "register"]
    assert version.round == 1
    assert version.data["tags"]["secure_aggregation"] == "secagg+"
    assert version.data["tags"]["secagg_threshold"] == f"{cfg.t} of {cfg.k}"
    [logged] = [j for j in reg.done if j.kind == "log" and j.round == 1]
    metrics = logged.data["metrics"]
    phases = {"keys", "shares", "inputs", "echoes", "reveals"}
    assert {f"secagg/{p}_s" for p in phases} <= set(metrics), sorted(metrics)
    assert all(metrics[f"secagg/{p}_s"] >= 0 for p in phases)
    assert metrics["secagg/survivors"] == len(SITES) and metrics["secagg/attempts"] >= 1


def test_a_site_lost_after_its_masked_input_is_recovered_from_shares(tmp_path):
    hub, coord, stop = _federation(tmp_path, drop={"site-d": "update"}, phase_timeout=2.0)
    [res] = _run(coord, stop)
    done = sec_done(coord)
    assert done.survivors == tuple(SITES) and res.aggregated
    _assert_close(coord, _fedavg(SITES), coord._secure.attempt.config.error_bound)


def test_a_site_lost_before_its_masked_input_is_left_out_and_its_masks_removed(tmp_path, caplog):
    hub, coord, stop = _federation(tmp_path, drop={"site-d": "shares"}, phase_timeout=2.0, round_timeout=4.0)
    with caplog.at_level("WARNING", logger="neurofed.coordinator.secure"):
        [res] = _run(coord, stop)
    done = sec_done(coord)
    assert "site-d" not in done.survivors and "site-d" in done.recovered
    # the operator's log names the silent site the round went on without (the chaos soak's
    # network cut is matched against this line)
    assert "round 1: deadline passed in the secure aggregation's inputs phase; going on without site-d" in (
        caplog.text
    )
    _assert_close(coord, _fedavg(SITES[:3]), coord._secure.attempt.config.error_bound)


def test_a_site_that_refuses_an_attempt_says_so_once_and_the_round_goes_on_without_it(
    tmp_path, monkeypatch, caplog
):
    """A site that cannot join an attempt (here: a config of a format it does not speak) says
    why once, not at every step while the coordinator waits out the key phase (a site logged
    the same warning every second until the phase's deadline)."""
    from neurofed.edge_node.secure import SiteSecAgg
    from neurofed.wire.secagg.errors import SecAggParameterError

    begin = SiteSecAgg.begin

    def refusing(self, r, secagg):
        if self.site == "site-d" and self.state_dir.is_relative_to(tmp_path):  # not an earlier test's
            raise SecAggParameterError("config format 'neurofed-secagg-config/9', expected ...")
        return begin(self, r, secagg)

    monkeypatch.setattr(SiteSecAgg, "begin", refusing)
    hub, coord, stop = _federation(tmp_path, phase_timeout=2.0, round_timeout=6.0)
    with caplog.at_level("WARNING", logger="neurofed.edge_node.agent"):
        [res] = _run(coord, stop)
    assert res.aggregated and res.sites == sorted(SITES[:3])
    refusals = [
        r for r in caplog.records if "site-d: round 1: secure aggregation step refused" in r.getMessage()
    ]
    # once per attempt it was asked to join (a loaded machine may need a retry: a second attempt)
    attempts = {
        m.meta["secagg"]["attempt"] for m in hub.sent if m.kind is MessageKind.TASK and m.meta.get("secagg")
    }
    assert 1 <= len(refusals) == len(attempts), [r.getMessage() for r in refusals]
    assert all("secagg-config/9" in r.getMessage() for r in refusals)
    _assert_close(coord, _fedavg(SITES[:3]), coord._secure.attempt.config.error_bound)


class GarblingEndpoint(MemoryEndpoint):
    """A malicious site-d: its share bundles go out truncated, under its own valid signature."""

    def send(self, kind, round, **kw):  # noqa: A002 - the Endpoint signature
        if self.participant == "site-d" and (kw.get("meta") or {}).get("step") == "shares":
            kw["payload"] = kw["payload"][:40]
        return super().send(kind, round, **kw)


def test_a_site_sending_garbage_is_rejected_with_the_reason_and_the_round_goes_on(tmp_path):
    hub, coord, stop = _federation(
        tmp_path, endpoint_cls=GarblingEndpoint, phase_timeout=2.0, round_timeout=6.0
    )
    [res] = _run(coord, stop)
    assert ("site-d", "secagg-malformed") in res.rejected, res.rejected
    assert res.aggregated and res.sites == sorted(SITES[:3])
    _assert_close(coord, _fedavg(SITES[:3]), coord._secure.attempt.config.error_bound)


@pytest.mark.parametrize(("bits", "bound"), [(32, 2.3), (64, 3.3)])
def test_the_secure_close_holds_the_ring_sum_and_the_new_weights_not_a_float64_copy(bits, bound):
    """From the first masked input to the new global weights, what the coordinator allocates
    stays within about twice the model (32-bit ring: the ring sum and the new weights; 64-bit:
    three times), the weights are FedAvg within the quantization bound, and the sum is gone
    afterwards. Making the whole float64 mean beside the ring sum (and a float64 copy of it in the
    strategy) took five times the model. tracemalloc counts numpy's buffers."""
    import tracemalloc

    from neurofed.coordinator.secure import flat_names, new_weights
    from tests.wire.secagg_helpers import Fed, fedavg, to_shares

    rng = np.random.default_rng(3)
    shapes = [(64, 32, 3, 3, 3)] * 8 + [(32, 16, 3, 3, 3)] * 10 + [(32,)] * 40
    weights = {f"t{i:02d}": rng.normal(0, 0.1, s).astype(np.float32) for i, s in enumerate(shapes)}
    weights["bn.num_batches_tracked"] = np.array(3, dtype=np.int64)
    names = flat_names(weights)
    length = sum(weights[k].size for k in names)
    model_bytes = 4 * length
    fed = Fed.make(4)
    cfg = fed.config(length, bits=bits)
    clients, server, _ = to_shares(fed, cfg)
    ups = {s: rng.normal(0, 1e-3, length).astype(np.float32) for s in fed.sites}
    cases = {s: 2 + i for i, s in enumerate(fed.sites)}
    masked = {s: clients[s].mask(ups[s], cases[s], server.shares_for(s)) for s in fed.sites}
    strategy = make_strategy("fedavg")
    strategy.begin(1, weights)

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for s in fed.sites:
            server.add_masked_input(s, masked[s])
        survivors = server.close_inputs()
        for s in fed.sites:
            server.add_echo(s, clients[s].consistency(survivors))
        request = server.unmask_request()
        for s in fed.sites:
            server.add_reveal(s, clients[s].unmask(request))
        res = server.finish()
        update = new_weights(res, weights)
        res.release()
        strategy.add_aggregate(update, res.total_weight)
        del update
        new = strategy.result()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak <= bound * model_bytes, f"{peak / model_bytes:.2f}x the model"
    with pytest.raises(RuntimeError, match="released"):
        res.mean_of(0, 1)
    assert new is not None and int(new["bn.num_batches_tracked"]) == 3
    got = np.concatenate([(new[k].astype(np.float64) - weights[k]).ravel() for k in names])
    want = fedavg(ups, cases, fed.sites, cfg.clip)
    # the float32 weights round the new value: half an ulp of the largest weight on top
    ulp = max(float(np.spacing(np.abs(new[k]).max())) for k in names)
    assert np.max(np.abs(got - want)) <= cfg.error_bound + ulp


def test_too_few_survivors_retry_with_fresh_keys_then_keep_the_model(tmp_path):
    drop = {"site-c": "shares", "site-d": "shares"}
    hub, coord, stop = _federation(tmp_path, drop=drop, phase_timeout=1.0, round_timeout=2.0, max_attempts=2)
    [res] = _run(coord, stop)
    assert not res.aggregated
    _assert_close(coord, initial_weights(), 0.0)  # no usable sum: the previous model stays
    tasks = [m for m in hub.sent if m.kind is MessageKind.TASK and m.meta.get("secagg")]
    assert sorted({m.meta["secagg"]["attempt"] for m in tasks}) == [0, 1]  # fresh keys, never reused
    # the attempt counter is persisted: a restarted coordinator would start at attempt 2
    assert (tmp_path / "coordinator" / "secagg.json").read_text().count('"next_attempt": 2') == 1


def test_a_retry_is_built_over_the_sites_still_answering(tmp_path, caplog):
    """6 sites (k=5, t=4): 3 die after their echo, so the first attempt gets 3 reveals, fewer than
    t, and fails. The retry is built over the 3 sites that revealed (k=2, t=2; still never fewer
    than 3 inputs unmasked) and completes with their FedAvg; over the whole roster it would fail
    the same way. A dropped site that comes back during the retry is not in its config: it sends
    nothing for it and is not counted."""
    dead = ("site-d", "site-e", "site-f")
    eps: dict = {}
    hub, coord, stop = _federation(
        tmp_path,
        sites=SIX,
        drop=dict.fromkeys(dead, "echo"),
        phase_timeout=2.0,
        max_attempts=2,
        endpoints=eps,
    )

    publish = hub._publish

    def revive_on_retry(msg, retain):  # site-d is back as the retry is announced, before it is delivered
        if msg.kind is MessageKind.TASK and msg.meta.get("secagg", {}).get("attempt") == 1:
            eps["site-d"].revive()
        publish(msg, retain)

    hub._publish = revive_on_retry
    with caplog.at_level("WARNING"):
        [res] = _run(coord, stop)
    alive = SITES[:3]
    assert res.aggregated and res.sites == list(alive)
    sec = coord._secure
    cfg = sec.attempt.config
    assert cfg.context.attempt == 1 and cfg.participants == alive and (cfg.k, cfg.t) == (2, 2)
    assert cfg.min_survivors == 3
    assert sec.result.survivors == alive and not sec.result.recovered
    _assert_close(coord, _fedavg(alive), cfg.error_bound)
    retry_tasks = [
        m for m in hub.sent if m.kind is MessageKind.TASK and m.meta.get("secagg", {}).get("attempt") == 1
    ]
    assert retry_tasks and all(m.meta["secagg"]["config"]["participants"] == list(alive) for m in retry_tasks)
    # the left-out sites sent nothing for the retry, site-d although it was back
    assert eps["site-d"].dead is False
    assert not [m for m in hub.sent if m.sender in dead and (m.meta or {}).get("attempt") == 1]
    assert "round 1: attempt 1 over 3 sites (k=2, t=2); left out: site-d, site-e, site-f" in caplog.text
    assert "site-d: round 1 attempt 1 is built over 3 other sites and leaves this one out" in caplog.text
    events = [e for e in read_events(tmp_path / "coordinator") if e["event"] == "secagg-attempt"]
    assert [e["left_out"] for e in events] == [[], list(dead)]


@pytest.mark.parametrize(
    ("k", "t", "n", "expected"),
    [
        (None, None, 5, (4, 3)),  # the defaults for 5 sites
        (None, None, 3, (2, 2)),
        (9, None, 5, (4, 3)),  # the operator's degree does not fit 5 sites: the defaults
        (None, 6, 5, None),  # the operator's threshold never drops: no retry over 5 sites
        (None, 6, 8, (7, 6)),
        (4, 3, 6, (4, 3)),  # the operator's k and t fit: kept
    ],
)
def test_a_narrowed_retry_takes_k_and_t_for_its_sites_never_below_the_operators_threshold(k, t, n, expected):
    from neurofed.coordinator.secure import SecureRound

    sites = tuple(f"s{i:02d}" for i in range(10))
    sec = SecureRound(
        federation="f", run_id="r", round=1, sites=sites, weights=initial_weights(),
        roster_keys={s: Ed25519PrivateKey.generate().public_key() for s in sites},
        settings=SecureSettings(k=k, t=t),
        next_attempt=0, send_relay=lambda *a: None, persist_attempt=lambda n: None, event=lambda *a, **kw: None,
    )  # fmt: skip
    assert sec._narrowed_k_t(n) == expected


def sec_done(coord: Coordinator):
    assert coord._secure is not None and coord._secure.result is not None
    return coord._secure.result


def test_an_attacker_with_everything_the_coordinator_holds_recovers_no_update(tmp_path):
    """The same script recovers every site's update from a plaintext round (it can fail) and
    none from a secure round: the coordinator opens every envelope (the hub's messages are what
    it decrypts), reads its state folder and events."""

    def attack(messages) -> dict[str, float]:
        """Best guess of each site's shift from what it sent to the coordinator."""
        w0 = initial_weights()
        found = {}
        for m in messages:
            if m.kind is not MessageKind.UPDATE:
                continue
            try:
                state = decode_state(bytes(m.payload))
                found[m.sender] = float(np.mean(state["w"] - w0["w"]))
            except Exception:  # noqa: BLE001 - masked input: try reading it as ring words
                raw = np.frombuffer(bytes(m.payload)[-48:], dtype="<u4").astype(np.float64)
                found[m.sender] = float(np.mean(raw[:12]) / 2**15)
        return found

    # plaintext round: the script recovers every site's update exactly
    from tests.coordinator.helpers import make_coordinator, start_agent

    hub = MemoryHub("testfed")
    coord = make_coordinator(hub, tmp_path / "plain", SITES, rounds=1, final_eval=False)
    stop = threading.Event()
    for s in SITES:
        start_agent(hub, s, ShiftTrainer(shift=SHIFTS[s], num_train_cases=CASES[s]), tmp_path / "p", stop)
    _run(coord, stop)
    plain = attack(hub.sent)
    assert plain and all(abs(plain[s] - SHIFTS[s]) < 1e-5 for s in SITES), plain

    hub, coord, stop = _federation(tmp_path / "secure")
    _run(coord, stop)
    guessed = attack(hub.sent)
    assert set(guessed) == set(SITES)
    assert all(abs(guessed[s] - SHIFTS[s]) > 0.01 for s in SITES), guessed
    # nor in what the coordinator keeps: its state folder holds the aggregate, never one update
    from safetensors.numpy import load_file

    files = list((tmp_path / "secure" / "coordinator").rglob("*.safetensors"))
    assert files
    for f in files:
        for name, a in load_file(f).items():
            if name.split("/")[-1] == "w":
                delta = float(np.mean(a - initial_weights()["w"]))
                assert all(abs(delta - SHIFTS[s]) > 0.01 for s in SITES), (f, name, delta)


@pytest.mark.parametrize(
    ("strategy", "kw", "words"),
    [
        ("median", {}, "own update"),
        ("trimmed-mean", {}, "own update"),
        ("fedavg", {"fp16": True}, "--fp16"),
        ("fedavg", {"site_optimizer": "continue-global"}, "continue-global"),
        ("fedavg", {"sites": 2}, "at least 3 sites"),
    ],
)
def test_what_secure_aggregation_cannot_do_is_refused_at_start(strategy, kw, words):
    args = {"fp16": False, "site_optimizer": "reset", "sites": 4, "max_norm_at_coordinator": False} | kw
    with pytest.raises(CoordinatorError, match=words):
        refuse_unsound(strategy, **args)


@pytest.mark.parametrize("strategy", ["fedadam", "fednova", "fedavgm"])
def test_server_optimisers_and_fednova_on_the_secure_mean_match_plaintext(tmp_path, strategy):
    """The same strategy fed the plaintext updates one by one gives the same model (within the
    quantization bound): FedNova's per-step normalisation is done by the sites before masking."""
    hub, coord, stop = _federation(tmp_path, strategy=strategy)
    [res] = _run(coord, stop)
    assert res.aggregated
    plain = make_strategy(strategy)
    w0 = initial_weights()
    plain.begin(1, w0)
    for s in SITES:
        upd = {k: (v + SHIFTS[s] if v.dtype.kind == "f" else v) for k, v in w0.items()}
        plain.add(s, upd, CASES[s], local_steps=STEPS[s])
    expected = plain.result()
    # a server optimiser may amplify the bound by its learning rate and normalisation
    _assert_close(
        coord, expected, 1e-3 if strategy == "fedadam" else 10 * coord._secure.attempt.config.error_bound
    )


def test_client_level_dp_under_secure_aggregation_noises_at_the_sites_and_adapts_the_clip(tmp_path):
    """DP-FedAvg with the adaptive clip under SecAgg+: every site clips to the round's clip and
    adds its share of Skellam noise, its centred clip bit rides in the masked sum as one more ring
    element with its own noise, the coordinator adds nothing and learns only the noisy mean and
    count. Norms 0.4 / 0.8 / 1.2 / 2.0 against clip 0.5: one site of four fits, the clip grows."""
    from neurofed.models.client_privacy import ClientDPConfig, adapt_clip, client_epsilon

    cfg = ClientDPConfig(noise_multiplier=0.05, clip=0.5, adaptive=True, rounds=2).resolved(sites=4)
    hub, coord, stop = _federation(tmp_path, rounds=2, dp_client=cfg.to_dict())
    results = _run(coord, stop)
    assert [r.aggregated for r in results] == [True, True]
    first = coord._extra_state["rounds"]["1"]["dp_client"]
    # a quarter fit, the target is half: the clip grows unless the count's integer noise (std
    # about 0.46 on the centred sum) reached +2, which it does about once in 200 runs
    frac = first["within_clip_fraction"]
    assert first["clip"] == 0.5 and abs(frac - 0.25) < 0.5
    assert round((frac - 0.25) * 8) == pytest.approx((frac - 0.25) * 8)  # 1 of 4, plus integer noise
    assert first["next_clip"] == pytest.approx(adapt_clip(0.5, frac, cfg.target_quantile, cfg.clip_lr))
    assert coord._extra_state["rounds"]["2"]["dp_client"]["epsilon"] == pytest.approx(
        client_epsilon(0.05, 1.0, 2, 1e-5), rel=1e-6
    )
    assert results[0].cases == CASES  # the cases reported, not the uniform ring weights

    # round 1: uniform mean of the clipped shifts (0.1, 0.125, -0.125, 0.125) = 0.05625 per float
    # coordinate; round 2 under the larger clip; both within the noise (std ~0.01) and quantization
    def clipped_mean(clip: float) -> float:
        return sum(x * min(1.0, clip / (abs(x) * 4)) for x in SHIFTS.values()) / 4  # 16 floats: norm 4|x|

    moved = clipped_mean(0.5) + clipped_mean(first["next_clip"])
    # the noise all 4 sites add: 4/t = 2 times the target variance per round, over 4 (the mean)
    std = math.sqrt(sum(2 * (cfg.update_noise_multiplier * c) ** 2 for c in (0.5, first["next_clip"]))) / 4
    w0 = initial_weights()
    for k in ("w", "b"):
        np.testing.assert_allclose(coord.weights[k] - w0[k], moved, atol=5 * std)
    events = [e for e in read_events(tmp_path / "coordinator") if e["event"] == "secagg-attempt"]
    assert (
        events[0]["noise_std"] == pytest.approx(cfg.update_noise_multiplier * 0.5)
        and events[0]["counts"] == 1
    )
