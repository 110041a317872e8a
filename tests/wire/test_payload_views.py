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

from neurofed.wire.errors import ProtocolError
from neurofed.wire.payload import META_KEY, decode_state, decode_state_torch, encode_state, view_state

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


def _torch_state():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    return torch, {
        "conv.weight": torch.randn(8, 4, 3, generator=g) * 3,
        "conv.bias": torch.randn(8, generator=g, dtype=torch.float64),
        "tiny": torch.tensor([1e-8, -6e-5, 7e4, 65519.0, float("inf")]),  # subnormal, overflow
        "norm.num_batches_tracked": torch.tensor(7),  # a 0-d integer counter stays as it is
        "ready": torch.tensor([True, False]),
    }


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy's, on 7e4
def test_fp16_encoding_of_torch_tensors_matches_numpys_bytes():
    """The site casts with torch (vectorised) and the coordinator with numpy: one payload format,
    so the bytes must be the same either way, rounding, overflow and subnormals included."""
    _, state = _torch_state()
    via_torch = encode_state(state, fp16=True)
    via_numpy = encode_state({k: v.numpy() for k, v in state.items()}, fp16=True)
    assert via_torch == via_numpy
    assert encode_state(state) == encode_state({k: v.numpy() for k, v in state.items()})


@pytest.mark.parametrize("fp16", [False, True])
def test_decode_state_torch_equals_decode_state_and_owns_its_tensors(fp16):
    torch, state = _torch_state()
    data = memoryview(bytearray(encode_state(state, fp16=fp16))).toreadonly()
    ref, got = decode_state(data), decode_state_torch(data)
    assert set(got) == set(ref)
    for k, t in got.items():
        assert isinstance(t, torch.Tensor) and t.dtype == torch.from_numpy(ref[k]).dtype
        np.testing.assert_array_equal(t.numpy(), ref[k])
        assert state[k].dtype == t.dtype  # fp16 on the wire, the sender's dtype back
    got["conv.weight"].add_(1.0)  # a tensor of its own: the payload is untouched
    np.testing.assert_array_equal(decode_state(data)["conv.weight"], ref["conv.weight"])


@pytest.mark.parametrize("cast", ['{"w": "object"}', '{"w": "int64"}', '["w"]', "{"])
def test_dtype_metadata_may_only_restore_float_types(cast):
    data = save({"w": np.ones(2, np.float16)}, metadata={META_KEY: cast})
    for decode in (decode_state, decode_state_torch):
        with pytest.raises(ProtocolError) as exc:
            decode(data)
        assert exc.value.reason == "bad-payload" and "dtype metadata" in exc.value.detail


def test_every_half_precision_value_comes_back_as_numpys_cast_would():
    """The coordinator restores fp16 tensors through a lookup table: all 65,536 bit patterns
    (subnormals, infinities, NaN payloads) against numpy's cast, bit for bit, any shape."""
    every = np.arange(65536, dtype=np.uint16).view(np.float16)
    data = save(
        {"all": every.reshape(256, 256), "scalar": np.asarray(np.float16(-2.5))},
        metadata={META_KEY: '{"all": "float32", "scalar": "float32"}'},
    )
    for copy in (True, False):
        got = decode_state(data, copy=copy)
        assert got["all"].dtype == np.float32 and got["all"].shape == (256, 256)
        np.testing.assert_array_equal(
            got["all"].view(np.uint32), every.astype(np.float32).view(np.uint32).reshape(256, 256)
        )
        assert got["scalar"].shape == () and got["scalar"] == np.float32(-2.5)
