"""Wire hardening with real processes and a real broker (issue 21): what a holder of one site's
broker certificate can do with raw MQTT clients against running `neurofed coordinator` and
`neurofed edge` processes.

- An update captured in one federation run and published again into the next run (a new
  coordinator ``--state`` of the same federation, the site's own edge not running) is refused
  as ``other-run`` and counts toward nothing; the same bytes sealed for the current run are taken.
- Every wire rejection reason a participant's certificate can produce through the broker is
  recorded: one ``reject`` event each in events.jsonl (a burst: 20 and one ``reject-burst`` line),
  counted per reason in the round's event, the CLI's round line and the MLflow parent run.

The tiny UNet on 32^3 volumes, two sites, one or two rounds: a test costs tens of seconds.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from neurofed.launch.local import wait_for
from neurofed.wire.api import MessageKind
from neurofed.wire.bundle import load_bundle
from neurofed.wire.envelope import encode_frame, new_run_id
from neurofed.wire.receiver import Receiver
from neurofed.wire.sealing import encode_plaintext_prefix, message_digest, new_msg_id, seal_message
from neurofed.wire.topics import topic_for
from tests.test_federation_failures import Fed, federation_data
from tests.wire.helpers import RawClient, flip, forge

pytestmark = pytest.mark.slow

SHAPE = (32, 32, 32)


@pytest.fixture(scope="module")
def wire_data(tmp_path_factory):
    """Two synthetic sites (three cases each) and one initial tiny model for every coordinator."""
    return federation_data(tmp_path_factory, "wire-data", sites=2, cases=6)


def _federation(request, tmp_path, wire_data, federation: str):
    f = Fed(tmp_path, wire_data, federation=federation)
    yield f
    f.close()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for log in sorted(f.logs.glob("*.log")):
            print(f"----- {log.name} (last 60 lines) -----")
            print("\n".join(log.read_text(errors="replace").splitlines()[-60:]))


@pytest.fixture
def fed(request, tmp_path, wire_data):
    yield from _federation(request, tmp_path, wire_data, "testfed")


def run_of(state: Path) -> str:
    """The federation run a coordinator state folder belongs to (once its coordinator created it)."""
    path = state / "run.json"
    return json.loads(path.read_text())["run"] if path.is_file() else ""


def announced(fed: Fed, r: int) -> bool:
    return any(e["round"] == r for e in fed.events("announce"))


def current_task(raw: RawClient, bundle_dir: Path, run: str, r: int) -> dict:
    """Round ``r``'s TASK as the site reads it (the raw client subscribed to the task topic)."""
    rx = Receiver(load_bundle(bundle_dir), run=run)
    rx.set_round_window(r, r)
    for topic, data, _ in reversed(raw.messages()):
        msg = rx.feed(topic, data) if "/task" in topic else None
        if msg is not None and msg.kind is MessageKind.TASK and msg.round == r:
            return dict(msg.meta)
    return {}


