"""Every rejection reason of the receiver, each with a message that is valid but for one thing.

Each test asserts the specific reason counter and that nothing was delivered, so removing the
check either delivers the message or files it under another reason: the test fails."""

from __future__ import annotations

import os

import pytest

from neurofed.wire.api import MessageKind
from neurofed.wire.envelope import decode_frame, encode_frame
from neurofed.wire.errors import ProtocolError
from neurofed.wire.receiver import Receiver
from neurofed.wire.sealing import seal_message
from tests.wire.helpers import feed_all, flip, forge

U = MessageKind.UPDATE


def payload(n: int = 5000) -> bytes:
    return os.urandom(n)


def frames_of(sealed):
    return list(sealed.frames)


@pytest.fixture(autouse=True, params=["disk", "memory"])
def spool(request, monkeypatch):
    """Every check holds whether incomplete messages wait in a spool file (the coordinator) or in
    memory (a site): each test runs both ways, but for those that look at the spool files."""
    if request.param == "memory":
        init = Receiver.__init__

        def in_memory(self, *args, **kw):
            if "spool_dir" not in kw:
                kw.setdefault("spool_in_memory", True)
            init(self, *args, **kw)

        monkeypatch.setattr(Receiver, "__init__", in_memory)
    return request.param


def rejected(receiver: Receiver, reason: str) -> None:
    assert receiver.rejections[reason] >= 1, dict(receiver.rejections)


def test_valid_update_round_trip_in_any_order(fed):
    data = payload(10_000)
    fr = frames_of(seal_message(fed.a, U, 3, {"num_cases": 7}, data, chunk_size=1000))
    assert len(fr) == 11
    r = Receiver(fed.coordinator)
    msgs = feed_all(r, list(reversed(fr)))  # reordered delivery is repaired by the chunk index
    assert len(msgs) == 1 and msgs[0].payload == data and msgs[0].meta == {"num_cases": 7}
    assert msgs[0].sender == "site-a" and msgs[0].round == 3
    assert not r.rejections


