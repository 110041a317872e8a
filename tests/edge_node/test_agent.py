"""The site agent over the in-memory hub: verifies tasks, is idempotent per round across restarts,
resends its stored update when receipts lack it, audits every send."""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import pytest

from neurofed.coordinator import payload as codec
from neurofed.edge_node.agent import SiteAgent
from neurofed.wire.api import COORDINATOR, MessageKind
from neurofed.wire.memory import MemoryHub
from neurofed.wire.sealing import message_digest
from tests.coordinator.helpers import ShiftTrainer, initial_weights


def _publish_round(coord, r, weights, *, train=True, session="s1", digest=None, name_model=True):
    payload = codec.encode(weights)
    d = digest or hashlib.sha256(payload).hexdigest()
    coord.send(
        MessageKind.MODEL,
        r,
        meta={"model_digest": hashlib.sha256(payload).hexdigest()} if name_model else {},
        payload=payload,
        retain=True,
    )
    coord.send(
        MessageKind.TASK,
        r,
        meta={
            "round": r,
            "model_digest": d,
            "train": train,
            "epochs": 2,
            "sites": {"site-a": {"epochs": 2, "mu": 0.05}},
            "session": session,
        },
        retain=True,
    )
    return d


def _drain(ep, timeout=0.5):
    out = []
    end = time.time() + timeout
    while time.time() < end:
        m = ep.receive(timeout=0.05)
        if m is not None:
            out.append(m)
    return out


def _agent(hub, tmp_path, trainer):
    ep = hub.endpoint("site-a")
    ep.start()
    return SiteAgent(ep, trainer, tmp_path / "site-a", resend_after=0.5)


def test_round_once_then_restart_does_not_retrain_and_resends_on_missing_receipt(tmp_path, monkeypatch):
    from neurofed.edge_node import audit as audit_mod

    # the agent's audit log takes each send's digest from the endpoint: it never hashes a payload
    monkeypatch.setattr(audit_mod, "message_digest", lambda *a, **k: pytest.fail("payload hashed twice"))
    hub = MemoryHub("f")
    coord = hub.endpoint(COORDINATOR)
    coord.start()
    digest = _publish_round(coord, 1, initial_weights())
    trainer = ShiftTrainer(shift=1.0, num_train_cases=4)
    agent = _agent(hub, tmp_path, trainer)
    for _ in range(3):
        agent.step(timeout=0.2)
    got = _drain(coord)
    kinds = [m.kind for m in got]
    # the update first (the round closes on it), then the score of the model it was trained from
    assert kinds == [MessageKind.UPDATE, MessageKind.METRICS]
    assert got[1].meta["evaluated_round"] == 0 and got[1].meta["model_digest"] == digest
    upd = got[0]
    assert upd.meta["num_cases"] == 4 and upd.meta["model_digest"] == digest
    assert trainer.trained == 1 and trainer.last_mu == 0.05 and trainer.last_epochs == 2
    np.testing.assert_allclose(codec.decode(upd.payload)["w"], initial_weights()["w"] + 1, rtol=1e-6)
    # the site restarts (new process: new agent, same state folder); the retained task and model
    # come back, the coordinator (restarted too: new session) holds nothing yet
    agent.ep.close()
    trainer2 = ShiftTrainer(shift=1.0, num_train_cases=4)
    agent2 = _agent(hub, tmp_path, trainer2)
    coord.send(MessageKind.RECEIPTS, 1, meta={"round": 1, "held": [], "session": "s2"})
    for _ in range(3):
        agent2.step(timeout=0.2)
    again = [m for m in _drain(coord) if m.kind is MessageKind.UPDATE]
    assert trainer2.trained == 0, "a round already trained is never trained again"
    assert len(again) == 1 and again[0].payload == upd.payload
    # receipts that hold it stop the resends
    coord.send(MessageKind.RECEIPTS, 1, meta={"round": 1, "held": ["site-a"], "session": "s2"})
    time.sleep(0.6)
    for _ in range(2):
        agent2.step(timeout=0.2)
    assert not [m for m in _drain(coord) if m.kind is MessageKind.UPDATE]
    # the audit log has every send, the resend marked, digests of what actually left
    entries = agent2.audit.entries()
    assert [(e["kind"], e["round"], e["resend"]) for e in entries] == [
        ("update", 1, False),
        ("metrics", 1, False),
        ("update", 1, True),
    ]
    # the message's signed digest (meta block + payload), the one the coordinator verifies and logs
    assert entries[0]["sha256"] == upd.digest == message_digest(upd.meta, upd.payload) == entries[2]["sha256"]
    assert upd.digest != hashlib.sha256(upd.payload).hexdigest()  # it covers the case count too
    assert entries[0]["bytes"] == len(upd.payload)
    assert entries[1]["fields"]["dice"] == 0.5 and entries[1]["fields"]["evaluated_round"] == 0


