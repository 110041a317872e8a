"""Fetching a registered model for inference: resolve ``models:/NAME@alias`` (or a version),
download its folder, and check the ONNX file against the sha256 recorded at registration."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neurofed.mlflow_server.errors import ModelFetchError, ModelIntegrityError
from neurofed.mlflow_server.names import (
    CHAMPION,
    LATEST_ALIAS,
    ONNX_FILE,
    TAG_ARTIFACTS,
    TAG_ONNX_SHA,
    TAG_WEIGHTS_SHA,
    WEIGHTS_DIR,
    WEIGHTS_FILE,
)


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