def test_frames_encrypted_in_place_equal_head_plus_sealed_chunk(fed):
    """The sender encrypts each chunk straight into its frame's buffer; the bytes must be exactly
    the frame head followed by AES-GCM's output for that chunk (what the receiver opens)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from neurofed.wire import crypto
    from neurofed.wire.envelope import chunk_aad

    key = AESGCM.generate_key(bit_length=256)
    piece = os.urandom(3000)
    aad = chunk_aad(b"header", 2, True)
    out = bytearray(len(piece) + crypto.TAG_LEN)
    crypto.seal_chunk_into(AESGCM(key), 2, piece, aad, memoryview(out))
    assert bytes(out) == crypto.seal_chunk(AESGCM(key), 2, piece, aad)
    for _topic, frame in frames_of(
        seal_message(fed.a, U, 3, {"num_cases": 7}, payload(2500), chunk_size=1000)
    ):
        f = decode_frame(frame)
        assert bytes(frame) == encode_frame(
            f.header_bytes, f.signature, f.index, f.final, f.keys_bytes, f.body
        )
        assert len(f.body) > crypto.TAG_LEN


def test_model_broadcast_opens_for_every_site_and_duplicates_are_ignored(fed):
    data = payload(3000)
    fr = frames_of(seal_message(fed.coordinator, MessageKind.MODEL, 1, {}, data, chunk_size=1000))
    for site in (fed.a, fed.b, fed.c):
        r = Receiver(site)
        msgs = feed_all(r, fr + fr[1:3])  # QoS 1 redelivery of chunks in flight
        assert [m.payload for m in msgs] == [data]
        assert r.rejections.get("replay", 0) == 2  # redelivered after completion: counted as replay
    r = Receiver(fed.a)
    assert feed_all(r, [fr[0], fr[0], *fr[1:]])[0].payload == data
    assert not r.rejections


def test_retained_copy_after_completion_is_silent(fed):
    fr = frames_of(seal_message(fed.coordinator, MessageKind.TASK, 1, {"round": 1}))
    r = Receiver(fed.a)
    assert len(feed_all(r, fr, retained=True)) == 1
    assert feed_all(r, fr, retained=True) == [] and not r.rejections


def test_bad_signature(fed):
    fr = forge(fed.a, U, 1, payload())
    topic, data = fr[0]
    hlen = int.from_bytes(data[4:6], "big")
    r = Receiver(fed.coordinator)
    assert feed_all(r, [(topic, flip(data, 6 + hlen + 3))] + fr[1:]) == []
    rejected(r, "bad-signature")


def test_signature_by_another_key_under_a_known_name(fed):
    # site-x of the rogue federation signs as "site-a": the roster key of site-a does not verify it
    fr = forge(fed.rogue_x, U, 1, payload(), sender="site-a", recipients=[])
    r = Receiver(fed.coordinator)
    assert feed_all(r, fr) == []
    rejected(r, "bad-signature")


def test_unknown_sender(fed):
    fr = forge(fed.rogue_x, U, 1, payload(), recipients=[])
    r = Receiver(fed.coordinator)
    assert feed_all(r, fr) == []
    rejected(r, "unknown-sender")


def test_sender_not_matching_topic(fed):
    fr = forge(fed.a, U, 1, payload(500))
    topic = fr[0][0].replace("/update/site-a/", "/update/site-b/")
    r = Receiver(fed.coordinator)
    assert feed_all(r, [(topic, fr[0][1])]) == []
    rejected(r, "sender-topic-mismatch")


def test_topic_disagreeing_with_header(fed):
    fr = forge(fed.a, U, 1, payload(500))
    topic = fr[0][0].replace("/update/site-a/1/", "/update/site-a/2/")
    r = Receiver(fed.coordinator)
    assert feed_all(r, [(topic, fr[0][1])]) == []
    rejected(r, "topic-mismatch")


def test_site_may_not_send_coordinator_kinds(fed):
    # a site's MODEL lands on a coordinator topic: caught as a topic/sender mismatch
    r = Receiver(fed.b)
    assert feed_all(r, forge(fed.a, MessageKind.MODEL, 1, payload(500), recipients=["site-b"])) == []
    rejected(r, "sender-topic-mismatch")
    # the coordinator's UPDATE on update/coordinator/...: topic agrees, the role does not
    r = Receiver(fed.coordinator)
    assert feed_all(r, forge(fed.coordinator, U, 1, payload(500))) == []
    rejected(r, "sender-role")
    with pytest.raises(ValueError, match="may not send"):
        seal_message(fed.a, MessageKind.MODEL, 1)


def test_wrong_federation(fed):
    fr = frames_of(seal_message(fed.other_a, U, 1, {}, payload(500)))
    r = Receiver(fed.coordinator)
    assert feed_all(r, fr) == []
    rejected(r, "wrong-federation")


@pytest.mark.parametrize("rnd", [3, 7])
def test_stale_or_future_round(fed, rnd):
    r = Receiver(fed.coordinator)
    r.set_round_window(5, 5)
    assert feed_all(r, frames_of(seal_message(fed.a, U, rnd, {}, payload(500)))) == []
    rejected(r, "stale-or-future-round")
    assert len(feed_all(r, frames_of(seal_message(fed.a, U, 5, {}, payload(500))))) == 1


def test_a_site_back_after_several_rounds_takes_the_current_task(fed):
    """A site whose window is still round 1's takes the coordinator's task of round 5 (the
    coordinator sets the rounds), and still refuses one of an earlier round."""
    r = Receiver(fed.a)
    r.set_round_window(0, 2)
    assert len(feed_all(r, frames_of(seal_message(fed.coordinator, MessageKind.TASK, 5, {"round": 5})))) == 1
    r.set_round_window(4, 6)
    assert feed_all(r, frames_of(seal_message(fed.coordinator, MessageKind.TASK, 3, {"round": 3}))) == []
    rejected(r, "stale-or-future-round")


def test_replayed_message_id(fed):
    fr = frames_of(seal_message(fed.a, U, 1, {}, payload(500)))
    r = Receiver(fed.coordinator)
    assert len(feed_all(r, fr)) == 1
    assert feed_all(r, fr) == []
    rejected(r, "replay")


def test_tampered_chunk(fed):
    fr = frames_of(seal_message(fed.a, U, 1, {}, payload(3000), chunk_size=1000))
    topic, data = fr[1]
    r = Receiver(fed.coordinator)
    assert feed_all(r, [fr[0], (topic, flip(data, len(data) - 20)), fr[2], fr[3]]) == []
    rejected(r, "tampered-chunk")


def test_chunks_swapped_between_indices(fed):
    # bodies of chunks 1 and 2 swapped under their own (signed) headers: reordered beyond repair
    fr = frames_of(seal_message(fed.a, U, 1, {}, payload(3000), chunk_size=1000))
    f1, f2 = decode_frame(fr[1][1]), decode_frame(fr[2][1])
    swapped1 = encode_frame(f1.header_bytes, f1.signature, 1, False, b"", f2.body)
    swapped2 = encode_frame(f2.header_bytes, f2.signature, 2, False, b"", f1.body)
    r = Receiver(fed.coordinator)
    assert feed_all(r, [fr[0], (fr[1][0], swapped1), (fr[2][0], swapped2), fr[3]]) == []
    rejected(r, "tampered-chunk")


def test_chunk_spliced_from_another_message(fed):
    one = frames_of(seal_message(fed.a, U, 1, {}, payload(3000), chunk_size=1000))
    two = frames_of(seal_message(fed.a, U, 1, {}, payload(3000), chunk_size=1000))
    f1 = decode_frame(one[1][1])
    spliced = encode_frame(f1.header_bytes, f1.signature, 1, False, b"", decode_frame(two[1][1]).body)
    r = Receiver(fed.coordinator)
    assert feed_all(r, [one[0], (one[1][0], spliced), one[2], one[3]]) == []
    rejected(r, "tampered-chunk")


def _forged_chunk_orders():
    """(name, order of frames) where ``F`` is a forged body for chunk 1 under the genuine signed
    header (what anyone holding the sender's broker certificate can publish on its topic)."""
    return {
        "after the genuine, key known": [0, 1, "F", 2, 3],
        "before the genuine, key known": [0, "F", 1, 2, 3],
        "before the genuine, key not yet known": ["F", 1, 2, 3, 0],
        "after the genuine, key not yet known": [1, "F", 2, 3, 0],
        "completing the message before the genuine": [0, 2, 3, "F", 1],
    }


@pytest.mark.parametrize("order", list(_forged_chunk_orders()))
def test_a_forged_chunk_cannot_spoil_the_genuine_message(fed, order):
    body = payload(3000)
    fr = frames_of(seal_message(fed.a, U, 1, {"n": 1}, body, chunk_size=1000))
    topic, data = fr[1]
    forged = (topic, flip(data, len(data) - 5))
    r = Receiver(fed.coordinator)
    seq = [forged if i == "F" else fr[i] for i in _forged_chunk_orders()[order]]
    [m] = feed_all(r, seq)
    assert m.payload == body and m.meta == {"n": 1}
    rejected(r, "tampered-chunk")
    assert not r.rejections["chunk-conflict"] and not r.rejections["replay"], dict(r.rejections)


def test_a_forged_chunk_for_a_complete_unopened_message_spoils_nothing(fed, tmp_path):
    body = payload(3000)
    fr = frames_of(seal_message(fed.a, U, 1, {}, body, chunk_size=1000))
    topic, data = fr[2]
    r = Receiver(fed.coordinator, spool_dir=tmp_path, defer_open=True)
    assert feed_all(r, fr + [(topic, flip(data, len(data) - 5))]) == []
    m = r.open_ready()
    assert m is not None and m.payload == body
    rejected(r, "tampered-chunk")


def test_more_candidates_than_the_bound_are_refused_without_dropping_the_message(fed):
    body = payload(3000)
    fr = frames_of(seal_message(fed.a, U, 1, {}, body, chunk_size=1000))
    topic, data = fr[1]
    forgeries = [(topic, flip(data, len(data) - 5 - i)) for i in range(6)]
    r = Receiver(fed.coordinator)
    [m] = feed_all(r, [fr[1], *forgeries, fr[2], fr[3], fr[0]])
    assert m.payload == body
    rejected(r, "chunk-conflict")
    rejected(r, "tampered-chunk")


def test_same_message_id_with_another_signed_header(fed):
    fr = forge(fed.a, U, 1, payload(3000), chunk_size=1000)
    f0 = decode_frame(fr[0][1])
    other = forge(fed.a, U, 1, payload(3000), chunk_size=1000, header_changes={"msg_id": f0.header.msg_id})
    r = Receiver(fed.coordinator)
    assert feed_all(r, [fr[0], other[1], fr[1], fr[2], fr[3]]) == []
    rejected(r, "chunk-conflict")


def test_extra_chunk(fed):
    fr = frames_of(seal_message(fed.a, U, 1, {}, payload(2000), chunk_size=1000))
    f = decode_frame(fr[0][1])
    extra = encode_frame(f.header_bytes, f.signature, f.header.count, False, b"", b"x" * 50)
    topic = fr[0][0].rsplit("/", 1)[0] + f"/{f.header.count}"
    r = Receiver(fed.coordinator)
    assert r.feed(topic, extra) is None
    rejected(r, "extra-chunk")


def test_missing_chunk_times_out(fed):
    now = [0.0]
    r = Receiver(fed.coordinator, incomplete_timeout=10, clock=lambda: now[0])
    fr = frames_of(seal_message(fed.a, U, 1, {}, payload(3000), chunk_size=1000))
    assert feed_all(r, fr[:1] + fr[2:]) == []
    assert r.pending_bytes > 0
    now[0] = 11.0
    assert r.expire() == 1
    rejected(r, "incomplete-timeout")
    assert r.pending_bytes == 0


def test_truncated_stream(fed):
    # the stream stops early: the final chunks never arrive, and a cut final chunk fails its tag
    now = [0.0]
    r = Receiver(fed.coordinator, incomplete_timeout=5, clock=lambda: now[0])
    fr = frames_of(seal_message(fed.a, U, 1, {}, payload(3000), chunk_size=1000))
    feed_all(r, fr[:2])
    now[0] = 6.0
    r.expire()
    rejected(r, "incomplete-timeout")
    fr = frames_of(seal_message(fed.a, U, 1, {}, payload(3500), chunk_size=1000))
    topic, data = fr[-1]
    assert feed_all(r, fr[:-1] + [(topic, data[:-30])]) == []
    rejected(r, "tampered-chunk")


def test_final_flag_moved(fed):
    fr = frames_of(seal_message(fed.a, U, 1, {}, payload(3000), chunk_size=1000))
    f = decode_frame(fr[1][1])
    early_final = encode_frame(f.header_bytes, f.signature, 1, True, b"", f.body)
    with pytest.raises(ProtocolError) as exc:
        Receiver(fed.coordinator).decode(fr[1][0], early_final)
    assert exc.value.reason == "malformed-header"


def test_header_claiming_fewer_chunks_is_not_signed(fed):
    fr = frames_of(seal_message(fed.a, U, 1, {}, payload(3000), chunk_size=1000))
    f = decode_frame(fr[0][1])
    hb = f.header_bytes.replace(b'"n":4', b'"n":2')
    r = Receiver(fed.coordinator)
    assert r.feed(fr[0][0], encode_frame(hb, f.signature, 0, False, f.keys_bytes, f.body)) is None
    rejected(r, "bad-signature")


def test_over_size_limit(fed):
    r = Receiver(fed.coordinator, max_message_bytes=2000)
    assert feed_all(r, frames_of(seal_message(fed.a, U, 1, {}, payload(5000), chunk_size=1000))) == []
    rejected(r, "over-size-limit")
    r = Receiver(fed.coordinator, max_frame_bytes=500)
    assert feed_all(r, frames_of(seal_message(fed.a, U, 1, {}, payload(1000)))) == []
    rejected(r, "over-size-limit")


def test_memory_budget_evicts_oldest_incomplete(fed):
    r = Receiver(fed.coordinator, max_pending_bytes=5000)
    one = frames_of(seal_message(fed.a, U, 1, {}, payload(4000), chunk_size=1000))
    two = frames_of(seal_message(fed.b, U, 1, {}, payload(4000), chunk_size=1000))
    feed_all(r, one[:3])
    feed_all(r, two[:3])
    assert r.pending_bytes <= 5000
    rejected(r, "memory-budget")
    assert len(feed_all(r, two[3:])) == 1


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"NFW", b"NFW\x01", b"NFW\x01\x00\x05{}{}{", b"NFW\x02" + b"\x00" * 100],
)
def test_malformed_header(fed, data):
    r = Receiver(fed.coordinator)
    with pytest.raises(ProtocolError) as exc:
        r.decode("nf/testfed/update/site-a/1/ab/0", data)
    assert exc.value.reason == "malformed-header"


