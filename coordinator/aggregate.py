"""Pure aggregation maths over named numpy arrays (Flower's idea: strategies are thin glue).

A model is a ``dict[str, np.ndarray]`` (a state dict). Everything here is side-effect free except
``WeightedMean``, which folds updates in one at a time so that the coordinator's memory does not
grow with the number of sites: it holds one float64 accumulator per tensor, nothing per site.
Sums are accumulated in float64 because a float32 running sum over many sites loses the low bits
of small updates; the result comes back in each tensor's original dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

Weights = dict[str, np.ndarray]


class WeightedMean:
    """Streaming weighted mean: ``add(weights, w)`` as each update arrives, ``result()`` at the end."""

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._total = 0.0
        self.count = 0
        self._taken = False
        self._given = False  # add_mean: the sums already are the mean

    def add(self, weights: Mapping[str, np.ndarray], weight: float) -> None:
        if self._taken:
            raise RuntimeError("WeightedMean.add after result(): start a new one for the next round")
        if self._given:
            raise RuntimeError("WeightedMean.add after add_mean: the mean is already made")
        if not weight > 0 or not math.isfinite(weight):
            raise ValueError(f"weight must be a positive finite number, got {weight!r}")
        if self._sums and set(weights) != set(self._sums):
            raise ValueError("update tensor names differ from the first update's")
        for name, arr in weights.items():
            a = np.asarray(arr)
            acc = self._sums.get(name)
            if acc is None:
                acc = np.array(a, dtype=np.float64)  # a real array even for 0-d tensors
                acc *= weight
                self._sums[name] = acc
                self._dtypes[name] = a.dtype
            else:
                _fold(acc, a, weight)
        self._total += float(weight)
        self.count += 1

    def add_mean(self, weights: Mapping[str, np.ndarray], weight: float) -> None:
        """Take a mean made elsewhere (secure aggregation's unmasked sum) behind ``weight``, as
        the only entry: its floating-point arrays are kept as given, not copied into float64
        sums (a whole model twice over for nothing), and ``result()`` hands them back."""
        if self.count or self._taken:
            raise RuntimeError("WeightedMean.add_mean takes the round's only entry")
        if not weight > 0 or not math.isfinite(weight):
            raise ValueError(f"weight must be a positive finite number, got {weight!r}")
        for name, arr in weights.items():
            a = np.asarray(arr)
            # floating tensors are owned from here on; the others (counters) are small: copied
            self._sums[name] = a if np.issubdtype(a.dtype, np.floating) else np.array(a)
            self._dtypes[name] = a.dtype
        self._total = float(weight)
        self._given = True
        self.count = 1

    @property
    def total_weight(self) -> float:
        return self._total

    def result(self) -> Weights | None:
        """The weighted mean, or None when nothing was added. It consumes the accumulator tensor
        by tensor (the float64 sums are freed as the means are made), so it can be taken once."""
        if not self.count:
            return None
        if self._taken:
            raise RuntimeError("WeightedMean.result() was already taken")
        self._taken = True
        if self._given:
            given, self._sums = self._sums, {}
            return given
        out: Weights = {}
        for name in list(self._sums):
            acc = self._sums.pop(name)
            acc /= self._total
            out[name] = _cast(acc, self._dtypes[name])
            del acc
        return out


# Elements per step when folding a tensor in: bounds the float64 temporary to 512 KiB.
_BLOCK = 64 * 1024


def _fold(acc: np.ndarray, a: np.ndarray, weight: float) -> None:
    """``acc += a * weight`` in float64, in blocks: no tensor-sized temporary (the default UNet's
    largest tensor would need 7 MB twice per update otherwise), and no per-site copy survives."""
    flat_acc, flat_a = acc.reshape(-1), a.reshape(-1)  # acc is ours and contiguous: a view
    for i in range(0, flat_acc.size, _BLOCK):
        flat_acc[i : i + _BLOCK] += np.multiply(flat_a[i : i + _BLOCK], weight, dtype=np.float64)


def _cast(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        return np.rint(arr).astype(dtype)
    return arr.astype(dtype)


def weighted_mean(updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> Weights:
    """Weighted mean of ``(weights, weight)`` pairs (FedAvg with weight = number of cases)."""
    acc = WeightedMean()
    for weights, w in updates:
        acc.add(weights, w)
    out = acc.result()
    if out is None:
        raise ValueError("weighted_mean needs at least one update")
    return out


def coordinate_median(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Element-wise median of one tensor across sites (robust to a minority of outliers)."""
    if not arrays:
        raise ValueError("coordinate_median needs at least one array")
    stacked = np.stack([np.asarray(a, dtype=np.float64) for a in arrays])
    return _cast(np.median(stacked, axis=0), np.asarray(arrays[0]).dtype)


def trimmed_mean(arrays: Sequence[np.ndarray], beta: float) -> np.ndarray:
    """Element-wise mean after dropping the ``floor(beta * n)`` lowest and highest values.

    ``beta`` lies in [0, 0.5); with n sites at least one value per coordinate always survives.
    """
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed-mean beta must be in [0, 0.5), got {beta}")
    n = len(arrays)
    if not n:
        raise ValueError("trimmed_mean needs at least one array")
    k = int(math.floor(beta * n))
    if n - 2 * k < 1:
        k = (n - 1) // 2
    stacked = np.sort(np.stack([np.asarray(a, dtype=np.float64) for a in arrays]), axis=0)
    kept = stacked[k : n - k]
    return _cast(kept.mean(axis=0), np.asarray(arrays[0]).dtype)


def delta_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``update - reference`` over all floating tensors (the update's size)."""
    total = 0.0
    for name, ref in reference.items():
        r = np.asarray(ref)
        if not np.issubdtype(r.dtype, np.floating):
            continue
        d = np.asarray(update[name], dtype=np.float64) - r.astype(np.float64)
        total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


def clip_update(
    update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], max_norm: float
) -> tuple[Weights, float]:
    """Scale ``update - reference`` down to at most ``max_norm`` (L2); return (clipped, original norm).

    This bounds how far one site can pull the model in a round; an update within the bound is
    returned unchanged. Non-floating tensors (counters such as BatchNorm's) are kept as sent.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    norm = delta_norm(update, reference)
    if norm <= max_norm:
        return dict(update), norm
    scale = max_norm / norm
    out: Weights = {}
    for name, u in update.items():
        r = np.asarray(reference[name])
        if np.issubdtype(r.dtype, np.floating):
            d = np.asarray(u, dtype=np.float64) - r.astype(np.float64)
            out[name] = (r.astype(np.float64) + d * scale).astype(r.dtype)
        else:
            out[name] = np.asarray(u)
    return out, norm
