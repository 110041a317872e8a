"""8-bit (top-k) delta codec: error bounds, sizes, error feedback and what a bad payload gets."""

from __future__ import annotations

import numpy as np
import pytest

from neurofed.wire import compression as c
from neurofed.wire.errors import ProtocolError


def _delta(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "conv": (rng.normal(size=(32, 16, 3, 3, 3)) * 1e-3).astype(np.float32),
        "bias": (rng.normal(size=(32,)) * 1e-2).astype(np.float32),
        "count": np.array([7], dtype=np.int64),
    }


def test_int8_round_trip_is_within_half_a_step_of_each_block():
    d = _delta()
    payload = c.encode_delta(d, "int8")
    out = c.decode_delta(payload, d)
    flat = d["conv"].reshape(-1)
    for i in range(0, flat.size, c.BLOCK):  # nearest rounding: at most half a code step per block
        block = slice(i, i + c.BLOCK)
        step = np.abs(flat[block]).max() / 127
        assert np.abs(out["conv"].reshape(-1)[block] - flat[block]).max() <= step / 2 * (1 + 1e-5)
    assert out["conv"].dtype == np.float32 and out["conv"].shape == d["conv"].shape
    np.testing.assert_array_equal(out["count"], d["count"])  # counters travel as values
    fp32 = sum(v.nbytes for v in d.values())
    assert len(payload) <= 0.3 * fp32


def test_top_k_keeps_the_largest_values_and_the_residual_holds_the_rest():
    d = _delta()
    payload, residual = c.compress(d, "int8-topk", density=0.1)
    out = c.decode_delta(payload, d)
    kept = out["conv"] != 0
    assert abs(kept.mean() - 0.1) < 0.01
    # whatever was kept is at least as large as whatever was dropped
    assert np.abs(d["conv"][kept]).min() >= np.abs(d["conv"][~kept]).max()
    # sent + residual is the delta (error feedback loses nothing)
    np.testing.assert_allclose(out["conv"] + residual["conv"], d["conv"], atol=1e-9)
    np.testing.assert_allclose(out["bias"] + residual["bias"], d["bias"], atol=1e-9)  # small: dense
    assert len(payload) <= 0.1 * sum(v.nbytes for v in d.values())


def test_error_feedback_keeps_the_sum_of_many_rounds_exact_to_one_rounds_error():
    """Ten rounds of the same small change: without feedback top-k never sends most of it, with
    feedback the sum of what was sent is off by one round's residual, however many rounds."""
    d = _delta()["conv"]
    residual = np.zeros_like(d)
    sent_total = np.zeros_like(d)
    for _ in range(10):
        payload, left = c.compress({"conv": d + residual}, "int8-topk", density=0.05)
        sent_total += c.decode_delta(payload, {"conv": d})["conv"]
        residual = left["conv"]
    np.testing.assert_allclose(sent_total + residual, 10 * d, atol=1e-6)
    assert np.abs(sent_total - 10 * d).max() <= np.abs(d).max() * 20


def test_apply_delta_is_what_both_ends_compute_and_digests_do_not_depend_on_order():
    base = {k: v * 100 for k, v in _delta(1).items()}
    payload = c.encode_delta(_delta(2), "int8")
    a, b = c.apply_delta(base, payload), c.apply_delta(dict(reversed(list(base.items()))), payload)
    assert c.canonical(a) == c.canonical(b) and c.digest(a) == c.digest(b)


@pytest.mark.parametrize("codec", c.DELTA_CODECS)
def test_a_delta_that_does_not_fit_the_model_is_a_bad_payload(codec):
    d = _delta()
    payload = c.encode_delta(d, codec)
    wrong_shape = dict(d, conv=np.zeros((16, 16, 3, 3, 3), np.float32))
    with pytest.raises(ProtocolError, match="shape"):
        c.decode_delta(payload, wrong_shape)
    with pytest.raises(ProtocolError, match="not in the model"):
        c.decode_delta(payload, {k: v for k, v in d.items() if k != "bias"})
    with pytest.raises(ProtocolError):
        c.decode_delta(b"not safetensors", d)
    from neurofed.wire.payload import encode_state

    with pytest.raises(ProtocolError, match="metadata"):
        c.decode_delta(encode_state(d), d)  # full weights named as a delta