def test_header_with_missing_field(fed):
    fr = frames_of(seal_message(fed.a, U, 1, {}, payload(100)))
    f = decode_frame(fr[0][1])
    hb = f.header_bytes.replace(b',"v":2', b"")
    with pytest.raises(ProtocolError) as exc:
        Receiver(fed.coordinator).decode(
            fr[0][0], encode_frame(hb, f.signature, 0, True, f.keys_bytes, f.body)
        )
    assert exc.value.reason == "malformed-header"


def test_keys_block_tampered(fed):
    fr = frames_of(seal_message(fed.a, U, 1, {}, payload(100)))
    f = decode_frame(fr[0][1])
    kb = f.keys_bytes.replace(b'"coordinator"', b'"coordinatoR"')
    r = Receiver(fed.coordinator)
    assert r.feed(fr[0][0], encode_frame(f.header_bytes, f.signature, 0, True, kb, f.body)) is None
    rejected(r, "tampered-keys")


def test_not_a_recipient(fed):
    fr = frames_of(seal_message(fed.a, U, 1, {}, payload(100)))
    r = Receiver(fed.b)
    assert feed_all(r, fr) == []
    rejected(r, "not-a-recipient")


def test_key_wrap_bound_to_round(fed):
    # a wrap made for round 1 cannot open under a header that says round 2 (HPKE info)
    fr = forge(fed.a, U, 1, payload(100))
    f = decode_frame(fr[0][1])
    other = forge(fed.a, U, 2, payload(100), header_changes={"msg_id": f.header.msg_id})
    g = decode_frame(other[0][1])
    mixed = encode_frame(g.header_bytes, g.signature, 0, True, f.keys_bytes, g.body)
    # the keys block no longer matches the signed keys_digest, so use a header that signs it
    r = Receiver(fed.coordinator)
    assert r.feed(other[0][0], mixed) is None
    assert r.rejections["tampered-keys"] == 1