def test_an_update_captured_in_one_run_is_refused_in_the_next_run(fed):
    """Issue 21, item 1: site-01's round-1 update of run A, published again with site-01's
    certificate into run B of the same federation (new coordinator state, same seed and so the
    same round-1 model digest) while site-01's edge is not running: ``other-run``, recorded, and
    round 1 of B closes with site-02 alone. The same plaintext sealed for run B is taken."""
    a, b = fed.sites
    # site-01 dies in round 2 of run A, its update stored and not sent: round 2 waits for it
    victim = fed.start_site(a, NEUROFED_FAULT="site-mid-upload", NEUROFED_FAULT_ROUND="2")
    fed.start_site(b)
    fed.wait_sites_ready()
    fed.start_coordinator(rounds=2, min_sites=2, timeout=120)
    r1 = fed.wait_round(1)
    assert r1["sites"] == [a, b]
    state_a, run_a = fed.state, run_of(fed.state)
    taken_a = next(e for e in fed.events("update") if e["site"] == a and e["round"] == 1)
    assert victim.wait(60) == -9 and "SIGKILL at site-mid-upload" in victim.tail()
    # run A's coordinator takes site-01's will (not left queued for run B), then stops too
    wait_for(
        lambda: any(e["site"] == a and e["status"] == "offline" for e in fed.events("status")),
        60,
        "run A's coordinator to see site-01 offline",
        fed.procs,
    )
    fed.coord.kill()

    # site-01's round-1 update as it crossed the broker in run A: its stored payload, the meta its
    # agent sent (kept in its state), sealed with its key for run A. Same plaintext digest as run A took.
    site_state = fed.tmp / f"{a}-state"
    payload = (site_state / "update-r0001.safetensors").read_bytes()
    rs = json.loads((site_state / "agent.json").read_text())["rounds"]["1"]
    meta = {k: rs.get(k) for k in ("num_cases", "model_digest", "loss", "train_seconds", "local_steps")}
    if rs.get("encoding"):
        meta["encoding"] = rs["encoding"]
    assert message_digest(meta, payload) == taken_a["sha256"], "not the bytes run A took"
    bundle_a = load_bundle(fed.bundles / a)
    replay = list(seal_message(bundle_a, MessageKind.UPDATE, 1, meta, payload, run=run_a).frames)

    # run B: a new state of the same federation; site-02's edge (still running) follows it
    fed.state = fed.tmp / "coordinator-state-B"
    fed.start_coordinator(rounds=2, min_sites=1, timeout=8)
    wait_for(lambda: announced(fed, 1), 120, "run B's round 1", fed.procs, poll=0.05)
    run_b = run_of(fed.state)
    assert run_b and run_b != run_a and run_of(state_a) == run_a
    attacker = RawClient(fed.bundles / a, fed.port, subscribe=[f"nf/{fed.federation}/task"])
    try:
        assert attacker.publish(replay) == len(replay)

        def refused() -> list[dict]:
            return [e for e in fed.events("reject") if e.get("wire") and e["site"] == a]

        def taken() -> list[dict]:
            return [e for e in fed.events("update") if e["site"] == a]

        wait_for(lambda: len(refused()) >= len(replay) or taken(), 30, "the replay's fate", fed.procs)
        r1 = fed.wait_round(1, timeout=120)
        assert r1["sites"] == [b], "the replayed update counted toward run B's round 1"
        assert not taken()
        assert [(e["reason"], e["msg_kind"], e["msg_round"], e["authenticated"]) for e in refused()] == [
            ("other-run", "update", 1, False)
        ] * len(replay)
        assert r1["rejected"].count([a, "other-run"]) == len(replay)

        # control: the same plaintext sealed for run B (round 2, naming round 2's model) is taken
        wait_for(lambda: announced(fed, 2), 120, "run B's round 2", fed.procs, poll=0.05)
        task = wait_for(lambda: current_task(attacker, fed.bundles / a, run_b, 2), 30, "round 2's task")
        meta2 = dict(meta, model_digest=task["model_digest"])
        attacker.publish(seal_message(bundle_a, MessageKind.UPDATE, 2, meta2, payload, run=run_b).frames)
        r2 = fed.wait_round(2, timeout=120)
    finally:
        attacker.close()
    assert r2["sites"] == [a, b], "the same update sealed for this run must be taken"
    took = next(e for e in fed.events("update") if e["site"] == a)
    assert took["round"] == 2 and took["sha256"] == message_digest(meta2, payload)


@pytest.fixture
def fed_tracked(request, tmp_path, wire_data):
    """A federation of its own name: its MLflow experiment and parent run are this test's alone."""
    yield from _federation(request, tmp_path, wire_data, "rejectfed")


def _sig_pos(frame: bytes) -> int:
    """Where the signature starts in an envelope: magic, u16 header length, header."""
    return 6 + int.from_bytes(frame[4:6], "big")


