"""ONNX export of the UNet with dynamic batch and spatial axes, and its parity check against torch.

The model config (channels, modalities and their order, orientation, spacing, normalisation, patch
size, threshold) goes into the ONNX metadata under ``neurofed.model_config`` so that inference reads,
not guesses, how to prepare a scan.

Exporter choice (measured here, default UNet, opset 17/18, onnxruntime 1.32 on 2 CPU cores):
both the TorchScript exporter (``dynamo=False``) and the dynamo exporter produce the same
operators for this network (Conv, InstanceNormalization, PRelu, ConvTranspose, Add, Concat);
after onnxruntime's own graph optimisation the sessions run at the same speed (0.27-0.28 s per
96^3 window). The TorchScript exporter takes 1.7 s against 24 s for dynamo and writes one
self-contained file, while dynamo writes weights to a ``.data`` side file unless told otherwise.
So ``dynamo=False`` is the default; ``dynamo=True`` stays available and passes the same checks.
Either way ``optimise_for_inference`` then makes one exact rewrite (PRelu -> LeakyRelu) that
removes 12-14 % of onnxruntime's time per window.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from neurofed.models.config import ModelConfig
from neurofed.models.errors import ModelError
from neurofed.models.unet import build_unet, check_spatial_size, required_multiple

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
CONFIG_KEY = "neurofed.model_config"
# protobuf refuses messages over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024


class ExportError(ModelError):
    """The model could not be exported, or the exported file failed a check."""


class OnnxModelError(ModelError):
    """An ONNX file that is missing, corrupt, or was not written by ``neurofed export``."""


class ParityError(ExportError):
    """The exported ONNX model does not reproduce the torch model within tolerance."""


def _weights_bytes(state_dict: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def export_onnx(
    state_dict: dict[str, torch.Tensor],
    config: ModelConfig,
    path: str | os.PathLike[str],
    *,
    opset: int = OPSET,
    metadata: dict[str, str] | None = None,
    dynamo: bool = False,
    external_data: bool | None = None,
    optimise: bool = True,
) -> Path:
    """Write the UNet as ONNX with dynamic batch and spatial axes, check it, and return its path.

    Weights are inline unless ``external_data`` is true, or (when ``None``) the weights exceed
    1.5 GiB, close to protobuf's 2 GiB limit (the default UNet is 19 MB, so it stays one file).
    External weights go to ``<name>.data`` beside the model. ``optimise`` applies the exact
    rewrites of ``optimise_for_inference`` (PRelu with one slope -> LeakyRelu). ``onnx.checker`` runs its full check
    (shape inference included) on the written file; the file is written atomically.
    """
    import onnx

    if opset < 17:
        raise ExportError(f"opset {opset} is too old: use opset 17 or newer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_unet(config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"weights do not match the model config ({exc})") from None
    model.eval()
    side = required_multiple(config) * 2
    example = torch.zeros(1, config.in_channels, side, side, side)
    tmp = path.with_name(f".{path.name}.export.tmp")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if dynamo:
                _export_dynamo(model, example, tmp, opset, required_multiple(config))
            else:
                axes = {0: "batch", 2: "x", 3: "y", 4: "z"}
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp),
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
                    opset_version=opset,
                    dynamo=False,
                )
        proto = onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
        Path(str(tmp) + ".data").unlink(missing_ok=True)
    if optimise:
        optimise_for_inference(proto)
    props = {CONFIG_KEY: config.to_json(), **(metadata or {})}
    existing = {p.key: p for p in proto.metadata_props}
    for k, v in props.items():
        entry = existing.get(k) or proto.metadata_props.add()
        entry.key, entry.value = str(k), str(v)
    if external_data is None:
        external_data = _weights_bytes(state_dict) > EXTERNAL_DATA_THRESHOLD
    _save_atomically(proto, path, external_data)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{path}: exported model fails onnx.checker ({exc})") from None
    return path


def _export_dynamo(model: torch.nn.Module, example: torch.Tensor, dst: Path, opset: int, m: int) -> None:
    dim = torch.export.Dim
    shapes = (
        {
            0: dim("batch", min=1, max=1024),
            2: dim("x", min=m, max=4096),
            3: dim("y", min=m, max=4096),
            4: dim("z", min=m, max=4096),
        },
    )
    torch.onnx.export(
        model,
        (example,),
        str(dst),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=shapes,
        opset_version=max(opset, 18),
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def _save_atomically(proto, path: Path, external_data: bool) -> None:
    import onnx

    tmp = path.with_name(f".{path.name}.tmp")
    data_name = path.name + ".data"
    try:
        if external_data:
            # The data file's name is recorded in the model, so write it under its final name.
            Path(path.parent / data_name).unlink(missing_ok=True)
            onnx.save_model(
                proto,
                str(tmp),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
        else:
            onnx.save_model(proto, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ONNX file's metadata properties, without loading external weights."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"{path}: no such ONNX model file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise OnnxModelError(f"{path}: not a readable ONNX model ({exc.__class__.__name__}: {exc})") from None
    if not proto.graph.node:
        raise OnnxModelError(f"{path}: not a readable ONNX model (empty graph)")
    return {p.key: p.value for p in proto.metadata_props}


def read_onnx_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The ``ModelConfig`` an exported model carries; raises ``OnnxModelError`` if it has none."""
    props = read_onnx_metadata(path)
    if CONFIG_KEY not in props:
        raise OnnxModelError(
            f"{path}: ONNX file has no {CONFIG_KEY!r} metadata, so its preprocessing is unknown; "
            "export it with `neurofed export`"
        )
    try:
        return ModelConfig.from_json(props[CONFIG_KEY])
    except (ValueError, TypeError) as exc:
        raise OnnxModelError(f"{path}: model config in the ONNX metadata is invalid ({exc})") from None


