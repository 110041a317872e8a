"""The long-running site agent: one hospital's side of every federated round.

Lifecycle per round r (wire/PROTOCOL.md), driven only by what arrives on the ``Endpoint``:

1. TASK r (retained) and MODEL r (retained) arrive, in either order; the model's SHA-256 must
   equal the task's ``model_digest`` or the model is ignored (a stale or foreign model).
2. TRAIN ``epochs`` local epochs from it (FedProx: ``mu`` from the task goes to the trainer's
   proximal term) and send UPDATE with the case count; the encoded update is written to the
   state folder (atomically) beside the send.
3. EVALUATE the global model (model r-1) on the local validation split and send METRICS (Dice,
   HD95, number of cases; sealed to the coordinator like every site message). The evaluation
   starts when training ends and runs while a worker thread sends the update and the coordinator
   aggregates: the round closes on updates, so scoring first would put it on the round's critical
   path, and scoring after would leave the CPU idle while the coordinator aggregates. An
   evaluation-only task (``train: false``) only does this step; its round closes on the METRICS.
4. Watch RECEIPTS r: if the coordinator's list lacks this site while its update was sent (the
   upload was lost to a broker restart, or the coordinator restarted: new ``session``), send the
   stored update again, never retrain; likewise the METRICS of an evaluation-only round, and
   those of the previous round while the receipts name it as still awaited (``evaluated``).

The federation ends with a TASK ``done: true``. It ends the agent only once the agent has taken
a task of that run: the TASK is retained, so a site started after a federation finished (or
before the next one's coordinator) finds that end first, and waits for the next task instead.

Idempotent per round: ``STATE/agent.json`` records what was evaluated, stored and sent, so a
restarted agent picks up the retained task and model and does not train a round twice. Every
send is recorded in the audit log (``neurofed.edge_node.audit``). The agent's current state is mirrored to
``STATE/status.json`` (for the demo's live view) and its train/evaluate intervals to
``STATE/timeline.jsonl`` (for the overhead benchmark).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol

from neurofed.edge_node.audit import AuditLog
from neurofed.edge_node.secure import ENCODING as ENCODING_SECAGG
from neurofed.edge_node.secure import SiteSecAgg, flat_delta
from neurofed.models.client_privacy import check_site_task, ring_weight
from neurofed.wire.api import Endpoint, Message, MessageKind
from neurofed.wire.errors import ProtocolError, TransportError
from neurofed.wire.secagg import SecAggRoundFailed

log = logging.getLogger(__name__)

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class Trainer(Protocol):
    """What the agent needs from ``neurofed.edge_node.training.LocalTrainer``."""

    num_train_cases: int

    def train(
        self,
        state_dict: Any,
        epochs: int,
        *,
        prox_mu: float = 0.0,
        progress: Any = None,
        keep_optimizer: bool = False,
        lr_scale: float = 1.0,
        optimizer_state: Any = None,
        export_optimizer: bool = False,
        dp: Any = None,
    ) -> Any: ...

    def evaluate(self, state_dict: Any, split: str = "val") -> Any: ...


def fault_point(point: str, round: int, before: Callable[[], None] | None = None) -> None:
    """Test hook: ``NEUROFED_FAULT=site-mid-upload`` (optionally ``NEUROFED_FAULT_ROUND=r``) makes
    the agent SIGKILL itself while its update is on its way out (stored, not yet acknowledged);
    ``secagg-after-<step>`` (keyset, shares, update, echo, reveal) right after a secure step.
    ``before`` runs first when the hook fires: the update file is written beside the send, and the
    hook waits for it so the scenario it stages is always the same."""
    if os.environ.get("NEUROFED_FAULT") != point:
        return
    wanted = os.environ.get("NEUROFED_FAULT_ROUND")
    if wanted and int(wanted) != round:
        return
    if before is not None:
        before()
    import signal

    log.critical("fault injection: SIGKILL at %s (round %d)", point, round)
    os.kill(os.getpid(), signal.SIGKILL)


WORK_NICE = 5
"""How much lower the CPU priority of a secure round's training and scoring thread is than the
thread that answers the protocol: a relay answered, a mask computed or the coordinator's
unmasking (on a shared machine) never queues behind the work, which is off the round's critical
path while the protocol runs."""


def _lower_priority() -> None:
    """Lower this thread's CPU priority by ``WORK_NICE`` (Linux keeps a nice value per thread;
    elsewhere, or where it is refused, the thread keeps the process's priority)."""
    import sys

    if sys.platform != "linux":
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + WORK_NICE)
    except OSError as exc:  # pragma: no cover - a sandbox that forbids it
        log.info("the secure round's work thread keeps the process's priority (%s)", exc)


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else ``None`` (JSON's null)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def weight_delta(trained: Mapping[str, Any], start: Mapping[str, Any]) -> dict[str, Any]:
    """``trained - start`` for floating tensors; other tensors (counters) travel as they are."""
    return {k: (v - start[k] if v.is_floating_point() else v) for k, v in trained.items()}


def _atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """All or nothing (temporary file, rename). ``durable`` also fsyncs, for what a restart relies
    on (the update, the round state); the status file is only read by people and health checks,
    and an fsync there would sit on the round's critical path."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


class SiteAgent:
    """One site's participation in the federation over ``endpoint`` with ``trainer``."""

    def __init__(
        self,
        endpoint: Endpoint,
        trainer: Trainer | Callable[[dict[str, Any]], Trainer],
        state_dir: str | os.PathLike[str],
        *,
        resend_after: float = 10.0,
        send_timeout: float = 60.0,
        fp16: bool = False,
        secure_identity: tuple[Any, Mapping[str, Any]] | tuple[Any, Mapping[str, Any], str] | None = None,
        report: Mapping[str, Any] | None = None,
    ) -> None:
        self.ep = endpoint
        # what the site tells the coordinator in its STATUS while it has no task (its spacing)
        self.report = dict(report or {})
        self._reported_at = 0.0
        # a trainer, or a factory taking the task's model config (the coordinator decides the model)
        self._factory = trainer if callable(trainer) and not hasattr(trainer, "train") else None
        self.trainer: Trainer | None = None if self._factory else trainer  # type: ignore[assignment]
        self._trainer_cfg: str | None = None
        self.site = endpoint.participant
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog(self.state_dir / "audit.jsonl", self.site)
        self.resend_after = resend_after
        self.send_timeout = send_timeout
        self.fp16 = fp16
        self.task: dict[str, Any] | None = None
        self.models: dict[str, tuple[int, str, bytes]] = {}  # digest -> (round, digest, payload)
        self.receipts: dict[str, Any] | None = None
        self._fresh_receipts: dict[str, Any] | None = None
        self._fresh_update: tuple[int, bytes] | None = None
        self._storing: tuple[int, Future[None]] | None = None  # (round, its update file's write)
        self._writer: ThreadPoolExecutor | None = None  # writes update files beside the send
        self._send_pool: ThreadPoolExecutor | None = None  # sends the update beside the scoring
        # trains and scores a secure round beside this thread, which answers the protocol's relays
        self._work_pool: ThreadPoolExecutor | None = None
        self.done = False
        # --compression int8|int8-topk: the last model this site reconstructed (digest, canonical
        # fp32 bytes; STATE/model.safetensors), the base of the next MODEL's delta, and when it
        # last asked for a whole model, by digest
        self._held: tuple[str, bytes] | None = None
        self._asked: dict[str, float] = {}
        self._said_no_val = False  # the warning that this site has no validation cases, once
        self._state = self._load_state()
        self._status: dict[str, Any] = {"site": self.site, "state": "waiting", "round": None}
        # secure aggregation: this site's signing key and the roster's site keys (key sets, echoes)
        self._secagg = (
            SiteSecAgg(self.site, self.state_dir, *secure_identity) if secure_identity is not None else None
        )
        self._relays: dict[tuple[int, int, str], bytes] = {}
        # a message was taken in since the last work started (during the work, or right after
        # it): the next step acts on it at once instead of waiting for another message first
        self._unworked = False
        # the secure attempt (run, round, attempt) this site refused to join: said once, not at
        # every step while the coordinator waits for key sets
        self._refused_attempt: tuple[str | None, int, int | None] | None = None
        if self._state.get("run"):  # the run this site last took part in (before a restart)
            endpoint.set_run(self._state["run"])

    @staticmethod
    def saved_run(state_dir: str | os.PathLike[str]) -> str:
        """The federation run a site's state folder last took part in ("" for none), for the
        endpoint to be built with before it connects (its will and receiver need it)."""
        try:
            return str(json.loads((Path(state_dir) / "agent.json").read_text()).get("run", ""))
        except (OSError, ValueError):
            return ""

    # -- persistent per-round record ------------------------------------------------------------
    @property
    def _state_path(self) -> Path:
        return self.state_dir / "agent.json"

    def _load_state(self) -> dict[str, Any]:
        if self._state_path.is_file():
            try:
                return json.loads(self._state_path.read_text())
            except ValueError:
                log.warning("%s: unreadable agent state; starting afresh", self._state_path)
        return {"rounds": {}}

    def _save_state(self) -> None:
        _atomic_write(self._state_path, json.dumps(self._state, indent=1, sort_keys=True).encode())

    def _round_state(self, r: int) -> dict[str, Any]:
        return self._state["rounds"].setdefault(str(r), {})

    def _update_path(self, r: int) -> Path:
        return self.state_dir / f"update-r{r:04d}.safetensors"

    def _prune(self, current: int) -> None:
        for key in list(self._state["rounds"]):
            if int(key) < current - 1:
                self._update_path(int(key)).unlink(missing_ok=True)
                del self._state["rounds"][key]

    def _set_status(self, **kw: Any) -> None:
        self._status.pop("note", None)  # a note belongs to the state it was given with
        self._status.update(kw, t=time.time())
        try:
            _atomic_write(self.state_dir / "status.json", json.dumps(self._status).encode(), durable=False)
        except OSError:  # pragma: no cover - the status file is a convenience
            pass

    def _timeline(self, what: str, r: int, t0: float, t1: float) -> None:
        """STATE/timeline.jsonl: when this site evaluated, trained, stored and sent (the
        federation-overhead benchmark reads it; only evaluate and train count as work)."""
        with open(self.state_dir / "timeline.jsonl", "a") as fh:
            fh.write(json.dumps({"site": self.site, "what": what, "round": r, "start": t0, "end": t1}) + "\n")

    # -- sending (with retry across broker outages) and auditing --------------------------------
    def _send(
        self,
        kind: MessageKind,
        r: int,
        meta: Mapping[str, Any],
        payload: bytes = b"",
        *,
        resend: bool = False,
        stop: threading.Event | None = None,
    ) -> str:
        delay = 1.0
        while True:
            try:
                msg_id = self.ep.send(kind, r, meta=meta, payload=payload, timeout=self.send_timeout)
                break
            except TransportError as exc:
                if stop is not None and stop.is_set():
                    raise
                log.warning(
                    "%s: sending %s for round %d failed (%s); retrying in %.0f s",
                    self.site,
                    kind,
                    r,
                    exc,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        self.audit.record(
            kind.value,
            r,
            msg_id=msg_id,
            payload=payload,
            meta=meta,
            resend=resend,
            digest=self.ep.sent_digest(msg_id),
        )
        return msg_id

    # -- message intake -----------------------------------------------------------------------------
    def _accept(self, msg: Message) -> None:
        self._unworked = True
        if msg.kind is MessageKind.TASK:
            if msg.meta.get("done") and (self.task is None or self.task.get("done")):
                # an end this process took no part in (even of the run its state served: a
                # long-running agent restarted after the end waits for the next run)
                self._earlier_end(msg)
                return
            if msg.run != self._state.get("run", ""):
                self._follow_run(msg.run)
            newer = self.task is None or msg.round >= self.task["round"]
            restarted = self.task is not None and msg.meta.get("session") != self.task.get("session")
            if newer or restarted or msg.meta.get("done"):
                self.task = dict(msg.meta, round=msg.round)
                if msg.meta.get("done"):
                    self.done = True
                elif not self._state.get("took_task"):
                    self._state["took_task"] = True  # this site takes part in the run
                    self._save_state()
        elif msg.kind is MessageKind.MODEL:
            # The wire has checked every byte of this message against the coordinator's signed
            # SHA-256, and the digest in its signed meta is the coordinator's name for the payload:
            # hashing the payload again here was a second SHA-256 pass on every site at the start
            # of every round (1.7 ms for the small UNet in fp16, 3.5 ms in fp32; ten sites on two
            # cores wait for each other there). Only a MODEL without one is hashed.
            digest = msg.meta.get("model_digest")
            if not (isinstance(digest, str) and _SHA256_HEX.fullmatch(digest)):
                digest = hashlib.sha256(msg.payload).hexdigest()
            payload: bytes | None = msg.payload
            if msg.meta.get("encoding") is not None:  # --compression int8 / int8-topk
                payload = self._reconstruct(msg, digest)
            if payload is not None:
                self._keep_model(msg.round, digest, payload)
        elif msg.kind is MessageKind.RECEIPTS:
            self.receipts = self._fresh_receipts = dict(msg.meta, round=msg.round)
        elif msg.kind is MessageKind.RELAY:
            # a secure-aggregation step for every site: kept for the current round only
            key = (msg.round, int(msg.meta.get("attempt", -1)), str(msg.meta.get("step")))
            self._relays[key] = bytes(msg.payload)
            for k in [k for k in self._relays if k[0] < msg.round]:
                del self._relays[k]

    def _keep_model(self, r: int, digest: str, payload: bytes) -> None:
        # keep the two newest by arrival: a model may arrive before the task that names it
        self.models.pop(digest, None)
        self.models[digest] = (r, digest, payload)
        while len(self.models) > 2:
            del self.models[next(iter(self.models))]

    # -- compressed models (int8 / int8-topk) ----------------------------------------------------
    @property
    def _held_path(self) -> Path:
        return self.state_dir / "model.safetensors"

    def _held_model(self) -> tuple[str, bytes] | None:
        """The model this site reconstructed last (kept across restarts), or None."""
        if self._held is None and self._held_path.is_file():
            data = self._held_path.read_bytes()
            self._held = (hashlib.sha256(data).hexdigest(), data)
        return self._held

    def _hold(self, digest: str, payload: bytes) -> None:
        # a torn file after a power loss only fails its digest: the site then asks for the whole model
        _atomic_write(self._held_path, payload, durable=False)
        self._held = (digest, payload)

    def _reconstruct(self, msg: Message, digest: str) -> bytes | None:
        """The model a compressed MODEL names, as canonical fp32 bytes: the payload itself
        (``encoding: full``), or the held model plus the payload's delta, checked against the
        task's digest. Without the delta's base (a site that missed rounds, is new or lost its
        state) it asks the coordinator for the whole model and returns None."""
        from neurofed.wire.compression import CODEC_OF, MODEL_FULL, apply_delta, canonical
        from neurofed.wire.errors import ProtocolError
        from neurofed.wire.payload import decode_state

        encoding = msg.meta.get("encoding")
        held = self._held_model()
        if encoding == MODEL_FULL:
            if held is None or held[0] != digest:
                self._hold(digest, msg.payload)
            return msg.payload
        if encoding not in CODEC_OF:
            log.warning(
                "%s: MODEL round %d has an unknown encoding %r; ignored", self.site, msg.round, encoding
            )
            return None
        if digest in self.models:
            return None  # the same model again (a re-announcement)
        if held is not None and held[0] == digest:
            return held[1]  # reconstructed before a restart
        if held is not None and held[0] == msg.meta.get("base_digest"):
            try:
                payload = canonical(apply_delta(decode_state(held[1]), msg.payload))
            except ProtocolError as exc:
                log.warning("%s: MODEL round %d does not apply (%s)", self.site, msg.round, exc)
                payload = b""
            if payload and hashlib.sha256(payload).hexdigest() == digest:
                self._hold(digest, payload)
                return payload
            log.warning("%s: the model rebuilt for round %d is not the one named", self.site, msg.round)
        self._ask_for_model(msg.round, digest)
        return None

    def _ask_for_model(self, r: int, digest: str) -> None:
        """STATUS ``need_model``: this round's delta does not apply here; at most every 30 s."""
        if time.time() - self._asked.get(digest, 0.0) < 30.0:
            return
        self._asked = {digest: time.time()}
        held = self._held_model()
        log.warning("%s: no base for round %d's model delta; asking for the whole model", self.site, r)
        try:
            self.ep.send(
                MessageKind.STATUS,
                0,
                meta={
                    "status": "online",
                    "need_model": digest,
                    "round": r,
                    "holds": held[0] if held else None,
                },
                timeout=self.send_timeout,
            )
        except TransportError as exc:
            log.warning("%s: asking for the whole model failed (%s); will ask again", self.site, exc)
            self._asked.clear()

    def _residual_path(self, r: int) -> Path:
        return self.state_dir / f"residual-r{r:04d}.safetensors"

    def _load_residual(self, r: int) -> dict[str, Any]:
        """The error-feedback residual after this site's newest stored update before round ``r``
        (what its compressed updates have not carried yet), or nothing."""
        from safetensors.numpy import load

        found = sorted(
            (
                (int(p.name[10:14]), p)
                for p in self.state_dir.glob("residual-r[0-9][0-9][0-9][0-9].safetensors")
            ),
            reverse=True,
        )
        for k, path in found:
            if k >= r:  # an attempt at this round (or a later one) that never was stored
                path.unlink(missing_ok=True)
                continue
            rs = self._state["rounds"].get(str(k))
            if rs is not None and not rs.get("update_stored"):
                continue
            try:
                return load(path.read_bytes())
            except Exception as exc:  # noqa: BLE001 - a damaged residual costs only its correction
                log.warning("%s: residual %s unreadable (%s); starting without it", self.site, path, exc)
                return {}
        return {}

    def _compressed_update(
        self,
        task: Mapping[str, Any],
        codec: str,
        trained: Mapping[str, Any],
        start: Mapping[str, Any],
        r: int,
    ) -> tuple[bytes, bytes]:
        """(payload, residual file bytes): the change trained - start plus the residual carried
        from the previous round, compressed; what the payload leaves out is the next residual."""
        from safetensors.numpy import save

        from neurofed.wire.compression import DEFAULT_DENSITY, compress, to_numpy

        residual = self._load_residual(r)
        delta: dict[str, Any] = {}
        for name, value in to_numpy(trained).items():
            if value.dtype.kind != "f":
                delta[name] = value
                continue
            change = value - to_numpy({name: start[name]})[name]
            carried = residual.get(name)
            if carried is not None and carried.shape == change.shape:
                change = change + carried
            delta[name] = change
        density = float(task.get("topk_density") or DEFAULT_DENSITY)
        payload, left = compress(delta, codec, density=density)
        return payload, save(left)

    def _follow_run(self, run: str) -> None:
        """A signed TASK of a run that started later than this site's (the wire lets no other
        through): the coordinator started a new federation run (a new state). Take part in it;
        the previous run's round records and update files are of no use to it."""
        if self._state.get("run"):
            log.warning("%s: the coordinator started a new federation run %s; following it", self.site, run)
        else:
            log.info("%s: taking part in federation run %s", self.site, run)
        for key in list(self._state["rounds"]):
            self._update_path(int(key)).unlink(missing_ok=True)
        for path in self.state_dir.glob("residual-r*.safetensors"):
            path.unlink(missing_ok=True)  # another run's compression error
        if self._secagg is not None:
            self._secagg.forget()  # another run's secure deltas and keys
        self._state.update(run=run, rounds={}, took_task=False)
        self.task = None
        self.receipts = self._fresh_receipts = None
        self.done = False
        self.ep.set_run(run)
        self._save_state()

    def _earlier_end(self, msg: Message) -> None:
        """A federation's end that this process took no part in: the broker keeps the last TASK
        (retained), so a site started after a federation finished (or before the next one's
        coordinator) finds that federation's ``done`` first. Ending on it made such a site exit at
        once; it waits for the coordinator's next task instead. (The wire delivers each message
        once: the broker's retained copies after a reconnect are dropped as replays.)"""
        log.warning(
            "%s: the broker holds the end of a federation run that finished before this site "
            "joined; waiting for the coordinator to announce a new one",
            self.site,
        )
        self._set_status(state="waiting", round=None, note="the last federation run has ended")

    # -- the work -------------------------------------------------------------------------------------
    def _decode_model(self, payload: bytes) -> tuple[Any, Any]:
        """(weights, optimiser state) of a MODEL payload; the second is empty unless the
        federation runs continue-global."""
        from neurofed.wire.payload import decode_state_torch, split_optimizer

        return split_optimizer(decode_state_torch(payload))

    def _trainer_for(self, task: Mapping[str, Any]) -> Trainer:
        if self._factory is None:
            assert self.trainer is not None
            return self.trainer
        cfg = task.get("model_config") or {}
        key = json.dumps(cfg, sort_keys=True)
        if self.trainer is None or key != self._trainer_cfg:
            self._set_status(state="loading-data")
            self._warn_if_far((cfg.get("preprocessing") or {}).get("spacing"))
            self.trainer = self._factory(dict(cfg))
            self._trainer_cfg = key
        return self.trainer

    def _warn_if_far(self, spacing: Any) -> None:
        """The coordinator sets the spacing; say so when it is far from this site's own cases."""
        own = (self.report.get("spacing") or {}).get("median")
        if not spacing or not own:
            return
        from neurofed.scans.spacing import far

        if far(own, spacing):
            log.warning(
                "%s: the federation trains at %s mm, far from this site's median spacing %s mm; its cases are "
                "resampled a lot",
                self.site,
                spacing,
                own,
            )

    def _work(self, stop: threading.Event | None) -> None:
        """Do what the current task asks, as far as it can go now: train, store and send the
        update while scoring the round's model beside the send, or only score it."""
        ready = self._ready_task()
        if ready is None:
            return
        task, model, r, rs = ready
        if self._budget_spent(task):
            self._leave_spent(task, None)  # left the federation: neither trains nor scores
            return
        trainer = self._trainer_for(task)
        rs["task_digest"] = model[1]
        if not bool(task.get("train", True)):
            # evaluation only: the round closes on these scores
            if not rs.get("metrics_sent"):
                self._report(r, rs, model[1], self._score_now(trainer, model, None, r), stop)
                self._set_status(state="evaluated", round=r)
            return
        if task.get("secagg"):
            self._secure_work(task, model, r, rs, trainer, stop)
            return
        state_dict = None
        path = self._update_path(r)
        if not (rs.get("update_stored") and path.is_file()):
            from neurofed.edge_node.privacy import BudgetSpent

            try:
                state_dict = self._train_and_store(task, model, r, rs, trainer, path)
            except BudgetSpent as exc:
                self._leave_spent(task, exc)
                return
        ev = self._send_scoring_beside(trainer, state_dict, r, rs, stop)
        if not rs.get("metrics_sent"):
            if ev is None:  # restarted after the update was stored or sent: score the model now
                ev = self._score_now(trainer, model, state_dict, r)
            self._report(r, rs, model[1], ev, stop)
            self._set_status(state="sent", round=r)

    def _ready_task(self) -> tuple[dict[str, Any], tuple[int, str, bytes], int, dict[str, Any]] | None:
        """The current task with its model, round and round state, when the model for it is here
        (``None`` otherwise, with the status saying what the site waits for)."""
        task = self.task
        model = self.models.get(str((task or {}).get("model_digest")))
        if task is None or task.get("done"):
            return None
        r = int(task["round"])
        rs = self._round_state(r)
        if rs.get("task_digest") not in (None, task.get("model_digest")):
            # same round number, another global model: the federation started over; so do we
            log.warning("%s: round %d now comes with another model; forgetting the old one", self.site, r)
            self._update_path(r).unlink(missing_ok=True)
            if self._secagg is not None:
                self._secagg.forget()  # a secure delta trained from the old model
            rs.clear()
            self._save_state()
        self._prune(r)
        if model is None or model[0] != r or model[1] != task.get("model_digest"):
            if task.get("model_digest") in self._asked and not rs.get("update_sent"):
                self._ask_for_model(r, str(task["model_digest"]))  # the request may have been lost
            if not rs.get("update_sent"):
                self._set_status(state="waiting-for-model", round=r)
            return None
        return task, model, r, rs

    def _train_and_store(
        self,
        task: dict[str, Any],
        model: tuple[int, str, bytes],
        r: int,
        rs: dict[str, Any],
        trainer: Trainer,
        path: Path,
    ) -> Any:
        """Train from the round's model, encode the update and start storing it (for resends
        after a restart) while it is sent from memory. Returns the round's model weights."""
        state_dict, result, t0, t1 = self._train_local(task, model, r, trainer, rs)
        from neurofed.wire.compression import DELTA_CODECS, ENCODING
        from neurofed.wire.payload import UPDATE_ENCODING_FP16_DELTA, encode_state

        compression = str(task.get("compression") or "none")
        residual: bytes | None = None
        if compression in DELTA_CODECS:
            # 8-bit (top-k) change from the model trained from, with error feedback: what earlier
            # updates could not carry rides along, and what this one cannot is kept for the next
            payload, residual = self._compressed_update(task, compression, result.state_dict, state_dict, r)
            rs["encoding"] = ENCODING[compression]
        elif bool(task.get("fp16", self.fp16)):
            # Half precision carries the change, not the weights: a change of ~1e-3 keeps
            # ~1e-6 of it in fp16, where the weights themselves would lose ~1e-4; the
            # coordinator adds it to its fp32 weights (mixed-precision master weights).
            payload = encode_state(weight_delta(result.state_dict, state_dict), fp16=True)
            rs["encoding"] = UPDATE_ENCODING_FP16_DELTA
        else:
            payload = encode_state({**result.state_dict, **(getattr(result, "optimizer_state", None) or {})})
            rs.pop("encoding", None)
        self._timeline("encode", r, t1, time.time())
        # The file is for resends after a restart; it is written and fsynced while the update
        # is on its way (sent from memory), not before: the write would sit on the round's
        # critical path. update_stored is recorded only once the file is durable.
        self._storing = (r, self._store_async(r, path, payload, residual))
        self._fresh_update = (r, payload)
        rs.update(
            num_cases=int(result.num_cases),
            loss=float(result.loss),
            model_digest=model[1],
            train_seconds=float(t1 - t0),
            local_steps=int(getattr(result, "steps", 0)) or None,  # 0: the trainer does not say
        )
        # no state save here: until the file is durable a restart retrains anyway, and an
        # fsync now would queue behind the update file's and hold up the send
        del result, payload  # the encoded update is all that travels on: not beside scoring
        return state_dict

    def _train_local(
        self,
        task: dict[str, Any],
        model: tuple[int, str, bytes],
        r: int,
        trainer: Trainer,
        rs: dict[str, Any],
        run: Callable[[Callable[[], Any]], Any] | None = None,
    ) -> tuple[Any, Any, float, float]:
        """Train from the round's model as the task says: (its weights, the result, start, end).
        ``run`` runs the trainer's call (on this thread when ``None``)."""
        self._set_status(state="training", round=r)
        site_cfg = dict(task.get("sites", {}).get(self.site, {}))
        state_dict, optimizer_state = self._decode_model(model[2])
        epochs = float(site_cfg.get("epochs", task.get("epochs", 1)))  # 0.5: half an epoch
        mu = float(site_cfg.get("mu", 0.0))
        t0 = time.time()
        treatment = task.get("site_optimizer", "reset")
        extra: dict[str, Any] = {}
        if treatment == "continue-global":  # start from the federation's Adam state, return ours
            extra = {"optimizer_state": optimizer_state or None, "export_optimizer": True}
        if task.get("dp"):
            extra["dp"] = self._charge_privacy(task, trainer, epochs, rs)

        def train() -> Any:
            return trainer.train(
                state_dict,
                epochs,
                prox_mu=mu,
                keep_optimizer=treatment == "continue-local",
                lr_scale=float(site_cfg.get("lr_scale", 1.0)),
                **extra,
            )

        result = run(train) if run is not None else train()
        clip = check_site_task(task.get("dp_client"))
        if clip is not None and not task.get("secagg"):
            # client-level DP: this site's change is clipped here; only whether it fitted leaves
            # (under secure aggregation the masking step clips the flat delta and counts the bit)
            from neurofed.edge_node.privacy import clip_site_update

            result.state_dict, within = clip_site_update(result.state_dict, state_dict, clip)
            rs["dp_client"] = {"within_clip": within, "clip": clip}
        else:
            rs.pop("dp_client", None)
        t1 = time.time()
        self._timeline("train", r, t0, t1)
        return state_dict, result, t0, t1

    # -- secure aggregation ---------------------------------------------------------------------------
    def _secure_work(
        self,
        task: dict[str, Any],
        model: tuple[int, str, bytes],
        r: int,
        rs: dict[str, Any],
        trainer: Trainer,
        stop: threading.Event | None,
    ) -> None:
        """A secure round: send this attempt's key set, train once (the delta stays on this
        site's disk), score the model, then follow the coordinator's relays step by step.

        Training and scoring run on a worker thread while this one keeps answering the relays:
        the key shares go out as soon as every site's key set is relayed, the survivor echo and
        the reveal as soon as they are asked for, so the protocol's round trips hide behind the
        training and the round closes while the site still scores the model."""
        if not self._secure_join(task, r, stop):
            return
        sec = self._secagg
        assert sec is not None
        if sec.load_delta(r) is None:
            from neurofed.edge_node.privacy import BudgetSpent

            beside = self._beside_relays(stop)
            try:
                state_dict, result, _, _ = self._train_local(task, model, r, trainer, rs, run=beside)
            except BudgetSpent as exc:
                sec.mark_sent("failed")
                self._leave_spent(task, exc)
                return
            steps = int(getattr(result, "steps", 0)) or None
            scale = 1.0 / steps if task.get("strategy") == "fednova" and steps else 1.0
            sec.save_delta(r, flat_delta(result.state_dict, state_dict, scale))
            rs.update(
                num_cases=int(result.num_cases),
                loss=float(result.loss),
                model_digest=model[1],
                local_steps=steps,
                secure_trained=True,
            )
            self._save_state()
            del result
            # the masked input first (the shares usually came in during training), then score the
            # round's model while the coordinator collects the inputs and unmasks
            self._secure_progress(stop)
            if not rs.get("metrics_sent"):
                self._set_status(state="evaluating", round=r)
                self._report(r, rs, model[1], self._evaluate(trainer, state_dict, r, run=beside), stop)
            self._set_status(state="sent" if "reveal" in sec.sent else "secure-aggregation", round=r)
        self._secure_progress(stop)

    def _secure_join(self, task: Mapping[str, Any], r: int, stop: threading.Event | None) -> bool:
        """Take up the task's secure attempt (restored or with fresh keys) and send its key set
        if it has not gone yet. False when this site takes no part in it."""
        sec = self._secagg
        if sec is None:
            rs = self._round_state(r)
            if not rs.get("secagg_refused"):
                rs["secagg_refused"] = True
                log.error(
                    "%s: the round runs secure aggregation, but this agent has no signing identity", self.site
                )
            return False
        roster = getattr(getattr(self.ep, "bundle", None), "roster", None)
        if roster is not None:  # the roster as it stands now (a live change adds or removes sites)
            sec.roster_keys = {x: roster.get(x).signing_key() for x in roster.sites}
        attempt = (self._state.get("run"), r, task["secagg"].get("attempt"))
        if attempt == self._refused_attempt:
            return False  # said once; the coordinator's next attempt is the next chance
        try:
            if not sec.begin(r, task["secagg"]):
                return False  # left out of this attempt: no keys, no training, no input
            sec.prune(r)
            if "keyset" not in sec.sent:
                self._secure_send(MessageKind.SECAGG, r, "keyset", sec.keyset(), stop)
        except (ProtocolError, SecAggRoundFailed, ValueError, KeyError) as exc:
            self._refused_attempt = attempt
            self._secure_refused(r, exc)
            return False
        return True

    def _beside_relays(self, stop: threading.Event | None) -> Callable[[Callable[[], Any]], Any]:
        """A runner for long work (training, scoring) on a worker thread while this thread takes
        in messages and answers the secure relays: a newer attempt's key set and the current
        attempt's shares, echo and reveal never wait for the work to end."""

        def run(work: Callable[[], Any]) -> Any:
            if self._work_pool is None:
                self._work_pool = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"{self.site}-work", initializer=_lower_priority
                )
            future = self._work_pool.submit(work)
            # the work's end wakes the wait for messages: no polling (a 20-Hz poll cost every
            # site a few percent of a core beside its training, and up to 50 ms after the work)
            future.add_done_callback(lambda _done: self.ep.wake())
            while not future.done():
                self._take_in(1.0)
                task = self.task
                if (
                    task
                    and task.get("secagg")
                    and not task.get("done")
                    and task.get("train", True)
                    and self._secagg is not None
                    and (int(task["round"]), int(task["secagg"].get("attempt", -1)))
                    != (self._secagg.round, self._secagg.attempt)
                    and not self._budget_spent(task)
                ):
                    # the coordinator retried the attempt, or the round closed without this site:
                    # its key set goes now, not once the work is done
                    self._secure_join(task, int(task["round"]), stop)
                self._secure_progress(stop)
            return future.result()

        return run

    def _secure_progress(self, stop: threading.Event | None) -> None:
        """Answer the relays of the current attempt that this site has not answered yet."""
        task, sec = self.task, self._secagg
        if sec is None or not task or not task.get("secagg") or sec.client is None:
            return
        r, a = int(task["round"]), sec.attempt
        if sec.round != r or "failed" in sec.sent:
            return
        rs = self._round_state(r)

        def relay(step: str) -> bytes | None:
            return self._relays.get((r, a, step))

        try:
            if "shares" not in sec.sent and (p := relay("keysets")) is not None:
                self._secure_send(MessageKind.SECAGG, r, "shares", sec.shares(p), stop)
            ready = "update" not in sec.sent and (p := relay("shares")) is not None
            if ready and (delta := sec.load_delta(r)) is not None:
                masked = sec.masked(p, delta, ring_weight(task.get("dp_client"), int(rs["num_cases"])))
                if masked is None:
                    log.warning(
                        "%s: round %d attempt %d: left out (no share bundles for it)", self.site, r, a
                    )
                    sec.mark_sent("failed")
                    return
                meta = {
                    "encoding": ENCODING_SECAGG,
                    "attempt": a,
                    "num_cases": int(rs["num_cases"]),
                    "model_digest": rs.get("model_digest"),
                    "local_steps": rs.get("local_steps"),
                }
                if rs.get("dp"):  # sample-level DP: what this site has spent
                    meta["dp"] = rs["dp"]
                self._secure_send(MessageKind.UPDATE, r, "update", masked, stop, meta=meta)
            if "echo" not in sec.sent and "update" in sec.sent and (p := relay("survivors")) is not None:
                self._secure_send(MessageKind.SECAGG, r, "echo", sec.echo(p), stop)
            if "reveal" not in sec.sent and "echo" in sec.sent and (p := relay("unmask")) is not None:
                self._secure_send(MessageKind.SECAGG, r, "reveal", sec.reveal(p), stop)
                self._set_status(state="sent", round=r)
        except (ProtocolError, SecAggRoundFailed, ValueError) as exc:
            self._secure_refused(r, exc)

    def _secure_send(
        self,
        kind: MessageKind,
        r: int,
        step: str,
        payload: bytes,
        stop: threading.Event | None,
        *,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        sec = self._secagg
        assert sec is not None
        self._send(kind, r, meta or {"step": step, "attempt": sec.attempt}, payload, stop=stop)
        sec.mark_sent(step)
        fault_point(f"secagg-after-{step}", r)

    def _secure_refused(self, r: int, exc: Exception) -> None:
        """A step this site will not (or cannot) take: it drops out of the attempt, saying why.
        A coordinator's retry brings fresh keys and a new chance."""
        sec = self._secagg
        log.warning("%s: round %d: secure aggregation step refused: %s", self.site, r, exc)
        if sec is not None and sec.client is not None:
            sec.mark_sent("failed")

    def _charge_privacy(self, task: Mapping[str, Any], trainer: Trainer, epochs: float, rs: dict) -> Any:
        """Plan this round's DP-SGD steps with the site's accountant and count them, saved to
        ``agent.json`` before they run (a round retrained after a restart counts again). Raises
        ``BudgetSpent`` when the round would spend more than the budget."""
        from neurofed.edge_node.privacy import SiteAccountant
        from neurofed.models.privacy import DPConfig

        cfg = DPConfig.from_task(task.get("dp"))
        assert cfg is not None
        acc = SiteAccountant(self._state.setdefault("dp", {}))
        batch = int(getattr(getattr(trainer, "train_config", None), "batch_size", 2))
        try:
            step = acc.plan(cfg, int(trainer.num_train_cases), batch, epochs)
        finally:
            self._save_state()  # a solved noise multiplier, or that the budget is spent
        acc.charge(step)
        rs["dp"] = acc.report(cfg, step)
        self._save_state()
        self._set_status(epsilon=rs["dp"]["epsilon"])
        log.info(
            "%s: DP-SGD round: %d steps at sampling rate %.3f, noise multiplier %.3f, clip %g; "
            "epsilon %.3f at delta %g after it",
            self.site,
            step.steps,
            step.sample_rate,
            step.noise_multiplier,
            step.max_grad_norm,
            rs["dp"]["epsilon"],
            cfg.delta,
        )
        return step

    def _budget_spent(self, task: Mapping[str, Any]) -> bool:
        """The task runs DP-SGD and this site's privacy budget is spent: it takes no part."""
        return bool(self._state.get("dp", {}).get("spent") and task.get("dp"))

    def _leave_spent(self, task: Mapping[str, Any], exc: Exception | None) -> None:
        """The site's privacy budget is spent: it trains no more, says so in its log and status,
        and tells the coordinator once per coordinator session (a STATUS ``offline`` with the
        reason), which treats it as a site that left."""
        dp = self._state.setdefault("dp", {})
        session = task.get("session")
        if dp.get("told_session") == session:
            return
        from neurofed.edge_node.privacy import SiteAccountant
        from neurofed.models.privacy import BUDGET_SPENT, DPConfig

        cfg = DPConfig.from_task(task.get("dp"))
        spent = SiteAccountant(dp).epsilon(cfg.delta, cfg.accountant) if cfg else None
        why = str(exc) if exc else f"privacy budget spent (epsilon {spent:.3f})"
        log.warning("%s: leaving the federation: %s", self.site, why)
        meta = {"status": "offline", "reason": BUDGET_SPENT, "epsilon": spent}
        if cfg is not None:
            meta.update(delta=cfg.delta, target_epsilon=cfg.target_epsilon)
        self._send(MessageKind.STATUS, 0, meta)
        dp["told_session"] = session
        self._save_state()
        self._set_status(state="budget-spent", epsilon=spent, note=why)

    def _send_scoring_beside(
        self, trainer: Trainer, state_dict: Any, r: int, rs: dict[str, Any], stop: threading.Event | None
    ) -> Any:
        """Send the update if it has not gone yet; when the site has just trained, score the
        round's model on this thread meanwhile. Returns that score, or ``None``."""
        ev = None
        try:
            if not rs.get("update_sent"):
                if state_dict is not None and not rs.get("metrics_sent"):
                    # trained just now: score the round's model while a worker thread sends the
                    # update and the coordinator aggregates (scoring on this thread keeps its
                    # memory in the arena training used)
                    self._set_status(state="evaluating", round=r)
                    sending = self._sender().submit(self._send_update, r, rs, stop=stop, status=False)
                    try:
                        ev = self._evaluate(trainer, state_dict, r)
                    finally:
                        sending.result()  # the send's error, if any, is raised here
                else:
                    self._send_update(r, rs, stop=stop)
        finally:
            self._finish_store(r, rs)
        return ev

    def _sender(self) -> ThreadPoolExecutor:
        if self._send_pool is None:
            self._send_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.site}-send")
        return self._send_pool

    def _score_now(self, trainer: Trainer, model: tuple[int, str, bytes], state_dict: Any, r: int) -> Any:
        """Score the round's model on this thread, with nothing beside it (decoded if need be)."""
        self._set_status(state="evaluating", round=r)
        if state_dict is None:
            state_dict, _ = self._decode_model(model[2])
        return self._evaluate(trainer, state_dict, r)

    def _evaluate(
        self,
        trainer: Trainer,
        state_dict: Any,
        r: int,
        run: Callable[[Callable[[], Any]], Any] | None = None,
    ) -> Any:
        """Score the global model (model r-1) on the local validation split (``run`` runs the
        trainer's call; on this thread when ``None``)."""
        t0 = time.time()

        def score() -> Any:
            return trainer.evaluate(state_dict, split="val")

        ev = run(score) if run is not None else score()
        self._timeline("evaluate", r, t0, time.time())
        if not ev.num_cases and not self._said_no_val:
            self._said_no_val = True
            log.warning(
                "%s: no validation cases in this site's split: it reports no Dice or HD95 of the "
                "global model (the split keeps about 10 %% of a site's cases for validation; a site "
                "with fewer than 4 cases has none)",
                self.site,
            )
        return ev

    def _report(self, r: int, rs: dict[str, Any], digest: str, ev: Any, stop: threading.Event | None) -> None:
        """Send METRICS r: this site's score of model r-1, the per-institution figure."""
        meta = {
            # No validation cases (a very small site): nothing to score, said as null.
            "dice": _finite(ev.dice) if ev.num_cases else None,
            # HD95 is undefined when a mask is empty (an untrained model): null, as JSON has no NaN.
            "hd95": _finite(ev.hd95),
            "num_cases": int(ev.num_cases),
            "evaluated_round": r - 1,
            "model_digest": digest,
        }
        splits = getattr(self.trainer, "splits_digest", None)
        if isinstance(splits, str):
            meta["splits_digest"] = splits  # which validation cases: no patient data
        if rs.get("dp"):  # the site's privacy spent so far, this round's training included
            meta["dp"] = rs["dp"]
        self._send(MessageKind.METRICS, r, meta, stop=stop)
        rs.update(
            metrics_sent=True,
            metrics_sent_at=time.time(),
            metrics_session=(self.task or {}).get("session"),
            metrics=meta,
            dice=meta["dice"],
        )
        self._save_state()
        self._set_status(dice=meta["dice"], evaluated_round=r - 1)
        log.info(
            "%s: round %d: model %d scores Dice %.4f on %d validation cases",
            self.site,
            r,
            r - 1,
            float("nan") if meta["dice"] is None else meta["dice"],
            meta["num_cases"],
        )

    def _store_async(self, r: int, path: Path, payload: bytes, residual: bytes | None = None) -> Future[None]:
        def write() -> None:
            t0 = time.time()
            if residual is not None:  # first: update_stored then vouches for both
                _atomic_write(self._residual_path(r), residual)
            _atomic_write(path, payload)
            self._timeline("store", r, t0, time.time())

        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.site}-store")
        return self._writer.submit(write)

    def _wait_for_store(self) -> None:
        if self._storing is not None:
            wait([self._storing[1]])

    def _finish_store(self, r: int, rs: dict[str, Any]) -> None:
        """Wait for the update file's write; only then does the round state say it is stored."""
        storing, self._storing = self._storing, None
        if storing is None or storing[0] != r:
            return
        storing[1].result()  # the write's error, if any, is raised here
        rs["update_stored"] = True
        self._save_state()
        for path in self.state_dir.glob("residual-r[0-9][0-9][0-9][0-9].safetensors"):
            if int(path.name[10:14]) < r:  # superseded by this round's residual
                path.unlink(missing_ok=True)

    def _send_update(
        self,
        r: int,
        rs: dict[str, Any],
        *,
        resend: bool = False,
        stop: threading.Event | None = None,
        status: bool = True,
    ) -> None:
        fresh, self._fresh_update = self._fresh_update, None
        payload = fresh[1] if fresh and fresh[0] == r else self._update_path(r).read_bytes()
        meta = {
            "num_cases": int(rs["num_cases"]),
            "model_digest": rs["model_digest"],
            # no loss (null) when no step took a case: a DP-SGD round whose Poisson sampling drew
            # none (a small site's expected batch is a fraction of a step), as JSON has no NaN
            "loss": _finite(rs.get("loss")),
            "train_seconds": rs.get("train_seconds"),
            "local_steps": rs.get("local_steps"),
        }
        if rs.get("encoding"):
            meta["encoding"] = rs["encoding"]
        if rs.get("dp"):
            meta["dp"] = rs["dp"]
        if rs.get("dp_client"):
            meta["dp_client"] = rs["dp_client"]
        if status:  # off while scoring beside it: one writer of the status file
            self._set_status(state="uploading", round=r)
        fault_point("site-mid-upload", r, before=self._wait_for_store)
        t0 = time.time()
        self._send(MessageKind.UPDATE, r, meta, payload, resend=resend, stop=stop)
        self._timeline("send", r, t0, time.time())
        rs.update(update_sent=True, sent_at=time.time())
        if not resend:
            rs["sent_session"] = (self.task or {}).get("session")
        self._save_state()
        if status:
            self._set_status(state="sent", round=r)
        log.info(
            "%s: round %d: update sent (%d cases, %d bytes)%s",
            self.site,
            r,
            rs["num_cases"],
            len(payload),
            " again" if resend else "",
        )

    def _overdue(self, rs: Mapping[str, Any], sent_at: str) -> bool:
        """Sent more than ``resend_after`` seconds ago and still not in the receipts: lost, not
        merely on its way."""
        return time.time() - float(rs.get(sent_at, 0)) > self.resend_after

    def _check_receipts(self, stop: threading.Event | None) -> None:
        """Send again what the coordinator's receipts lack: the stored update (a lost upload, a
        restart of the broker or the coordinator), in an evaluation-only round the metrics, and
        the previous round's metrics while the receipts name them as awaited (``evaluated``)."""
        rc = self._fresh_receipts
        if rc is None:
            return
        self._fresh_receipts = None  # act once per RECEIPTS message (the coordinator repeats them)
        session = rc.get("session")
        scored = rc.get("evaluated")
        if isinstance(scored, dict) and isinstance(scored.get("round"), int):
            # the previous round's scores, sent after its update: still awaited by the coordinator
            self._resend_metrics(scored["round"], scored.get("sites", []), session, stop)
        r = int(rc["round"])
        rs = self._state["rounds"].get(str(r))
        if not rs:
            return
        if rs.get("update_sent") and self.site not in rc.get("held", []):
            new_session = session not in (None, rs.get("sent_session"))
            if new_session or self._overdue(rs, "sent_at"):
                if self._update_path(r).is_file():
                    log.warning(
                        "%s: receipts for round %d lack this site's update; sending it again", self.site, r
                    )
                    if new_session:
                        rs["sent_session"] = session
                    self._send_update(r, rs, resend=True, stop=stop)
        # In an evaluation-only round the metrics are the round's results: it closes on them.
        evaluating = self.task and not self.task.get("train", True) and int(self.task["round"]) == r
        if evaluating:
            self._resend_metrics(r, rc.get("metrics", []), session, stop)

    def _resend_metrics(
        self, r: int, held: list[str], session: str | None, stop: threading.Event | None
    ) -> None:
        """Send round r's METRICS again from the round state (never evaluated twice) when the
        coordinator's receipts lack them and it restarted or they are overdue."""
        rs = self._state["rounds"].get(str(r))
        if not rs or not rs.get("metrics_sent") or self.site in held:
            return
        if session in (None, rs.get("metrics_session")) and not self._overdue(rs, "metrics_sent_at"):
            return
        if not rs.get("metrics"):  # a round state from before metrics were kept: evaluate
            rs["metrics_sent"] = False
            self._save_state()
            return
        log.warning("%s: receipts lack this site's evaluation for round %d; sending it again", self.site, r)
        self._send(MessageKind.METRICS, r, rs["metrics"], resend=True, stop=stop)
        rs.update(metrics_sent_at=time.time(), metrics_session=session)
        self._save_state()

    def step(self, timeout: float = 1.0, stop: threading.Event | None = None) -> bool:
        """Take in every queued message (waiting up to ``timeout`` for the first), then do the work
        they call for. Returns False once the federation is done.

        Messages taken in while the last work ran (a secure round's relays, the next round's task
        and model arriving while this site scored) or right after it are acted on without waiting:
        waiting for a first message that already came would hold the next round up by ``timeout``."""
        self._take_in(0 if self._unworked else timeout)
        if self.done:
            self._set_status(state="done")
            return False
        if self.task is not None:
            self.ep.set_round_window(max(0, int(self.task["round"]) - 1), int(self.task["round"]) + 1)
        self._unworked = False
        self._work(stop)
        # Receipts that came in while this site trained and scored are fresher than those taken
        # in before: acting on a stale one after a long scoring read a held update as overdue.
        self._take_in(0)
        self._secure_progress(stop)
        self._check_receipts(stop)
        return not self.done

    def _report_status(self, every: float = 5.0) -> None:
        """Until a task arrives, repeat an online STATUS carrying ``report`` (STATUS is not
        retained: a coordinator started after the site still gets it)."""
        if not self.report or self.task is not None or time.time() - self._reported_at < every:
            return
        self._reported_at = time.time()
        try:
            self.ep.send(MessageKind.STATUS, 0, meta={"status": "online", **self.report}, timeout=10.0)
        except Exception as exc:  # noqa: BLE001 - reporting is retried; the wire logs the cause
            log.info("%s: status report not sent: %s", self.site, exc)

    def _take_in(self, timeout: float) -> None:
        """Accept every queued message, waiting up to ``timeout`` for the first."""
        msg = self.ep.receive(timeout=timeout)
        while msg is not None:
            self._accept(msg)
            msg = self.ep.receive(timeout=0)

    def run(self, stop: threading.Event | None = None, *, max_idle: float | None = None) -> None:
        """Serve rounds until the coordinator announces the end (or ``stop`` is set, or nothing
        arrives for ``max_idle`` seconds)."""
        self._set_status(state="waiting")
        last = time.time()
        while stop is None or not stop.is_set():
            # The container HEALTHCHECK (neurofed health) reads this: alive and looping.
            (self.state_dir / "heartbeat").touch()
            self._report_status()
            seen = (self.task or {}).get("round"), (self.receipts or {}).get("held")
            if not self.step(timeout=1.0, stop=stop):
                log.info("%s: federation finished", self.site)
                return
            if ((self.task or {}).get("round"), (self.receipts or {}).get("held")) != seen:
                last = time.time()
            elif max_idle is not None and time.time() - last > max_idle:
                log.warning("%s: nothing new for %.0f s; stopping", self.site, max_idle)
                return
