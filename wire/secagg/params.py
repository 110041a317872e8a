"""Public parameters of one secure-aggregation attempt: the context, the neighbour graph, the
threshold and the ring the quantized inputs live in.

Everything here is public and deterministic: the coordinator makes a ``SecAggConfig`` and sends it
in the round's task; every site re-checks it (``SecAggConfig.from_dict``) and derives the same
graph from it. Each site's signed key set carries the config's digest, so a coordinator that tells
two sites two different configs (other participants, another k or t) gets key sets that do not
verify at the other sites.

Defaults for n sites (3..100 tested; ``default_k_t``):

- degree ``k = min(n - 1, 2 * ceil(1.5 * log2 n))``: the complete graph up to 10 sites, then
  logarithmic (n = 20: 14, 50: 18, 100: 20), as SecAgg+ (Bell et al. 2020) suggests;
- threshold ``t = ceil(2k / 3)``: more than half of a site's neighbours (so two disjoint halves
  can never both reconstruct, the reason for ``t > k/2``), and a third of the neighbours may drop.

Ring and quantization (``choose_ring``): an update clipped to L2 norm C has every coordinate in
[-C, C]; scaled by ``s = 2**scale_log2`` and stochastically rounded, ``|q| <= C*s + 1``; times
the case weight w and summed over the sites, ``|sum| <= W * (C*s + 1)`` with W the total case
weight. With ``W * ((C + N)*s + 2) <= 2**(b-1) - 1`` (N: a per-coordinate bound of any noise
added after clipping, 0 without DP; one extra unit for float rounding of the clip) the sum never
wraps in Z_2^b: the wrap probability is 0 without noise, and below 2^-40 with Gaussian noise
when N comes from ``gaussian_tail_bound``. The unmasked mean then differs from the
weighted mean of the clipped updates by less than ``1/s`` in every coordinate (stochastic rounding
moves each input by less than one unit, and the weights average those errors).

Distributed noise (client-level DP): with ``noise_std`` > 0 each site adds Skellam noise (the
difference of two Poisson draws: integer, symmetric) of variance ``(noise_std * s)^2 / t`` to
each update coordinate in ring units, so any t survivors together carry at least the variance
``(noise_std * s)^2`` and the n survivors at most n/t times it. The ring is sized for the most,
with a Bernstein tail bound (``skellam_tail_bound``; a centred Poisson is sub-exponential) over
every coordinate: the wrap probability stays below 2^-40. The scale is also capped so that each
Poisson rate stays at most 2^40, where the sampler's float64 arithmetic is still exact to the
unit. ``counts`` extra coordinates at the end of the vector are not weighted or scaled: the
adaptive clip's centred bit (+1 within the clip, -1 not), with its own Skellam noise of
variance ``count_noise_std^2 / t``.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from neurofed.wire import kem as kems
from neurofed.wire.secagg.errors import SecAggParameterError

DOMAIN = b"neurofed-secagg/1"
# format 2: masks and rounding coins from AES-256-CTR (format 1 sites, ChaCha20, refuse it by name)
CONFIG_FORMAT = "neurofed-secagg-config/2"
RING_BITS = (32, 64)
DEFAULT_MAX_TOTAL_WEIGHT = 4096
MIN_SITES = 3
MAX_SITES = 1000


def encode_parts(*parts: str | bytes | int) -> bytes:
    """Length-prefixed concatenation (2-byte big-endian length each): unambiguous, unlike joins."""
    out = bytearray()
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode()
        if len(b) > 0xFFFF:
            raise ValueError("part too long")
        out += struct.pack(">H", len(b)) + b
    return bytes(out)


@dataclass(frozen=True)
class RoundContext:
    """What every key, share and mask of one attempt is bound to (HKDF info, AEAD data, signatures)."""

    federation: str
    run_id: str
    round: int
    attempt: int

    def __post_init__(self) -> None:
        if self.round < 0 or self.attempt < 0:
            raise SecAggParameterError("round and attempt must be non-negative")

    def info(self, purpose: str, *parts: str | bytes | int) -> bytes:
        """Domain-separated bytes naming this attempt, a purpose and the parties involved."""
        return DOMAIN + encode_parts(self.federation, self.run_id, self.round, self.attempt, purpose, *parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "federation": self.federation,
            "run_id": self.run_id,
            "round": self.round,
            "attempt": self.attempt,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundContext:
        return cls(str(d["federation"]), str(d["run_id"]), int(d["round"]), int(d["attempt"]))


def default_k_t(n: int) -> tuple[int, int]:
    """Default degree and threshold for n sites (see the module docstring)."""
    if n < MIN_SITES:
        raise SecAggParameterError(f"secure aggregation needs at least {MIN_SITES} sites, got {n}")
    k = min(n - 1, 2 * math.ceil(1.5 * math.log2(n)))
    if (k * n) % 2:
        k += 1
    return k, math.ceil(2 * k / 3)


def check_k_t(n: int, k: int, t: int) -> None:
    """Refuse a degree and threshold that cannot give a sound round, with the reason."""
    if not MIN_SITES <= n <= MAX_SITES:
        raise SecAggParameterError(f"secure aggregation needs {MIN_SITES} to {MAX_SITES} sites, got {n}")
    if not 2 <= k <= n - 1:
        raise SecAggParameterError(f"degree k={k} must be between 2 and n-1={n - 1}")
    if (k * n) % 2:
        raise SecAggParameterError(f"no {k}-regular graph on {n} sites (k*n odd); use k={k + 1}")
    if t < 2:
        raise SecAggParameterError(f"threshold t={t} must be at least 2 (one share must never suffice)")
    if t > k:
        raise SecAggParameterError(f"threshold t={t} exceeds the degree k={k}: no site could be recovered")
    if 2 * t <= k:
        raise SecAggParameterError(
            f"threshold t={t} must exceed k/2={k / 2}: otherwise two disjoint groups of neighbours "
            "could each reconstruct, one a site's self-mask seed and the other its mask key"
        )


def gaussian_tail_bound(sigma: float, dim: int, log2_failure: int = 40) -> float:
    """A per-coordinate bound on Gaussian noise N(0, sigma^2) that every one of ``dim`` coordinates
    respects except with probability below 2^-log2_failure (union bound over the coordinates)."""
    target = 2.0**-log2_failure / max(dim, 1)
    z = 1.0
    while math.erfc(z / math.sqrt(2)) > target:
        z += 0.01
    return z * sigma


MAX_POISSON_RATE = 2.0**40


def skellam_tail_bound(variance: float, dim: int, log2_failure: int = 40) -> float:
    """A bound on |X| for X the sum of independent Skellam noises of total ``variance`` that every
    one of ``dim`` coordinates respects except with probability below 2^-log2_failure: Bernstein,
    P(|X| >= a) <= 2 exp(-a^2 / (2 (variance + a/3)))."""
    if variance <= 0:
        return 0.0
    ln = math.log(2.0 * max(dim, 1)) + log2_failure * math.log(2.0)
    return ln / 3.0 + math.sqrt((ln / 3.0) ** 2 + 2.0 * variance * ln)


def choose_ring(
    clip: float,
    max_total_weight: int,
    *,
    bits: int | None = None,
    scale_log2: int | None = None,
    noise_bound: float = 0.0,
    noise_std: float = 0.0,
    noise_sites: float = 1.0,
    dim: int = 1,
) -> tuple[int, int]:
    """Return ``(bits, scale_log2)`` such that a sum of weighted quantized inputs cannot wrap.

    Give neither: 32 bits and the finest scale that fits. Give ``bits``: the finest scale that fits
    in it. Give ``scale_log2``: the smallest ring (32 or 64 bits) that holds it. Both: check them.
    """
    if not (clip > 0 and math.isfinite(clip)):
        raise SecAggParameterError(f"clip must be a positive finite L2 norm, got {clip}")
    if not (noise_bound >= 0 and math.isfinite(noise_bound)):
        raise SecAggParameterError(f"noise bound must be finite and >= 0, got {noise_bound}")
    if max_total_weight < 1:
        raise SecAggParameterError("the maximum total case weight must be at least 1")

    if not (noise_std >= 0 and math.isfinite(noise_std)):
        raise SecAggParameterError(f"noise std must be finite and >= 0, got {noise_std}")

    def fits(b: int, e: int) -> bool:
        ring_std = noise_std * 2.0**e  # the noise any t survivors carry, in ring units
        if ring_std**2 / 2 > MAX_POISSON_RATE:  # a site's rate, var / (2 t), is at most this
            return False
        skellam = skellam_tail_bound(noise_sites * ring_std**2, dim)
        return max_total_weight * ((clip + noise_bound) * 2.0**e + 2) + skellam <= 2 ** (b - 1) - 1

    if scale_log2 is None:
        b = bits or 32
        if b not in RING_BITS:
            raise SecAggParameterError(f"ring bits must be one of {RING_BITS}, got {b}")
        room = (2 ** (b - 1) - 1) / max_total_weight - 2
        e = math.floor(math.log2(room / (clip + noise_bound + noise_std))) if room > 0 else -64
        while e > -64 and not fits(b, e):
            e -= 1
        if not fits(b, e) or 2.0**-e > clip:
            raise SecAggParameterError(
                f"clip {clip} with total weight up to {max_total_weight} does not fit a {b}-bit ring "
                "with any useful precision; use 64 bits or a smaller weight budget"
            )
        return b, e
    for b in (bits,) if bits else RING_BITS:
        if b not in RING_BITS:
            raise SecAggParameterError(f"ring bits must be one of {RING_BITS}, got {b}")
        if fits(b, scale_log2):
            return b, scale_log2
    raise SecAggParameterError(
        f"scale 2^{scale_log2} with clip {clip} and total weight up to {max_total_weight} "
        f"would wrap a {bits or 64}-bit ring"
    )


def _public_stream(seed: bytes) -> Iterable[int]:
    """Public, deterministic pseudo-random 64-bit integers (SHA-256 in counter mode): graph only."""
    counter = 0
    while True:
        block = hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
        for i in range(0, 32, 8):
            yield int.from_bytes(block[i : i + 8], "big")


def neighbour_graph(participants: Iterable[str], k: int, seed: bytes) -> dict[str, tuple[str, ...]]:
    """A k-regular graph on the participants, the same for everyone who has the same inputs.

    The sorted participants are shuffled with a public seed (Fisher-Yates over SHA-256 counter
    mode, rejection sampling, no modulo bias) and placed on a circle; each connects to its k/2
    nearest on either side, plus the diametrically opposite one when k is odd (n is then even).
    ``k = n - 1`` gives the complete graph.
    """
    order = sorted(participants)
    n = len(order)
    if (k * n) % 2 or not 1 <= k <= n - 1:
        raise SecAggParameterError(f"no {k}-regular graph on {n} sites")
    stream = iter(_public_stream(seed))
    for i in range(n - 1, 0, -1):
        limit = (1 << 64) - (1 << 64) % (i + 1)
        r = next(stream)
        while r >= limit:
            r = next(stream)
        j = r % (i + 1)
        order[i], order[j] = order[j], order[i]
    adj: dict[str, set[str]] = {p: set() for p in order}
    offsets = list(range(1, k // 2 + 1)) + ([n // 2] if k % 2 else [])
    for pos, p in enumerate(order):
        for off in offsets:
            q = order[(pos + off) % n]
            adj[p].add(q)
            adj[q].add(p)
    return {p: tuple(sorted(adj[p])) for p in sorted(adj)}


@dataclass(frozen=True)
class SecAggConfig:
    """The public parameters of one attempt, made by the coordinator and checked by every site.

    ``participants``: the sorted site ids asked to take part; ``length``: coordinates of the flat
    update vector; ``k``/``t``: degree and threshold; ``clip``: L2 bound every site clips to;
    ``scale_log2``/``bits``: quantization scale 2^scale_log2 and ring Z_2^bits;
    ``max_total_weight``: the most case weight the sum may carry (the coordinator refuses inputs
    beyond it); ``noise_bound``: per-coordinate bound of noise added after clipping (0 without DP);
    ``kem``: the federation's KEM (its roster's), which also seals the share bundles (with
    ``mlkem768-x25519`` each key set carries a fresh hybrid key the bundles are sealed to).
    """

    context: RoundContext
    participants: tuple[str, ...]
    length: int
    k: int
    t: int
    clip: float
    scale_log2: int
    bits: int
    max_total_weight: int = DEFAULT_MAX_TOTAL_WEIGHT
    noise_bound: float = 0.0
    kem: str = kems.DEFAULT
    noise_std: float = 0.0  # distributed noise: std any t survivors carry per coordinate (clip units)
    counts: int = 0  # unweighted count coordinates at the end of the vector (the clip bit)
    count_noise_std: float = 0.0  # distributed noise on each count: std any t survivors carry

    def __post_init__(self) -> None:
        if self.kem not in kems.KEMS:
            raise SecAggParameterError(f"unknown KEM {self.kem!r} (one of {', '.join(kems.KEMS)})")
        if tuple(sorted(set(self.participants))) != tuple(self.participants):
            raise SecAggParameterError("participants must be sorted and distinct")
        n = len(self.participants)
        check_k_t(n, self.k, self.t)
        if self.length < 1:
            raise SecAggParameterError("the update vector must have at least one coordinate")
        if self.max_total_weight < n:
            raise SecAggParameterError(f"max total weight {self.max_total_weight} is below n={n}")
        if not 0 <= self.counts < self.length:
            raise SecAggParameterError(f"counts must be in [0, length), got {self.counts}")
        if self.count_noise_std < 0 or (self.count_noise_std > 0 and not self.counts):
            raise SecAggParameterError("count noise needs count coordinates")
        if choose_ring(
            self.clip,
            self.max_total_weight,
            bits=self.bits,
            scale_log2=self.scale_log2,
            noise_bound=self.noise_bound,
            noise_std=self.noise_std,
            noise_sites=self.n / self.t,
            dim=self.length,
        ) != (self.bits, self.scale_log2):
            raise SecAggParameterError("ring does not hold the scale")

    @classmethod
    def create(
        cls,
        context: RoundContext,
        participants: Iterable[str],
        length: int,
        clip: float,
        *,
        k: int | None = None,
        t: int | None = None,
        bits: int | None = None,
        scale_log2: int | None = None,
        max_total_weight: int = DEFAULT_MAX_TOTAL_WEIGHT,
        noise_bound: float = 0.0,
        kem: str = kems.DEFAULT,
        noise_std: float = 0.0,
        counts: int = 0,
        count_noise_std: float = 0.0,
    ) -> SecAggConfig:
        """The coordinator's constructor: defaults for k, t and the ring, checked. ``length``
        counts the ``counts`` coordinates too."""
        parts = tuple(sorted(set(participants)))
        dk, dt = default_k_t(len(parts))
        k = dk if k is None else k
        t = (dt if k == dk else math.ceil(2 * k / 3)) if t is None else t
        b, e = choose_ring(
            clip, max_total_weight, bits=bits, scale_log2=scale_log2, noise_bound=noise_bound,
            noise_std=noise_std, noise_sites=len(parts) / t, dim=int(length),
        )  # fmt: skip
        return cls(
            context, parts, int(length), k, t, float(clip), e, b, max_total_weight, noise_bound, kem,
            float(noise_std), int(counts), float(count_noise_std),
        )  # fmt: skip

    @property
    def n(self) -> int:
        return len(self.participants)

    @property
    def scale(self) -> float:
        return 2.0**self.scale_log2

    @property
    def dtype(self) -> np.dtype:
        return np.dtype("<u4") if self.bits == 32 else np.dtype("<u8")

    @property
    def error_bound(self) -> float:
        """Per-coordinate bound on |unmasked mean - weighted mean of the clipped updates|."""
        return 1.0 / self.scale

    @property
    def site_noise_variance(self) -> float:
        """Each site's Skellam variance per update coordinate, in ring units: 1/t of the target."""
        return (self.noise_std * self.scale) ** 2 / self.t

    @property
    def site_count_variance(self) -> float:
        """Each site's Skellam variance on each count coordinate: 1/t of the target."""
        return self.count_noise_std**2 / self.t

    @property
    def min_survivors(self) -> int:
        """The coordinator never unmasks fewer inputs than this: max(t, 3)."""
        return max(self.t, MIN_SITES)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": CONFIG_FORMAT,
            "context": self.context.to_dict(),
            "participants": list(self.participants),
            "length": self.length,
            "k": self.k,
            "t": self.t,
            "clip": self.clip,
            "scale_log2": self.scale_log2,
            "bits": self.bits,
            "max_total_weight": self.max_total_weight,
            "noise_bound": self.noise_bound,
            # only when used: a config without distributed noise keeps its digest
            **({"noise_std": self.noise_std} if self.noise_std else {}),
            **({"counts": self.counts} if self.counts else {}),
            **({"count_noise_std": self.count_noise_std} if self.count_noise_std else {}),
        }
        if self.kem != kems.DEFAULT:  # absent = x25519 (the digest of such configs is unchanged)
            d["kem"] = self.kem
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SecAggConfig:
        """A site's constructor: the coordinator's dict, re-checked (raises SecAggParameterError)."""
        try:
            if d.get("format") != CONFIG_FORMAT:
                raise SecAggParameterError(f"config format {d.get('format')!r}, expected {CONFIG_FORMAT}")
            return cls(
                RoundContext.from_dict(d["context"]),
                tuple(str(p) for p in d["participants"]),
                int(d["length"]),
                int(d["k"]),
                int(d["t"]),
                float(d["clip"]),
                int(d["scale_log2"]),
                int(d["bits"]),
                int(d["max_total_weight"]),
                float(d["noise_bound"]),
                str(d.get("kem", kems.DEFAULT)),
                float(d.get("noise_std", 0.0)),
                int(d.get("counts", 0)),
                float(d.get("count_noise_std", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, SecAggParameterError):
                raise
            raise SecAggParameterError(f"malformed secure-aggregation config: {exc!r}") from None

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @cached_property
    def digest(self) -> bytes:
        return hashlib.sha256(DOMAIN + b"config" + self.to_bytes()).digest()

    @cached_property
    def graph(self) -> dict[str, tuple[str, ...]]:
        seed = hashlib.sha256(self.context.info("graph", *self.participants, self.k)).digest()
        return neighbour_graph(self.participants, self.k, seed)

    def neighbours(self, site: str) -> tuple[str, ...]:
        return self.graph[site]
