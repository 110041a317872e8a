"""One registered model version per aggregated round, with the aliases a clinic deploys from.

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

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neurofed.mlflow_server.errors import ModelFetchError, ModelIntegrityError, RegistryError

log = logging.getLogger(__name__)

MODEL_SUFFIX = "-unet"
CHAMPION = "champion"
LATEST_ALIAS = "latest-round"  # "latest" is reserved by MLflow 3
ONNX_FILE = "model.onnx"
WEIGHTS_DIR = "weights"
WEIGHTS_FILE = "model.safetensors"

TAG_ROUND = "round"
TAG_FED_RUN = "federation_run_id"
TAG_SITES = "sites"
TAG_NUM_SITES = "num_sites"
TAG_CASES = "cases"
TAG_CONFIG = "config_digest"
TAG_WEIGHTS_SHA = "weights_sha256"
TAG_ONNX_SHA = "onnx_sha256"
TAG_VAL_DICE = "val_dice"
TAG_WAS_CHAMPION = "was_champion"
TAG_ARTIFACTS = "artifacts"


def model_name(federation: str) -> str:
    return f"{federation}{MODEL_SUFFIX}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- building the model folder
def onnx_signature(config: Any) -> Any:
    """Input ``image`` (N, C, X, Y, Z) float32 and output ``logits`` (N, out, X, Y, Z), with -1 for
    batch and spatial dims: the sliding window feeds any multiple of the UNet's stride product.
    Written by hand, because a signature inferred from an example fixes its spatial size."""
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from neurofed.models.export import INPUT_NAME, OUTPUT_NAME

    f32 = np.dtype("float32")
    return ModelSignature(
        inputs=Schema([TensorSpec(f32, (-1, config.in_channels, -1, -1, -1), INPUT_NAME)]),
        outputs=Schema([TensorSpec(f32, (-1, config.out_channels, -1, -1, -1), OUTPUT_NAME)]),
    )


def input_example(config: Any) -> Any:
    """The smallest volume the UNet accepts (one stride product per side): a few KB in the registry."""
    import numpy as np

    from neurofed.models.unet import required_multiple

    side = required_multiple(config)
    return np.zeros((1, config.in_channels, side, side, side), dtype=np.float32)


def pip_requirements() -> list[str]:
    """Pinned to what ran here; explicit, because inferring them costs about 2 s per version."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("mlflow", "onnx", "onnxruntime", "numpy"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            if dist == "onnxruntime":
                try:
                    reqs.append(f"onnxruntime-gpu=={version('onnxruntime-gpu')}")
                except PackageNotFoundError:
                    reqs.append("onnxruntime")
            else:
                reqs.append(dist)
    return reqs


def execution_providers(cuda: bool = False) -> list[str]:
    """What the pyfunc loader will ask onnxruntime for: CPU only, or CUDA first when asked
    (MLflow's default puts CUDA first and warns on every CPU load)."""
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]