# ------------------------------------------------------------------------------ graph clean-up


def optimise_for_inference(proto) -> int:
    """Rewrite ``PRelu`` with one constant slope (MONAI's default ``Act.PRELU``) as the
    mathematically identical ``LeakyRelu(alpha=slope)``, then drop constants left unused.

    Why: onnxruntime's CPU PRelu is a generic broadcasting kernel; it took 14-15 % of the default
    UNet's time per 96^3 window here, while the vectorised LeakyRelu takes well under 1 %. The
    outputs are bit-identical (same formula, same float32 slope). Returns the number of rewrites.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:  # Constant nodes, and Identity chains the TorchScript exporter adds
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
        elif node.op_type == "Identity" and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]
    rewrites = 0
    nodes = []
    for node in graph.node:
        slope = consts.get(node.input[1]) if node.op_type == "PRelu" and len(node.input) == 2 else None
        if slope is not None and slope.size == 1:
            nodes.append(
                helper.make_node(
                    "LeakyRelu",
                    [node.input[0]],
                    list(node.output),
                    name=f"{node.name}_as_leaky",
                    alpha=float(slope.reshape(-1)[0]),
                )
            )
            rewrites += 1
        else:
            nodes.append(node)
    # drop Constant/Identity nodes and initializers nobody reads any more
    keep_outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in nodes for i in n.input} | keep_outputs
        pruned = [
            n for n in nodes if n.op_type not in ("Constant", "Identity") or any(o in used for o in n.output)
        ]
        if len(pruned) == len(nodes):
            break
        nodes = pruned
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input} | keep_outputs
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return rewrites


# ---------------------------------------------------------------------------------------- parity


@dataclass(frozen=True)
class ParityCase:
    """One comparison: an input kind at one spatial size."""

    input: str
    size: tuple[int, int, int]
    max_abs_diff: float
    mask_mismatches: int
    mismatches_outside_margin: int

    def ok(self, atol: float) -> bool:
        return self.max_abs_diff <= atol and self.mismatches_outside_margin == 0


@dataclass
class ParityReport:
    """Torch vs onnxruntime on random input and on a synthetic scan at several spatial sizes."""

    atol: float
    margin: float
    threshold: float
    cases: list[ParityCase] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok(self.atol) for c in self.cases)

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.cases), default=0.0)

    def summary(self) -> str:
        lines = [
            f"{c.input:>9} {'x'.join(map(str, c.size)):>12}: max |logit diff| {c.max_abs_diff:.2e}, "
            f"mask differs at {c.mask_mismatches} voxels ({c.mismatches_outside_margin} outside the "
            f"+-{self.margin:g} band around {self.threshold:g})"
            for c in self.cases
        ]
        return "\n".join(lines)


def synthetic_scan(size: Sequence[int], seed: int = 0) -> np.ndarray:
    """A z-scored brain-like volume: an ellipsoid of tissue with smooth texture, a bright blob
    (the tumour) and zero background, the value range the network sees after preprocessing."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, int(s), dtype=np.float32) for s in size], indexing="ij")
    r2 = sum(g**2 for g in grids)
    brain = r2 < 0.85
    vol = 1.0 + 0.2 * np.sin(3 * grids[0]) * np.cos(2 * grids[1]) + 0.05 * rng.standard_normal(r2.shape)
    centre = rng.uniform(-0.3, 0.3, size=3)
    blob = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)) < 0.08
    vol = np.where(blob, vol + 1.5, vol) * brain
    vals = vol[brain]
    vol = np.where(brain, (vol - vals.mean()) / (vals.std() + 1e-8), 0.0)
    return vol.astype(np.float32)