def test_model_not_matching_the_task_is_not_trained(tmp_path):
    hub = MemoryHub("f")
    coord = hub.endpoint(COORDINATOR)
    coord.start()
    _publish_round(coord, 1, initial_weights(), digest="f" * 64)
    trainer = ShiftTrainer(shift=1.0, num_train_cases=4)
    agent = _agent(hub, tmp_path, trainer)
    for _ in range(3):
        agent.step(timeout=0.2)
    assert trainer.trained == 0 and not _drain(coord, 0.2)
    assert agent.audit.entries() == []


def test_a_model_whose_meta_does_not_name_it_is_hashed_by_the_site(tmp_path):
    """The site files a MODEL under the digest in its signed meta (the wire has verified every
    byte); one without that name is hashed, and still found by the task that names its digest."""
    hub = MemoryHub("f")
    coord = hub.endpoint(COORDINATOR)
    coord.start()
    digest = _publish_round(coord, 1, initial_weights(), name_model=False)
    trainer = ShiftTrainer(shift=1.0, num_train_cases=4)
    agent = _agent(hub, tmp_path, trainer)
    for _ in range(3):
        agent.step(timeout=0.2)
    assert list(agent.models) == [digest]
    upd = [m for m in _drain(coord) if m.kind is MessageKind.UPDATE]
    assert trainer.trained == 1 and len(upd) == 1 and upd[0].meta["model_digest"] == digest


def test_evaluation_only_round_sends_metrics_only_and_done_ends(tmp_path):
    hub = MemoryHub("f")
    coord = hub.endpoint(COORDINATOR)
    coord.start()
    _publish_round(coord, 3, initial_weights(), train=False)
    trainer = ShiftTrainer(shift=1.0, num_train_cases=4, dice=0.8)
    agent = _agent(hub, tmp_path, trainer)
    agent.step(timeout=0.2)
    got = _drain(coord)
    assert [m.kind for m in got] == [MessageKind.METRICS] and got[0].meta["dice"] == 0.8
    assert trainer.trained == 0
    coord.send(MessageKind.TASK, 4, meta={"round": 4, "done": True}, retain=True)
    assert agent.step(timeout=0.5) is False


def test_a_federation_end_the_site_took_no_part_in_does_not_end_it(tmp_path):
    """The broker keeps the last TASK: a site started after a federation ended (or before the
    next one's coordinator) finds that ``done`` first. It waits for the next run instead of
    exiting, and that run's own end ends it."""
    hub = MemoryHub("f")
    coord = hub.endpoint(COORDINATOR)
    coord.start()
    coord.send(MessageKind.TASK, 4, meta={"round": 4, "done": True, "session": "old"}, retain=True)
    trainer = ShiftTrainer(shift=1.0, num_train_cases=4)
    agent = _agent(hub, tmp_path, trainer)
    assert agent.step(timeout=0.5) is True
    status = json.loads((tmp_path / "site-a" / "status.json").read_text())
    assert status["state"] == "waiting" and "ended" in status["note"]
    _publish_round(coord, 1, initial_weights(), session="new")
    assert agent.step(timeout=0.5) is True
    assert trainer.trained == 1
    assert MessageKind.UPDATE in [m.kind for m in _drain(coord)]
    assert "note" not in json.loads((tmp_path / "site-a" / "status.json").read_text())
    coord.send(MessageKind.TASK, 2, meta={"round": 2, "done": True, "session": "new"}, retain=True)
    assert agent.step(timeout=0.5) is False


