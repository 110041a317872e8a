"""Differential-privacy settings as the coordinator sets them in a round's task and every site's
trainer applies them (sample-level DP-SGD; the privacy unit is the patient). No torch here: the
coordinator reads and checks these without loading a network.

A federation runs DP-SGD when its task carries ``dp`` (``DPConfig.to_task``):

- ``max_grad_norm`` C: each sampled case's gradient is clipped to L2 norm C;
- ``noise_multiplier`` sigma: Gaussian noise of std sigma * C is added to the sum of clipped gradients;
- or ``target_epsilon`` E with ``delta``: each site solves its own sigma so that the planned
  ``rounds`` x local steps, at its own Poisson sampling rate, spend at most (E, delta);
- with both sigma and E, sigma is used and E is the budget: a site stops training once one more
  round would spend more than E.

``accountant`` names how epsilon is computed (``rdp``: Renyi DP of the Poisson-subsampled
Gaussian mechanism, Mironov et al. 2019, through Opacus's RDP accountant; ``prv``: privacy random
variables, Gopi et al. 2021, Opacus's PRV accountant: the privacy loss distribution composed
numerically, a tighter epsilon for the same noise).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

ACCOUNTANTS = ("rdp", "prv")
DEFAULT_DELTA = 1e-5
PRIVACY_UNIT = "patient: one crop per Poisson-sampled case per step"
BUDGET_SPENT = "privacy-budget-spent"
"""The ``reason`` of the STATUS a site sends when it stops training because its budget is spent."""


class PrivacyConfigError(ValueError):
    """DP settings that cannot be used as given (the message says what to change)."""


T = TypeVar("T")


def settings_from_object(cls: type[T], data: Any, known: set[str], what: str) -> T:
    """``cls`` built from the ``known`` fields of a JSON object, others ignored (a newer
    coordinator may add some); a non-object or a field of the wrong kind is a
    ``PrivacyConfigError`` naming ``what``, never a half-configured DP setting."""
    if not isinstance(data, dict):
        raise PrivacyConfigError(f"{what} must be an object, got {type(data).__name__}")
    try:
        return cls(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        raise PrivacyConfigError(f"{what}: malformed ({exc})") from None


@dataclass(frozen=True, kw_only=True)
class DPConfig:
    """Sample-level DP-SGD settings for every site of a federation (see the module docstring)."""

    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = DEFAULT_DELTA
    rounds: int = 1  # planned training rounds: what a target epsilon is spread over
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise PrivacyConfigError(f"--dp-max-grad-norm must be positive, got {self.max_grad_norm}")
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise PrivacyConfigError(
                "DP-SGD needs --dp-noise-multiplier or --dp-target-epsilon (with --dp-delta)"
            )
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0
        ):
            raise PrivacyConfigError(f"--dp-noise-multiplier must be positive, got {self.noise_multiplier}")
        if self.target_epsilon is not None and not (
            math.isfinite(self.target_epsilon) and self.target_epsilon > 0
        ):
            raise PrivacyConfigError(f"--dp-target-epsilon must be positive, got {self.target_epsilon}")
        if not 0 < self.delta < 1:
            raise PrivacyConfigError(f"--dp-delta must be in (0, 1), got {self.delta}")
        if self.rounds < 1:
            raise PrivacyConfigError(f"DP needs at least one planned round, got {self.rounds}")
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyConfigError(
                f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}"
            )

    def to_task(self) -> dict[str, Any]:
        """The task's ``dp`` object (wire/PROTOCOL.md)."""
        return asdict(self)

    @classmethod
    def from_task(cls, data: Any) -> DPConfig | None:
        """The settings a task carries, ``None`` when it asks for no DP. Raises
        ``PrivacyConfigError`` on a malformed object (a site must not train without the DP it was asked for)."""
        if data in (None, False):
            return None
        known = {"max_grad_norm", "noise_multiplier", "target_epsilon", "delta", "rounds", "accountant"}
        return settings_from_object(cls, data, known, "task dp")

    def describe(self) -> str:
        noise = (
            f"noise multiplier {self.noise_multiplier:g}"
            if self.noise_multiplier is not None
            else f"noise solved per site for epsilon {self.target_epsilon:g}"
        )
        budget = f", budget epsilon {self.target_epsilon:g}" if self.target_epsilon is not None else ""
        return (
            f"DP-SGD: clip {self.max_grad_norm:g}, {noise}{budget}, delta {self.delta:g} ({self.accountant})"
        )


def sampling_plan(num_cases: int, batch_size: int, epochs: float) -> tuple[float, int]:
    """A site's Poisson sampling rate and optimiser steps per round: each case is in a step's
    batch with probability ``batch_size / num_cases`` (capped at 1), and a round of ``epochs``
    local epochs takes ``round(epochs * num_cases / batch_size)`` steps (at least one), so that on
    average every case is seen ``epochs`` times, as without DP."""
    if num_cases < 1:
        raise PrivacyConfigError("DP-SGD needs at least one training case")
    b = max(1, int(batch_size))
    q = min(1.0, b / num_cases)
    steps = max(1, round(float(epochs) * num_cases / b))
    return q, steps
