"""DP-FedAvg at the coordinator: the round's clip, each site's weight, the central Gaussian noise
on the mean (plain mode), the noisy clip count and the adaptive clip, and the accountant's ledger.

The maths and its references are in ``neurofed.models.client_privacy``; this module keeps the
federation's state (the clip now, the rounds charged) in the coordinator's snapshot, so a restarted
coordinator neither forgets a round it released nor charges one twice: a round is charged when it
is aggregated, in the same snapshot that holds its model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from neurofed.coordinator.errors import CoordinatorError, UpdateRejected
from neurofed.models.client_privacy import ClientDPConfig, adapt_clip, client_weight, site_task
from neurofed.models.dp_noise import SecureGaussian

log = logging.getLogger(__name__)

# strategies whose result is the (weighted) mean of the updates, where the noise goes
CLIENT_DP_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi")


def refuse_unsound(strategy: str, *, site_optimizer: str, sample_dp: bool) -> None:
    """One clear error at start for what client-level DP cannot do."""
    if strategy not in CLIENT_DP_STRATEGIES:
        why = (
            "FedNova reweights each update by its local steps, so one site could move the sum by more "
            "than the clip"
            if strategy == "fednova"
            else f"{strategy} is an order statistic: its sensitivity to one site is not bounded by the clip"
        )
        raise CoordinatorError(
            f"client-level DP needs a mean of clipped updates; --strategy {strategy} cannot carry it "
            f"({why}); use {', '.join(CLIENT_DP_STRATEGIES)}"
        )
    if site_optimizer == "continue-global":
        raise CoordinatorError(
            "--site-optimizer continue-global averages each site's Adam state without noise, outside "
            "the client-level guarantee; use reset or continue-local"
        )


class ClientDP:
    """The federation's DP-FedAvg: one per coordinator, its ``state`` kept in the snapshot."""

    def __init__(self, config: ClientDPConfig, state: dict[str, Any]) -> None:
        if config.noise_multiplier is None:
            raise CoordinatorError("client DP settings must be resolved (noise multiplier solved) first")
        self.config = config
        self.state = state
        state.setdefault("clip", config.clip)
        state.setdefault("rounds", 0)
        self.bits: dict[str, bool] = {}
        self.weights: dict[str, float] = {}

    # -- the round ------------------------------------------------------------------------------
    @property
    def clip(self) -> float:
        return float(self.state["clip"])

    @property
    def rounds(self) -> int:
        return int(self.state["rounds"])

    def epsilon(self, rounds: int | None = None) -> float:
        return self.config.epsilon(self.rounds if rounds is None else rounds)

    def budget_left(self) -> bool:
        """False once another round would spend more than the target epsilon."""
        if self.config.target_epsilon is None:
            return True
        return self.epsilon(self.rounds + 1) <= self.config.target_epsilon * (1 + 1e-9)

    def begin(self) -> None:
        self.bits, self.weights = {}, {}

    def task(self) -> dict[str, Any]:
        return site_task(self.clip, self.config.weighting, self.config.weight_cap)

    def accept(self, site: str, meta: Mapping[str, Any], num_cases: int) -> float:
        """Check ``site``'s clip report and return its weight in the noisy mean."""
        report = meta.get("dp_client")
        if not isinstance(report, dict) or not isinstance(report.get("within_clip"), bool):
            raise UpdateRejected(
                "missing-clip-bit", "a client-level DP federation needs each update's dp_client.within_clip"
            )
        if report.get("clip") is not None and not math.isclose(
            float(report["clip"]), self.clip, rel_tol=1e-9
        ):
            raise UpdateRejected(
                "wrong-clip", f"clipped to {report['clip']}, this round's clip is {self.clip}"
            )
        self.bits[site] = report["within_clip"]
        w = client_weight(num_cases, self.config.weighting, self.config.weight_cap)
        self.weights[site] = w
        return w

    def ring_weight(self, num_cases: int) -> int:
        """The integer weight a site multiplies its quantized input by under secure aggregation."""
        if self.config.weighting == "uniform":
            return 1
        return max(1, min(int(num_cases), self.config.weight_cap))

    def secure_params(self, sites: int) -> dict[str, Any]:
        """What a secure round's config needs (coordinator.secure.SecureRound ``dp``): each site
        clips to the round's clip, adds 1/t of the noise variance (std z_delta * C * the largest
        ring weight, the most one site moves the weighted sum) and, with the adaptive clip, one
        centred bit (+1/-1: sensitivity 1, so its noise std is 2 sigma_b, sigma_b in count units)."""
        cfg = self.config
        top = 1 if cfg.weighting == "uniform" else cfg.weight_cap
        out: dict[str, Any] = {
            "clip": self.clip,
            "noise_std": cfg.update_noise_multiplier * self.clip * top,
            "max_total_weight": max(3, sites * top),
        }
        if cfg.adaptive:
            assert cfg.count_noise is not None
            out.update(counts=1, count_noise_std=2 * cfg.count_noise)
        return out

    @staticmethod
    def count_from_centred(centred_sum: int, survivors: int) -> float:
        """The noisy number of sites within the clip from the sum of their centred bits."""
        return (centred_sum + survivors) / 2.0

    def noise_std(self, total_weight: float) -> float:
        """Std of the noise on each coordinate of the mean: z_delta * C / (sum of weights)."""
        return self.config.update_noise_multiplier * self.clip / total_weight

    def add_noise(self, mean: dict[str, np.ndarray], total_weight: float) -> dict[str, np.ndarray]:
        """Central Gaussian noise on the mean's floating tensors (plain mode), from a fresh
        ChaCha20 stream keyed from the operating system."""
        std = self.noise_std(total_weight)
        g = SecureGaussian()
        out: dict[str, np.ndarray] = {}
        for name in sorted(mean):
            a = np.asarray(mean[name])
            if np.issubdtype(a.dtype, np.floating):
                noisy = a.astype(np.float64)  # a fresh copy: the noise is added in float64
                g.add_to(noisy, std)
                a = noisy.astype(a.dtype)
            out[name] = a
        log.info("client DP: Gaussian noise of std %.3g on each coordinate of the mean", std)
        return out

    def close(self, sites: int, noisy_count: float | None = None) -> dict[str, Any]:
        """Charge the aggregated round, update the clip from the (noisy) count of sites within
        it, and return the round's privacy figures. ``noisy_count``: the count as the secure sum
        gave it (already noisy); in plain mode the coordinator adds the noise here."""
        cfg = self.config
        clip = self.clip
        self.state["rounds"] = self.rounds + 1
        out: dict[str, Any] = {
            "level": "client",
            "unit": "hospital",
            "accountant": "rdp",
            "epsilon": round(self.epsilon(), 6),
            "delta": cfg.delta,
            "noise_multiplier": round(float(cfg.noise_multiplier or 0), 6),
            "update_noise_multiplier": round(cfg.update_noise_multiplier, 6),
            "clip": clip,
            "sample_rate": cfg.sample_rate,
            "weights": cfg.weighting,
            "rounds": self.rounds,
        }
        if cfg.target_epsilon is not None:
            out["target_epsilon"] = cfg.target_epsilon
        if cfg.adaptive and sites > 0:
            assert cfg.count_noise is not None
            if noisy_count is None:
                noisy_count = sum(self.bits.values()) + cfg.count_noise * float(
                    SecureGaussian().standard_normal(1)[0]
                )
            fraction = noisy_count / sites
            new = adapt_clip(clip, fraction, cfg.target_quantile, cfg.clip_lr)
            self.state["clip"] = new
            out.update(count_noise=cfg.count_noise, within_clip_fraction=round(fraction, 6), next_clip=new)
            log.info(
                "client DP: %.2f of %d sites within clip %.4g (noisy); next clip %.4g",
                fraction,
                sites,
                clip,
                new,
            )
        return out