def test_digest_mismatch_under_valid_signature(fed):
    # a participant that signs a digest that does not match the content it sealed
    fr = forge(fed.a, U, 1, payload(100), header_changes={"digest": "0" * 64})
    r = Receiver(fed.coordinator)
    assert feed_all(r, fr) == []
    rejected(r, "digest-mismatch")


def test_feed_never_raises_and_counts(fed):
    r = Receiver(fed.coordinator)
    assert r.feed("nf/testfed/update/site-a/1/x/0", os.urandom(300)) is None
    assert sum(r.rejections.values()) == 1


def test_interleaved_uploads_are_spooled_not_held_in_memory(fed, tmp_path):
    """Twelve 1 MiB uploads arriving interleaved (as concurrent senders' chunks do): Python's heap
    grows by about one message while they reassemble, not twelve, and the spool files go away."""
    import tracemalloc

    senders = [fed.a, fed.b, fed.c]
    data = {i: os.urandom(1024 * 1024 - i) for i in range(12)}
    streams = [
        frames_of(seal_message(senders[i % 3], U, 1, {"i": i}, data[i], chunk_size=64 * 1024)) for i in data
    ]
    interleaved = [s[k] for k in range(max(map(len, streams))) for s in streams if k < len(s)]
    r = Receiver(fed.coordinator, spool_dir=tmp_path)
    got = {}
    tracemalloc.start()
    try:
        for topic, frame in interleaved:
            m = r.feed(topic, frame)
            if m is not None:
                got[m.meta["i"]] = bytes(m.payload)  # the test keeps copies; measured below
                del m
            if len(got) == 0:
                _, peak_before_any_complete = tracemalloc.get_traced_memory()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == data and not r.rejections
    # the ciphertext of all twelve (about 12 MiB) was in flight at once before the first completed
    assert r.pending_bytes == 0 and list(tmp_path.iterdir()) == []
    assert peak_before_any_complete < 3 * 1024 * 1024, peak_before_any_complete


