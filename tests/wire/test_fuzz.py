"""Property-based fuzzing of the decoder: random bytes, and mutations of valid envelopes that get
past the parser into the signature and AEAD checks. Only ProtocolError may come out."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neurofed.wire.api import MessageKind
from neurofed.wire.envelope import decode_frame, encode_frame
from neurofed.wire.errors import ProtocolError
from neurofed.wire.receiver import Receiver
from neurofed.wire.sealing import seal_message

SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
TOPIC = "nf/testfed/update/site-a/1/{msg}/{i}"


def decode_only_protocol_errors(r: Receiver, topic: str, data: bytes):
    try:
        return r.decode(topic, data)
    except ProtocolError as exc:
        assert exc.reason and isinstance(exc.reason, str)
        return None


@pytest.fixture(scope="module")
def valid(fed):
    sealed = seal_message(fed.a, MessageKind.UPDATE, 1, {"num_cases": 3}, os.urandom(2500), chunk_size=1000)
    return list(sealed.frames)


@SETTINGS
@given(data=st.binary(max_size=2000), topic=st.text(max_size=60))
def test_random_bytes(fed, data, topic):
    r = Receiver(fed.coordinator)
    assert decode_only_protocol_errors(r, topic, data) is None


@SETTINGS
@given(body=st.binary(max_size=500), header=st.binary(max_size=300))
def test_random_after_magic(fed, body, header):
    data = b"NFW\x01" + len(header).to_bytes(2, "big") + header + body
    assert (
        decode_only_protocol_errors(Receiver(fed.coordinator), "nf/testfed/update/site-a/1/x/0", data) is None
    )


@SETTINGS
@given(
    which=st.integers(0, 2),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 1200)),
)
def test_mutated_envelopes(fed, valid, which, flips, cut):
    """Byte flips anywhere (header, signature, keys, body) and truncations of one chunk of a valid
    message, fed with its intact siblings: nothing but ProtocolError, and never a delivery of
    altered content."""
    topic, data = valid[which]
    b = bytearray(data)
    for pos, x in flips:
        b[pos % len(b)] ^= x
    mutated = bytes(b if cut is None else b[:cut])
    r = Receiver(fed.coordinator)
    delivered = []
    for i, (t, d) in enumerate(valid):
        m = decode_only_protocol_errors(r, t, mutated if i == which else d)
        if m is not None:
            delivered.append(m)
    if mutated != data:
        assert delivered == []


@SETTINGS
@given(body_flip=st.integers(0, 10**6), keep_sig=st.booleans())
def test_body_mutations_reach_aead(fed, valid, body_flip, keep_sig):
    """Mutate only the sealed body (the header and signature stay valid), so the fuzzing reaches
    the AES-GCM check itself."""
    f = decode_frame(valid[1][1])
    body = bytearray(f.body)
    body[body_flip % len(body)] ^= 0x80
    mutated = encode_frame(f.header_bytes, f.signature, f.index, f.final, f.keys_bytes, bytes(body))
    r = Receiver(fed.coordinator)
    reasons = []
    for i, (t, d) in enumerate(valid):
        try:
            assert r.decode(t, mutated if i == 1 else d) is None
        except ProtocolError as exc:
            reasons.append(exc.reason)
    assert reasons == ["tampered-chunk"]
