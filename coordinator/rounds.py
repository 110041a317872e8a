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

- TASK: ``round``, ``model_digest`` (SHA-256 of the MODEL payload), ``train`` (false: evaluation
  only), ``done`` (true: the federation is over), ``deadline`` (unix time), ``epochs``, ``sites``
  ({site: its own config, e.g. ``{"epochs": 1, "mu": 0.01}``}), ``session`` (changes when the
  coordinator restarts), ``strategy``, ``min_sites``, ``fp16``, ``site_optimizer`` (reset |
  continue-local | continue-global), ``model_config`` (ModelConfig dict). A site's own config may carry ``lr_scale``
  (the factor on its learning rate this round, from ``--lr-schedule``; absent: 1).
- MODEL: ``round``, ``model_digest``; payload: safetensors of the global weights (fp16 with
  ``--fp16``), plus the averaged Adam state (``optimizer/...``) under continue-global.
- RECEIPTS: ``round``, ``held`` (sites whose update the coordinator holds), ``metrics`` (sites
  whose evaluation it holds), ``session``; ``evaluated`` (``{"round": r-1, "sites": [...]}``)
  while the previous round's evaluations are still awaited.
- UPDATE: ``num_cases`` (positive int, the FedAvg weight), ``model_digest`` (the model it was
  trained from), ``loss``, ``train_seconds``, ``local_steps`` (optimiser steps taken, FedNova's
  tau), ``encoding`` (absent or ``weights``; ``fp16-delta`` with ``--fp16``); payload:
  safetensors of the full weights, or of the fp16 change of the float tensors; plus the site's
  Adam state (``optimizer/...``) under continue-global.
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
    check_update,
    upcast_half,
)
from neurofed.coordinator.errors import CoordinatorError, UpdateRejected
from neurofed.coordinator.faults import fault_point
from neurofed.coordinator.membership import RosterWatch
from neurofed.coordinator.registration import Registrar
from neurofed.coordinator.state import Snapshot, StateStore
from neurofed.coordinator.strategies import Strategy
from neurofed.wire.api import Endpoint, Message, MessageKind
from neurofed.wire.errors import TransportError
from neurofed.wire.payload import UPDATE_ENCODING_FP16_DELTA, UPDATE_ENCODINGS, split_optimizer

