"""Client-level differential privacy (DP-FedAvg): the settings the coordinator puts in a round's
task, the adaptive clip, the site weights and the accountant. No torch here: the coordinator
reads, checks and accounts these without loading a network.

The privacy unit is one **hospital's contribution** in a round: its whole clipped update (and its
clip bit). Each round (McMahan et al. 2018, "Learning differentially private recurrent language
models"; Andrew et al. 2021, "Differentially private learning with adaptive clipping"):

- every site clips its update delta to L2 norm ``C`` (the round's clip) and reports one bit,
  ``norm <= C``;
- the sum of the weighted clipped deltas gets Gaussian noise of std ``z_delta * C`` (centrally by
  the coordinator in plain mode; distributed over the sites under secure aggregation), and is
  divided by the sum of the weights;
- the count of bits gets Gaussian noise of std ``sigma_b``; with the adaptive clip, C moves
  geometrically towards the ``target_quantile`` of the sites' update norms:
  ``C <- C * exp(-clip_lr * (noisy fraction - target_quantile))``.

Adjacency is zero-out (Kairouz et al. 2021): two federations differ in one site's update (and
bit) being replaced by zeros. Which sites took part is public in a cross-silo federation (the
roster is signed, every message carries its sender), so dividing by the number of updates or
the sum of the public weights is post-processing. Each weight is at most 1 (``uniform``: 1;
``capped``: ``min(cases / weight_cap, 1)``), so one site moves the noisy sum by at most C.

The bit is centred (b - 1/2 has sensitivity 1/2), and the two Gaussian mechanisms of a round
together are one Gaussian mechanism with noise multiplier z when the update's is
``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2`` (Andrew et al., Theorem 1): the accountant charges
z per round, the coordinator adds z_delta to the update. Without the adaptive clip no bit is
released and z_delta = z.

Accountant: Renyi DP of the (sub)sampled Gaussian mechanism, Google's ``dp-accounting``
(``RdpAccountant``), with the sampling rate = sites asked per round / sites in the federation
(1.0: every site is asked every round; a site that drops out does not amplify anything).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from neurofed.models.privacy import DEFAULT_DELTA, PrivacyConfigError, settings_from_object

WEIGHTINGS = ("uniform", "capped")
PRIVACY_UNIT = "hospital: one site's clipped update per round (zero-out adjacency)"
DEFAULT_CLIP = 1.0
DEFAULT_TARGET_QUANTILE = 0.5
DEFAULT_CLIP_LR = 0.2
DEFAULT_WEIGHT_CAP = 64
# the default bit noise keeps the update's noise within ~9 % of z: z / (2 sigma_b) = 0.4
BIT_NOISE_FACTOR = 1.25


def update_noise_multiplier(z: float, count_noise: float | None) -> float:
    """The update's noise multiplier z_delta that, with the clip count's Gaussian noise of std
    ``count_noise`` (sensitivity 1/2), makes one round a Gaussian mechanism of multiplier ``z``."""
    if count_noise is None:
        return z
    if not 2 * count_noise > z:
        raise PrivacyConfigError(
            f"the clip count's noise std {count_noise:g} must exceed half the noise multiplier "
            f"({z / 2:g}): otherwise the count alone spends the round's budget; raise "
            "--dp-client-count-noise or turn off the adaptive clip"
        )
    return (z**-2 - (2 * count_noise) ** -2) ** -0.5


def client_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds of the Gaussian mechanism with multiplier
    ``noise_multiplier`` at site-sampling rate ``sample_rate`` (dp-accounting RDP; 0 for none)."""
    if rounds <= 0:
        return 0.0
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    event: Any = GaussianDpEvent(noise_multiplier)
    if sample_rate < 1.0:
        event = PoissonSampledDpEvent(sample_rate, event)
    acc = RdpAccountant(orders=RDP_ORDERS)
    acc.compose(SelfComposedDpEvent(event, int(rounds)))
    return float(acc.get_epsilon(delta))


# Opacus's default orders, plus finer ones near 1 (few, noisy rounds need them) and larger ones
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512, 1024])


def solve_client_noise(target_epsilon: float, delta: float, sample_rate: float, rounds: int) -> float:
    """The smallest noise multiplier (bisection to 0.1 % of z) at which ``rounds`` rounds spend at
    most ``target_epsilon``."""
    lo, hi = 0.05, 1.0
    while client_epsilon(hi, sample_rate, rounds, delta) > target_epsilon:
        hi *= 2
        if hi > 1e4:
            raise PrivacyConfigError(
                f"no noise multiplier reaches epsilon {target_epsilon:g} over {rounds} rounds; "
                "raise --dp-client-target-epsilon"
            )
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        if client_epsilon(mid, sample_rate, rounds, delta) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def adapt_clip(clip: float, noisy_fraction: float, target_quantile: float, clip_lr: float) -> float:
    """Andrew et al.'s geometric update: the clip shrinks when more than ``target_quantile`` of the
    sites' updates were within it, and grows when fewer were."""
    return clip * math.exp(-clip_lr * (noisy_fraction - target_quantile))


def client_weight(num_cases: int, weighting: str, cap: int) -> float:
    """A site's weight in the noisy mean: 1 (uniform) or min(cases / cap, 1) (capped), never above
    1, so that one site moves the weighted sum by at most the clip."""
    if weighting == "uniform":
        return 1.0
    return min(max(int(num_cases), 0) / cap, 1.0)