def test_evaluation_lost_in_an_evaluation_only_round_is_sent_again_without_evaluating_again(tmp_path):
    """An evaluation-only round closes on metrics, so metrics the coordinator never got (a broker
    restart between the site's send and the coordinator's resubscription) would hold it open
    forever: receipts that lack them, once ``resend_after`` has passed, bring the same metrics
    again, as receipts that lack an update bring the update."""
    hub = MemoryHub("f")
    coord = hub.endpoint(COORDINATOR)
    coord.start()
    _publish_round(coord, 3, initial_weights(), train=False)
    trainer = ShiftTrainer(shift=1.0, num_train_cases=4, dice=0.8)
    ep = hub.endpoint("site-a")
    ep.start()
    agent = SiteAgent(ep, trainer, tmp_path / "site-a", resend_after=1.0)
    agent.step(timeout=0.2)
    first = [m for m in _drain(coord, 0.1) if m.kind is MessageKind.METRICS]
    assert len(first) == 1
    evaluations = trainer.evaluated
    # fresh receipts that lack them, before resend_after: nothing yet (the send may be on its way)
    coord.send(MessageKind.RECEIPTS, 3, meta={"round": 3, "held": [], "metrics": [], "session": "s1"})
    agent.step(timeout=0.2)
    assert not _drain(coord, 0.2)
    time.sleep(1.1)
    coord.send(MessageKind.RECEIPTS, 3, meta={"round": 3, "held": [], "metrics": [], "session": "s1"})
    agent.step(timeout=0.2)
    again = [m for m in _drain(coord) if m.kind is MessageKind.METRICS]
    assert len(again) == 1 and again[0].meta == first[0].meta
    assert trainer.evaluated == evaluations, "sent again from the round state, not evaluated again"
    # receipts that hold them stop the resends
    time.sleep(1.1)
    coord.send(MessageKind.RECEIPTS, 3, meta={"round": 3, "held": [], "metrics": ["site-a"], "session": "s1"})
    agent.step(timeout=0.2)
    assert not _drain(coord, 0.2)
    assert [(e["kind"], e["resend"]) for e in agent.audit.entries()] == [
        ("metrics", False),
        ("metrics", True),
    ]


def test_the_model_is_scored_while_the_update_is_sent(tmp_path):
    """Evaluation starts when training ends, beside the upload: the update does not wait for the
    score, and the CPU scores while the update travels and the round closes."""
    import threading

    hub = MemoryHub("f")
    coord = hub.endpoint(COORDINATOR)
    coord.start()
    digest = _publish_round(coord, 1, initial_weights())
    scoring = threading.Event()
    seen: dict[str, bool] = {}

    class SlowScorer(ShiftTrainer):
        def evaluate(self, state_dict, split="val"):
            scoring.set()
            time.sleep(0.5)
            return super().evaluate(state_dict, split)

    agent = _agent(hub, tmp_path, SlowScorer(shift=1.0, num_train_cases=4))
    send = agent.ep.send

    def watched_send(kind, r, **kw):
        if kind is MessageKind.UPDATE:  # was the score under way while the update left?
            seen["scoring_during_send"] = scoring.wait(5.0)
        return send(kind, r, **kw)

    agent.ep.send = watched_send
    agent.step(timeout=0.2)
    assert seen == {"scoring_during_send": True}
    got = _drain(coord)
    assert [m.kind for m in got] == [MessageKind.UPDATE, MessageKind.METRICS]
    assert got[1].meta["model_digest"] == digest and got[1].meta["dice"] == 0.5
    timeline = [json.loads(x) for x in (tmp_path / "site-a" / "timeline.jsonl").read_text().splitlines()]
    span = {x["what"]: (x["start"], x["end"]) for x in timeline}
    assert span["send"][0] < span["evaluate"][1] and span["evaluate"][0] < span["send"][1], "they overlap"