log = logging.getLogger(__name__)
WIRE_EVENTS_PER_SENDER = 20  # events.jsonl lines per sender, reason and round; the rest are counted


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
    fp16: bool = False
    site_optimizer: str = "reset"
    lr_schedule: str = "constant"
    receipt_interval: float = 3.0
    final_eval: bool = True
    max_extensions: int = 1000
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
    ) -> None:
        self.ep = endpoint
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
        self.weights: dict[str, np.ndarray] = {}
        # continue-global: the federation's averaged Adam state, sent with each model
        self.site_optimizer: dict[str, np.ndarray] = {}
        self._optimizer_mean: WeightedMean | None = None
        self.completed = 0  # last aggregated (persisted) round
        self.closed_round = 0
        self.results: list[RoundResult] = []
        self.offline: set[str] = set()  # sites whose latest STATUS is offline (e.g. their MQTT will)
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
        try:
            self.events_path.parent.mkdir(parents=True, exist_ok=True)
            with self.events_path.open("a") as fh:
                fh.write(json.dumps(rec, default=str) + "\n")
        except OSError as exc:  # pragma: no cover - the events file is a convenience
            log.debug("events file: %s", exc)

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
            self.strategy.load_state(snap.strategy_meta, snap.strategy_tensors)
            self.completed = self.closed_round = snap.round
            self._extra_state = dict(snap.extra or {"rounds": {}})
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
        return {"strategy": self.strategy.name, "session": self.session, "round": str(r), "run": self.run_id}

    def _persist(self, round: int, extra: dict[str, Any]) -> None:
        meta, tensors = self.strategy.state()
        self.store.save(
            Snapshot(
                round=round,
                federation=self.ep.federation,
                weights=self.weights,
                model_config=self.model_config,
                strategy_meta=meta,
                strategy_tensors=tensors,
                roster_digest=self.roster_digest,
                extra=extra,
                site_optimizer=self.site_optimizer,
            )
        )

    def _extra(self) -> dict[str, Any]:
        extra = dict(self._extra_state)
        if self._evaluating is not None:
            extra["evaluating"] = {"round": self._evaluating.round, "metrics": self._evaluating.metrics}
        return extra

    def run(self) -> list[RoundResult]:
        """Run (or resume) the federation to the end; return the rounds run in this process."""
        finished = self._resume_or_init()
        try:
            self._publish_roster()
            if not finished:
                for r in range(self.completed + 1, self.cfg.rounds + 1):
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

    def _heartbeat(self) -> None:
        """Touch STATE/heartbeat: the container HEALTHCHECK (neurofed health) reads its age."""
        try:
            self.store.root.mkdir(parents=True, exist_ok=True)
            (self.store.root / "heartbeat").touch()
        except OSError:  # health reporting must never stop a round
            pass

    # -- one round ------------------------------------------------------------------------------------
    def _announce(
        self, r: int, train: bool, deadline: float, model_payload: bytes, digest: str
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
        timing = self._publish_model_and_task(r, train, deadline, model_payload, digest, per_site)
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
    ) -> dict[str, float]:
        t0 = t1 = t2 = 0.0

        def announce() -> None:
            nonlocal t0, t1, t2
            t0 = time.time()
            self.ep.send(
                MessageKind.MODEL,
                r,
                meta={"round": r, "model_digest": digest},
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
            "site_optimizer": self.cfg.site_optimizer,
            "model_config": self.model_config,
        }
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

    def _reannounce(self, r: int, train: bool, deadline: float, digest: str) -> None:
        """The round's MODEL and TASK once more, after the wire reconnected to the broker.

        Both are retained so that a site (re)connecting mid-round finds them, but Mosquitto writes
        retained messages to disk only every ``autosave_interval`` seconds: a broker killed in
        between comes back without them, and a site that had not received them yet would wait
        for a model that never comes (the deadline extension re-publishes only the TASK). Sites
        that already hold the model get a second copy and ignore it: same round, same digest."""
        payload = self._encode_model()
        if codec.digest(payload) != digest:  # the global model must not change within a round
            raise CoordinatorError(f"round {r}: the global model changed while the round was open")
        log.warning(
            "round %d: reconnected to the broker; publishing the round's MODEL and TASK again "
            "(a restarted broker may have lost them)",
            r,
        )
        self._publish_model_and_task(r, train, deadline, payload, digest, self._task_meta["sites"])
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
        model_payload = self._encode_model()
        digest = codec.digest(model_payload)
        if train:
            self.strategy.begin(r, self.weights)
            if self.cfg.site_optimizer == "continue-global":
                self._optimizer_mean = WeightedMean()
        deadline = self.clock() + self.cfg.round_timeout
        t_encoded = time.time()
        # read before announcing: a reconnect during the announcement counts as one after it
        connections = self.ep.connections
        timing = self._announce(r, train, deadline, model_payload, digest)
        del model_payload
        self._event(
            "announce",
            round=r,
            train=train,
            deadline=deadline,
            encode_s=round(t_encoded - t0_wall, 4),
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
        last_receipts = self.clock()

        def have() -> set[str]:
            return set(res.cases) if train else set(res.metrics)

        while True:
            now = self.clock()
            self._check_roster()  # a site revoked now leaves this round's expected sites
            expected = set(self.cfg.expected_sites)
            if have() >= expected:
                break
            if self.ep.connections != connections:
                connections = self.ep.connections
                self._reannounce(r, train, deadline, digest)
            waiting = expected - have() - self.offline
            if not waiting and len(have()) >= self.cfg.min_sites:
                # the rest are offline (their MQTT will said so): waiting for them helps nobody
                log.warning(
                    "round %d: closing with quorum; %s offline", r, ", ".join(sorted(expected - have()))
                )
                break
            if now >= deadline:
                if len(have()) >= self.cfg.min_sites:
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

    def _extend(
        self, r: int, train: bool, digest: str, res: RoundResult, have: list[str], now: float
    ) -> float:
        """The deadline passed without a quorum: extend it (at most ``max_extensions`` times)."""
        res.extensions += 1
        if res.extensions > self.cfg.max_extensions:
            raise CoordinatorError(f"round {r}: quorum of {self.cfg.min_sites} never reached")
        deadline = now + self.cfg.round_timeout
        log.warning(
            "round %d: deadline passed with %d of %d required sites; extending by %.0f s",
            r,
            len(have),
            self.cfg.min_sites,
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
        if train and not set(res.metrics) >= set(self.cfg.expected_sites):
            self._evaluating = res  # the rest of the sites' scores of model r-1 are on their way
        else:
            self._forward_metrics(r, res)

    def _close_training(self, r: int, res: RoundResult, t0: float) -> None:
        """Aggregate, persist (before anything announces the next round), then register."""
        new = self.strategy.result()
        if new is None:
            log.warning("round %d: no usable update; keeping the previous global model", r)
        else:
            self.weights = new
            res.aggregated = True
            if self._optimizer_mean is not None:
                self.site_optimizer = self._optimizer_mean.result() or self.site_optimizer
        self._optimizer_mean = None
        fault_point("after-aggregate", r)
        self._extra_state.setdefault("rounds", {})[str(r)] = {"sites": res.sites, "cases": res.num_cases}
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
                },
            )
            if res.aggregated:
                self.registrar.register(r, sites=res.sites, cases=res.num_cases, tags=self._tags(r))

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
        round's count and events.jsonl: every one counted, the first ``WIRE_EVENTS_PER_SENDER``
        per sender and reason written as an event each, the rest as one summary at the close."""
        for rec in self.ep.drain_rejected():
            sender, reason = str(rec.get("sender", "?")), str(rec.get("reason", "?"))
            res.rejected.append((sender, reason))
            key = (res.round, sender, reason)
            seen = self._wire_events.get(key, 0)
            self._wire_events[key] = seen + 1
            if seen < WIRE_EVENTS_PER_SENDER:
                self._event(
                    "reject",
                    round=res.round,
                    wire=True,
                    site=sender,  # as the header claims it
                    authenticated=bool(rec.get("authenticated")),
                    msg_kind=rec.get("kind"),
                    msg_round=rec.get("round"),
                    reason=reason,
                    detail=rec.get("detail", ""),
                )

    def _summarise_wire_events(self, r: int) -> None:
        for (rnd, sender, reason), n in sorted(self._wire_events.items()):
            if rnd == r and n > WIRE_EVENTS_PER_SENDER:
                self._event(
                    "reject-burst", round=r, site=sender, reason=reason, count=n,
                    logged=WIRE_EVENTS_PER_SENDER,
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
            if state == "offline":
                self.offline.add(msg.sender)
                self.online.discard(msg.sender)
            elif state == "online":
                self.offline.discard(msg.sender)
                self.online.add(msg.sender)
            self._event("status", site=msg.sender, status=state)
            return
        self.offline.discard(msg.sender)  # anything it sends proves it is back
        self.online.add(msg.sender)
        try:
            if msg.kind is MessageKind.UPDATE:
                self._on_update(msg, r, train, digest, res, closing)
            elif msg.kind is MessageKind.METRICS:
                pending = self._evaluating
                if pending is not None and msg.round == pending.round < r:
                    # a site's score of the previous round's model, sent after its update
                    self._on_metrics(msg, pending.round, pending, closing=False)
                    if set(pending.metrics) >= set(self.cfg.expected_sites):
                        self._forward_pending()
                else:
                    # A training round's evaluations have no deadline (the round closes on
                    # updates); in an evaluation-only round they are the results, and can be late.
                    self._on_metrics(msg, r, res, closing and not train)
        except UpdateRejected as exc:
            self._reject(res, msg.sender, msg.kind.value, msg.round, exc)

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
        try:
            update = codec.decode(msg.payload, copy=False)
        except Exception as exc:
            raise UpdateRejected("undecodable", f"payload is not a safetensors state dict ({exc})") from None
        update, optimizer = split_optimizer(update)
        if self._optimizer_mean is not None:
            check_optimizer_state(optimizer, self.weights)
        elif optimizer:
            raise UpdateRejected(
                "unexpected-tensors", "optimiser state sent, but this federation does not run continue-global"
            )
        update = upcast_half(update, self.weights)
        encoding = msg.meta.get("encoding", "weights")
        if encoding not in UPDATE_ENCODINGS:
            raise UpdateRejected("bad-encoding", f"unknown update encoding {encoding!r}")
        check_update(update, self.weights)
        if encoding == UPDATE_ENCODING_FP16_DELTA:
            update = apply_delta(update, self.weights)
            check_update(update, self.weights)  # finite deltas can still overflow the weights
        self.strategy.add(site, update, num_cases, check_local_steps(msg.meta.get("local_steps")))
        if self._optimizer_mean is not None:
            self._optimizer_mean.add(optimizer, num_cases)
        del update, optimizer
        res.cases[site] = num_cases
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