@dataclass(frozen=True, kw_only=True)
class ClientDPConfig:
    """DP-FedAvg settings of a federation (see the module docstring)."""

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = DEFAULT_DELTA
    rounds: int = 1  # planned training rounds: what a target epsilon is spread over
    clip: float = DEFAULT_CLIP  # initial clip (the fixed clip without the adaptive one)
    weighting: str = "uniform"
    weight_cap: int = DEFAULT_WEIGHT_CAP  # capped: cases at which a site's weight reaches 1
    adaptive: bool = False
    target_quantile: float = DEFAULT_TARGET_QUANTILE
    clip_lr: float = DEFAULT_CLIP_LR
    count_noise: float | None = None  # std of the clip count's noise (None: chosen from z, sites)
    sample_rate: float = 1.0  # sites asked per round / sites in the federation

    def __post_init__(self) -> None:
        def positive(name: str, v: float) -> None:
            if not (math.isfinite(v) and v > 0):
                raise PrivacyConfigError(f"--dp-client-{name} must be positive, got {v}")

        if self.noise_multiplier is None and self.target_epsilon is None:
            raise PrivacyConfigError(
                "client-level DP needs --dp-client-noise-multiplier or --dp-client-target-epsilon"
            )
        if self.noise_multiplier is not None:
            positive("noise-multiplier", self.noise_multiplier)
        if self.target_epsilon is not None:
            positive("target-epsilon", self.target_epsilon)
        positive("clip", self.clip)
        positive("clip-lr", self.clip_lr)
        if not 0 < self.delta < 1:
            raise PrivacyConfigError(f"--dp-client-delta must be in (0, 1), got {self.delta}")
        if self.rounds < 1:
            raise PrivacyConfigError(f"client-level DP needs at least one planned round, got {self.rounds}")
        if self.weighting not in WEIGHTINGS:
            raise PrivacyConfigError(
                f"--dp-client-weights must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}"
            )
        if int(self.weight_cap) != self.weight_cap or self.weight_cap < 1:
            raise PrivacyConfigError(
                f"--dp-client-weight-cap must be a whole number >= 1, got {self.weight_cap}"
            )
        if not 0 < self.target_quantile < 1:
            raise PrivacyConfigError(
                f"--dp-client-target-quantile must be in (0, 1), got {self.target_quantile}"
            )
        if self.count_noise is not None:
            positive("count-noise", self.count_noise)
        if not 0 < self.sample_rate <= 1:
            raise PrivacyConfigError(f"the site sampling rate must be in (0, 1], got {self.sample_rate}")

    def resolved(self, sites: int) -> ClientDPConfig:
        """These settings with the noise multiplier solved (target epsilon over the planned
        rounds) and the clip count's noise chosen: max(sites / 20, 1.25 z) by default (Andrew et
        al. suggest sites / 20; a few hospitals need more, so that z_delta stays within ~9 % of z)."""
        import dataclasses

        z = self.noise_multiplier
        if z is None:
            z = solve_client_noise(float(self.target_epsilon), self.delta, self.sample_rate, self.rounds)
        sb = self.count_noise
        if self.adaptive and sb is None:
            sb = max(sites / 20.0, BIT_NOISE_FACTOR * z)
        out = dataclasses.replace(self, noise_multiplier=z, count_noise=sb if self.adaptive else None)
        out.update_noise_multiplier  # noqa: B018 - refuses a count noise too small for z
        return out

    @property
    def update_noise_multiplier(self) -> float:
        """z_delta: what the update's noise std is a multiple of the clip by."""
        if self.noise_multiplier is None:
            raise PrivacyConfigError("the noise multiplier is not solved yet (resolved())")
        return update_noise_multiplier(self.noise_multiplier, self.count_noise if self.adaptive else None)

    def epsilon(self, rounds: int) -> float:
        assert self.noise_multiplier is not None
        return client_epsilon(self.noise_multiplier, self.sample_rate, rounds, self.delta)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ClientDPConfig:
        return settings_from_object(cls, data, set(cls.__dataclass_fields__), "client DP settings")

    def describe(self) -> str:
        noise = (
            f"noise multiplier {self.noise_multiplier:g}"
            if self.noise_multiplier is not None
            else f"noise solved for epsilon {self.target_epsilon:g}"
        )
        clip = (
            f"adaptive clip from {self.clip:g} towards the {self.target_quantile:g} quantile"
            if self.adaptive
            else f"clip {self.clip:g}"
        )
        return (
            f"DP-FedAvg (client level): {clip}, {noise}, {self.weighting} weights, delta {self.delta:g}, "
            f"site sampling rate {self.sample_rate:g}"
        )


def site_task(
    clip: float, weighting: str = "uniform", weight_cap: int = DEFAULT_WEIGHT_CAP
) -> dict[str, Any]:
    """What a round's task tells every site (``dp_client``, wire/PROTOCOL.md): clip the update
    delta to this L2 norm and report whether it was within it; under secure aggregation, the
    integer weight to multiply the input by (1, or min(cases, cap))."""
    return {"clip": float(clip), "weights": weighting, "weight_cap": int(weight_cap)}


def ring_weight(task: Any, num_cases: int) -> int:
    """A site's integer weight in a secure round's sum: its cases without client-level DP, else
    1 (uniform) or min(cases, cap) (capped)."""
    if not task:
        return int(num_cases)
    if task.get("weights", "uniform") == "uniform":
        return 1
    return max(1, min(int(num_cases), int(task.get("weight_cap", DEFAULT_WEIGHT_CAP))))


def check_site_task(data: Any) -> float | None:
    """The clip a task's ``dp_client`` asks for; None when it asks for none. A malformed one
    raises (a site must not send an unclipped update to a DP federation)."""
    if data in (None, False):
        return None
    try:
        clip = float(data["clip"])
    except (TypeError, KeyError, ValueError):
        raise PrivacyConfigError(f"task dp_client is malformed: {data!r}") from None
    if not (math.isfinite(clip) and clip > 0):
        raise PrivacyConfigError(f"task dp_client clip must be positive, got {clip}")
    return clip
