"""Registration off the round's critical path: one background worker thread owns the tracker.

The round loop only enqueues jobs (``register``, ``log``, ``evaluation``) and moves on; the worker
runs them in order against ``neurofed.mlflow_server.tracking.FederationTracker`` (registration, ONNX export
and alias moves take seconds), and after each successful registration writes the round to the
state folder's ledger, so a restarted coordinator re-queues only the rounds not yet registered.
``FederationTracker.register_round`` is itself idempotent by round tag: a crash between
registering and writing the ledger cannot produce a second version.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from neurofed.coordinator.faults import fault_point
from neurofed.coordinator.state import StateStore, until_saved

log = logging.getLogger(__name__)


@dataclass
class Job:
    kind: str  # "register" | "log" | "evaluation"
    round: int
    data: dict[str, Any] = field(default_factory=dict)


class Registrar:
    """Queue + worker thread around a tracker made by ``tracker_factory`` (called in the worker, so
    a slow MLflow import or server never delays the first round). ``tracker_factory=None`` keeps
    only the in-memory record (``self.done``), e.g. for a federation without MLflow."""

    def __init__(
        self,
        store: StateStore,
        model_config: Mapping[str, Any],
        tracker_factory: Callable[[], Any] | None = None,
        *,
        retries: int = 3,
    ) -> None:
        self.store = store
        self.model_config = dict(model_config)
        self._factory = tracker_factory
        self._tracker: Any = None
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._retries = retries
        self.done: list[Job] = []
        self.failed: list[tuple[Job, str]] = []
        self._running = False
        self._thread = threading.Thread(target=self._work, name="registrar", daemon=True)
        self._thread.start()

    # -- round loop side (cheap) -----------------------------------------------------------------
    def register(
        self, round: int, *, sites: list[str], cases: int, tags: Mapping[str, str] | None = None
    ) -> None:
        self._queue.put(
            Job("register", round, {"sites": list(sites), "cases": int(cases), "tags": dict(tags or {})})
        )

    def log_round(self, round: int, metrics: Mapping[str, float]) -> None:
        self._queue.put(Job("log", round, {"metrics": dict(metrics)}))

    def record_evaluation(
        self, round: int, dice: float, per_site: Mapping[str, float], *, splits_digest: str | None = None
    ) -> None:
        data = {"dice": float(dice), "per_site": dict(per_site), "splits_digest": splits_digest}
        self._queue.put(Job("evaluation", round, data))

    def pending(self) -> int:
        return self._queue.qsize()

    def busy(self) -> bool:
        """A job is running now (e.g. a registration waiting for MLflow)."""
        return self._running

    def close(self, timeout: float = 120.0) -> None:
        """Finish queued jobs (up to ``timeout``), then stop the worker and close the tracker."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("registration worker still busy after %.0f s; %d jobs left", timeout, self.pending())

    # -- worker side -------------------------------------------------------------------------------
    def _tracker_or_none(self) -> Any:
        if self._tracker is None and self._factory is not None:
            self._tracker = self._factory()
        return self._tracker

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                break
            self._running = True
            for attempt in range(1, self._retries + 1):
                try:
                    self._run(job)
                    self.done.append(job)
                    break
                except Exception as exc:  # the federation must go on if MLflow is down
                    log.warning("registry %s round %d failed (try %d): %s", job.kind, job.round, attempt, exc)
                    if attempt == self._retries:
                        self.failed.append((job, str(exc)))
                    else:
                        time.sleep(min(5.0, attempt * 1.0))
            self._running = False
        if self._tracker is not None:
            try:
                self._tracker.close()
            except Exception as exc:  # pragma: no cover - best effort at shutdown
                log.warning("closing tracker: %s", exc)

    def _run(self, job: Job) -> None:
        tracker = self._tracker_or_none()
        if job.kind == "register":
            if job.round in self.store.registered():
                log.info("round %d already registered (ledger); skipping", job.round)
                return
            version = None
            if tracker is not None:
                from neurofed.models.config import ModelConfig

                version = tracker.register_round(
                    job.round,
                    self.store.round_weights_path(job.round),
                    ModelConfig.from_dict(self.model_config),
                    sites=job.data["sites"],
                    cases=job.data["cases"],
                    tags=job.data["tags"],
                )
            versions = {job.round: version} if version is not None else None
            # the version exists now: its ledger line waits for space rather than failing the
            # job (a restart would find the version by its round tag, but this process would not)
            until_saved(
                lambda: self.store.mark_registered([job.round], versions),
                f"round {job.round}'s registry ledger",
                self.store.root,
            )
            if tracker is None:
                log.info("round %d persisted; no registry configured (--mlflow)", job.round)
            else:
                log.info("round %d registered as version %s", job.round, version)
            fault_point("after-register", job.round)
        elif job.kind == "log":
            if tracker is not None:
                tracker.log_round(job.round, job.data["metrics"], step=job.round)
        elif job.kind == "evaluation":
            if job.round in self.store.evaluated():
                return
            if tracker is not None:
                splits = job.data.get("splits_digest")
                extra = {"splits_digest": splits} if splits else {}
                tracker.record_evaluation(job.round, job.data["dice"], job.data["per_site"], **extra)
                until_saved(
                    lambda: self.store.mark_evaluated(job.round),
                    f"round {job.round}'s evaluation",
                    self.store.root,
                )
        else:  # pragma: no cover
            raise ValueError(job.kind)
