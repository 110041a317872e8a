"""Secure aggregation in a round: the coordinator's side of SecAgg+ over the wire.

The protocol core is ``neurofed.wire.secagg`` (pure, transport-free); this module drives one round
of it through the coordinator's endpoint: it makes each attempt's config (announced in the TASK),
takes the sites' SECAGG steps (key set, share bundles, echo, reveal) and masked UPDATEs, closes
each phase when every site still in it answered or the phase's deadline passed, sends the RELAY
messages every site needs for the next phase, and ends with the weighted mean of the sites'
clipped update deltas, never with one site's update. An attempt that cannot finish (too few
survivors, reveals or echoes) is abandoned and the round retried with fresh keys under the next
attempt number, which is persisted before it is announced, so a restarted coordinator never
reuses one. A retry is built over the sites that answered the failed attempt's last phase and
are not offline (``retry_participants``), with k and t for that many sites: sites that died in an
attempt would otherwise fail every retry the same way. Only when fewer than max(3, the round's
quorum) are left, or the operator's own threshold does not fit them, is it built over the whole
roster again. A site left out of an attempt is neither asked for input nor counted; if it comes
back it waits for the next round.

The update vector is the float tensors' change from the round's global model, flattened in the
order of their sorted names (``flat_names``); FedNova sites divide it by their local steps first
and report the steps (``fednova_scale``).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neurofed.coordinator.errors import CoordinatorError, UpdateRejected
from neurofed.coordinator.faults import fault_point
from neurofed.wire.api import Message
from neurofed.wire.errors import ProtocolError
from neurofed.wire.secagg import (
    RoundContext,
    SecAggConfig,
    SecAggParameterError,
    SecAggResult,
    SecAggRoundFailed,
    SecAggServer,
    default_k_t,
    pack_bundles,
    unpack_bundles,
)
from neurofed.wire.secagg.params import MIN_SITES, check_k_t

log = logging.getLogger(__name__)

ENCODING = "secagg"  # an UPDATE's meta "encoding": a masked input, not weights
REFUSED_STRATEGIES = ("median", "trimmed-mean")


@dataclass(frozen=True, kw_only=True)
class SecureSettings:
    """``--secure-aggregation`` and its parameters (``clip`` is each site's L2 clip)."""

    clip: float = 10.0
    k: int | None = None
    t: int | None = None
    bits: int | None = None
    max_total_weight: int = 4096
    phase_timeout: float = 60.0
    max_attempts: int = 3


def refuse_unsound(
    strategy: str, *, fp16: bool, site_optimizer: str, sites: int, max_norm_at_coordinator: bool
) -> None:
    """One clear error at start for what secure aggregation cannot do."""
    if strategy in REFUSED_STRATEGIES:
        raise CoordinatorError(
            f"--strategy {strategy} needs every site's own update, which secure aggregation hides; "
            "use fedavg, fedprox, fednova, fedavgm, fedadam or fedyogi"
        )
    if max_norm_at_coordinator:
        raise CoordinatorError(
            "a coordinator-side update-norm bound needs individual updates; with secure aggregation "
            "--max-norm is each site's L2 clip"
        )
    if fp16:
        raise CoordinatorError(
            "--fp16 and --secure-aggregation do not combine: masked inputs are ring elements"
        )
    if site_optimizer == "continue-global":
        raise CoordinatorError(
            "--site-optimizer continue-global averages each site's optimiser state, which secure "
            "aggregation hides; use reset or continue-local"
        )
    if sites < 3:
        raise CoordinatorError(f"secure aggregation needs at least 3 sites; the roster has {sites}")


def flat_names(weights: Mapping[str, np.ndarray]) -> list[str]:
    """The tensors an update vector holds, in order: the floating-point ones, by name."""
    return sorted(k for k, v in weights.items() if np.issubdtype(np.asarray(v).dtype, np.floating))


def flat_length(weights: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(weights[k]).size for k in flat_names(weights)))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Attempt:
    """One attempt of a secure round: its config, the server and what the phases saw."""

    config: SecAggConfig
    server: SecAggServer
    phase: str = "keys"
    phase_deadline: float = 0.0
    local_steps: dict[str, int] = field(default_factory=dict)
    cases: dict[str, int] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.time)


