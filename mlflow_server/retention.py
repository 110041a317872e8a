"""Retention: keep the registry to a bounded number of round versions without ever deleting the
champion: the version records and their tags stay, only the
artifacts of versions that never were champion and hold no alias are deleted."""

from __future__ import annotations

import logging
from typing import Any

from neurofed.mlflow_server.errors import RegistryError
from neurofed.mlflow_server.names import (
    TAG_ARTIFACTS,
    TAG_WAS_CHAMPION,
    _now,
    model_name,
)

log = logging.getLogger(__name__)


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