def build_model_dir(
    weights_path: Path,
    config: Any,
    out_dir: Path,
    *,
    mlflow_model: Any = None,
    metadata: Mapping[str, str] | None = None,
    cuda: bool = False,
) -> tuple[str, str]:
    """Export ``weights_path`` to ONNX and save it as an MLflow ONNX-flavor folder at ``out_dir``
    with the weights beside it. Returns ``(onnx_sha256, weights_sha256)``."""
    import mlflow.onnx
    import onnx

    from neurofed.models.checkpoint import file_sha256, load_weights
    from neurofed.models.export import export_onnx

    state, file_config, _ = load_weights(weights_path)
    if file_config.digest() != config.digest():
        raise RegistryError(
            f"{weights_path}: weights carry model config {file_config.digest()} but the round was "
            f"registered with {config.digest()}; pass the config the weights were trained with"
        )
    with tempfile.TemporaryDirectory(prefix="nf-export-") as tmp:
        exported = export_onnx(state, config, Path(tmp) / ONNX_FILE, metadata=dict(metadata or {}))
        proto = onnx.load(str(exported))  # a fresh object: save_model may mutate what it is given
        n_init = len(proto.graph.initializer)
        mlflow.onnx.save_model(
            proto,
            str(out_dir),
            mlflow_model=mlflow_model,
            signature=onnx_signature(config),
            input_example=input_example(config),
            pip_requirements=pip_requirements(),
            onnx_execution_providers=execution_providers(cuda),
            metadata=dict(metadata or {}),
            save_as_external_data=False,
        )
    onnx_path = out_dir / ONNX_FILE
    # The trap: a version registered without weights only warns. Reload and count.
    reloaded = onnx.load(str(onnx_path))
    if (
        n_init == 0
        or len(reloaded.graph.initializer) != n_init
        or any(init.data_location == onnx.TensorProto.EXTERNAL for init in reloaded.graph.initializer)
    ):
        raise RegistryError(
            f"{onnx_path}: saved ONNX model lost its weights ({len(reloaded.graph.initializer)} of "
            f"{n_init} initializers inline); not registering it"
        )
    wdir = out_dir / WEIGHTS_DIR
    wdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights_path, wdir / WEIGHTS_FILE)
    return file_sha256(onnx_path), file_sha256(wdir / WEIGHTS_FILE)


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
def find_round_version(client: Any, name: str, round: int, fed_run_id: str | None = None) -> Any | None:
    """The version registered for ``round`` (of this federation run, when given), or None."""
    from mlflow.exceptions import MlflowException

    query = f"name = '{name}' and tags.{TAG_ROUND} = '{int(round)}'"
    try:
        found = client.search_model_versions(query)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            return None
        raise
    if fed_run_id is not None:
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
    existing = find_round_version(client, name, round, run_id)
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
    existing = find_round_version(client, name, round, run_id)
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
) -> Evaluation:
    """Tag round ``round``'s version with its validated Dice; move ``champion`` to it only if it
    beats the current champion's Dice (ties keep the older champion)."""
    import math

    name = model_name(federation)
    if not math.isfinite(float(dice)):
        raise RegistryError(f"round {round}: validated Dice {dice!r} is not a finite number")
    mv = find_round_version(client, name, round, run_id)
    if mv is None:
        raise RegistryError(
            f"round {round}: no registered version of {name} to record the evaluation on; register the "
            "round first (FederationTracker.register_round)"
        )
    for site, value in per_site.items():
        client.set_model_version_tag(name, mv.version, f"{TAG_VAL_DICE}/{site}", f"{float(value):.6f}")
    client.set_model_version_tag(name, mv.version, TAG_VAL_DICE, f"{float(dice):.6f}")
    client.set_model_version_tag(name, mv.version, "evaluated_at", _now())

    champion = get_alias(client, name, CHAMPION)
    prev_dice = (
        float(champion.tags[TAG_VAL_DICE]) if champion is not None and TAG_VAL_DICE in champion.tags else None
    )
    if champion is not None and champion.version == mv.version:
        promoted, outcome = False, f"Champion since {champion.tags.get('promoted_at', 'earlier')}."
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