class SecureRound:
    """The secure-aggregation part of one training round at the coordinator.

    ``send_relay(phase, attempt, payload)`` publishes a RELAY; ``persist_attempt(n)`` writes the
    attempt counter durably before the attempt is announced; ``event(kind, **data)`` logs to
    events.jsonl."""

    def __init__(
        self,
        *,
        federation: str,
        run_id: str,
        round: int,
        sites: Sequence[str],
        weights: Mapping[str, np.ndarray],
        roster_keys: Mapping[str, Any],
        settings: SecureSettings,
        next_attempt: int,
        kem: str = "x25519",
        send_relay: Callable[[str, int, bytes], None],
        persist_attempt: Callable[[int], None],
        event: Callable[..., None],
        clock: Callable[[], float] = time.time,
        dp: Mapping[str, Any] | None = None,
        quorum: int = MIN_SITES,
    ) -> None:
        self.federation, self.run_id, self.round = federation, run_id, round
        self.sites = tuple(sorted(sites))
        # a retry over the sites still answering needs at least this many of them (--min-sites)
        self.quorum = max(MIN_SITES, int(quorum))
        self._offline: set[str] = set()  # known offline at the latest advance()
        # client-level DP (ClientDP.secure_params): the round's clip, the distributed noise and
        # the adaptive clip's count coordinate, appended after the update's coordinates
        self.dp = dict(dp or {})
        self.length = flat_length(weights) + int(self.dp.get("counts", 0))
        self.roster_keys = dict(roster_keys)
        self.settings = settings
        self.kem = kem  # the federation's KEM: share bundles are sealed with it too
        self._send_relay, self._persist_attempt, self._event = send_relay, persist_attempt, event
        self.clock = clock
        self.attempts = 0
        self.result: SecAggResult | None = None
        self.failed = False
        self.attempt = self._new_attempt(next_attempt, self.sites)

    # -- attempts -----------------------------------------------------------------------------
    def _new_attempt(self, number: int, participants: Sequence[str], left_out: Sequence[str] = ()) -> Attempt:
        self._persist_attempt(number + 1)  # never announce the same attempt twice
        k, t = (self.settings.k, self.settings.t) if not left_out else self._narrowed_k_t(len(participants))
        try:
            config = SecAggConfig.create(
                RoundContext(self.federation, self.run_id, self.round, number),
                participants,
                self.length,
                float(self.dp.get("clip", self.settings.clip)),
                k=k,
                t=t,
                bits=self.settings.bits,
                max_total_weight=int(self.dp.get("max_total_weight", self.settings.max_total_weight)),
                noise_std=float(self.dp.get("noise_std", 0.0)),
                counts=int(self.dp.get("counts", 0)),
                count_noise_std=float(self.dp.get("count_noise_std", 0.0)),
                kem=self.kem,
            )
        except SecAggParameterError as exc:
            raise CoordinatorError(f"secure aggregation: {exc}") from None
        self.attempts += 1
        a = Attempt(config, SecAggServer(config, self.roster_keys))
        a.phase_deadline = self.clock() + self.settings.phase_timeout
        log.info(
            "round %d: secure aggregation attempt %d (%d sites, k=%d, t=%d, %d-bit ring, clip %.3g)",
            self.round, number, config.n, config.k, config.t, config.bits, config.clip,
        )  # fmt: skip
        if left_out:
            log.warning(
                "round %d: attempt %d over %d sites (k=%d, t=%d); left out: %s",
                self.round, number, config.n, config.k, config.t, ", ".join(left_out),
            )  # fmt: skip
        self._event(
            "secagg-attempt", round=self.round, attempt=number, sites=list(config.participants),
            left_out=list(left_out), k=config.k, threshold=config.t, bits=config.bits,
            scale_log2=config.scale_log2, clip=config.clip, error_bound=config.error_bound,
            **({"noise_std": config.noise_std, "counts": config.counts} if config.noise_std else {}),
        )  # fmt: skip
        return a

    @property
    def number(self) -> int:
        return self.attempt.config.context.attempt

    def task_meta(self) -> dict[str, Any]:
        """What the TASK says of this attempt: every site checks the config and takes part."""
        return {"attempt": self.number, "config": self.attempt.config.to_dict()}

    def retry(self, reason: str) -> bool:
        """Abandon the attempt; start the next with fresh keys. False when no attempt is left."""
        self._event("secagg-retry", round=self.round, attempt=self.number, reason=reason)
        if self.attempts >= self.settings.max_attempts:
            log.warning(
                "round %d: secure aggregation failed %d times (%s); the round keeps the previous model",
                self.round, self.attempts, reason,
            )  # fmt: skip
            self.failed = True
            return False
        log.warning(
            "round %d: secure aggregation attempt %d cannot finish (%s); retrying with fresh keys as "
            "attempt %d",
            self.round, self.number, reason, self.number + 1,
        )  # fmt: skip
        participants = self.retry_participants()
        left_out = tuple(s for s in self.sites if s not in participants)
        self.attempt = self._new_attempt(self.number + 1, participants, left_out)
        return True

    def answered(self) -> set[str]:
        """The sites that answered the current attempt's open phase (the one that failed)."""
        s = self.attempt.server
        return set(
            {
                "keys": s._keysets,
                "shares": s._bundles,
                "inputs": s._inputs,
                "echoes": s._echoes,
                "reveals": s._revealed,
            }.get(self.attempt.phase, self.attempt.config.participants)
        )

    def retry_participants(self) -> tuple[str, ...]:
        """Who the next attempt is built over: the sites that answered the failed attempt's last
        phase and are not known offline, when at least max(3, quorum) of them are left and a
        sound k and t exist for them; otherwise the whole roster (sites may have come back)."""
        alive = tuple(sorted(self.answered() - self._offline))
        if len(alive) == len(self.sites):
            return self.sites
        if len(alive) < self.quorum:
            log.warning(
                "round %d: only %d sites answered attempt %d (%s), fewer than the %d a retry needs; "
                "retrying over the whole roster",
                self.round, len(alive), self.number, ", ".join(alive) or "none", self.quorum,
            )  # fmt: skip
            return self.sites
        if self._narrowed_k_t(len(alive)) is None:
            log.warning(
                "round %d: the threshold t=%s does not fit the %d sites that answered attempt %d; "
                "retrying over the whole roster",
                self.round, self.settings.t, len(alive), self.number,
            )  # fmt: skip
            return self.sites
        return alive

    def _narrowed_k_t(self, n: int) -> tuple[int, int] | None:
        """k and t for an attempt over n of the roster's sites: the operator's when they fit n,
        else the defaults for n; a threshold the operator set is kept (with the default degree
        for n when that is sound, else the smallest sound one), None when it cannot be."""
        dk, dt = default_k_t(n)
        k, t = self.settings.k, self.settings.t
        if t is None:
            if k is not None and _sound(n, k, math.ceil(2 * k / 3)):
                return k, math.ceil(2 * k / 3)
            return dk, dt
        for cand in (k, dk, *range(t, n)):
            if cand is not None and _sound(n, cand, t):
                return cand, t
        return None

    # -- messages -----------------------------------------------------------------------------
    def on_step(self, msg: Message) -> None:
        """A site's SECAGG step (key set, shares, echo or reveal) of the current attempt."""
        meta = msg.meta
        if int(meta.get("attempt", -1)) != self.number:
            raise UpdateRejected(
                "secagg-other-attempt", f"step of attempt {meta.get('attempt')}, this is {self.number}"
            )
        step, server = meta.get("step"), self.attempt.server
        payload = bytes(msg.payload)
        try:
            if step == "keyset":
                server.add_keyset(msg.sender, payload)
            elif step == "shares":
                server.add_shares(msg.sender, payload)
            elif step == "echo":
                server.add_echo(msg.sender, payload)
            elif step == "reveal":
                server.add_reveal(msg.sender, payload)
            else:
                raise UpdateRejected("secagg-bad-step", f"unknown step {step!r}")
        except ProtocolError as exc:
            raise UpdateRejected(exc.reason, exc.detail) from None

    def on_masked_input(self, msg: Message, num_cases: int, local_steps: int | None) -> None:
        """A site's masked UPDATE: folded into the ring sum at once (never held per site)."""
        meta = msg.meta
        if int(meta.get("attempt", -1)) != self.number:
            raise UpdateRejected(
                "secagg-other-attempt", f"input of attempt {meta.get('attempt')}, this is {self.number}"
            )
        try:
            # the wire verified the message's signed digest: it names the input without a second hash
            digest = msg.digest.encode() if msg.digest else None
            self.attempt.server.add_masked_input(msg.sender, msg.payload, digest=digest)
        except ProtocolError as exc:
            raise UpdateRejected(exc.reason, exc.detail) from None
        self.attempt.cases[msg.sender] = num_cases
        if local_steps is not None:
            self.attempt.local_steps[msg.sender] = local_steps

    # -- phases ---------------------------------------------------------------------------------
    def advance(self, offline: set[str], round_deadline: float) -> bool:
        """Close the current phase when every site still in it answered (or the offline rest
        cannot), or its deadline passed; relay what the next phase needs. True once the sum is
        unmasked (``result``) or the round gave up (``failed``)."""
        if self.result is not None or self.failed:
            return True
        self._offline = set(offline)
        try:
            self._advance(offline, round_deadline)
        except SecAggRoundFailed as exc:
            if not self.retry(exc.reason if hasattr(exc, "reason") else str(exc)):
                return True
        return self.result is not None or self.failed

    def _went_without(self, waiting: set[str]) -> None:
        """A phase closed at its deadline without answers from sites not known to be offline (cut
        off, stuck): name them, as a plaintext round names the sites it closed without."""
        if waiting:
            log.warning(
                "round %d: deadline passed in the secure aggregation's %s phase; going on without %s",
                self.round,
                self.attempt.phase,
                ", ".join(sorted(waiting)),
            )

    def _advance(self, offline: set[str], round_deadline: float) -> None:  # noqa: C901 - one branch per phase
        a, now = self.attempt, self.clock()
        s = a.server
        if a.phase == "keys":
            waiting = set(a.config.participants) - set(s._keysets) - offline
            if waiting and now < a.phase_deadline:
                return
            self._went_without(waiting)
            keysets = s.close_keysets()
            self._relay("keysets", json.dumps({k: _b64(v) for k, v in sorted(keysets.items())}).encode())
            fault_point("secagg-after-keysets", self.round)
            self._next("shares", now + self.settings.phase_timeout)
        elif a.phase == "shares":
            waiting = set(s._u1) - set(s._bundles) - offline
            if waiting and now < a.phase_deadline:
                return
            self._went_without(waiting)
            s.close_shares()
            sharing = sorted(s._u2)
            relayed = {site: _b64(pack_bundles(s.shares_for(site))) for site in sharing}
            self._relay("shares", json.dumps(relayed).encode())
            # the masked inputs come after local training: the round's own deadline
            self._next("inputs", round_deadline)
        elif a.phase == "inputs":
            waiting = set(s._u2) - set(s._inputs) - offline
            if waiting and now < a.phase_deadline:
                return
            self._went_without(waiting)
            self._relay("survivors", s.close_inputs())
            fault_point("secagg-after-inputs", self.round)
            self._next("echoes", now + self.settings.phase_timeout)
        elif a.phase == "echoes":
            survivors = set(s._list.survivors) if s._list is not None else set()
            waiting = survivors - set(s._echoes) - offline
            if waiting and now < a.phase_deadline:
                return
            self._went_without(waiting)
            self._relay("unmask", s.unmask_request())
            self._next("reveals", now + self.settings.phase_timeout)
        elif a.phase == "reveals":
            survivors = set(s._list.survivors) if s._list is not None else set()
            waiting = survivors - set(s._revealed) - offline
            if waiting and not s.ready() and now < a.phase_deadline:
                return
            if waiting and not s.ready():
                raise SecAggRoundFailed(
                    "secagg-too-few-reveals", f"no reveal from {', '.join(sorted(waiting))}"
                )
            self.result = s.finish()
            a.times["reveals"] = now - a.started
            self._event(
                "secagg-done", round=self.round, attempt=self.number, survivors=list(self.result.survivors),
                recovered=list(self.result.recovered), left_out=list(self.result.left_out),
                total_weight=self.result.total_weight, error_bound=self.result.error_bound,
                phase_s={k: round(v, 3) for k, v in a.times.items()},
                bytes_in=self.result.bytes_in, bytes_out=self.result.bytes_out,
            )  # fmt: skip

    def _next(self, phase: str, deadline: float) -> None:
        a = self.attempt
        a.times[a.phase] = self.clock() - a.started
        a.phase, a.phase_deadline = phase, deadline

    def _relay(self, step: str, payload: bytes) -> None:
        self._send_relay(step, self.number, payload)

    def resend_current(self) -> None:
        """After the broker came back: the relays the current phase depends on, once more (the
        RELAY kind is not retained; a site ignores a copy it already used)."""
        s = self.attempt.server
        if self.attempt.phase in ("shares", "inputs", "echoes", "reveals") and s._u1:
            self._relay(
                "keysets", json.dumps({k: _b64(v) for k, v in sorted(s.close_keysets().items())}).encode()
            )

    # -- the result -------------------------------------------------------------------------------
    def mean_update(
        self, weights: Mapping[str, np.ndarray], strategy: str
    ) -> tuple[dict[str, np.ndarray], int]:
        """The new weights the strategy takes as the round's one (already averaged) update, and
        the total case weight behind it. Made tensor by tensor from the unmasked ring sum, which
        is released afterwards: the close never holds a whole float64 copy of the model."""
        assert self.result is not None
        res = self.result
        factor = (
            fednova_scale(self.attempt.cases, self.attempt.local_steps, res.survivors)
            if strategy == "fednova"
            else 1.0
        )
        out = new_weights(res, weights, factor)
        res.release()
        return out, int(res.total_weight)


