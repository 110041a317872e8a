"""Distributed DP noise under secure aggregation: each site's Skellam share, the variance the
unmasked sum carries with every site and with only t survivors, the clip bit's noisy count, and
the ring sized so that the noise does not wrap it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from neurofed.edge_node.privacy import skellam_noise
from neurofed.wire.secagg.params import choose_ring, skellam_tail_bound
from tests.wire.secagg_helpers import Drops, Fed, run_round

LENGTH = 150_001  # update coordinates, plus one count
SIGMA, COUNT_SIGMA = 0.5, 2.0  # the noise any t survivors must carry (clip units; count units)


def _noisy_round(drops: Drops | None = None):
    fed = Fed.make(5)  # k = 4, t = 3
    cfg = fed.config(
        LENGTH + 1, clip=1.0, max_total_weight=5, noise_std=SIGMA, counts=1, count_noise_std=COUNT_SIGMA
    )
    zero = {s: np.zeros(LENGTH, np.float32) for s in fed.sites}

    def kw(site, client):
        return {
            "counts": [1],  # a zero update is within any clip
            "noise": skellam_noise(
                [(LENGTH, cfg.site_noise_variance), (1, cfg.site_count_variance)], client.noise_seed
            ),
        }

    result, *_ = run_round(fed, cfg, zero, dict.fromkeys(fed.sites, 1), drops, mask_kw=kw)
    return cfg, result


def test_the_unmasked_sum_of_zero_updates_carries_the_configured_variance():
    """Five sites each add 1/t of the target variance: the unmasked sum's noise has variance
    n/t * sigma^2 within 5 % (zero updates, 150k coordinates); without noise it would be 0."""
    cfg, result = _noisy_round()
    assert cfg.t == 3 and len(result.survivors) == 5
    noise = result.weighted_sum  # float (clip) units: sum of the sites' inputs
    assert float(noise.var()) == pytest.approx(5 / 3 * SIGMA**2, rel=0.05)
    assert abs(float(noise.mean())) < 5 * SIGMA / math.sqrt(LENGTH)
    # the count: 5 centred bits (+1 each) plus noise of std COUNT_SIGMA * sqrt(5 / 3)
    assert abs(result.counts[0] - 5) < 6 * COUNT_SIGMA * math.sqrt(5 / 3)


def test_the_fewest_survivors_still_carry_the_full_noise():
    """Any t sites' shares add up to the target variance; the protocol unmasks no fewer than t + 1
    (each survivor's seed needs t shares held by other survivors). One site dropping after sharing
    (its masks removed, its noise not in the sum): the 4 survivors carry 4/3 sigma^2 >= sigma^2."""
    cfg, _ = _noisy_round()
    shares = sum(skellam_noise([(LENGTH, cfg.site_noise_variance)], seed) for seed in (1, 2, 3))
    assert float(shares.var()) / cfg.scale**2 == pytest.approx(SIGMA**2, rel=0.05)  # t = 3 of them
    _, result = _noisy_round(Drops(masked={"site-04"}))
    assert len(result.survivors) == 4 and result.recovered == ("site-04",)
    var = float(result.weighted_sum.var())
    assert var == pytest.approx(4 / 3 * SIGMA**2, rel=0.05) and var >= SIGMA**2


def test_skellam_shares_are_integer_symmetric_repeatable_and_secret_seeded():
    a = skellam_noise([(200_000, 1.5), (3, 0.0)], seed=11)
    assert a.dtype == np.int64 and a.shape == (200_003,) and not a[-3:].any()
    assert float(a[:-3].var()) == pytest.approx(1.5, rel=0.03) and abs(float(a.mean())) < 0.02
    assert np.array_equal(a, skellam_noise([(200_000, 1.5), (3, 0.0)], seed=11))  # a restart re-sends it
    assert not np.array_equal(a, skellam_noise([(200_000, 1.5), (3, 0.0)], seed=12))
    big = skellam_noise([(200_000, 2.0**41)], seed=3)  # the largest rate the ring allows
    assert float(big.var()) == pytest.approx(2.0**41, rel=0.03)


def test_the_ring_is_sized_for_the_noise():
    """With noise the scale drops so that clip, weights and the noise's tail over every
    coordinate fit (the wrap probability stays below 2^-40) and each site's Poisson rate stays
    within 2^40."""
    plain = choose_ring(1.0, 5)
    bits, e = choose_ring(1.0, 5, noise_std=SIGMA, noise_sites=5 / 3, dim=LENGTH)
    assert bits == 32 and e < plain[1]
    tail = skellam_tail_bound(5 / 3 * (SIGMA * 2.0**e) ** 2, LENGTH)
    assert 5 * (1.0 * 2.0**e + 2) + tail <= 2**31 - 1
    # one step finer would wrap or push a site's Poisson rate past 2^40 (here: the rate)
    wraps = 5 * (2.0 ** (e + 1) + 2) + skellam_tail_bound(5 / 3 * (SIGMA * 2.0 ** (e + 1)) ** 2, LENGTH)
    assert wraps > 2**31 - 1 or (SIGMA * 2.0 ** (e + 1)) ** 2 / 2 > 2.0**40