def _rejection_catalogue(bundle, run: str) -> dict[str, list[tuple[str, bytes]]]:
    """One message (its frames, on site-01's own topics) per wire rejection reason that site-01's
    certificate can produce through the broker."""
    from neurofed.wire.envelope import decode_frame

    a, fedname = bundle.participant, bundle.federation
    meta, payload = {"num_cases": 1}, b"u" * 100
    plain_len = len(encode_plaintext_prefix(meta)) + len(payload)

    def update(**kw) -> list[tuple[str, bytes]]:
        kw.setdefault("run", run)
        return forge(bundle, MessageKind.UPDATE, kw.pop("round", 1), payload, meta=meta, **kw)

    def retopic(frames, **changes) -> list[tuple[str, bytes]]:
        out = []
        for _topic, data in frames:
            f = decode_frame(data)
            t = dict(sender=a, msg_id=f.header.msg_id, index=f.index) | changes
            out.append(
                (topic_for(fedname, MessageKind.UPDATE, t["sender"], 1, t["msg_id"], t["index"]), data)
            )
        return out

    ((t0, d0),) = update()
    f0 = decode_frame(d0)
    other_keys = json.dumps({"coordinator": "AAAA"}).encode()
    conflict_id = new_msg_id()
    first = forge(bundle, MessageKind.UPDATE, 1, b"v" * 1500, run=run, msg_id=conflict_id)
    second = forge(bundle, MessageKind.UPDATE, 1, b"w" * 1500, run=run, msg_id=conflict_id)
    assert len(first) == len(second) == 2 and first[0][1] != second[0][1]
    return {
        "malformed-header": [
            (topic_for(fedname, MessageKind.UPDATE, a, 1, new_msg_id(), 0), b"NFW\x02garbage")
        ],
        "extra-chunk": [
            (
                t0.rsplit("/", 1)[0] + "/1",
                encode_frame(f0.header_bytes, f0.signature, 1, True, b"", bytes(f0.body)),
            )
        ],
        "wrong-federation": update(header_changes={"federation": "otherfed"}),
        "sender-topic-mismatch": retopic(update(sender="site-02")),
        "topic-mismatch": retopic(update(), msg_id=new_msg_id()),
        "other-run": update(run=new_run_id()),
        "stale-or-future-round": update(round=7),
        "not-a-recipient": update(recipients=["site-02"]),
        # a header naming the hybrid KEM in this x25519 federation (the wraps are x25519)
        "wrong-kem": update(header_changes={"kem": "mlkem768-x25519"}),
        "bad-signature": [(t, flip(d, _sig_pos(d) + 5)) for t, d in update()],
        "tampered-keys": [
            (t0, encode_frame(f0.header_bytes, f0.signature, 0, True, other_keys, bytes(f0.body)))
        ],
        "bad-key-wrap": update(wrap_run=new_run_id()),
        "tampered-chunk": [(t, flip(d, len(d) - 1)) for t, d in update()],
        "size-mismatch": update(header_changes={"size": plain_len + 1}),
        "digest-mismatch": update(header_changes={"digest": "0" * 64}),
        "malformed-body": update(plaintext=b"\x00\x00\x00\x03[1]" + payload),
        "over-size-limit": update(header_changes={"size": 3 * 1024**3}),
        # the same message id under two signed headers: chunk 0 of each
        "chunk-conflict": [first[0], second[0]],
    }


# Reasons of PROTOCOL.md's table that no participant's certificate produces through the broker:
# the broker's ACL lets a site publish only on its own update/metrics/status topics, and the topic
# must name the signer (checked before the roster), so a header naming an unknown signer or a site
# sending a coordinator kind is refused as a topic mismatch first (the coordinator's certificate
# could send a site kind, but connecting with it displaces the coordinator). incomplete-timeout is
# 300 s in the coordinator; memory-budget needs 512 incomplete messages or 3 GiB in flight. These
# are covered in-process by tests/wire/test_receiver.py.
NOT_THROUGH_THE_BROKER = ("unknown-sender", "sender-role", "incomplete-timeout", "memory-budget")
BURST = 50
CLAIMS = 30