def new_weights(
    res: SecAggResult, weights: Mapping[str, np.ndarray], factor: float = 1.0
) -> dict[str, np.ndarray]:
    """``weights + factor * mean`` tensor by tensor, each from its slice of the unmasked ring sum
    (one tensor's float64 copy at a time, never the whole model's); non-float tensors as given."""
    if flat_length(weights) != res.length:
        raise CoordinatorError(f"secure sum has {res.length} coordinates, the model {flat_length(weights)}")
    out = {k: np.asarray(v) for k, v in weights.items()}
    pos = 0
    for k in flat_names(weights):
        w = out[k]
        d = res.mean_of(pos, pos + w.size).reshape(w.shape)
        if factor != 1.0:
            d *= factor
        d += w  # in float64, then back to the tensor's dtype
        out[k] = d.astype(w.dtype)
        pos += w.size
    return out


def _sound(n: int, k: int, t: int) -> bool:
    try:
        check_k_t(n, k, t)
    except SecAggParameterError:
        return False
    return True


def fednova_scale(cases: Mapping[str, int], steps: Mapping[str, int], survivors: Sequence[str]) -> float:
    """FedNova under masking: each site sent its delta divided by its local steps tau_i (weight
    n_i), so the unmasked mean is sum n_i d_i/tau_i / N, and FedNova's update is
    (sum n_i tau_i / N) times it."""
    n = sum(int(cases[s]) for s in survivors)
    missing = [s for s in survivors if s not in steps]
    if missing:
        raise CoordinatorError(f"FedNova needs local_steps from {', '.join(missing)}")
    return sum(int(cases[s]) * int(steps[s]) for s in survivors) / n if n else 0.0


def roster_signing_keys(bundle: Any) -> dict[str, Any]:
    """The sites' Ed25519 public keys from a verified bundle's roster (the key sets' signers)."""
    return {s: bundle.roster.get(s).signing_key() for s in bundle.roster.sites}


def load_next_attempt(path: Path) -> int:
    try:
        return int(json.loads(path.read_text()).get("next_attempt", 0))
    except (OSError, ValueError):
        return 0


__all__ = [
    "ENCODING",
    "SecureRound",
    "SecureSettings",
    "flat_names",
    "new_weights",
    "flat_length",
    "load_next_attempt",
    "refuse_unsound",
    "roster_signing_keys",
    "unpack_bundles",
]
