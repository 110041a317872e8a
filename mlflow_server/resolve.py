"""Where a model for inference comes from: a local ``.onnx``, a neurofed ``.safetensors``
checkpoint (exported on the fly), or an MLflow ``models:/<name>@<alias>`` URI fetched and
sha256-checked through the registry. It lives above ``neurofed.models`` so that the model room
knows nothing of MLflow."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from neurofed.models.inference import ModelUriError, stem

__all__ = ["ResolvedModel", "probe_registry", "resolve_model"]

# How long infer waits for a registry before saying it cannot be reached (seconds).
REGISTRY_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ResolvedModel:
    onnx_path: Path
    source: str
    sha256: str | None = None  # the registered sha256 the file was checked against
    version: str | None = None  # the registry's version number


def probe_registry(uri: str, timeout: float = REGISTRY_TIMEOUT_S) -> None:
    """Fail within ``timeout`` seconds, naming the cause, when an HTTP tracking server cannot be
    reached (MLflow's own client retries for minutes). Other URIs (file, sqlite) pass."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout) as resp:  # noqa: S310 - http(s) only, checked above
            resp.read(64)
    except urllib.error.HTTPError:
        return  # it answered: a proxy without /health still serves the API
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ModelUriError(
            f"the model registry at {uri} cannot be reached ({reason}); is the MLflow server running, "
            "and is --tracking-uri / MLFLOW_TRACKING_URI right?"
        ) from None


def resolve_model(
    model: str, workdir: str | os.PathLike[str], *, tracking_uri: str | None = None
) -> ResolvedModel:
    """A local ``.onnx`` (or neurofed ``.safetensors``, exported on the fly), or an MLflow
    ``models:/<name>@<alias>`` URI fetched and sha256-checked by the registry
    (``tracking_uri`` defaults to ``MLFLOW_TRACKING_URI``)."""
    workdir = Path(workdir)
    if model.startswith(("models:/", "runs:/")):
        try:
            from neurofed.mlflow_server.registry import fetch_model
        except ImportError as exc:
            raise ModelUriError(
                f"{model}: cannot resolve registry URIs here (the MLflow client is unavailable: {exc}); "
                "pass a local .onnx file instead"
            ) from None
        from neurofed.errors import NeurofedError

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
        probe_registry(uri)
        # reachable a moment ago: a few quick retries, not MLflow's minutes of back-off
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        try:
            fetched = fetch_model(model, workdir, tracking_uri=tracking_uri)
        except NeurofedError:
            raise
        except Exception as exc:  # mlflow's own exceptions: unknown name/alias, server unreachable
            raise ModelUriError(
                f"{model}: does not resolve ({exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}); "
                "check the model name and alias and MLFLOW_TRACKING_URI / --tracking-uri"
            ) from None
        return ResolvedModel(
            Path(fetched.onnx_path),
            model,
            getattr(fetched, "sha256_expected", None),
            getattr(fetched, "version", None),
        )
    path = Path(model)
    if not path.is_file():
        raise ModelUriError(
            f"{path}: no such model file; give an .onnx file from `neurofed export`, a .safetensors "
            "checkpoint, or models:/<name>@<alias>"
        )
    if path.name.endswith(".safetensors"):  # a weights file or train's checkpoint.safetensors
        from neurofed.models.checkpoint import load_weights
        from neurofed.models.export import export_onnx

        state, config, _ = load_weights(path)
        onnx_path = export_onnx(state, config, workdir / (stem(path) + ".onnx"))
        return ResolvedModel(onnx_path, str(path))
    return ResolvedModel(path, str(path))
