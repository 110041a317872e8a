"""Checks on a site's update before it may touch the aggregate.

The wire has already verified the signature, the sender and the round window; these checks make
sure the tensors themselves fit the global model: same names, shapes and dtypes, every value
finite, a sane case count. A failure raises ``UpdateRejected`` with a reason slug; the round loop
logs it with the site and does not count the update toward quorum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from neurofed.coordinator.errors import UpdateRejected
from neurofed.wire.payload import OPTIMIZER_STEP, optimizer_names

MAX_CASES = 10_000_000
MAX_STEPS = 100_000_000


def _positive_int(value: Any, field: str, limit: int) -> int:
    """``value`` if it is an int in [1, limit] (bool is not one), else ``bad-<field>``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        reason = "bad-" + field.replace("_", "-")
        raise UpdateRejected(reason, f"{field} must be a positive integer, got {value!r}")
    return value


def check_local_steps(value: Any) -> int | None:
    """The optimiser steps a site took this round (FedNova's tau): absent (None) or a positive
    integer."""
    return None if value is None else _positive_int(value, "local_steps", MAX_STEPS)


def check_num_cases(value: Any) -> int:
    """The update's weight: a positive integer."""
    return _positive_int(value, "num_cases", MAX_CASES)


def check_update(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> None:
    """Raise ``UpdateRejected`` unless ``update`` has exactly ``reference``'s tensors (names,
    shapes, dtypes) and only finite values."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing:
        raise UpdateRejected("missing-tensors", f"{len(missing)} missing, e.g. {missing[:3]}")
    if extra:
        raise UpdateRejected("unexpected-tensors", f"{len(extra)} not in the global model, e.g. {extra[:3]}")
    for name, ref in reference.items():
        arr = update[name]
        if not isinstance(arr, np.ndarray):
            raise UpdateRejected("bad-tensor", f"{name}: not an array ({type(arr).__name__})")
        if arr.shape != ref.shape:
            raise UpdateRejected("shape-mismatch", f"{name}: {arr.shape} != global {ref.shape}")
        if arr.dtype != ref.dtype:
            raise UpdateRejected("dtype-mismatch", f"{name}: {arr.dtype} != global {ref.dtype}")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise UpdateRejected("non-finite", f"{name}: {bad} NaN/Inf values")


def upcast_half(
    update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """An fp16 transfer of an fp32 model comes back to fp32 before the checks (the wire's
    optional half-precision payload); anything else is left for ``check_update`` to judge."""
    out = {}
    for name, arr in update.items():
        ref = reference.get(name)
        if ref is not None and arr.dtype == np.float16 and ref.dtype == np.float32:
            arr = arr.astype(np.float32)
        out[name] = arr
    return out


def apply_delta(
    delta: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """A checked fp16-delta update made whole against the coordinator's fp32 weights: the site
    trained from the half-precision model it was sent, and its change lands on the full-precision
    weights, so the rounding of the broadcast never accumulates in the global model."""
    out = {}
    for name, arr in delta.items():
        ref = reference[name]
        if np.issubdtype(ref.dtype, np.floating):
            if arr.flags.writeable and arr.base is None:  # upcast from fp16: a private copy
                np.add(arr, ref, out=arr)
            else:
                arr = arr + ref
        out[name] = arr
    return out


def check_optimizer_state(state: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]) -> None:
    """continue-global: the update must carry Adam's moments for every float tensor of the
    global model (same shapes, float32, finite; second moments not negative) and its step."""
    expected = optimizer_names(weights)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UpdateRejected(
            "missing-optimizer-state",
            f"continue-global needs Adam's state; {len(missing)} missing, e.g. {missing[:2]}",
        )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise UpdateRejected(
            "unexpected-tensors", f"{len(extra)} optimiser tensors not in the model, e.g. {extra[:2]}"
        )
    for name, arr in state.items():
        if arr.dtype != np.float32:
            raise UpdateRejected("dtype-mismatch", f"{name}: {arr.dtype}, optimiser state travels as float32")
        ref_shape = (1,) if name == OPTIMIZER_STEP else weights[name.split("/", 2)[2]].shape
        if arr.shape != ref_shape:
            raise UpdateRejected("shape-mismatch", f"{name}: {arr.shape} != {ref_shape}")
        if not np.isfinite(arr).all():
            raise UpdateRejected("non-finite", f"{name}: NaN/Inf values")
        if ("/exp_avg_sq/" in name or name == OPTIMIZER_STEP) and (arr < 0).any():
            raise UpdateRejected("bad-optimizer-state", f"{name}: negative values")


def check_privacy_report(dp: Any) -> dict[str, Any]:
    """A DP federation's UPDATE must say what the site spent (``meta.dp``: wire/PROTOCOL.md): an
    update without it came from a site that did not run DP-SGD, and is not counted."""
    if not isinstance(dp, dict):
        raise UpdateRejected("dp-missing", "this federation trains with DP-SGD; the update has no dp report")
    try:
        eps = float(dp["epsilon"])
    except (KeyError, TypeError, ValueError):
        raise UpdateRejected("dp-missing", "the update's dp report has no numeric epsilon") from None
    if not (math.isfinite(eps) and eps >= 0):
        raise UpdateRejected("dp-missing", f"the update's dp report says epsilon {eps}")
    out = {"epsilon": eps}
    for key in ("delta", "noise_multiplier", "max_grad_norm", "sample_rate", "target_epsilon"):
        if isinstance(dp.get(key), (int, float)) and math.isfinite(float(dp[key])):
            out[key] = float(dp[key])
    if isinstance(dp.get("steps"), int):
        out["steps"] = int(dp["steps"])
    return out
