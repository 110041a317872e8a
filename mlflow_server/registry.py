"""One registered model version per aggregated round, with the aliases a clinic deploys from.

The registry room is split by job: ``names`` (model name, aliases, tags), ``packaging`` (the
model folder), this module (registration, evaluation, aliases), ``retention`` and ``fetching``;
the names of all of them are importable from here.

Every round's global model becomes a version of ``<federation>-unet`` in MLflow's ONNX flavor
(signature with -1 batch and spatial dims, a small input example, CPU execution provider unless
CUDA is asked for, explicit pip requirements) plus its safetensors weights in the same artifact
folder, tagged with round, sites, cases, config digest and both sha256 digests. Alias
``latest-round`` follows the newest version and ``champion`` the best validated Dice.

Why these choices:
- MLflow 3 reserves the alias name ``latest`` (``models:/NAME/latest`` already means "highest
  version"), so the alias shown in the UI is ``latest-round``; ``fetch_model`` accepts
  ``models:/NAME@latest`` and ``models:/NAME/latest`` as well.
- Registration is idempotent by the ``round`` tag (and the federation's parent run): the tags go in
  with ``create_model_version`` itself, so a coordinator that dies between aggregating and
  registering and registers again after resume finds the version and gets it back.
- Only ``MlflowClient`` calls (no fluent ``mlflow.*`` run state): the coordinator registers from a
  background thread, and fluent state is process-global.
- ``mlflow.onnx`` with ``save_as_external_data=True`` mutates the ONNX object it is given; here each
  version is saved from a freshly loaded object, self-contained (no external data), and reloaded
  and checked before upload.
- With a database URI used directly (``sqlite:///...``, ``postgresql://...``, no server), MLflow
  3.x's SQL registry store resolves a ``models:/<model_id>`` source through the *process-global*
  tracking URI, not the client's (a TODO in its ``create_model_version``); left alone it opens
  ``./mlflow.db`` and fails with "Logged model ... not found". ``create_model_version`` here runs
  with the global URI pointed at the client's own store.
- Promotion history lives in version tags (``val_dice``, ``promoted_over``, ``was_champion``): aliases
  are only pointers.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neurofed.mlflow_server.errors import RegistryError
from neurofed.mlflow_server.fetching import FetchedModel, fetch_model, read_round_config  # noqa: F401
from neurofed.mlflow_server.names import (  # noqa: F401 - the registry's names, importable from here
    CHAMPION,
    LATEST_ALIAS,
    MODEL_SUFFIX,
    ONNX_FILE,
    TAG_ARTIFACTS,
    TAG_CASES,
    TAG_CONFIG,
    TAG_FED_RUN,
    TAG_NUM_SITES,
    TAG_ONNX_SHA,
    TAG_ROUND,
    TAG_RUN,
    TAG_SITES,
    TAG_SPLITS,
    TAG_VAL_DICE,
    TAG_WAS_CHAMPION,
    TAG_WEIGHTS_SHA,
    WEIGHTS_DIR,
    WEIGHTS_FILE,
    _now,
    model_name,
)
from neurofed.mlflow_server.packaging import (  # noqa: F401
    build_model_dir,
    execution_providers,
    input_example,
    onnx_signature,
    pip_requirements,
)
from neurofed.mlflow_server.retention import apply_retention  # noqa: F401

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- descriptions
def _fmt(x: float | None) -> str:
    return "pending" if x is None else f"{x:.4f}"


def describe_version(
    *,
    federation: str,
    round: int,
    sites: Mapping[str, int | None],
    cases: int,
    config_digest: str,
    champion: Any = None,
    dice: float | None = None,
    per_site: Mapping[str, float] | None = None,
    outcome: str | None = None,
) -> str:
    """Markdown the ML lead reads in the registry UI: round, sites and cases, Dice per site, and
    what changed since the champion."""
    lines = [
        f"**Round {round}** of federation `{federation}`: global model aggregated from "
        f"{len(sites)} site(s), {cases} training case(s).",
        "",
        "| site | cases | validated Dice |",
        "|---|---|---|",
    ]
    per_site = dict(per_site or {})
    for site in sorted(set(sites) | set(per_site)):
        n = sites.get(site)
        lines.append(f"| {site} | {'' if n is None else n} | {_fmt(per_site.get(site))} |")
    lines.append(f"| **mean (case-weighted)** | {cases} | **{_fmt(dice)}** |")
    lines.append("")
    if dice is None:
        lines.append(
            f"Validated Dice pending: the sites score this model in round {round + 1} "
            "(or the final evaluation-only round)."
        )
    if champion is None:
        lines.append("Since champion: there is no champion yet.")
    else:
        ct = champion.tags
        c_round = int(ct.get(TAG_ROUND, 0))
        c_sites = set(filter(None, ct.get(TAG_SITES, "").split(",")))
        changes = [f"+{round - c_round} round(s)"]
        added, removed = sorted(set(sites) - c_sites), sorted(c_sites - set(sites))
        changes.append(
            "sites unchanged"
            if not added and not removed
            else "sites " + ", ".join([f"+{s}" for s in added] + [f"-{s}" for s in removed])
        )
        try:
            changes.append(f"cases {cases - int(ct.get(TAG_CASES, cases)):+d}")
        except ValueError:
            pass
        changes.append(
            "same model config"
            if ct.get(TAG_CONFIG) == config_digest
            else f"model config {ct.get(TAG_CONFIG)} -> {config_digest}"
        )
        c_dice = ct.get(TAG_VAL_DICE)
        lines.append(
            f"Since champion v{champion.version} (round {c_round}, Dice {c_dice or 'n/a'}): "
            + ", ".join(changes)
            + "."
        )
        if dice is not None and c_dice:
            lines.append(f"Dice {dice - float(c_dice):+.4f} against the champion.")
    if outcome:
        lines.append("")
        lines.append(outcome)
    return "\n".join(lines)


# --------------------------------------------------------------------------- lookups
def find_round_version(
    client: Any, name: str, round: int, fed_run_id: str | None = None, run: str | None = None
) -> Any | None:
    """The version registered for ``round`` of federation run ``run`` (versions tagged with a run
    match on it; older, untagged ones on the MLflow parent run ``fed_run_id``), or None."""
    from mlflow.exceptions import MlflowException

    query = f"name = '{name}' and tags.{TAG_ROUND} = '{int(round)}'"
    try:
        found = client.search_model_versions(query)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            return None
        raise
    if run:
        found = [
            v
            for v in found
            if v.tags.get(TAG_RUN) == run
            or (TAG_RUN not in v.tags and fed_run_id is not None and v.tags.get(TAG_FED_RUN) == fed_run_id)
        ]
    elif fed_run_id is not None:
        found = [v for v in found if v.tags.get(TAG_FED_RUN) in (None, fed_run_id)]
    return min(found, key=lambda v: int(v.version)) if found else None


def get_alias(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _ensure_registered_model(client: Any, name: str, federation: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name,
                tags={"federation": federation, "task": "brain tumour whole-tumour segmentation"},
                description=(
                    f"Global 3D-UNet of federation `{federation}`, one version per aggregated round. "
                    f"`@{CHAMPION}`: best validated Dice so far (deploy this). `@{LATEST_ALIAS}`: newest round. "
                    "Each version holds the ONNX model (MLflow ONNX flavor) and its safetensors weights."
                ),
            )
        except MlflowException as exc:  # created meanwhile by another client
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise


# --------------------------------------------------------------------------- register / evaluate
def register_round(
    client: Any,
    *,
    experiment_id: str,
    run_id: str,
    federation: str,
    round: int,
    weights_path: str | os.PathLike[str],
    config: Any,
    sites: Sequence[str] | Mapping[str, int],
    cases: int | Mapping[str, int],
    tags: Mapping[str, str] | None = None,
    cuda: bool = False,
) -> Any:
    """Log round ``round``'s model and register it as a new version, or return the version this
    round already has (idempotent). Moves ``latest-round`` to the newest version."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    name = model_name(federation)
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise RegistryError(f"round {round}: weights file {weights_path} does not exist")
    existing = find_round_version(client, name, round, run_id, (tags or {}).get(TAG_RUN))
    if existing is not None:
        log.info(
            "round %d already registered as %s v%s; not registering again", round, name, existing.version
        )
        _move_latest(client, name)
        return existing

    site_cases: dict[str, int | None] = (
        {str(k): int(v) for k, v in sites.items()}
        if isinstance(sites, Mapping)
        else dict.fromkeys(map(str, sites))
    )
    if isinstance(cases, Mapping):
        site_cases.update({str(k): int(v) for k, v in cases.items()})
        total_cases = int(sum(cases.values()))
    else:
        total_cases = int(cases)
    digest = config.digest()
    base_tags = {
        TAG_ROUND: str(int(round)),
        TAG_FED_RUN: run_id,
        TAG_SITES: ",".join(sorted(site_cases)),
        TAG_NUM_SITES: str(len(site_cases)),
        TAG_CASES: str(total_cases),
        TAG_CONFIG: digest,
        **{f"{TAG_CASES}/{s}": str(n) for s, n in site_cases.items() if n is not None},
    }
    _ensure_registered_model(client, name, federation)
    champion = get_alias(client, name, CHAMPION)

    lm = client.create_logged_model(
        experiment_id=experiment_id,
        name=f"round-{int(round)}",
        source_run_id=run_id,
        tags={TAG_ROUND: str(int(round)), TAG_CONFIG: digest},
        params={"round": str(int(round)), "config": config.to_json()[:6000]},
        model_type="onnx-unet",
    )
    try:
        client.log_outputs(run_id, [LoggedModelOutput(lm.model_id, step=int(round))])
        with tempfile.TemporaryDirectory(prefix="nf-register-") as tmp:
            local = Path(tmp) / "model"
            mm = Model(
                artifact_path=lm.artifact_location,
                run_id=run_id,
                model_uuid=lm.model_id,
                model_id=lm.model_id,
            )
            onnx_sha, weights_sha = build_model_dir(
                weights_path,
                config,
                local,
                mlflow_model=mm,
                metadata={"neurofed.round": str(int(round)), "neurofed.federation": federation},
                cuda=cuda,
            )
            client.log_model_artifacts(lm.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(lm.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(lm.model_id, LoggedModelStatus.READY)

    version_tags = {**base_tags, TAG_WEIGHTS_SHA: weights_sha, TAG_ONNX_SHA: onnx_sha, **dict(tags or {})}
    description = describe_version(
        federation=federation,
        round=round,
        sites=site_cases,
        cases=total_cases,
        config_digest=digest,
        champion=champion,
    )
    # A second look right before creating: another registrar may have won the race meanwhile.
    existing = find_round_version(client, name, round, run_id, (tags or {}).get(TAG_RUN))
    if existing is not None:
        return existing
    with _registry_sees_client_store(client):
        mv = client.create_model_version(
            name,
            source=f"models:/{lm.model_id}",
            run_id=run_id,
            tags=version_tags,
            description=description,
            model_id=lm.model_id,
        )
    _move_latest(client, name)
    log.info("registered %s v%s for round %d (onnx sha256 %s)", name, mv.version, round, onnx_sha[:12])
    return client.get_model_version(name, mv.version)


_GLOBAL_URI_LOCK = threading.Lock()


@contextmanager
def _registry_sees_client_store(client: Any) -> Iterator[None]:
    """Point MLflow's global tracking URI at ``client``'s store while a version is created.

    Only for direct database stores: a server resolves ``models:/<id>`` on its own side."""
    tracking = getattr(getattr(client, "_tracking_client", None), "tracking_uri", None)
    if not tracking or "://" not in str(tracking) or str(tracking).startswith(("http", "databricks")):
        yield
        return
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _GLOBAL_URI_LOCK:
        env = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            with _use_tracking_uri(str(tracking)):
                yield
        finally:  # MLflow unsets the variable when it restores an unset global: put it back
            if env is not None:
                os.environ["MLFLOW_TRACKING_URI"] = env


def _incomparable_champion(champion: Any, mv: Any, splits_digest: str | None) -> str:
    """Why the champion, from another federation run, cannot be compared with ``mv`` ("" when it
    can: same run, or the same validation cases on both sides)."""
    if champion is None or champion.version == mv.version:
        return ""
    theirs, ours = champion.tags.get(TAG_RUN), mv.tags.get(TAG_RUN)
    if theirs == ours:
        return ""
    their_splits = champion.tags.get(TAG_SPLITS)
    if splits_digest and their_splits == splits_digest:
        return ""
    return (
        f"champion v{champion.version} is from another federation run ({theirs or 'unknown'}) and was "
        f"validated on {'other' if their_splits and splits_digest else 'unknown'} cases, so the two "
        "Dice do not compare (move the alias by hand if this version should serve)"
    )


def _move_latest(client: Any, name: str) -> None:
    versions = client.search_model_versions(f"name = '{name}'")
    if versions:
        newest = max(versions, key=lambda v: int(v.version))
        current = get_alias(client, name, LATEST_ALIAS)
        if current is None or current.version != newest.version:
            client.set_registered_model_alias(name, LATEST_ALIAS, newest.version)


@dataclass(frozen=True)
class Evaluation:
    """What ``record_evaluation`` did: the version it tagged and whether it became champion."""

    version: str
    dice: float
    promoted: bool
    previous_champion: str | None
    previous_dice: float | None


def record_evaluation(
    client: Any,
    *,
    federation: str,
    round: int,
    dice: float,
    per_site: Mapping[str, float],
    run_id: str | None = None,
    run: str | None = None,
    splits_digest: str | None = None,
) -> Evaluation:
    """Tag round ``round``'s version with its validated Dice; move ``champion`` to it only if it
    beats the current champion's Dice (ties keep the older champion). A champion of another
    federation run is displaced only by a higher Dice measured on the same validation cases
    (``splits_digest``): Dice on other cases does not compare."""
    import math

    name = model_name(federation)
    if not math.isfinite(float(dice)):
        raise RegistryError(f"round {round}: validated Dice {dice!r} is not a finite number")
    mv = find_round_version(client, name, round, run_id, run)
    if mv is None:
        raise RegistryError(
            f"round {round}: no registered version of {name} to record the evaluation on; register the "
            "round first (FederationTracker.register_round)"
        )
    for site, value in per_site.items():
        client.set_model_version_tag(name, mv.version, f"{TAG_VAL_DICE}/{site}", f"{float(value):.6f}")
    client.set_model_version_tag(name, mv.version, TAG_VAL_DICE, f"{float(dice):.6f}")
    client.set_model_version_tag(name, mv.version, "evaluated_at", _now())
    if splits_digest:
        client.set_model_version_tag(name, mv.version, TAG_SPLITS, splits_digest)

    champion = get_alias(client, name, CHAMPION)
    prev_dice = (
        float(champion.tags[TAG_VAL_DICE]) if champion is not None and TAG_VAL_DICE in champion.tags else None
    )
    other_run = _incomparable_champion(champion, mv, splits_digest)
    if champion is not None and champion.version == mv.version:
        promoted, outcome = False, f"Champion since {champion.tags.get('promoted_at', 'earlier')}."
    elif other_run:
        promoted, outcome = False, f"Not promoted: {other_run}."
    elif champion is None or prev_dice is None or float(dice) > prev_dice:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
        client.set_model_version_tag(name, mv.version, TAG_WAS_CHAMPION, "true")
        client.set_model_version_tag(name, mv.version, "promoted_at", _now())
        over = "none" if champion is None else f"v{champion.version} (Dice {_fmt(prev_dice)})"
        client.set_model_version_tag(name, mv.version, "promoted_over", over)
        promoted, outcome = True, f"Promoted to `@{CHAMPION}` over {over}."
    else:
        promoted = False
        outcome = f"Not promoted: Dice {float(dice):.4f} does not beat champion v{champion.version} ({prev_dice:.4f})."
    mv = client.get_model_version(name, mv.version)
    sites: dict[str, int | None] = {}
    for s in filter(None, mv.tags.get(TAG_SITES, "").split(",")):
        n = mv.tags.get(f"{TAG_CASES}/{s}")
        sites[s] = int(n) if n is not None and n.isdigit() else None
    client.update_model_version(
        name,
        mv.version,
        description=describe_version(
            federation=federation,
            round=round,
            sites=sites,
            cases=int(mv.tags.get(TAG_CASES, 0)),
            config_digest=mv.tags.get(TAG_CONFIG, ""),
            champion=None if champion is None or champion.version == mv.version else champion,
            dice=float(dice),
            per_site=per_site,
            outcome=outcome,
        ),
    )
    return Evaluation(
        version=str(mv.version),
        dice=float(dice),
        promoted=promoted,
        previous_champion=None if champion is None else str(champion.version),
        previous_dice=prev_dice,
    )
