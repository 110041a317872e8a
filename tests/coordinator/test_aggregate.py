"""The aggregation maths against independent computations (and Flower's reference when present)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from neurofed.coordinator.aggregate import (
    WeightedMean,
    clip_update,
    coordinate_median,
    delta_norm,
    trimmed_mean,
    weighted_mean,
)


def _models(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "conv.weight": rng.normal(size=(4, 2, 3, 3, 3)).astype(np.float32),
            "conv.bias": rng.normal(size=4).astype(np.float32),
        }
        for _ in range(n)
    ]


def test_weighted_mean_equals_independent_computation():
    models = _models(5)
    cases = [3, 10, 1, 7, 4]
    got = weighted_mean(zip(models, cases, strict=True))
    for name in models[0]:
        stacked = np.stack([m[name].astype(np.float64) for m in models])
        w = np.array(cases, dtype=np.float64).reshape(-1, *([1] * (stacked.ndim - 1)))
        expected = (stacked * w).sum(0) / sum(cases)
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-7)


def test_weighted_mean_streaming_matches_batch_and_is_order_independent():
    models = _models(4, seed=1)
    cases = [2, 5, 9, 1]
    acc = WeightedMean()
    for m, c in reversed(list(zip(models, cases, strict=True))):
        acc.add(m, c)
    batch = weighted_mean(zip(models, cases, strict=True))
    streamed = acc.result()
    assert acc.count == 4 and acc.total_weight == 17
    for name in batch:
        np.testing.assert_allclose(streamed[name], batch[name], rtol=1e-6)


def test_weighted_mean_rejects_bad_weight_and_mismatched_names():
    acc = WeightedMean()
    with pytest.raises(ValueError, match="positive"):
        acc.add({"a": np.zeros(2)}, 0)
    acc.add({"a": np.zeros(2)}, 1)
    with pytest.raises(ValueError, match="names"):
        acc.add({"b": np.zeros(2)}, 1)
    assert WeightedMean().result() is None


def _flower_aggregate(arrays: list[list[np.ndarray]], cases: list[int], tmp: Path) -> list[np.ndarray]:
    """Flower's own ``aggregate``: in this process when flwr imports here, otherwise in the peer
    benchmark's environment (``scripts/peer_env.sh``; flwr is kept out of .venv on purpose),
    arrays passing through .npy files both ways."""
    try:
        from flwr.server.strategy.aggregate import aggregate
    except ImportError:
        pass
    else:
        return aggregate(list(zip(arrays, cases, strict=True)))
    from benchmarks.peers.flower_run import VENV

    python = VENV / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"flwr is in neither .venv (on purpose) nor {VENV}: run scripts/peer_env.sh")
    for i, site in enumerate(arrays):
        for j, a in enumerate(site):
            np.save(tmp / f"in-{i}-{j}.npy", a)
    script = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from flwr.server.strategy.aggregate import aggregate\n"
        "tmp, cases, n = Path(sys.argv[1]), [int(c) for c in sys.argv[2].split(',')], int(sys.argv[3])\n"
        "res = [([np.load(tmp / f'in-{i}-{j}.npy') for j in range(n)], c) for i, c in enumerate(cases)]\n"
        "for j, a in enumerate(aggregate(res)):\n"
        "    np.save(tmp / f'out-{j}.npy', a)\n"
    )
    n = len(arrays[0])
    subprocess.run(
        [str(python), "-c", script, str(tmp), ",".join(map(str, cases)), str(n)], check=True, timeout=300
    )
    return [np.load(tmp / f"out-{j}.npy") for j in range(n)]


def test_a_mean_made_elsewhere_is_taken_as_given_and_alone():
    """Secure aggregation's unmasked mean goes in as the round's only entry: its float tensors are
    handed back as they are (a float64 copy would cost twice the model at the close), its
    counters copied, and nothing may be averaged with it."""
    mean = {**_models(1)[0], "bn.num_batches_tracked": np.array(7, dtype=np.int64)}
    acc = WeightedMean()
    acc.add_mean(mean, 12.0)
    assert acc.total_weight == 12.0
    with pytest.raises(RuntimeError, match="add_mean"):
        acc.add(_models(1)[0], 1.0)
    out = acc.result()
    assert out is not None
    assert out["conv.weight"] is mean["conv.weight"] and out["conv.bias"] is mean["conv.bias"]
    assert (
        out["bn.num_batches_tracked"] == 7
        and out["bn.num_batches_tracked"] is not mean["bn.num_batches_tracked"]
    )
    other = WeightedMean()
    other.add(_models(1)[0], 1.0)
    with pytest.raises(RuntimeError, match="only entry"):
        other.add_mean(mean, 1.0)
    with pytest.raises(ValueError, match="positive"):
        WeightedMean().add_mean(mean, 0.0)


def test_agrees_with_flower_reference(tmp_path):
    models = _models(6, seed=2)
    cases = [4, 4, 8, 1, 2, 30]
    ours = weighted_mean(zip(models, cases, strict=True))
    names = list(models[0])
    theirs = _flower_aggregate([[m[n] for n in names] for m in models], cases, tmp_path)
    assert len(theirs) == len(names)
    for name, arr in zip(names, theirs, strict=True):
        np.testing.assert_allclose(ours[name], arr, rtol=1e-5, atol=1e-6)
    # and the check can fail: Flower's mean is not the unweighted one these cases would give
    plain = weighted_mean(zip(models, [1] * len(models), strict=True))
    assert any(not np.allclose(plain[n], a, rtol=1e-5, atol=1e-6) for n, a in zip(names, theirs, strict=True))


def test_median_and_trimmed_mean_resist_one_huge_site():
    honest = [np.full((3, 3), v, dtype=np.float32) for v in (1.0, 1.1, 0.9, 1.05)]
    attacker = np.full((3, 3), 1e9, dtype=np.float32)
    med = coordinate_median([*honest, attacker])
    tm = trimmed_mean([*honest, attacker], beta=0.2)
    assert np.all(np.abs(med - 1.0) < 0.11)
    assert np.all(np.abs(tm - 1.0) < 0.11)
    # the plain mean is dragged away, which is what the robust ones protect against
    assert np.all(np.mean(np.stack([*honest, attacker]), 0) > 1e8)


def test_trimmed_mean_beta_range():
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean([np.zeros(2)], 0.5)
    np.testing.assert_allclose(trimmed_mean([np.ones(2), 3 * np.ones(2)], 0.0), 2 * np.ones(2))


def test_clip_update_bounds_the_delta_norm():
    ref = {"w": np.zeros(4, dtype=np.float32), "n": np.array(3, dtype=np.int64)}
    upd = {"w": np.array([3.0, 4.0, 0.0, 0.0], dtype=np.float32), "n": np.array(5, dtype=np.int64)}
    clipped, norm = clip_update(upd, ref, max_norm=1.0)
    assert norm == pytest.approx(5.0)
    assert delta_norm(clipped, ref) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(clipped["w"], [0.6, 0.8, 0, 0], rtol=1e-6)
    assert int(clipped["n"]) == 5
    same, norm2 = clip_update(upd, ref, max_norm=10.0)
    assert norm2 == pytest.approx(5.0) and same["w"] is upd["w"]