def default_parity_sizes(config: ModelConfig) -> list[tuple[int, int, int]]:
    """The model's patch size plus a non-cubic size: sizes other than the export example catch
    exports that froze a shape or dropped a padding step."""
    m = required_multiple(config)
    patch = tuple(int(s) for s in config.preprocessing.patch_size)
    odd = (2 * m, 3 * m, 4 * m)
    sizes = [patch, odd]
    return list(dict.fromkeys(sizes))


def check_parity(
    weights: Mapping[str, torch.Tensor] | torch.nn.Module,
    config: ModelConfig,
    onnx_path: str | os.PathLike[str],
    *,
    sizes: Sequence[Sequence[int]] | None = None,
    atol: float = 1e-3,
    margin: float = 1e-3,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> ParityReport:
    """Run torch and onnxruntime side by side on random input and on a synthetic scan at each
    size: logits must agree within ``atol`` and masks (sigmoid > threshold) must be identical
    except at voxels whose probability lies within ``margin`` of the threshold.

    Raises ``ParityError`` with the per-size figures when ``raise_on_failure`` and a check fails.
    """
    from neurofed.models.onnx_session import create_session

    if isinstance(weights, torch.nn.Module):
        model = weights
    else:
        model = build_unet(config)
        model.load_state_dict(dict(weights), strict=True)
    model.eval()
    session = create_session(onnx_path, threads=1, device="cpu")
    thr = float(config.preprocessing.threshold)
    logit_thr = math.log(thr / (1 - thr))
    report = ParityReport(atol=atol, margin=margin, threshold=thr)
    sizes = [tuple(int(s) for s in sz) for sz in (sizes or default_parity_sizes(config))]
    rng = np.random.default_rng(seed)
    for size in sizes:
        check_spatial_size(size, config, where=f"parity size {size}")
        inputs = {
            "random": rng.standard_normal((1, config.in_channels, *size)).astype(np.float32),
            "synthetic": np.stack([synthetic_scan(size, seed=seed + c) for c in range(config.in_channels)])[
                None
            ],
        }
        for kind, x in inputs.items():
            with torch.inference_mode():
                ref = model(torch.from_numpy(x)).numpy()
            got = session.run_numpy(x)
            if got.shape != ref.shape:
                raise ParityError(
                    f"{onnx_path}: ONNX output shape {got.shape} differs from torch {ref.shape} at input "
                    f"size {size}; the export lost a dynamic axis or a padding step"
                )
            diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
            differ = (got > logit_thr) != (ref > logit_thr)
            prob = 1.0 / (1.0 + np.exp(-ref.astype(np.float64)))
            outside = differ & (np.abs(prob - thr) > margin)
            report.cases.append(
                ParityCase(kind, size, diff, int(differ.sum()), int(outside.sum()))  # type: ignore[arg-type]
            )
    if raise_on_failure and not report.ok:
        raise ParityError(
            f"{onnx_path}: ONNX model does not match torch (logits within {atol:g}, masks equal outside "
            f"+-{margin:g} of the threshold):\n{report.summary()}"
        )
    return report