def test_scores_of_the_previous_round_are_sent_again_when_a_restarted_coordinator_lacks_them(tmp_path):
    hub = MemoryHub("f")
    coord = hub.endpoint(COORDINATOR)
    coord.start()
    _publish_round(coord, 1, initial_weights())
    trainer = ShiftTrainer(shift=1.0, num_train_cases=4)
    agent = _agent(hub, tmp_path, trainer)
    agent.step(timeout=0.2)
    first = [m for m in _drain(coord) if m.kind is MessageKind.METRICS]
    assert len(first) == 1
    # same session, scores held: nothing to do
    coord.send(
        MessageKind.RECEIPTS,
        2,
        meta={"round": 2, "held": [], "session": "s1", "evaluated": {"round": 1, "sites": ["site-a"]}},
    )
    agent.step(timeout=0.2)
    assert not [m for m in _drain(coord) if m.kind is MessageKind.METRICS]
    # a restarted coordinator (new session) whose receipts lack them: the same scores again
    coord.send(
        MessageKind.RECEIPTS,
        2,
        meta={"round": 2, "held": [], "session": "s2", "evaluated": {"round": 1, "sites": []}},
    )
    agent.step(timeout=0.2)
    again = [m for m in _drain(coord) if m.kind is MessageKind.METRICS]
    assert len(again) == 1 and again[0].round == 1 and again[0].meta == first[0].meta
    assert trainer.evaluated == 1, "sent again from the round state, never evaluated twice"
    assert agent.audit.entries()[-1]["resend"] is True


def test_receipts_that_arrive_during_a_long_scoring_replace_the_stale_ones_taken_before(tmp_path):
    """A RECEIPTS taken in with the task predates this site's update; acting on it after a scoring
    longer than the resend delay read the update as overdue and sent it again. What arrived during
    the work is taken in first: the coordinator's newer receipts hold the update."""
    hub = MemoryHub("f")
    coord = hub.endpoint(COORDINATOR)
    coord.start()

    class SlowScorer(ShiftTrainer):
        def evaluate(self, state_dict, split="val"):
            time.sleep(0.8)  # longer than resend_after (0.5 s)
            # meanwhile the update arrived and the coordinator's receipts say so
            coord.send(MessageKind.RECEIPTS, 1, meta={"round": 1, "held": ["site-a"], "session": "s1"})
            return super().evaluate(state_dict, split)

    agent = _agent(hub, tmp_path, SlowScorer(shift=1.0, num_train_cases=4))
    _publish_round(coord, 1, initial_weights())
    # published before this site's update arrived: it lacks it (taken in with the task)
    coord.send(MessageKind.RECEIPTS, 1, meta={"round": 1, "held": [], "session": "s1"})
    agent.step(timeout=0.2)
    kinds = [m.kind for m in _drain(coord)]
    assert kinds.count(MessageKind.UPDATE) == 1, f"sent again on stale receipts: {kinds}"
    assert [e["resend"] for e in agent.audit.entries() if e["kind"] == "update"] == [False]
    assert agent.receipts is not None and agent.receipts["held"] == ["site-a"]


def test_the_next_round_that_came_in_while_the_site_scored_starts_at_once(tmp_path):
    """Round 2's model and task arrive while the site still scores round 1's model. The site took
    them in during or right after that work; its next step trains round 2 at once instead of first
    waiting (up to its timeout) for another message, which held such a site up by a second a round."""
    hub = MemoryHub("f")
    coord = hub.endpoint(COORDINATOR)
    coord.start()
    published: list[int] = []

    class ScorerDuringWhichTheNextRoundComes(ShiftTrainer):
        def evaluate(self, state_dict, split="val"):
            if not published:
                time.sleep(0.2)
                published.append(_publish_round(coord, 2, initial_weights(), session="s1") and 2)
                time.sleep(0.2)
            return super().evaluate(state_dict, split)

    agent = _agent(hub, tmp_path, ScorerDuringWhichTheNextRoundComes(shift=1.0, num_train_cases=4))
    _publish_round(coord, 1, initial_weights())
    agent.step(timeout=0.2)
    assert published == [2]
    t0 = time.monotonic()
    agent.step(timeout=5.0)  # nothing more will come: waiting for a message first would take 5 s
    took = time.monotonic() - t0
    updates = [m for m in _drain(coord) if m.kind is MessageKind.UPDATE]
    assert sorted(m.round for m in updates) == [1, 2]
    assert took < 2.5, f"round 2 waited {took:.1f} s for a message that had already come"


