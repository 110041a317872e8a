"""The round state machine: announce, collect, close, aggregate, persist, register, repeat.

It is separate from the aggregation maths (a ``Strategy``) and from the transport (any
``neurofed.wire.api.Endpoint``: the real MQTT one or the in-memory hub). Per round r (wire/PROTOCOL.md):

1. ANNOUNCE: publish MODEL r (retained, the global model after round r-1), TASK r (retained:
   round, model digest, hyper-parameters incl. local epochs and mu, deadline, train flag) and an
   empty RECEIPTS r.
2. COLLECT: accept one UPDATE per expected site (checked: round, not late, not duplicate, trained
   from this round's model, tensors equal in names/shapes/dtypes to the global model, finite), fold
   each into the strategy as it arrives and re-publish RECEIPTS (the list of sites whose update the
   coordinator holds) once it has caught up with what is queued, not after every update; also
   re-published every few seconds, so a site whose upload was lost to a
   broker restart notices and resends). METRICS (each site's evaluation of model r-1, sent after
   its update: the site scores while the update travels) are gathered on the way and during round
   r+1, which forwards them once every site's are in or when it closes (persisted meanwhile as
   ``extra.evaluating``; RECEIPTS r+1 name them as ``evaluated``). A training round closes on
   updates: when every expected site delivered, or at the deadline with at
   least ``min_sites``, or early with ``min_sites`` once every missing site is known offline (its
   MQTT will published an offline STATUS); below quorum the deadline is extended and the task
   re-published.
3. CLOSE: drain what is already queued; updates for round r from now on are rejected as late.
4. Then IN THIS ORDER: aggregate -> persist the snapshot atomically -> hand registration to the
   background worker -> announce round r+1 (fault points between each).

After the last training round comes an evaluation-only round (``train: false``) so the last model
is scored by every site too, then a final TASK with ``done: true``. Rejections are logged with the
site and reason and counted in ``RoundResult.rejected``; they never count toward quorum.

``meta`` fields the federation layer defines (wire/PROTOCOL.md leaves them to us):

- TASK: ``round``, ``model_digest`` (SHA-256 of the MODEL payload; under int8 / int8-topk of the
  model the sites rebuild, see wire/PROTOCOL.md), ``train`` (false: evaluation
  only), ``done`` (true: the federation is over), ``deadline`` (unix time), ``epochs``, ``sites``
  ({site: its own config, e.g. ``{"epochs": 1, "mu": 0.01}``}), ``session`` (changes when the
  coordinator restarts), ``strategy``, ``min_sites``, ``fp16``, ``compression`` (none | fp16 | int8 |
  int8-topk), ``topk_density``, ``site_optimizer`` (reset |
  continue-local | continue-global), ``model_config`` (ModelConfig dict). A site's own config may carry ``lr_scale``
  (the factor on its learning rate this round, from ``--lr-schedule``; absent: 1).
- MODEL: ``round``, ``model_digest``; payload: safetensors of the global weights (fp16 with
  ``--fp16``), plus the averaged Adam state (``optimizer/...``) under continue-global. Under
  int8 / int8-topk also ``encoding`` (``full``, or ``int8-delta`` / ``int8-topk-delta`` with
  ``base_digest``): the whole model, or the compressed change from the model the sites rebuilt.
- RECEIPTS: ``round``, ``held`` (sites whose update the coordinator holds), ``metrics`` (sites
  whose evaluation it holds), ``session``; ``evaluated`` (``{"round": r-1, "sites": [...]}``)
  while the previous round's evaluations are still awaited.
- UPDATE: ``num_cases`` (positive int, the FedAvg weight), ``model_digest`` (the model it was
  trained from), ``loss``, ``train_seconds``, ``local_steps`` (optimiser steps taken, FedNova's
  tau), ``encoding`` (absent or ``weights``; ``fp16-delta`` with ``--fp16``; ``int8-delta`` /
  ``int8-topk-delta`` under int8 / int8-topk); payload: safetensors of the full weights, or of
  the fp16 or compressed change of the float tensors; plus the site's
  Adam state (``optimizer/...``) under continue-global.
- STATUS (from a site): ``need_model`` (a digest) when it cannot rebuild the round's model from
  the delta: the coordinator sends the whole model, once per round.
- METRICS: ``dice``, ``hd95``, ``num_cases`` (validation cases), ``evaluated_round`` (r-1),
  ``model_digest``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neurofed.coordinator import payload as codec
from neurofed.coordinator.aggregate import WeightedMean
from neurofed.coordinator.checks import (
    apply_delta,
    check_local_steps,
    check_num_cases,
    check_optimizer_state,
    check_privacy_report,
    check_update,
    upcast_half,
)
from neurofed.coordinator.client_dp import ClientDP
from neurofed.coordinator.errors import CoordinatorError, UpdateRejected
from neurofed.coordinator.faults import fault_point
from neurofed.coordinator.membership import RosterWatch
from neurofed.coordinator.registration import Registrar
from neurofed.coordinator.secure import ENCODING as SECAGG_ENCODING
from neurofed.coordinator.secure import SecureRound, SecureSettings, load_next_attempt
from neurofed.coordinator.state import (
    Snapshot,
    StateStore,
    append_whole,
    atomic_write_json,
    disk_full,
    until_saved,
)
from neurofed.coordinator.strategies import Strategy
from neurofed.models.privacy import BUDGET_SPENT
from neurofed.wire import compression as compress
from neurofed.wire.api import Endpoint, Message, MessageKind
from neurofed.wire.compression import COMPRESSIONS, DEFAULT_DENSITY, DELTA_CODECS
from neurofed.wire.errors import TransportError
from neurofed.wire.payload import UPDATE_ENCODING_FP16_DELTA, UPDATE_ENCODINGS, split_optimizer

log = logging.getLogger(__name__)
WIRE_EVENTS_PER_PUBLISHER = 20  # events.jsonl lines per publisher, reason and round; the rest are counted


SITE_OPTIMIZER = ("reset", "continue-local", "continue-global")
"""What a site does with its optimiser's state between rounds (OpenFL's names): ``reset`` starts
each round with a fresh Adam (the FedAvg paper's convention); ``continue-local`` keeps the site's
Adam moments from its previous round and applies them to the new global weights, which avoids
Adam's large bias-corrected first steps every round; ``continue-global`` has each site send its
Adam moments with its update, the coordinator averages them like the weights (by cases) and sends
them with the next model, so every site starts each round from the federation's moments (what a
pooled run's Adam would carry). It triples the bytes of models and updates."""

LR_SCHEDULES = ("constant", "cosine")
"""How the sites' learning rate changes over the training rounds. ``cosine`` scales it by
0.5 (1 + cos(pi (r - 1) / R)) in round r of R: 1 in the first round, near 0 in the last.

Why: with a constant local learning rate FedAvg converges only to a neighbourhood of the optimum,
one biased by the sites' differing data; its convergence proofs decay the local rate (Li et al.
2020, "On the convergence of FedAvg on non-IID data"). Pooled training gains from the same decay,
so ``neurofed experiment`` gives every arm the same schedule by epoch. Measured on the study's
synthetic sites (docs/study): pooled training gains more from it than federated."""


def lr_scale(schedule: str, round: int, rounds: int) -> float:
    """The factor on the sites' learning rate in training round ``round`` (1-based) of ``rounds``."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (min(max(round, 1), rounds) - 1) / rounds))
    raise CoordinatorError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")


@dataclass(frozen=True, kw_only=True)
class RoundConfig:
    """How the federation runs. ``round_timeout`` is the collection deadline per round (seconds)."""

    rounds: int
    expected_sites: tuple[str, ...]
    min_sites: int
    round_timeout: float = 600.0
    local_epochs: float = 1  # a fraction: that share of an epoch's batches per round
    fp16: bool = False  # the same as compression="fp16" (kept for ``--fp16``)
    compression: str = "none"  # neurofed.wire.compression.COMPRESSIONS
    topk_density: float = DEFAULT_DENSITY  # int8-topk: the share of each tensor's values sent
    site_optimizer: str = "reset"
    lr_schedule: str = "constant"
    receipt_interval: float = 3.0
    final_eval: bool = True
    max_extensions: int = 1000
    secure: SecureSettings | None = None  # --secure-aggregation: only the sum of the updates is seen
    dp: Mapping[str, Any] | None = None  # the task's ``dp`` (neurofed.models.privacy.DPConfig.to_task)
    # client-level DP (DP-FedAvg): resolved neurofed.models.client_privacy.ClientDPConfig.to_dict()
    dp_client: Mapping[str, Any] | None = None
    # after the end (TASK done): stay connected up to this long while sites known online have not
    # left, publishing the end again if the broker comes back without it (0: exit at once)
    linger: float = 0.0

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise CoordinatorError(f"--rounds must be >= 1, got {self.rounds}")
        if not self.expected_sites:
            raise CoordinatorError("the roster names no sites: provision at least one site")
        if not 1 <= self.min_sites <= len(self.expected_sites):
            raise CoordinatorError(
                f"--min-sites must be between 1 and the {len(self.expected_sites)} provisioned sites, "
                f"got {self.min_sites}"
            )
        if not self.round_timeout > 0:
            raise CoordinatorError(f"--round-timeout must be positive, got {self.round_timeout}")
        if not (0 < self.local_epochs < math.inf):
            raise CoordinatorError(f"--local-epochs must be a positive number, got {self.local_epochs}")
        if self.site_optimizer not in SITE_OPTIMIZER:
            raise CoordinatorError(
                f"--site-optimizer must be one of {', '.join(SITE_OPTIMIZER)}, got {self.site_optimizer!r}"
            )
        if self.compression not in COMPRESSIONS:
            raise CoordinatorError(
                f"--compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}"
            )
        if self.fp16 and self.compression not in ("none", "fp16"):
            raise CoordinatorError(
                f"--fp16 is --compression fp16; it cannot go with --compression {self.compression}"
            )
        if self.fp16 or self.compression == "fp16":  # one setting, whichever way it was given
            object.__setattr__(self, "fp16", True)
            object.__setattr__(self, "compression", "fp16")
        if not 0 < self.topk_density <= 1:
            raise CoordinatorError(f"--topk-density must be in (0, 1], got {self.topk_density}")
        if self.site_optimizer == "continue-global" and self.compression in DELTA_CODECS:
            raise CoordinatorError(
                f"--site-optimizer continue-global cannot run with --compression {self.compression}: "
                "Adam's state travels uncompressed beside the weights; drop one of the two"
            )
        if self.site_optimizer == "continue-global" and self.fp16:
            raise CoordinatorError(
                "--site-optimizer continue-global cannot run with --fp16: Adam's second moments "
                "(~1e-10) underflow in half precision; drop one of the two"
            )
        lr_scale(self.lr_schedule, 1, self.rounds)  # refuses an unknown schedule now, not in round 1


@dataclass
class RoundResult:
    """What happened in one round (also written to ``STATE/events.jsonl``)."""

    round: int
    train: bool
    sites: list[str] = field(default_factory=list)
    cases: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (sender, reason), wire ones too
    aggregated: bool = False
    seconds: float = 0.0
    extensions: int = 0
    bytes_received: int = 0
    dp: dict[str, dict[str, Any]] = field(default_factory=dict)  # each site's privacy report
    dp_client: dict[str, Any] = field(default_factory=dict)  # the round's client-level DP figures

    @property
    def num_cases(self) -> int:
        return sum(self.cases.values())

    def rejected_by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, reason in self.rejected:
            out[reason] = out.get(reason, 0) + 1
        return dict(sorted(out.items()))


def splits_digest(metrics: Mapping[str, Mapping[str, Any]]) -> str | None:
    """One digest of the validation cases every reporting site scored on (each site reports its
    own); None when a site did not say. Two runs' Dice compare only under the same digest."""
    import hashlib

    parts = []
    for site in sorted(metrics):
        d = metrics[site].get("splits_digest")
        if not isinstance(d, str):
            return None
        parts.append(f"{site}={d}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest() if parts else None


class Coordinator:
    """Runs a whole federation over ``endpoint`` with ``strategy``, persisting to ``store``."""

    def __init__(
        self,
        endpoint: Endpoint,
        strategy: Strategy,
        store: StateStore,
        config: RoundConfig,
        *,
        model_config: Mapping[str, Any],
        initial_weights: Callable[[], dict[str, np.ndarray]],
        registrar: Registrar | None = None,
        roster_digest: str = "",
        roster_watch: RosterWatch | None = None,
        events_path: str | Path | None = None,
        clock: Callable[[], float] = time.time,
        roster_keys: Mapping[str, Any] | None = None,
        spacing_from_sites: bool = False,
    ) -> None:
        self.ep = endpoint
        self.roster_keys = dict(roster_keys or {})
        self._secure: SecureRound | None = None
        self.client_dp: ClientDP | None = None  # DP-FedAvg: made once the snapshot is loaded
        self.spacing_from_sites = spacing_from_sites
        self.site_spacing: dict[str, dict[str, Any]] = {}  # site -> its reported spacing summary
        self.strategy = strategy
        self.store = store
        self.cfg = config
        self.model_config = dict(model_config)
        self._initial = initial_weights
        self.registrar = registrar
        self.roster_digest = roster_digest
        self.roster_watch = roster_watch
        self._next_sites: tuple[str, ...] | None = None  # sites added live: from the next round
        self.session = uuid.uuid4().hex[:12]
        # the federation run this state belongs to: bound into every message both ways
        self.run_id = store.run_id()
        endpoint.set_run(self.run_id)
        self.clock = clock
        self.events_path = Path(events_path) if events_path else store.root / "events.jsonl"
        self._unwritten: list[str] = []  # events lines not yet written (a full disk)
        self.weights: dict[str, np.ndarray] = {}
        # continue-global: the federation's averaged Adam state, sent with each model
        self.site_optimizer: dict[str, np.ndarray] = {}
        self._optimizer_mean: WeightedMean | None = None
        # --compression int8|int8-topk: the model the sites reconstruct from the MODELs sent (the
        # next MODEL is a delta against it; the TASK's digest names it) and the current round's
        # MODEL as sent: (round, payload, meta, digest)
        self.reconstructed: dict[str, np.ndarray] = {}
        self._reconstructed_digest = ""
        self._round_model: tuple[int, bytes, dict[str, Any], str] | None = None
        self.completed = 0  # last aggregated (persisted) round
        self.closed_round = 0
        self.results: list[RoundResult] = []
        self.offline: set[str] = set()  # sites whose latest STATUS is offline (e.g. their MQTT will)
        self.retired: dict[str, str] = {}  # sites that left for good (privacy budget spent): why
        self.online: set[str] = set()  # sites heard from in this process and not offline since
        self._extra_state: dict[str, Any] = {"rounds": {}}
        # The last closed training round while its sites' evaluations still arrive: a site sends
        # its update first and scores the round's model while the update travels and the round
        # closes (see _on_metrics); they are forwarded when every site has reported, or when the
        # next round closes.
        self._evaluating: RoundResult | None = None
        self._wire_events: dict[tuple[int, str, str], int] = {}

    # -- events for logs and the live view ------------------------------------------------------
    def _event(self, kind: str, **data: Any) -> None:
        rec = {"t": time.time(), "event": kind, **data}
        self._unwritten.append(json.dumps(rec, default=str) + "\n")
        try:
            self.events_path.parent.mkdir(parents=True, exist_ok=True)
            append_whole(self.events_path, "".join(self._unwritten).encode())
        except OSError as exc:
            # Kept and written with the next event that fits (a full disk): the events are the
            # record the sites' audit logs are reconciled against, so none may be dropped.
            if disk_full(exc) and len(self._unwritten) == 1:
                log.error("events file %s: disk full; events are kept until it has space", self.events_path)
            elif not disk_full(exc):
                log.warning("events file %s: %s", self.events_path, exc)
            return
        self._unwritten.clear()

    # -- lifecycle ------------------------------------------------------------------------------------
    def _resume_or_init(self) -> bool:
        """Load the snapshot, or create round 0. Return True when the federation already finished."""
        if self.store.exists():
            # a roster taken live (a newer version of this federation's) resumes the same state
            taken = self.roster_digest in self.store.rosters_taken()
            snap = self.store.load(
                federation=self.ep.federation, roster_digest=None if taken else self.roster_digest
            )
            self.weights = snap.weights
            self.site_optimizer = snap.site_optimizer
            self.reconstructed = snap.reconstructed
            self._reconstructed_digest = compress.digest(self.reconstructed) if self.reconstructed else ""
            self.strategy.load_state(snap.strategy_meta, snap.strategy_tensors)
            self.completed = self.closed_round = snap.round
            self._extra_state = dict(snap.extra or {"rounds": {}})
            if self.spacing_from_sites and self._extra_state.get("spacing_from_sites"):
                self.model_config = dict(snap.model_config)  # the spacing chosen before round 1
            self.retired = dict(self._extra_state.get("retired", {}))
            pending = self._extra_state.pop("evaluating", None)
            if pending:  # evaluations of the last closed round that had arrived before the crash
                self._evaluating = RoundResult(
                    round=int(pending["round"]), train=True, metrics=dict(pending["metrics"])
                )
            log.warning("resuming after round %d from %s", snap.round, self.store.snapshot_path)
            self._event("resume", round=snap.round)
            if self.registrar is not None:
                done = set(self.store.registered())
                for r in range(1, snap.round + 1):
                    info = snap.extra.get("rounds", {}).get(str(r))
                    if r not in done and info is not None:
                        self.registrar.register(
                            r, sites=info["sites"], cases=info["cases"], tags=self._tags(r)
                        )
                evaluated = set(self.store.evaluated())
                for key, ev in sorted(snap.extra.get("evaluations", {}).items(), key=lambda kv: int(kv[0])):
                    if int(key) not in evaluated:
                        self.registrar.record_evaluation(int(key), ev["dice"], ev["per_site"])
            # a finished federation given more rounds goes on from where it stopped
            return bool(snap.extra.get("finished")) and snap.round >= self.cfg.rounds
        self.weights = self._initial()
        self._extra_state = {"rounds": {}}
        self._persist(0, self._extra_state)
        self._event("init", params=int(sum(v.size for v in self.weights.values())))
        return False

    def _tags(self, r: int) -> dict[str, str]:
        tags = {"strategy": self.strategy.name, "session": self.session, "round": str(r), "run": self.run_id}
        if self.cfg.secure is not None:
            sec = self._secure
            tags["secure_aggregation"] = "secagg+"
            if sec is not None and sec.round == r:
                tags["secagg_threshold"] = f"{sec.attempt.config.t} of {sec.attempt.config.k}"
                tags["secagg_attempts"] = str(sec.attempts)
        dp = self._extra_state.get("rounds", {}).get(str(r), {}).get("dp")
        if dp:
            tags.update({f"dp.{k}": str(v) for k, v in dp.items()})
        client = self._extra_state.get("rounds", {}).get(str(r), {}).get("dp_client")
        if client:
            tags.update({f"dp.client.{k}": str(v) for k, v in client.items()})
        return tags

    def _persist(self, round: int, extra: dict[str, Any]) -> None:
        meta, tensors = self.strategy.state()
        snap = Snapshot(
            round=round,
            federation=self.ep.federation,
            weights=self.weights,
            model_config=self.model_config,
            strategy_meta=meta,
            strategy_tensors=tensors,
            roster_digest=self.roster_digest,
            extra=extra,
            site_optimizer=self.site_optimizer,
            reconstructed=self.reconstructed,
        )
        until_saved(lambda: self.store.save(snap), f"round {round}", self.store.root)

    def _extra(self) -> dict[str, Any]:
        extra = dict(self._extra_state)
        if self._evaluating is not None:
            extra["evaluating"] = {"round": self._evaluating.round, "metrics": self._evaluating.metrics}
        return extra

    def run(self) -> list[RoundResult]:
        """Run (or resume) the federation to the end; return the rounds run in this process."""
        finished = self._resume_or_init()
        if self.cfg.dp_client:
            from neurofed.models.client_privacy import ClientDPConfig

            self.client_dp = ClientDP(
                ClientDPConfig.from_dict(dict(self.cfg.dp_client)),
                self._extra_state.setdefault("dp_client", {}),
            )
        try:
            if self.spacing_from_sites and not self._extra_state.get("spacing_from_sites"):
                self._choose_spacing()
            self._publish_roster()
            if not finished:
                for r in range(self.completed + 1, self.cfg.rounds + 1):
                    if not self._active():
                        log.warning(
                            "no site has privacy budget left (%s): training ends after round %d",
                            ", ".join(sorted(self.retired)),
                            self.completed,
                        )
                        self._event("training-ended", round=self.completed, reason="privacy-budget-spent")
                        break
                    if self.client_dp is not None and not self.client_dp.budget_left():
                        cd = self.client_dp
                        log.warning(
                            "client-level privacy budget spent: %d rounds have spent epsilon %.3f of %g "
                            "(delta %g); another round would reach %.3f. Training ends after round %d and "
                            "the federation keeps its model",
                            cd.rounds, cd.epsilon(), cd.config.target_epsilon, cd.config.delta,
                            cd.epsilon(cd.rounds + 1), self.completed,
                        )  # fmt: skip
                        self._event(
                            "training-ended", round=self.completed, reason="client-privacy-budget-spent",
                            epsilon=cd.epsilon(),
                        )  # fmt: skip
                        break
                    self.results.append(self._round(r, train=True))
                if self.cfg.final_eval:
                    self.results.append(self._round(self.cfg.rounds + 1, train=False))
                self._finish_evaluations()
                self._extra_state["finished"] = True
                self._persist(self.completed, self._extra())
            self._announce_done()
            self._linger()
        finally:
            self.strategy.close()
        return self.results

    def _choose_spacing(self) -> None:
        """No ``--spacing``: wait for the sites' STATUS reports (each site's median spacing per RAS
        axis over its training cases) and train at the median per axis of their medians. Waits
        for every expected site, or ``round_timeout`` seconds for at least ``min_sites``."""
        from neurofed.scans.spacing import far, median_of_medians

        start = self.clock()
        log.info("waiting for the sites' spacing reports (no --spacing given)")
        while True:
            msg = self.ep.receive(timeout=1.0)
            if msg is not None and msg.kind is MessageKind.STATUS:
                rep = msg.meta.get("spacing")
                if isinstance(rep, dict) and "median" in rep and msg.sender in self.cfg.expected_sites:
                    self.site_spacing[msg.sender] = rep
            self._heartbeat()
            n = len(self.site_spacing)
            if n == len(self.cfg.expected_sites):
                break
            if self.clock() - start > self.cfg.round_timeout and n >= self.cfg.min_sites:
                break
        spacing = median_of_medians([rep["median"] for rep in self.site_spacing.values()])
        pre = dict(self.model_config.get("preprocessing") or {})
        pre["spacing"] = list(spacing)
        self.model_config = {**self.model_config, "preprocessing": pre}
        self.model_config["training_data"] = {
            **(self.model_config.get("training_data") or {}),
            "spacing": {
                "median": list(spacing),
                "rule": "median per RAS axis of the sites' medians",
                "sites": {s: rep["median"] for s, rep in sorted(self.site_spacing.items())},
            },
        }
        if self.registrar is not None:
            self.registrar.model_config = dict(self.model_config)
        log.info("training spacing %s mm (median of %d sites' medians)", spacing, len(self.site_spacing))
        for site, rep in sorted(self.site_spacing.items()):
            if far(rep["median"], spacing):
                log.warning(
                    "site %s: its cases' median spacing %s mm is far from the federation's %s mm; they are resampled a lot",
                    site,
                    rep["median"],
                    spacing,
                )
        self._extra_state["spacing_from_sites"] = {
            "spacing": list(spacing),
            "sites": sorted(self.site_spacing),
        }
        self._event("spacing", spacing=list(spacing), sites=self.site_spacing)
        self._persist(self.completed, self._extra())

    def _heartbeat(self) -> None:
        """Touch STATE/heartbeat: the container HEALTHCHECK (neurofed health) reads its age."""
        try:
            self.store.root.mkdir(parents=True, exist_ok=True)
            (self.store.root / "heartbeat").touch()
        except OSError:  # health reporting must never stop a round
            pass

    # -- one round ------------------------------------------------------------------------------------
    def _announce(
        self,
        r: int,
        train: bool,
        deadline: float,
        model_payload: bytes,
        digest: str,
        model_meta: dict[str, Any],
    ) -> dict[str, float]:
        """MODEL, then the TASK naming it, back to back, then the broker's acknowledgement of both.

        A site starts when it holds both; waiting for the model's acknowledgement before
        publishing the task put one more broker round trip between the model's arrival and the
        task's (on a WAN, a round trip per round; on one machine a few ms, as a site finishes
        opening the model only when the broker's fan-out to every site is over). A site accepts
        the two in either order, so nothing depends on the broker having acknowledged the model
        first. Returns how long each step took (seconds, for events.jsonl)."""
        base: dict[str, Any] = {"epochs": self.cfg.local_epochs, "train": train}
        if train and self.cfg.lr_schedule != "constant":
            base["lr_scale"] = lr_scale(self.cfg.lr_schedule, r, self.cfg.rounds)
        per_site = {s: self.strategy.configure(r, s, base) for s in self.cfg.expected_sites}
        timing = self._publish_model_and_task(r, train, deadline, model_payload, digest, per_site, model_meta)
        fault_point("after-announce", r)
        return timing

    def _publish_model_and_task(
        self,
        r: int,
        train: bool,
        deadline: float,
        model_payload: bytes,
        digest: str,
        per_site: dict[str, Any],
        model_meta: dict[str, Any] | None = None,
    ) -> dict[str, float]:
        t0 = t1 = t2 = 0.0

        def announce() -> None:
            nonlocal t0, t1, t2
            t0 = time.time()
            self.ep.send(
                MessageKind.MODEL,
                r,
                meta={"round": r, "model_digest": digest, **(model_meta or {})},
                payload=model_payload,
                retain=True,
                timeout=60.0,
                wait=False,
            )
            t1 = time.time()
            self._send_task(r, train, deadline, digest, per_site, wait=False)
            t2 = time.time()
            self.ep.flush(timeout=60.0)

        self._until_published(r, "the round's MODEL and TASK", announce)
        return {
            "model_s": round(t1 - t0, 4),
            "task_s": round(t2 - t1, 4),
            "acked_s": round(time.time() - t2, 4),
        }

    def _send_task(
        self,
        r: int,
        train: bool,
        deadline: float,
        digest: str,
        per_site: dict[str, Any],
        *,
        wait: bool = True,
    ) -> None:
        """The retained TASK. ``wait=False`` only hands it to the client (the caller flushes and
        retries); otherwise it is retried until the broker acknowledged it."""
        self._task_meta = {
            "round": r,
            "model_digest": digest,
            "train": train,
            "done": False,
            "deadline": deadline,
            "epochs": self.cfg.local_epochs,
            "sites": per_site,
            "session": self.session,
            "run": self.run_id,
            "strategy": self.strategy.name,
            "min_sites": self.cfg.min_sites,
            "fp16": self.cfg.fp16,
            "compression": self.cfg.compression,
            "topk_density": self.cfg.topk_density,
            "site_optimizer": self.cfg.site_optimizer,
            "model_config": self.model_config,
        }
        if train and self._secure is not None and self._secure.round == r:
            self._task_meta["secagg"] = self._secure.task_meta()
        if self.cfg.dp:
            self._task_meta["dp"] = dict(self.cfg.dp)
        if train and self.client_dp is not None:
            self._task_meta["dp_client"] = self.client_dp.task()
        if wait:
            self._send_reliably(MessageKind.TASK, r, meta=self._task_meta, retain=True)
        else:
            self.ep.send(MessageKind.TASK, r, meta=self._task_meta, retain=True, timeout=60.0, wait=False)

    def _send_reliably(self, kind: MessageKind, r: int, **kw: Any) -> None:
        self._until_published(r, str(kind), lambda: self.ep.send(kind, r, timeout=60.0, **kw))

    @staticmethod
    def _until_published(r: int, what: str, publish: Callable[[], Any]) -> None:
        """Announcements must reach the broker: retry across a broker outage (the wire reconnects)."""
        delay = 1.0
        while True:
            try:
                publish()
                return
            except TransportError as exc:
                log.warning("round %d: publishing %s failed (%s); retrying in %.0f s", r, what, exc, delay)
                time.sleep(delay)
                delay = min(2 * delay, 10.0)

    def _send_receipts(self, r: int, received: list[str], metrics: list[str]) -> None:
        """Best effort: receipts are repeated every few seconds, so a lost one costs nothing, and
        they are not waited for: after each update a broker round trip, while the broker relays
        other sites' updates, held up opening the next one."""
        meta: dict[str, Any] = {
            "round": r,
            "held": sorted(received),
            "metrics": sorted(metrics),
            "session": self.session,
        }
        if self._evaluating is not None:  # the previous round's scores still awaited
            meta["evaluated"] = {"round": self._evaluating.round, "sites": sorted(self._evaluating.metrics)}
        try:
            self.ep.send(
                MessageKind.RECEIPTS,
                r,
                meta=meta,
                timeout=5.0,
                wait=False,
            )
        except TransportError as exc:
            log.warning("round %d: receipts not published (%s); will repeat", r, exc)

    def _encode_model(self) -> bytes:
        return codec.encode({**self.weights, **self.site_optimizer}, fp16=self.cfg.fp16)

    def _model_message(self, r: int) -> tuple[bytes, dict[str, Any], str]:
        """Round ``r``'s MODEL: (payload, meta beside round and digest, digest).

        ``none``/``fp16``: the global model itself, named by its payload's SHA-256. ``int8`` and
        ``int8-topk``: a compressed delta from the model the sites reconstructed last round to
        the global model (``encoding``, ``base_digest``: the digest of the model it applies to),
        or the whole model in fp32 (``encoding: full``) when there is no such model yet. Either
        way the sites' reconstruction, computed here with the same function, becomes
        ``self.reconstructed`` and its digest the task's ``model_digest``; what the delta could
        not carry stays in ``weights - reconstructed`` and goes out with the next one (error
        feedback on the downlink)."""
        name = self.cfg.compression
        if name not in DELTA_CODECS:
            payload = self._encode_model()
            return payload, {}, codec.digest(payload)
        base, target = self.reconstructed, self.weights
        fits = base.keys() == target.keys() and all(
            base[k].shape == v.shape and base[k].dtype == v.dtype for k, v in target.items()
        )
        if fits:
            delta = {k: (v - base[k] if v.dtype.kind == "f" else v) for k, v in target.items()}
            payload = compress.encode_delta(delta, name, density=self.cfg.topk_density)
            meta = {"encoding": compress.ENCODING[name], "base_digest": self._reconstructed_digest}
            self.reconstructed = compress.apply_delta(base, payload)
            digest = compress.digest(self.reconstructed)
        else:
            self.reconstructed = {k: np.array(target[k], copy=True) for k in sorted(target)}
            payload = compress.canonical(self.reconstructed)
            meta = {"encoding": compress.MODEL_FULL}
            digest = codec.digest(payload)
        self._reconstructed_digest = digest
        self._round_model = (r, payload, meta, digest)
        return payload, meta, digest

    def _send_full_model(self, r: int, site: str, wanted: Any) -> None:
        """A site that does not hold the model this round's delta applies to (it missed rounds,
        or is new, or lost its state) asks for the whole model (STATUS ``need_model``). The
        round's retained MODEL is replaced by the whole fp32 model, once per round: the sites
        that already hold it ignore the copy (same digest), and one that connects later in the
        round finds the whole model retained."""
        current = self._round_model
        if current is None or current[0] != r or wanted != current[3]:
            return  # a request for another round's model: that round is over
        if current[2].get("encoding") == compress.MODEL_FULL:
            return  # already whole
        payload = compress.canonical(self.reconstructed)
        meta = {"encoding": compress.MODEL_FULL}
        self._round_model = (r, payload, meta, current[3])
        log.info("round %d: %s lacks the model the delta applies to; sending the whole model", r, site)
        self._until_published(
            r,
            "the whole model",
            lambda: self.ep.send(
                MessageKind.MODEL,
                r,
                meta={"round": r, "model_digest": current[3], **meta},
                payload=payload,
                retain=True,
                timeout=60.0,
            ),
        )
        self._event("full-model", round=r, site=site, bytes=len(payload))

    def _reannounce(self, r: int, train: bool, deadline: float, digest: str) -> None:
        """The round's MODEL and TASK once more, after the wire reconnected to the broker.

        Both are retained so that a site (re)connecting mid-round finds them, but Mosquitto writes
        retained messages to disk only every ``autosave_interval`` seconds: a broker killed in
        between comes back without them, and a site that had not received them yet would wait
        for a model that never comes (the deadline extension re-publishes only the TASK). Sites
        that already hold the model get a second copy and ignore it: same round, same digest."""
        model_meta: dict[str, Any] = {}
        if self._round_model is not None and self._round_model[0] == r:  # a delta-coded federation
            _, payload, model_meta, sent = self._round_model
        else:
            payload, sent = self._encode_model(), ""
        if (sent or codec.digest(payload)) != digest:  # the global model must not change within a round
            raise CoordinatorError(f"round {r}: the global model changed while the round was open")
        log.warning(
            "round %d: reconnected to the broker; publishing the round's MODEL and TASK again "
            "(a restarted broker may have lost them)",
            r,
        )
        self._publish_model_and_task(
            r, train, deadline, payload, digest, self._task_meta["sites"], model_meta
        )
        self._publish_roster()
        self._event("reannounce", round=r)

    # -- live membership --------------------------------------------------------------------------
    def _publish_roster(self) -> None:
        """The roster in use, retained, for every site (signed by the CA; sites take only newer
        versions). Again after a reconnect: a broker restarted without its state lost it."""
        if self.roster_watch is None or self.roster_watch.current is None:
            return
        from neurofed.wire.roster import roster_meta

        cur = self.roster_watch.current
        self._send_reliably(MessageKind.ROSTER, 0, meta=roster_meta(cur.data, cur.sig), retain=True)

    def _check_roster(self) -> None:
        """Take a newer roster from the bundle: the wire at once (accept the new sites' messages,
        refuse the removed ones', encrypt to the new list), the sites through ROSTER; a removed
        site leaves the round now, an added one takes part from the next round."""
        if self.roster_watch is None:
            return
        new = self.roster_watch.poll(self.clock())
        if new is None:
            return
        import hashlib

        roster = new.roster
        self.ep.set_roster(roster)
        if self.roster_keys:  # secure aggregation checks key sets against the sites' keys
            self.roster_keys = {x: roster.get(x).signing_key() for x in roster.sites}
        self.roster_digest = hashlib.sha256(new.data).hexdigest()
        self.store.take_roster(self.roster_digest)
        self._publish_roster()
        now_sites = tuple(roster.sites)
        removed = sorted(set(self.cfg.expected_sites) - set(now_sites))
        added = sorted(set(now_sites) - set(self.cfg.expected_sites))
        log.warning(
            "roster version %d taken and published: removed %s (from now on), added %s (from the next round)",
            roster.version,
            ", ".join(removed) or "none",
            ", ".join(added) or "none",
        )
        self._event("roster", version=roster.version, removed=removed, added=added)
        if removed:
            self._set_sites(tuple(s for s in self.cfg.expected_sites if s in now_sites))
            self.offline -= set(removed)
            self.online -= set(removed)
        self._next_sites = now_sites if added else None

    def _set_sites(self, sites: tuple[str, ...]) -> None:
        if not sites:
            raise CoordinatorError("the roster names no sites any more: nothing left to federate")
        min_sites = self.cfg.min_sites
        if min_sites > len(sites):
            log.warning("quorum lowered from %d to the %d sites left in the roster", min_sites, len(sites))
            min_sites = len(sites)
        self.cfg = dataclasses.replace(self.cfg, expected_sites=tuple(sites), min_sites=min_sites)

    def _announce_done(self) -> None:
        r = self.cfg.rounds + 1
        self._done_connections = self.ep.connections
        self._send_reliably(
            MessageKind.TASK,
            r,
            meta={
                "round": r,
                "done": True,
                "train": False,
                "session": self.session,
                "run": self.run_id,
                "deadline": 0,
            },
            retain=True,
        )
        self._event("done", round=r)

    def _linger(self) -> None:
        """After the end: stay until every site heard from in this process has left (its offline
        STATUS: a site ends on the end and says goodbye), at most ``linger`` seconds, and publish
        the end again whenever the connection comes back meanwhile.

        The end is a retained TASK, and Mosquitto saves retained messages every
        ``autosave_interval`` (30 s): a broker killed before that, or replaced without its data,
        comes back without it, and a site that had not read it yet would wait for a task for
        ever. Sites that leave at once cost no lingering; one that is stopped or cut off keeps
        the coordinator up to ``linger`` seconds."""
        if self.cfg.linger <= 0:
            return
        r = self.cfg.rounds + 1
        until = self.clock() + self.cfg.linger
        self.ep.set_round_window(r, r)
        waited = False
        while self.clock() < until:
            staying = (self.online - self.offline) & set(self.cfg.expected_sites)
            if not staying:
                break
            if not waited:
                log.info(
                    "federation over; waiting up to %.0f s for %s to leave (the end is published again "
                    "if the broker comes back without it)",
                    self.cfg.linger,
                    ", ".join(sorted(staying)),
                )
                waited = True
            if self.ep.connections != self._done_connections:
                log.warning(
                    "reconnected to the broker after the end; publishing the end again (a restarted "
                    "broker may have lost it)"
                )
                self._announce_done()
                self._event("reannounce-done", round=r)
                self._publish_roster()
                continue
            self._check_roster()
            self._heartbeat()
            msg = self.ep.receive(timeout=max(0.01, min(0.5, until - self.clock())))
            if msg is not None and msg.kind is MessageKind.STATUS:
                self._handle(msg, r, False, "", RoundResult(round=r, train=False), closing=True)
            msg = None
        self.ep.drain_rejected()

    def _round(self, r: int, *, train: bool) -> RoundResult:
        """One round: announce, collect until every expected site answered (or quorum at the
        deadline), take in what arrived late, then aggregate, persist and register."""
        t0 = self.clock()
        res = RoundResult(round=r, train=train)
        digest, deadline, connections = self._open_round(r, train)
        self._collect(r, train, digest, res, deadline, connections)
        self._drain_late(r, train, digest, res)
        if train:
            self._close_training(r, res, t0)
        res.seconds = self.clock() - t0
        self._log_closed(r, res)
        return res

    def _open_round(self, r: int, train: bool) -> tuple[str, float, int]:
        """Encode and announce round ``r``'s model and task; returns its digest, the deadline and
        the connection count read before announcing."""
        t0_wall = time.time()
        self._check_roster()
        if self._next_sites is not None:  # sites added live take part from this round
            self._set_sites(self._next_sites)
            self._next_sites = None
        # r-2 and r-1 still reach the round gate (logged as old-round / late); older ones the wire drops
        self.ep.set_round_window(max(0, r - 2), r)
        model_payload, model_meta, digest = self._model_message(r)
        if train:
            if self.client_dp is not None:
                # the round's clip bounds every update at the coordinator too; in plain mode the
                # central noise goes on the mean (under secure aggregation the sites add it)
                self.client_dp.begin()
                self.strategy.max_norm = self.client_dp.clip
                self.strategy.mean_noise = self.client_dp.add_noise if self.cfg.secure is None else None
            self.strategy.begin(r, self.weights)
            if self.cfg.site_optimizer == "continue-global":
                self._optimizer_mean = WeightedMean()
        self._secure = self._secure_round(r) if train and self.cfg.secure is not None else None
        deadline = self.clock() + self.cfg.round_timeout
        t_encoded = time.time()
        # read before announcing: a reconnect during the announcement counts as one after it
        connections = self.ep.connections
        timing = self._announce(r, train, deadline, model_payload, digest, model_meta)
        model_bytes = len(model_payload)
        del model_payload
        self._event(
            "announce",
            round=r,
            train=train,
            deadline=deadline,
            encode_s=round(t_encoded - t0_wall, 4),
            model_bytes=model_bytes,
            model_encoding=model_meta.get("encoding", "fp16" if self.cfg.fp16 else "weights"),
            **timing,
        )
        log.info(
            "round %d announced (%s), deadline in %.0f s",
            r,
            "train" if train else "evaluate",
            self.cfg.round_timeout,
        )
        self._send_receipts(r, [], [])
        return digest, deadline, connections

    def _collect(
        self, r: int, train: bool, digest: str, res: RoundResult, deadline: float, connections: int
    ) -> None:
        """Take in updates (or scores) until every expected site answered, or the offline rest
        leave a quorum, or the deadline passes with one (it is extended otherwise)."""
        if self._secure is not None:
            self._collect_secure(r, digest, res, deadline)
            return
        last_receipts = self.clock()

        def have() -> set[str]:
            return set(res.cases) if train else set(res.metrics)

        while True:
            now = self.clock()
            self._check_roster()  # a site revoked now leaves this round's expected sites
            expected = self._active()  # a site that leaves mid-round stops being waited for
            if have() >= expected:
                break
            if self.ep.connections != connections:
                connections = self.ep.connections
                self._reannounce(r, train, deadline, digest)
            waiting = expected - have() - self.offline
            if not waiting and len(have()) >= self._quorum():
                # the rest are offline (their MQTT will said so): waiting for them helps nobody
                log.warning(
                    "round %d: closing with quorum; %s offline", r, ", ".join(sorted(expected - have()))
                )
                break
            if now >= deadline:
                if len(have()) >= self._quorum():
                    log.warning(
                        "round %d: deadline passed; closing with quorum without %s",
                        r,
                        ", ".join(sorted(expected - have())),
                    )
                    break
                deadline = self._extend(r, train, digest, res, sorted(have()), now)
            if now - last_receipts >= self.cfg.receipt_interval:
                self._send_receipts(r, list(res.cases), list(res.metrics))
                last_receipts = now
            self._heartbeat()
            self._take_wire_rejections(res)
            msg = self.ep.receive(timeout=max(0.01, min(0.5, deadline - now, self.cfg.receipt_interval)))
            held = len(res.cases), len(res.metrics)
            while msg is not None:
                self._handle(msg, r, train, digest, res, closing=False)
                # an update is folded in and dropped before the wire decodes the next one: memory
                # stays at one update however many sites upload at once
                msg = None
                if have() >= expected:
                    break
                msg = self.ep.receive(timeout=0)
            if (len(res.cases), len(res.metrics)) != held and not have() >= expected:
                # one receipt per catch-up, not per update: while updates queue up, a receipt after
                # each would be ten signed broadcasts the sites wake for, on the round's critical path
                self._send_receipts(r, list(res.cases), list(res.metrics))
                last_receipts = self.clock()

    def _secure_round(self, r: int) -> SecureRound:
        path = self.store.root / "secagg.json"

        def persist_attempt(next_attempt: int) -> None:
            until_saved(
                lambda: atomic_write_json(path, {"round": r, "next_attempt": next_attempt}),
                f"round {r}'s secure attempt number",
                self.store.root,
            )

        def relay(step: str, attempt: int, payload: bytes) -> None:
            self._send_reliably(
                MessageKind.RELAY, r, meta={"step": step, "attempt": attempt}, payload=payload
            )

        assert self.cfg.secure is not None
        if not self.roster_keys:
            raise CoordinatorError("secure aggregation needs the roster's site keys")
        return SecureRound(
            federation=self.ep.federation,
            run_id=self.run_id,
            round=r,
            sites=self.cfg.expected_sites,
            weights=self.weights,
            roster_keys=self.roster_keys,
            settings=self.cfg.secure,
            next_attempt=load_next_attempt(path),
            kem=self.ep.bundle.roster.kem if hasattr(self.ep, "bundle") else "x25519",
            send_relay=relay,
            persist_attempt=persist_attempt,
            event=self._event,
            clock=self.clock,
            dp=self.client_dp.secure_params(len(self.cfg.expected_sites))
            if self.client_dp is not None
            else None,
            quorum=self._quorum(),
        )

    def _collect_secure(self, r: int, digest: str, res: RoundResult, deadline: float) -> None:
        """A secure round: drive the protocol's phases until the sum is unmasked or the round
        gives up; a retried attempt announces its fresh config and gets a new deadline."""
        sec = self._secure
        assert sec is not None
        attempt, connections, last_receipts = sec.number, self.ep.connections, self.clock()
        while not sec.advance(self.offline | (set(sec.sites) - self._active()), deadline):
            self._check_roster()  # a site revoked now counts as dropped out
            now = self.clock()
            if sec.number != attempt:  # retried with fresh keys: sites start the attempt over
                attempt, deadline = sec.number, now + self.cfg.round_timeout
                res.cases.clear()
                self._send_task(r, True, deadline, digest, self._task_meta["sites"])
            if self.ep.connections != connections:
                connections = self.ep.connections
                self._reannounce(r, True, deadline, digest)
            if now - last_receipts >= self.cfg.receipt_interval:
                self._send_receipts(r, list(res.cases), list(res.metrics))
                last_receipts = now
            self._heartbeat()
            self._take_wire_rejections(res)
            msg = self.ep.receive(timeout=0.2)
            while msg is not None:
                self._handle(msg, r, True, digest, res, closing=False)
                msg = self.ep.receive(timeout=0)

    def _active(self) -> set[str]:
        """The sites still in the federation (all but those whose privacy budget is spent)."""
        return set(self.cfg.expected_sites) - set(self.retired)

    def _quorum(self) -> int:
        """``min_sites``, or every site still in the federation when fewer are left: sites whose
        privacy budget is spent never come back, so waiting for them would stall for ever."""
        return max(1, min(self.cfg.min_sites, len(self._active())))

    def _retire(self, site: str, meta: Mapping[str, Any]) -> None:
        """A site left because its privacy budget is spent: treated as offline for good."""
        if site in self.retired:
            return
        eps = meta.get("epsilon")
        why = (
            f"privacy budget spent (epsilon {eps:.3f})"
            if isinstance(eps, (int, float))
            else "privacy budget spent"
        )
        self.retired[site] = why
        self._extra_state["retired"] = dict(self.retired)
        log.warning(
            "%s left the federation: %s; %d sites remain%s",
            site,
            why,
            len(self._active()),
            f" (fewer than --min-sites {self.cfg.min_sites})"
            if len(self._active()) < self.cfg.min_sites
            else "",
        )
        self._event("left", site=site, reason=meta.get("reason"), epsilon=eps)

    def _extend(
        self, r: int, train: bool, digest: str, res: RoundResult, have: list[str], now: float
    ) -> float:
        """The deadline passed without a quorum: extend it (at most ``max_extensions`` times)."""
        res.extensions += 1
        if res.extensions > self.cfg.max_extensions:
            raise CoordinatorError(f"round {r}: quorum of {self._quorum()} never reached")
        deadline = now + self.cfg.round_timeout
        log.warning(
            "round %d: deadline passed with %d of %d required sites; extending by %.0f s",
            r,
            len(have),
            self._quorum(),
            self.cfg.round_timeout,
        )
        self._send_task(r, train, deadline, digest, self._task_meta["sites"])
        self._event("extend", round=r, deadline=deadline, have=have)
        return deadline

    def _drain_late(self, r: int, train: bool, digest: str, res: RoundResult) -> None:
        """Close the round: anything still queued for it is late; then receipts and scores."""
        self.closed_round = r
        while True:
            msg = self.ep.receive(timeout=0)
            if msg is None:
                break
            self._handle(msg, r, train, digest, res, closing=True)
            msg = None
        self._take_wire_rejections(res)
        res.sites = sorted(res.cases)
        self._send_receipts(r, list(res.cases), list(res.metrics))
        self._forward_pending()
        if train and not set(res.metrics) >= self._active():
            self._evaluating = res  # the rest of the sites' scores of model r-1 are on their way
        else:
            self._forward_metrics(r, res)

    def _close_training(self, r: int, res: RoundResult, t0: float) -> None:
        """Aggregate, persist (before anything announces the next round), then register."""
        if self._secure is not None and self._secure.result is not None:
            update, total = self._secure.mean_update(self.weights, self.strategy.name)
            self.strategy.add_aggregate(update, total)
            del update
            # the cases each survivor reported (its ring weight is 1 or capped under client DP)
            att = self._secure.attempt
            res.cases = {s: int(att.cases.get(s, w)) for s, w in self._secure.result.weights.items()}
            res.sites = sorted(res.cases)
        new = self.strategy.result()
        if new is None:
            log.warning("round %d: no usable update; keeping the previous global model", r)
        else:
            self.weights = new
            res.aggregated = True
            if self._optimizer_mean is not None:
                self.site_optimizer = self._optimizer_mean.result() or self.site_optimizer
        self._optimizer_mean = None
        if self.client_dp is not None and res.aggregated:
            res.dp_client = self.client_dp.close(len(res.sites), self._secure_clip_count())
        fault_point("after-aggregate", r)
        info: dict[str, Any] = {"sites": res.sites, "cases": res.num_cases}
        dp = self._privacy_summary(res)
        if dp:
            info["dp"] = dp
        if res.dp_client:
            info["dp_client"] = res.dp_client
        self._extra_state.setdefault("rounds", {})[str(r)] = info
        self._persist(r, self._extra())
        self.completed = r
        fault_point("after-persist", r)
        res.seconds = self.clock() - t0
        if self.registrar is not None:
            self.registrar.log_round(
                r,
                {
                    "sites": float(len(res.sites)),
                    "cases": float(res.num_cases),
                    "rejected": float(len(res.rejected)),
                    **{f"rejected/{k}": float(v) for k, v in res.rejected_by_reason().items()},
                    "round_seconds": res.seconds,
                    "bytes_received": float(res.bytes_received),
                    **self._secure_metrics(),
                    **self._privacy_metrics(res),
                    **{
                        f"dp_client/{k}": float(v)
                        for k, v in res.dp_client.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)
                    },
                },
            )
            if res.aggregated:
                self.registrar.register(r, sites=res.sites, cases=res.num_cases, tags=self._tags(r))

    def _secure_clip_count(self) -> float | None:
        """Under secure aggregation: the noisy count of sites within the clip, as unmasked."""
        sec = self._secure
        if sec is None or sec.result is None or not sec.result.counts:
            return None
        return ClientDP.count_from_centred(sec.result.counts[0], len(sec.result.survivors))

    def _secure_metrics(self) -> dict[str, float]:
        """Per-phase times (seconds since the attempt started) and attempts of a secure round."""
        sec = self._secure
        if sec is None:
            return {}
        out = {"secagg/attempts": float(sec.attempts)}
        out.update({f"secagg/{k}_s": float(v) for k, v in sec.attempt.times.items()})
        if sec.result is not None:
            out["secagg/survivors"] = float(len(sec.result.survivors))
            out["secagg/recovered"] = float(len(sec.result.recovered))
        return out

    def _privacy_summary(self, res: RoundResult) -> dict[str, Any]:
        """The federation's privacy after the round: the largest epsilon any site has spent (the
        figure that bounds every patient), at the task's delta, with the settings behind it."""
        if not self.cfg.dp:
            return {}
        out: dict[str, Any] = {
            "level": "sample",
            "unit": "patient",
            "accountant": self.cfg.dp.get("accountant", "rdp"),
            "delta": self.cfg.dp.get("delta"),
            "max_grad_norm": self.cfg.dp.get("max_grad_norm"),
        }
        if self.cfg.dp.get("target_epsilon") is not None:
            out["target_epsilon"] = self.cfg.dp["target_epsilon"]
        eps = [float(d["epsilon"]) for d in res.dp.values()]
        noise = [float(d["noise_multiplier"]) for d in res.dp.values() if "noise_multiplier" in d]
        # sites that did not train this round keep what they spent before: the federation's
        # epsilon never goes down
        before = [
            float(v["dp"]["epsilon"])
            for v in self._extra_state.get("rounds", {}).values()
            if isinstance(v, dict) and v.get("dp", {}).get("epsilon") is not None
        ]
        if eps or before:
            out["epsilon"] = round(max(eps + before), 6)
        if noise:
            out["noise_multiplier"] = round(min(noise), 6)
        return out

    def _privacy_metrics(self, res: RoundResult) -> dict[str, float]:
        """MLflow metrics for the round: ``dp_epsilon`` (largest of any site), ``dp_delta``,
        ``dp_noise_multiplier`` (smallest of any site), ``dp_max_grad_norm``, and per site."""
        dp = self._privacy_summary(res)
        out = {
            f"dp_{k}": float(dp[k])
            for k in ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "target_epsilon")
            if dp.get(k) is not None
        }
        for site, d in res.dp.items():
            out[f"dp_epsilon/{site}"] = float(d["epsilon"])
            if "noise_multiplier" in d:
                out[f"dp_noise_multiplier/{site}"] = float(d["noise_multiplier"])
        return out

    def _log_closed(self, r: int, res: RoundResult) -> None:
        self._event(
            "round",
            **{k: v for k, v in asdict(res).items() if k != "rejected"},
            rejected=res.rejected,
            rejected_by_reason=res.rejected_by_reason(),
        )
        self._summarise_wire_events(r)
        log.info(
            "round %d closed: %d updates (%d cases), %d evaluations, %d rejected, %.1f s",
            r,
            len(res.sites),
            res.num_cases,
            len(res.metrics),
            len(res.rejected),
            res.seconds,
        )

    def _forward_pending(self) -> None:
        """Forward the previous round's evaluations, however many arrived."""
        pending, self._evaluating = self._evaluating, None
        if pending is not None:
            self._forward_metrics(pending.round, pending)

    def _finish_evaluations(self) -> None:
        """After the last training round with no evaluation-only round to follow: wait (at most
        a round timeout, capped at a minute) for the scores of every site that trained in it."""
        pending = self._evaluating
        if pending is None:
            return
        until = self.clock() + min(self.cfg.round_timeout, 60.0)
        after = RoundResult(round=pending.round + 1, train=False)  # no round runs: anything else is late
        self.ep.set_round_window(pending.round, pending.round)
        last_receipts = -math.inf
        while not set(pending.metrics) >= set(pending.sites) and self.clock() < until:
            if self.clock() - last_receipts >= self.cfg.receipt_interval:
                # names what it holds, so a site whose scores were lost (a restart) sends them again
                self._send_receipts(after.round, [], [])
                last_receipts = self.clock()
            msg = self.ep.receive(timeout=max(0.01, min(0.5, until - self.clock())))
            if msg is not None:
                self._handle(msg, after.round, False, "", after, closing=True)
        self._forward_pending()

    def _forward_metrics(self, r: int, res: RoundResult) -> None:
        """Sites scored model r-1 this round: mean Dice (weighted by validation cases) to the tracker."""
        evaluated = r - 1
        if not res.metrics:
            return
        per_site = {
            s: float(m["dice"]) for s, m in res.metrics.items() if np.isfinite(m.get("dice", float("nan")))
        }
        weights = {s: float(res.metrics[s].get("num_cases", 1) or 1) for s in per_site}
        total = sum(weights.values())
        dice = sum(per_site[s] * weights[s] for s in per_site) / total if total else float("nan")
        hd = [float(m["hd95"]) for m in res.metrics.values() if np.isfinite(m.get("hd95", float("nan")))]
        self._event("evaluation", round=evaluated, dice=dice, per_site=per_site)
        if evaluated >= 1 and not per_site:
            # the registry takes only a finite Dice; a job it must refuse would be retried, fail,
            # and be queued again after every restart
            log.warning(
                "round %d: no site reported a Dice of model %d (no validation cases at any site?); "
                "its registry version gets no validated Dice and champion stays where it is",
                r,
                evaluated,
            )
        if evaluated >= 1 and per_site:
            # kept in the snapshot too, so a crash before the worker got to it loses nothing
            self._extra_state.setdefault("evaluations", {})[str(evaluated)] = {
                "dice": dice,
                "per_site": per_site,
            }
        if self.registrar is None:
            return
        metrics = {"dice_mean": dice, **{f"dice/{s}": d for s, d in per_site.items()}}
        if hd:
            metrics["hd95_mean"] = float(np.mean(hd))
        self.registrar.log_round(evaluated, metrics)
        if evaluated >= 1 and per_site:
            self.registrar.record_evaluation(
                evaluated, dice, per_site, splits_digest=splits_digest(res.metrics)
            )

    # -- message handling -----------------------------------------------------------------------------
    def _take_wire_rejections(self, res: RoundResult) -> None:
        """The wire's rejections (forged, tampered, replayed, other-run ... messages) into this
        round's count and events.jsonl: every one counted, the first ``WIRE_EVENTS_PER_PUBLISHER``
        per publisher and reason written as an event each, the rest as one summary at the close.
        The publisher (the site whose topic it came on, which the broker's ACL ties to that
        site's certificate) bounds the events, not the sender a header claims: a certificate
        claiming another sender in each message would otherwise get 20 lines for each name."""
        for rec in self.ep.drain_rejected():
            sender, reason = str(rec.get("sender", "?")), str(rec.get("reason", "?"))
            publisher = rec.get("publisher")
            res.rejected.append((sender, reason))
            key = (res.round, str(publisher or "?"), reason)
            seen = self._wire_events.get(key, 0)
            self._wire_events[key] = seen + 1
            if seen < WIRE_EVENTS_PER_PUBLISHER:
                self._event(
                    "reject",
                    round=res.round,
                    wire=True,
                    site=sender,  # as the header claims it
                    publisher=publisher,  # whose topic it came on (None: a topic naming nobody)
                    authenticated=bool(rec.get("authenticated")),
                    msg_kind=rec.get("kind"),
                    msg_round=rec.get("round"),
                    reason=reason,
                    detail=rec.get("detail", ""),
                )

    def _summarise_wire_events(self, r: int) -> None:
        for (rnd, publisher, reason), n in sorted(self._wire_events.items()):
            if rnd == r and n > WIRE_EVENTS_PER_PUBLISHER:
                self._event(
                    "reject-burst", round=r, publisher=publisher, reason=reason, count=n,
                    logged=WIRE_EVENTS_PER_PUBLISHER,
                )  # fmt: skip
        self._wire_events = {k: v for k, v in self._wire_events.items() if k[0] != r}

    def _reject(self, res: RoundResult, site: str, kind: str, msg_round: int, exc: UpdateRejected) -> None:
        res.rejected.append((site, exc.reason))
        log.warning("round %d: rejected %s from %s (round %d): %s", res.round, kind, site, msg_round, exc)
        self._event(
            "reject", round=res.round, site=site, msg_kind=kind, msg_round=msg_round, reason=exc.reason
        )

    def _handle(
        self, msg: Message, r: int, train: bool, digest: str, res: RoundResult, *, closing: bool
    ) -> None:
        if msg.kind is MessageKind.STATUS:
            state = msg.meta.get("status")
            if (
                state == "offline"
                and msg.meta.get("reason") == BUDGET_SPENT
                and msg.sender in self.cfg.expected_sites
            ):
                self._retire(msg.sender, msg.meta)
            if state == "offline":
                self.offline.add(msg.sender)
                self.online.discard(msg.sender)
            elif state == "online":
                self.offline.discard(msg.sender)
                self.online.add(msg.sender)
            self._event("status", site=msg.sender, status=state)
            if msg.meta.get("need_model") and msg.sender in self.cfg.expected_sites:
                self._send_full_model(r, msg.sender, msg.meta.get("need_model"))
            return
        self.offline.discard(msg.sender)  # anything it sends proves it is back
        self.online.add(msg.sender)
        try:
            if msg.kind is MessageKind.SECAGG:
                if self._late_unmask_step(msg, r):
                    return
                self._round_gate(msg, r)
                if self._secure is None:
                    raise UpdateRejected("not-a-secure-round", f"round {r} does not run secure aggregation")
                self._secure.on_step(msg)
            elif msg.kind is MessageKind.UPDATE and self._secure is not None:
                self._on_masked_update(msg, r, digest, res, closing)
            elif msg.kind is MessageKind.UPDATE:
                self._on_update(msg, r, train, digest, res, closing)
            elif msg.kind is MessageKind.METRICS:
                pending = self._evaluating
                if pending is not None and msg.round == pending.round < r:
                    # a site's score of the previous round's model, sent after its update
                    self._on_metrics(msg, pending.round, pending, closing=False)
                    if set(pending.metrics) >= self._active():
                        self._forward_pending()
                else:
                    # A training round's evaluations have no deadline (the round closes on
                    # updates); in an evaluation-only round they are the results, and can be late.
                    self._on_metrics(msg, r, res, closing and not train)
        except UpdateRejected as exc:
            self._reject(res, msg.sender, msg.kind.value, msg.round, exc)

    def _late_unmask_step(self, msg: Message, r: int) -> bool:
        """An echo or reveal that comes after the sum was unmasked (the coordinator goes on as soon
        as the shares it holds remove every mask, and the slower survivors' answers follow):
        expected, not a fault, so it is logged quietly rather than counted as a rejection."""
        if msg.meta.get("step") not in ("echo", "reveal"):
            return False
        done = self._secure is not None and self._secure.result is not None and msg.round == r
        if done or (msg.round == self.closed_round == r - 1 and msg.round >= 1):
            log.debug(
                "round %d: %s's %s came after the sum was unmasked", msg.round, msg.sender, msg.meta["step"]
            )
            return True
        return False

    @staticmethod
    def _closing_gate(r: int, closing: bool) -> None:
        if closing:
            raise UpdateRejected("late", f"arrived after round {r}'s deadline")

    def _round_gate(self, msg: Message, r: int) -> None:
        if msg.sender not in self.cfg.expected_sites:
            raise UpdateRejected("unknown-site", f"{msg.sender} is not in this federation's roster")
        if msg.round < r:
            if msg.round == self.closed_round == r - 1 and msg.round >= 1:
                raise UpdateRejected("late", f"round {msg.round} closed before this arrived")
            raise UpdateRejected("old-round", f"for round {msg.round}, current round is {r}")
        if msg.round > r:
            raise UpdateRejected("future-round", f"for round {msg.round}, current round is {r}")

    def _on_masked_update(self, msg: Message, r: int, digest: str, res: RoundResult, closing: bool) -> None:
        """A masked input: checked for its round, model and cases, folded into the ring sum. The
        coordinator never holds the site's update itself."""
        self._round_gate(msg, r)
        self._closing_gate(r, closing)
        assert self._secure is not None
        if msg.meta.get("encoding") != SECAGG_ENCODING:
            raise UpdateRejected(
                "not-masked", "this round runs secure aggregation: a plain update is refused"
            )
        if msg.meta.get("model_digest") not in (None, digest):
            raise UpdateRejected("stale-model", "trained from another model than this round's")
        num_cases = check_num_cases(msg.meta.get("num_cases"))
        steps = check_local_steps(msg.meta.get("local_steps"))
        if steps is None and self.strategy.needs_local_steps:
            raise UpdateRejected("missing-local-steps", f"{self.strategy.name} needs each site's local_steps")
        dp = check_privacy_report(msg.meta.get("dp")) if self.cfg.dp else None
        self._secure.on_masked_input(msg, num_cases, steps)
        res.cases[msg.sender] = num_cases
        if dp is not None:
            res.dp[msg.sender] = dp
        res.bytes_received += len(msg.payload)
        self._event(
            "update",
            round=r,
            site=msg.sender,
            cases=num_cases,
            bytes=len(msg.payload),
            sha256=msg.digest,
            masked=True,
        )

    def _on_update(
        self, msg: Message, r: int, train: bool, digest: str, res: RoundResult, closing: bool
    ) -> None:
        self._round_gate(msg, r)
        site = msg.sender
        if not train:
            raise UpdateRejected("not-a-training-round", f"round {r} only evaluates")
        if site in res.cases:
            if not closing:
                self._send_receipts(r, list(res.cases), list(res.metrics))
            raise UpdateRejected("duplicate", f"already holding {site}'s update for round {r}")
        self._closing_gate(r, closing)
        if msg.meta.get("model_digest") not in (None, digest):
            raise UpdateRejected("stale-model", "trained from another model than this round's")
        num_cases = check_num_cases(msg.meta.get("num_cases"))
        encoding = msg.meta.get("encoding", "weights")
        if encoding not in UPDATE_ENCODINGS and encoding not in compress.CODEC_OF:
            raise UpdateRejected("bad-encoding", f"unknown update encoding {encoding!r}")
        dp = check_privacy_report(msg.meta.get("dp")) if self.cfg.dp else None
        try:
            if encoding in compress.CODEC_OF:  # 8-bit (top-k) changes, decoded to dense fp32
                update = compress.decode_delta(msg.payload, self.weights)
            else:
                update = codec.decode(msg.payload, copy=False)
        except Exception as exc:
            raise UpdateRejected("undecodable", f"payload is not a {encoding} state dict ({exc})") from None
        update, optimizer = split_optimizer(update)
        if self._optimizer_mean is not None:
            check_optimizer_state(optimizer, self.weights)
        elif optimizer:
            raise UpdateRejected(
                "unexpected-tensors", "optimiser state sent, but this federation does not run continue-global"
            )
        weight: float = num_cases
        if self.client_dp is not None:
            weight = self.client_dp.accept(site, msg.meta, num_cases)
        update = upcast_half(update, self.weights)
        check_update(update, self.weights)
        if encoding == UPDATE_ENCODING_FP16_DELTA or encoding in compress.CODEC_OF:
            update = apply_delta(update, self.weights)
            check_update(update, self.weights)  # finite deltas can still overflow the weights
        self.strategy.add(site, update, weight, check_local_steps(msg.meta.get("local_steps")))  # type: ignore[arg-type]
        if self._optimizer_mean is not None:
            self._optimizer_mean.add(optimizer, num_cases)
        del update, optimizer
        res.cases[site] = num_cases
        if dp is not None:
            res.dp[site] = dp
        res.bytes_received += len(msg.payload)
        log.info(
            "round %d: update from %s accepted (%d cases; %d/%d)",
            r,
            site,
            num_cases,
            len(res.cases),
            len(self.cfg.expected_sites),
        )
        self._event(
            "update",
            round=r,
            site=site,
            cases=num_cases,
            bytes=len(msg.payload),
            **({"epsilon": dp["epsilon"]} if dp is not None else {}),
            sha256=msg.digest,  # verified by the wire: the digest the site's audit log records
        )

    def _on_metrics(self, msg: Message, r: int, res: RoundResult, closing: bool) -> None:
        self._round_gate(msg, r)
        site = msg.sender
        if site in res.metrics:
            raise UpdateRejected("duplicate", f"already holding {site}'s metrics for round {r}")
        self._closing_gate(r, closing)
        m = msg.meta
        try:
            # A site with no validation cases sends dice null and num_cases 0: accepted, not averaged.
            dice = (
                float("nan")
                if m.get("dice", 0) is None and int(m.get("num_cases", 0)) == 0
                else float(m["dice"])
            )
            # HD95 is undefined (null on the wire: JSON has no NaN) when a mask is empty.
            hd95 = float("nan") if m.get("hd95") is None else float(m["hd95"])
            n = int(m.get("num_cases", 0))
        except (KeyError, TypeError, ValueError):
            raise UpdateRejected("bad-metrics", "METRICS needs numeric dice, hd95, num_cases") from None
        if not (0.0 <= dice <= 1.0 or (np.isnan(dice) and n == 0)):
            raise UpdateRejected("bad-metrics", f"dice {dice} outside [0, 1]")
        res.metrics[site] = {"dice": dice, "hd95": hd95, "num_cases": n}
        if isinstance(m.get("splits_digest"), str) and len(m["splits_digest"]) == 64:
            res.metrics[site]["splits_digest"] = m["splits_digest"]
        self._event("metrics", round=r, evaluated_round=r - 1, site=site, dice=dice, hd95=hd95)
