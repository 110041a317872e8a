"""What the coordinator tells MLflow about a federation: one experiment per federation, one parent
run, round metrics as steps, a Dice-per-round plot, and a registered model version per round.

The coordinator calls a ``FederationTracker`` from a background thread, off the round's critical
path; every method is serialised by a lock and uses only ``MlflowClient`` (no fluent, process-global
run state). A restarted coordinator that builds a new tracker for the same federation resumes the
parent run that is still marked RUNNING, so metrics, the plot and the registry continue where they
were.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from neurofed.mlflow_server import registry
from neurofed.mlflow_server.errors import RegistryError

log = logging.getLogger(__name__)

ROLE_TAG = "neurofed.role"
FED_TAG = "neurofed.federation"
RUN_TAG = "neurofed.run"
PLOT_PATH = "plots/dice_per_round.png"
MAX_PARAM = 6000  # MLflow's limit on a parameter value


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists and other values as JSON, cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[name] = text[:MAX_PARAM]
    return out


def case_weighted_dice(per_site: Mapping[str, float], cases: Mapping[str, int]) -> float:
    """Mean Dice over sites weighted by each site's number of validation cases (sites with no
    count weigh zero; all-zero weights fall back to the plain mean)."""
    total = sum(int(cases.get(s, 0)) for s in per_site)
    if total <= 0:
        return sum(per_site.values()) / max(1, len(per_site))
    return sum(float(d) * int(cases.get(s, 0)) for s, d in per_site.items()) / total


def render_dice_plot(history: Mapping[str, Mapping[int, float]], federation: str) -> bytes:
    """PNG of Dice per round: the case-weighted mean bold, each site thin. Uses the Agg canvas
    directly (no pyplot), so it is safe in a background thread and never opens a window."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key in sorted(k for k in history if k.startswith("dice/")):
        pts = sorted(history[key].items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", linewidth=1, alpha=0.7, label=key[5:])
    if "dice_mean" in history:
        pts = sorted(history["dice_mean"].items())
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            linewidth=2.5,
            color="black",
            label="mean (cases)",
        )
    ax.set_xlabel("round")
    ax.set_ylabel("Dice (validation)")
    ax.set_ylim(0, 1)
    ax.set_title(f"Federation {federation}: Dice of the global model per round")
    ax.grid(True, alpha=0.3)
    if history:
        ax.legend(loc="lower right", fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


class FederationTracker:
    """One federation's experiment, parent run and registered model.

    ``params`` is the federation config (logged once as parameters, nested keys flattened with dots).
    ``keep_last``: when set, after each registration the artifacts of versions older than the newest
    ``keep_last`` are deleted, except champions (see ``registry.apply_retention``).
    ``cuda``: record CUDA first in the registered models' execution providers.
    """

    def __init__(
        self,
        tracking_uri: str,
        federation: str,
        params: Mapping[str, Any],
        *,
        run_name: str | None = None,
        keep_last: int | None = None,
        cuda: bool = False,
        fed_run: str | None = None,
    ) -> None:
        import mlflow
        from mlflow.exceptions import MlflowException

        if not federation or any(c in federation for c in "'\"/\\"):
            raise RegistryError(f"federation name {federation!r} is empty or has quotes or slashes")
        self.tracking_uri = tracking_uri
        self.federation = federation
        self.fed_run = fed_run  # the coordinator state's run: one parent run and version set each
        self.keep_last = keep_last
        self.cuda = cuda
        self.model_name = registry.model_name(federation)
        self._lock = threading.Lock()
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        try:
            exp = self.client.get_experiment_by_name(federation)
            self.experiment_id = (
                exp.experiment_id
                if exp is not None
                else self.client.create_experiment(federation, tags={FED_TAG: federation})
            )
            self.run_id, self.resumed = self._parent_run(run_name)
        except MlflowException as exc:
            raise RegistryError(
                f"MLflow at {tracking_uri}: cannot open the experiment for federation {federation!r} "
                f"({exc.message.splitlines()[0]}); is `neurofed mlflow-server` running there?"
            ) from None
        self._log_params(params)
        self.history: dict[str, dict[int, float]] = self._load_history()

    # ------------------------------------------------------------------ set-up
    def _parent_run(self, run_name: str | None) -> tuple[str, bool]:
        query = f"tags.`{ROLE_TAG}` = 'federation' and attributes.status = 'RUNNING'"
        if self.fed_run:  # resume only this federation run's parent run, never another's
            query += f" and tags.`{RUN_TAG}` = '{self.fed_run}'"
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=query,
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs:
            log.info("resuming parent run %s of federation %s", runs[0].info.run_id, self.federation)
            return runs[0].info.run_id, True
        run = self.client.create_run(
            self.experiment_id,
            run_name=run_name or f"{self.federation}-federation",
            tags={
                ROLE_TAG: "federation",
                FED_TAG: self.federation,
                **({RUN_TAG: self.fed_run} if self.fed_run else {}),
                "mlflow.note.content": self._note(),
            },
        )
        return run.info.run_id, False

    def _note(self) -> str:
        return (
            f"Federation `{self.federation}`: metrics are per round (step = round). `dice_mean` is the "
            "global model's validation Dice over sites weighted by cases; `dice/<site>` each site's. "
            f"Every round's model is registered as a version of `{self.model_name}`."
        )

    def _log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten_params(params)
        logged = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in flat.items() if k not in logged]
        changed = sorted(k for k, v in flat.items() if k in logged and logged[k] != v)
        if changed:  # parameters are immutable in MLflow: say so instead of failing the resume
            log.warning(
                "federation config changed on resume for %s; kept the first values", ", ".join(changed)
            )
            self.client.set_tag(self.run_id, "neurofed.params_changed_on_resume", ",".join(changed)[:5000])
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def _load_history(self) -> dict[str, dict[int, float]]:
        if not self.resumed:
            return {}
        keys = [
            k
            for k in self.client.get_run(self.run_id).data.metrics
            if k == "dice_mean" or k.startswith("dice/")
        ]
        return {k: {m.step: m.value for m in self.client.get_metric_history(self.run_id, k)} for k in keys}

    # ------------------------------------------------------------------ per round
    def log_round(
        self,
        round: int,
        metrics: Mapping[str, float],
        step: int | None = None,
        *,
        round_config: Mapping[str, Any] | None = None,
        site_cases: Mapping[str, int] | None = None,
    ) -> None:
        """Log a round's metrics at ``step`` (default: the round), refresh the Dice plot, and store the
        round's config as ``rounds/round-NNNN/config.json``.

        Expected keys: ``dice_mean``, ``dice/<site>``, ``sites``, ``bytes_received``,
        ``round_seconds`` (any other numeric key is logged too). When ``dice_mean`` is missing and
        ``site_cases`` is given, it is computed from the per-site Dice weighted by cases."""
        from mlflow.entities import Metric

        step = int(round if step is None else step)
        values = {k: float(v) for k, v in metrics.items()}
        per_site = {k[5:]: v for k, v in values.items() if k.startswith("dice/")}
        if "dice_mean" not in values and per_site and site_cases:
            values["dice_mean"] = case_weighted_dice(per_site, site_cases)
        bad = sorted(k for k, v in values.items() if v != v or v in (float("inf"), float("-inf")))
        if bad:
            log.warning("round %d: not logging non-finite metrics %s", round, ", ".join(bad))
            values = {k: v for k, v in values.items() if k not in bad}
        now = int(time.time() * 1000)
        with self._lock:
            batch = [Metric(k, v, now, step) for k, v in sorted(values.items())]
            for i in range(0, len(batch), 500):
                self.client.log_batch(self.run_id, metrics=batch[i : i + 500])
            for k, v in values.items():
                if k == "dice_mean" or k.startswith("dice/"):
                    self.history.setdefault(k, {})[step] = v
            config = {
                "federation": self.federation,
                "round": int(round),
                "step": step,
                "metrics": values,
                "config": dict(round_config or {}),
            }
            self.client.log_text(
                self.run_id,
                json.dumps(config, indent=2, sort_keys=True, default=str),
                f"rounds/round-{int(round):04d}/config.json",
            )
            if self.history:
                self._log_plot()

    def _log_plot(self) -> None:
        import tempfile

        png = render_dice_plot(self.history, self.federation)
        with tempfile.TemporaryDirectory(prefix="nf-plot-") as tmp:
            path = Path(tmp) / Path(PLOT_PATH).name
            path.write_bytes(png)
            self.client.log_artifact(self.run_id, str(path), str(Path(PLOT_PATH).parent))

    # ------------------------------------------------------------------ registry
    def register_round(
        self,
        round: int,
        weights_path: str | os.PathLike[str],
        model_config: Any,
        *,
        sites: Sequence[str] | Mapping[str, int],
        cases: int | Mapping[str, int],
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Register round ``round``'s global model; returns the version number (as MLflow gives it,
        a string). Idempotent: a round already registered returns its version."""
        if self.fed_run:
            tags = {registry.TAG_RUN: self.fed_run, **dict(tags or {})}
        with self._lock:
            t0 = time.perf_counter()
            mv = registry.register_round(
                self.client,
                experiment_id=self.experiment_id,
                run_id=self.run_id,
                federation=self.federation,
                round=round,
                weights_path=weights_path,
                config=model_config,
                sites=sites,
                cases=cases,
                tags=tags,
                cuda=self.cuda,
            )
            if self.keep_last:
                registry.apply_retention(self.client, self.federation, self.keep_last, self.tracking_uri)
            log.info(
                "round %d: %s v%s in %.2f s", round, self.model_name, mv.version, time.perf_counter() - t0
            )
            return str(mv.version)

    def record_evaluation(
        self, round: int, dice: float, per_site: Mapping[str, float], *, splits_digest: str | None = None
    ) -> registry.Evaluation:
        """The sites' validated Dice of round ``round``'s model: tag its version and move ``champion``
        if it beats the current one."""
        with self._lock:
            result = registry.record_evaluation(
                self.client,
                federation=self.federation,
                round=round,
                dice=dice,
                per_site=per_site,
                run_id=self.run_id,
                run=self.fed_run,
                splits_digest=splits_digest,
            )
            return result

    def close(self, status: str = "FINISHED") -> None:
        """End the parent run (``FINISHED``, ``FAILED`` or ``KILLED``). A later tracker for the same
        federation then starts a new parent run instead of resuming this one."""
        with self._lock:
            self.client.set_terminated(self.run_id, status)

    def __enter__(self) -> FederationTracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("FINISHED" if exc_type is None else "FAILED")