def test_a_round_whose_steps_took_no_case_sends_its_update_with_no_loss(tmp_path):
    """A small site's DP-SGD round can draw no case in any Poisson-sampled step: the mean loss of
    no step is NaN, which JSON cannot carry; the update goes with ``loss`` null, not a crash."""

    class NoCaseTrainer(ShiftTrainer):
        def train(self, state_dict, epochs, **kw):
            out = super().train(state_dict, epochs, **kw)
            out.loss = float("nan")
            return out

    hub = MemoryHub("f")
    coord = hub.endpoint(COORDINATOR)
    coord.start()
    _publish_round(coord, 1, initial_weights())
    agent = _agent(hub, tmp_path, NoCaseTrainer(shift=0.0, num_train_cases=1))
    for _ in range(3):
        agent.step(timeout=0.2)
    [upd] = [m for m in _drain(coord) if m.kind is MessageKind.UPDATE]
    assert upd.meta["loss"] is None and upd.meta["num_cases"] == 1


def test_a_new_federation_run_drops_the_old_runs_secure_deltas_and_keys(tmp_path):
    """A secure delta kept for round 1 of one run must never be masked in round 1 of the next: the
    site would skip training, mask an update of the old model and (with the new run's empty round
    state) fail. Following a new run drops every secure delta and attempt state."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    hub = MemoryHub("f")
    key = Ed25519PrivateKey.generate()
    ep = hub.endpoint("site-a")
    ep.start()
    agent = SiteAgent(
        ep, ShiftTrainer(shift=1.0, num_train_cases=4), tmp_path / "site-a",
        secure_identity=(key, {"site-a": key.public_key()}),
    )  # fmt: skip
    sec = agent._secagg
    sec.save_delta(1, np.ones(8, np.float32))
    (tmp_path / "site-a" / "secagg-r0001-a0.json").write_text("{}")
    assert sec.load_delta(1) is not None
    agent._follow_run("a-later-run")
    assert sec.load_delta(1) is None
    assert not list((tmp_path / "site-a").glob("secure-delta-r*")) + list(
        (tmp_path / "site-a").glob("secagg-r*")
    )


def test_the_audit_log_takes_the_digest_the_wire_signed_instead_of_hashing_the_payload_again(
    tmp_path, monkeypatch
):
    """A sent update is hashed once, when it is sealed: the audit log records that digest
    (``Endpoint.sent_digest``), and hashes only when the endpoint has none to give."""
    from neurofed.edge_node import audit as audit_mod
    from neurofed.wire.api import SENT_DIGESTS

    hub = MemoryHub()
    site = hub.endpoint("site-a")
    site.start()
    payload = os.urandom(4096)
    msg_id = site.send(MessageKind.UPDATE, 1, meta={"num_cases": 4}, payload=payload)
    signed = message_digest({"num_cases": 4}, payload)
    assert site.sent_digest(msg_id) == signed
    log = audit_mod.AuditLog(tmp_path / "audit.jsonl", "site-a")

    def no_second_hash(*_a, **_k):
        raise AssertionError("the payload was hashed again")

    monkeypatch.setattr(audit_mod, "message_digest", no_second_hash)
    entry = log.record(
        "update", 1, msg_id=msg_id, payload=payload, meta={"num_cases": 4}, digest=site.sent_digest(msg_id)
    )
    assert entry["sha256"] == signed
    with pytest.raises(AssertionError, match="hashed again"):  # without a digest it hashes, as before
        log.record("update", 1, msg_id=msg_id, payload=payload, meta={"num_cases": 4})
    # the endpoint keeps the last SENT_DIGESTS digests, not every message it ever sent
    for i in range(SENT_DIGESTS):
        site.send(MessageKind.METRICS, 1, meta={"i": i})
    assert site.sent_digest(msg_id) is None