def test_spool_files_are_removed_when_a_message_is_dropped(fed, tmp_path):
    now = [0.0]
    r = Receiver(fed.coordinator, spool_dir=tmp_path, incomplete_timeout=1, clock=lambda: now[0])
    fr = frames_of(seal_message(fed.a, U, 1, {}, payload(5000), chunk_size=1000))
    feed_all(r, fr[:3])
    assert r.pending_bytes > 0
    now[0] = 5.0
    assert r.expire() == 1 and r.pending_bytes == 0
    feed_all(r, frames_of(seal_message(fed.b, U, 1, {}, payload(5000), chunk_size=1000))[:2])
    r.close()
    assert r.pending_bytes == 0


def test_large_payload_is_a_read_only_view_small_one_bytes(fed):
    big, small = os.urandom(200_000), os.urandom(100)
    r = Receiver(fed.coordinator)
    [m] = feed_all(r, frames_of(seal_message(fed.a, U, 1, {}, big, chunk_size=64 * 1024)))
    assert isinstance(m.payload, memoryview) and m.payload.readonly and m.payload == big
    [m] = feed_all(r, frames_of(seal_message(fed.a, U, 1, {}, small)))
    assert isinstance(m.payload, bytes) and m.payload == small


def test_deferred_open_keeps_complete_messages_spooled_and_rejects_tampered_ones_on_open(fed, tmp_path):
    r = Receiver(fed.coordinator, spool_dir=tmp_path, defer_open=True)
    good = payload(5000)
    assert feed_all(r, frames_of(seal_message(fed.a, U, 1, {"n": 1}, good, chunk_size=1000))) == []
    fr = frames_of(seal_message(fed.b, U, 1, {"n": 2}, payload(5000), chunk_size=1000))
    topic, data = fr[2]
    fr[2] = (topic, flip(data, len(data) - 20))  # a bit flipped inside chunk 2's ciphertext
    assert feed_all(r, fr) == []
    assert r.ready_count == 2 and r.pending_bytes > 0 and not r.rejections
    m = r.open_ready()
    assert m is not None and m.payload == good and m.meta == {"n": 1}
    assert r.open_ready() is None  # the tampered one fails only when opened, and is counted
    rejected(r, "tampered-chunk")
    # it waits for an authentic chunk 2 (a forgery must not spoil a genuine message) until its
    # timeout, then goes with its spool file
    assert r.ready_count == 0 and r.pending_bytes > 0
    assert r.expire(now=r.clock() + r.incomplete_timeout + 1) == 1
    rejected(r, "incomplete-timeout")
    assert r.pending_bytes == 0 and list(tmp_path.iterdir()) == []


