"""``view_state`` (zero-copy safetensors reader used by the coordinator) against the safetensors
library itself: same arrays for whatever the library writes, a clear error for what it would
refuse."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load, save

from wire.errors import ProtocolError
from wire.payload import decode_state, encode_state, view_state

DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.int8, np.uint8, np.bool_]


@st.composite
def states(draw):
    n = draw(st.integers(0, 6))
    out = {}
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
        dtype = draw(st.sampled_from(DTYPES))
        rng = np.random.default_rng(draw(st.integers(0, 2**31)))
        out[f"t{i}.w"] = np.asarray((rng.normal(size=shape) * 10).astype(dtype))
    return out


@settings(max_examples=150, deadline=None)
@given(states())
def test_views_equal_the_librarys_copies(state):
    data = save(state)
    ref, got = load(data), view_state(data)
    assert set(ref) == set(got)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape
        np.testing.assert_array_equal(got[k], ref[k])


def test_views_share_memory_with_the_payload_and_are_read_only():
    data = memoryview(bytearray(encode_state({"w": np.arange(1000, dtype=np.float32)}))).toreadonly()
    out = decode_state(data, copy=False)
    assert not out["w"].flags.writeable and not out["w"].flags.owndata
    np.testing.assert_array_equal(out["w"], np.arange(1000, dtype=np.float32))
    half = decode_state(encode_state({"w": np.ones(4, np.float32)}, fp16=True), copy=False)
    assert half["w"].dtype == np.float32  # the fp16 wire cast is undone, as with copy=True


def forged(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


@pytest.mark.parametrize(
    ("header", "body", "why"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "do not fit"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "do not fit"),
        ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "bad shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}, b"\0" * 8, "bad data_offsets"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "gaps or overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "trailing"),
        ({"a": [1, 2]}, b"", "unknown dtype"),
    ],
)
def test_malformed_payloads_are_refused_like_the_library_does(header, body, why):
    data = forged(header, body)
    with pytest.raises(ValueError, match=why):
        view_state(data)
    with pytest.raises(Exception):  # noqa: B017 - the library refuses them too (its own error types)
        load(data)
    with pytest.raises(ProtocolError) as exc:
        decode_state(data, copy=False)
    assert exc.value.reason == "bad-payload"