# --------------------------------------------------------------------------- retention
def apply_retention(
    client: Any, federation: str, keep_last: int, tracking_uri: str | None = None
) -> list[str]:
    """Delete the artifacts (ONNX + weights) of versions older than the newest ``keep_last``,
    except every version that ever was champion or holds an alias. Returns the pruned versions.

    The version records stay, tagged ``artifacts=deleted``: their tags and descriptions are the
    federation's promotion history (Dice per round, who beat whom), a few hundred bytes each,
    while the artifacts are the megabytes. ``fetch_model`` refuses a pruned version clearly.
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    if keep_last < 1:
        raise RegistryError(f"retention: keep_last must be at least 1, got {keep_last}")
    name = model_name(federation)
    versions = sorted(
        client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version), reverse=True
    )
    pruned: list[str] = []
    for mv in versions[keep_last:]:
        if mv.aliases or mv.tags.get(TAG_WAS_CHAMPION) == "true" or mv.tags.get(TAG_ARTIFACTS) == "deleted":
            continue
        location = client.get_model_version_download_uri(name, mv.version)
        try:
            get_artifact_repository(location, tracking_uri=tracking_uri).delete_artifacts()
        except Exception as exc:  # keep going: retention must never break a round
            log.warning(
                "retention: could not delete artifacts of %s v%s at %s: %s", name, mv.version, location, exc
            )
            continue
        client.set_model_version_tag(name, mv.version, TAG_ARTIFACTS, "deleted")
        client.set_model_version_tag(
            name,
            mv.version,
            "artifacts_deleted",
            f"{_now()} (retention: last {keep_last} versions + champions)",
        )
        pruned.append(str(mv.version))
    if pruned:
        log.info("retention: deleted artifacts of %s versions %s", name, ", ".join(pruned))
    return pruned


# --------------------------------------------------------------------------- fetch
@dataclass(frozen=True)
class FetchedModel:
    """A model on local disk: the ONNX file, its weights if registered with them, and the sha256
    the registry recorded for the ONNX file (None for a plain path)."""

    onnx_path: Path
    weights_path: Path | None
    sha256_expected: str | None
    uri: str = ""
    version: str | None = None


def _resolve_version(client: Any, uri: str) -> tuple[str, Any]:
    from mlflow.exceptions import MlflowException

    rest = uri[len("models:/") :].strip("/")
    try:
        if "/" in rest:
            name, ref = rest.split("/", 1)
            if ref.isdigit():
                return name, client.get_model_version(name, ref)
            if ref.lower() != "latest":
                raise ModelFetchError(
                    f"{uri}: stages are not used here; use models:/{name}@{CHAMPION}, "
                    f"models:/{name}@{LATEST_ALIAS} or models:/{name}/<version>"
                )
            alias = "latest"
        elif "@" in rest:
            name, alias = rest.rsplit("@", 1)
        else:
            raise ModelFetchError(
                f"{uri}: not a registered model URI; use models:/<name>@<alias> or models:/<name>/<version>"
            )
        if alias.lower() == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ModelFetchError(f"{uri}: registered model {name!r} has no versions")
            return name, max(versions, key=lambda v: int(v.version))
        return name, client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise ModelFetchError(
            f"{uri}: cannot resolve it in the registry ({exc.message.splitlines()[0]}); check the model "
            "name and alias in the MLflow UI"
        ) from None


def fetch_model(
    uri_or_path: str | os.PathLike[str], dst_dir: str | os.PathLike[str], *, tracking_uri: str | None = None
) -> FetchedModel:
    """Resolve ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``, download its folder into
    ``dst_dir`` and check the ONNX file against the registered sha256. A plain path (an ``.onnx``
    file or an MLflow model folder) passes through unchecked (``sha256_expected`` None).

    ``tracking_uri`` defaults to ``MLFLOW_TRACKING_URI``."""
    from neurofed.models.checkpoint import file_sha256

    text = str(uri_or_path)
    if not text.startswith("models:/"):
        path = Path(text)
        if path.is_dir() and (path / ONNX_FILE).is_file():
            weights = path / WEIGHTS_DIR / WEIGHTS_FILE
            return FetchedModel(path / ONNX_FILE, weights if weights.is_file() else None, None, text)
        if path.is_file():
            return FetchedModel(path, None, None, text)
        raise ModelFetchError(
            f"{text}: no such ONNX file or model folder; give a path or a models:/<name>@<alias> URI"
        )

    import mlflow
    from mlflow.exceptions import MlflowException

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise ModelFetchError(
            f"{text}: a models:/ URI needs the MLflow server: set MLFLOW_TRACKING_URI or --tracking-uri"
        )
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, mv = _resolve_version(client, text)
    if mv.tags.get(TAG_ARTIFACTS) == "deleted":
        raise ModelFetchError(
            f"{text}: the artifacts of {name} v{mv.version} were deleted by the retention policy "
            f"({mv.tags.get('artifacts_deleted', '')}); use models:/{name}@{CHAMPION} or a newer version"
        )
    expected = mv.tags.get(TAG_ONNX_SHA)
    if not expected:
        raise ModelFetchError(
            f"{text}: {name} v{mv.version} has no {TAG_ONNX_SHA} tag, so its file cannot be checked; "
            "it was not registered by neurofed"
        )
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    try:
        location = client.get_model_version_download_uri(name, mv.version)
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=str(dst), tracking_uri=tracking_uri
            )
        )
    except MlflowException as exc:
        raise ModelFetchError(
            f"{text}: download of {name} v{mv.version} failed ({exc.message.splitlines()[0]})"
        ) from None
    onnx_path = local / ONNX_FILE
    if not onnx_path.is_file():
        raise ModelFetchError(
            f"{text}: {name} v{mv.version} has no {ONNX_FILE} in its artifacts ({location})"
        )
    actual = file_sha256(onnx_path)
    if actual != expected:
        raise ModelIntegrityError(
            f"{text}: {onnx_path} has sha256 {actual} but {name} v{mv.version} was registered with {expected}; "
            "the artifact store copy was altered or corrupted. Do not use it; re-register the round or "
            "fetch another version"
        )
    weights = local / WEIGHTS_DIR / WEIGHTS_FILE
    if (
        weights.is_file()
        and mv.tags.get(TAG_WEIGHTS_SHA)
        and file_sha256(weights) != mv.tags[TAG_WEIGHTS_SHA]
    ):
        raise ModelIntegrityError(
            f"{text}: {weights} does not match the registered weights sha256 of {name} v{mv.version}"
        )
    return FetchedModel(onnx_path, weights if weights.is_file() else None, expected, text, str(mv.version))


def read_round_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a round config JSON written by the tracker (helper for tools and tests)."""
    return json.loads(Path(path).read_text())