def test_rejections_are_rate_limited_per_publisher_not_per_claimed_sender(fed, caplog):
    """A header claims whatever sender its author likes until its signature verifies: 50
    rejections on site-a's topic, each claiming another sender, are 50 records naming site-a as
    their publisher (the broker's ACL ties the topic to site-a's certificate) and 5 log lines,
    not 50 (the limit was per claimed sender, so a new name each time escaped it)."""
    import logging

    r = Receiver(fed.coordinator)
    frames = []
    for i in range(50):
        ((topic, data),) = forge(fed.a, U, 1, payload(100), sender=f"claimed-{i}")
        frames.append((topic.replace(f"/update/claimed-{i}/", "/update/site-a/"), data))
    with caplog.at_level(logging.WARNING, logger="neurofed.wire.receiver"):
        assert feed_all(r, frames) == []
    recs = r.drain_rejected()
    assert [(x["reason"], x["publisher"]) for x in recs] == [("sender-topic-mismatch", "site-a")] * 50
    assert {x["sender"] for x in recs} == {f"claimed-{i}" for i in range(50)}
    assert len([m for m in caplog.messages if "rejected a message" in m]) == 5
    # a topic that names nobody: no publisher
    assert feed_all(r, [("elsewhere", frames[0][1])]) == []
    assert [(x["reason"], x["publisher"]) for x in r.drain_rejected()] == [("topic-mismatch", None)]
