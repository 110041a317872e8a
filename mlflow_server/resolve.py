"""Where a model for inference comes from: a local ``.onnx``, a neurofed ``.safetensors``
checkpoint (exported on the fly), or an MLflow ``models:/<name>@<alias>`` URI fetched and
sha256-checked through the registry. It lives above ``neurofed.models`` so that the model room
knows nothing of MLflow."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from neurofed.models.inference import ModelUriError, stem

__all__ = ["ResolvedModel", "resolve_model"]


@dataclass(frozen=True)
class ResolvedModel:
    onnx_path: Path
    source: str
    sha256: str | None = None


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

        try:
            fetched = fetch_model(model, workdir, tracking_uri=tracking_uri)
        except NeurofedError:
            raise
        except Exception as exc:  # mlflow's own exceptions: unknown name/alias, server unreachable
            raise ModelUriError(
                f"{model}: does not resolve ({exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}); "
                "check the model name and alias and MLFLOW_TRACKING_URI / --tracking-uri"
            ) from None
        return ResolvedModel(Path(fetched.onnx_path), model, getattr(fetched, "sha256_expected", None))
    path = Path(model)
    if not path.is_file():
        raise ModelUriError(
            f"{path}: no such model file; give an .onnx file from `neurofed export`, a .safetensors "
            "checkpoint, or models:/<name>@<alias>"
        )
    if path.name.endswith(".safetensors"):
        from neurofed.models.checkpoint import load_weights
        from neurofed.models.export import export_onnx

        state, config, _ = load_weights(path)
        onnx_path = export_onnx(state, config, workdir / (stem(path) + ".onnx"))
        return ResolvedModel(onnx_path, str(path))
    return ResolvedModel(path, str(path))
