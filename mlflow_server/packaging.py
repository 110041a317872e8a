"""The model folder registered for each round: MLflow's ONNX flavor with a signature that keeps
batch and spatial dimensions free (-1), a small input example, explicit pip requirements and the
CPU execution provider unless CUDA is asked for, plus the safetensors weights beside it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from neurofed.mlflow_server.errors import RegistryError
from neurofed.mlflow_server.names import (
    ONNX_FILE,
    WEIGHTS_DIR,
    WEIGHTS_FILE,
)


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