def test_every_wire_rejection_is_recorded_in_events_the_round_line_and_mlflow(
    fed_tracked,
    mlflow_server,  # the session's server (tests/fixtures/mlflow.py)
):
    """Issue 21, item 3: one message per rejection reason, from site-01's certificate, into a real
    coordinator's round 1; then 50 replays of one message and 30 messages each claiming another
    sender (bursts). Each reason's count is in events.jsonl (``reject``, ``wire: true``: one line
    each, at most 20 per publisher and reason, then one ``reject-burst`` line), in the round
    event's ``rejected_by_reason``, in the CLI's round line and in the MLflow parent run's
    ``rejected/<reason>``; log lines are rate-limited."""
    import mlflow
    from safetensors.numpy import load_file

    from neurofed.coordinator import payload as codec

    fed = fed_tracked
    a, b = fed.sites
    coord = fed.start_coordinator(rounds=1, min_sites=1, timeout=120, mlflow=mlflow_server)
    wait_for(lambda: announced(fed, 1), 120, "round 1", fed.procs, poll=0.1)
    run = run_of(fed.state)
    bundle_a = load_bundle(fed.bundles / a)
    catalogue = _rejection_catalogue(bundle_a, run)
    expected = Counter({reason: 1 for reason in catalogue})
    # the burst: a genuine METRICS from site-01 is taken; the same frame 50 times more is replay
    (metrics,) = seal_message(
        bundle_a, MessageKind.METRICS, 1, {"dice": 0.5, "hd95": 3.0, "num_cases": 1}, run=run
    ).frames
    expected["replay"] = BURST
    # a burst under ever new names: sender-topic-mismatch, each claiming another sender
    renamed = [
        (topic.replace(f"/update/claimed-{i}/", f"/update/{a}/"), data)
        for i in range(CLAIMS)
        for topic, data in forge(
            bundle_a, MessageKind.UPDATE, 1, b"n", meta={"num_cases": 1}, run=run, sender=f"claimed-{i}"
        )
    ]
    expected["sender-topic-mismatch"] += CLAIMS

    def wire_events() -> Counter:
        return Counter(e["reason"] for e in fed.events("reject") if e.get("wire") and e["round"] == 1)

    attacker = RawClient(fed.bundles / a, fed.port)
    try:
        for frames in catalogue.values():
            attacker.publish(frames)
        attacker.publish([metrics])
        wait_for(lambda: fed.events("metrics"), 30, "site-01's genuine METRICS", fed.procs)
        attacker.publish([metrics] * BURST)
        attacker.publish(renamed)
        logged = Counter({r: min(n, 20) for r, n in expected.items()})
        wait_for(lambda: wire_events() == logged, 60, f"the rejections {dict(logged)}", fed.procs)
        # genuine updates of both sites close the round
        weights = codec.encode(load_file(fed.summary["init"]))
        attacker.publish(
            seal_message(bundle_a, MessageKind.UPDATE, 1, {"num_cases": 2}, weights, run=run).frames
        )
    finally:
        attacker.close()
    site_b = RawClient(fed.bundles / b, fed.port)
    try:
        bundle_b = load_bundle(fed.bundles / b)
        site_b.publish(
            seal_message(bundle_b, MessageKind.UPDATE, 1, {"num_cases": 2}, weights, run=run).frames
        )
    finally:
        site_b.close()
    r1 = fed.wait_round(1, timeout=60)

    total = sum(expected.values())
    assert r1["sites"] == [a, b]
    assert r1["rejected_by_reason"] == dict(expected)
    events = [e for e in fed.events("reject") if e.get("wire")]
    assert Counter(e["reason"] for e in events) == logged, "one event per rejection, 20 at most"
    # the sender as the header claims it ("?" where there is no readable header); the publisher
    # (whose topic it came on: the broker's ACL ties it to the certificate) is site-01 throughout
    assert {e["publisher"] for e in events} == {a}
    claimed = {e["reason"]: e["site"] for e in events if e["reason"] != "sender-topic-mismatch"}
    assert claimed == {r: a for r in expected if r != "sender-topic-mismatch"} | {
        "malformed-header": "?",
        "extra-chunk": "?",
    }
    by_reason = {e["reason"]: e for e in events}
    assert by_reason["tampered-chunk"]["authenticated"] and by_reason["chunk-conflict"]["authenticated"]
    assert not by_reason["bad-signature"]["authenticated"] and not by_reason["replay"]["authenticated"]
    assert {(e["msg_kind"], e["msg_round"]) for e in events if e["reason"] == "replay"} == {("metrics", 1)}
    # bursts: 20 events each, then one line with the count (per publisher, whatever names it claims)
    bursts = [(e["publisher"], e["reason"], e["round"], e["count"]) for e in fed.events("reject-burst")]
    assert sorted(bursts) == [(a, "replay", 1, BURST), (a, "sender-topic-mismatch", 1, CLAIMS + 1)]
    log = coord.log.read_text(errors="replace")
    assert re.search(rf"round 1 closed: 2 updates \(4 cases\), 1 evaluations, {total} rejected", log), log
    for reason in ("replay", "sender-topic-mismatch"):
        assert log.count(f"rejected a message: {reason}") == 5, "log lines of a burst are rate-limited"

    # MLflow: the parent run of this federation run counts them per reason
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)

    def parent_metrics() -> dict[str, float]:
        exp = client.get_experiment_by_name(fed.federation)
        runs = exp and client.search_runs([exp.experiment_id], f"tags.`neurofed.run` = '{run}'")
        metrics = runs[0].data.metrics if runs else {}
        return metrics if "rejected" in metrics else {}

    metrics = wait_for(parent_metrics, 60, "round 1's metrics in MLflow", fed.procs)
    assert metrics["rejected"] == total
    assert {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("rejected/")} == dict(expected)
    assert not set(NOT_THROUGH_THE_BROKER) & set(expected)
