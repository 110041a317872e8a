"""int8 ONNX for CPU workstations: static QDQ quantization calibrated on a few local cases, and
its own parity check against the fp32 model on mask Dice.

Calibration sees exactly what inference feeds the network: the cases are found, checked, loaded
and preprocessed by ``models.inference`` (the model's own orientation, spacing and z-score), and
the windows are cut by the same MONAI sliding window (patch size, overlap, padding) that
``neurofed infer`` runs. onnxruntime's ``quantize_static`` then writes a QDQ model: int8 weights
per output channel (symmetric), uint8 activations with ranges from the calibration windows.

What is quantized, and why (default UNet, 96^3 windows, onnxruntime 1.32, 2 cores of an AMD EPYC
with AVX512-VNNI): onnxruntime fuses ``DequantizeLinear -> Conv -> QuantizeLinear`` into
``QLinearConv``, 1.1-17x faster than the fp32 Conv for the 16..256-channel convolutions (the
most at the coarse levels, about even at full resolution), but 5-30x slower for a convolution
with a single input or output channel (the first one on a one-modality scan, the 1-channel output
head). ConvTranspose, InstanceNormalization, Add and Concat have no faster int8 kernel here and
only gain quantize/dequantize passes, so they stay fp32. Hence only ``Conv`` nodes with at least
``min_channels`` input and output channels are quantized; keeping the first and the last layer in
fp32 is also what protects accuracy most.

Calibration method: MinMax (onnxruntime's default). The histogram methods (entropy, percentile)
keep every calibration window's activations in memory, several GB for a handful of 96^3 windows.

The parity check segments each case with both models through the whole inference path and
requires the int8 mask's Dice against the fp32 mask to reach ``min_dice`` (default 0.99) on every
case. A model that falls short is deleted, never left where the fp32 model's user would find it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neurofed.models.config import ModelConfig
from neurofed.models.export import ExportError, read_onnx_config, read_onnx_metadata

PRECISION_KEY = "neurofed.precision"
INT8_PREFIX = "neurofed.int8."
DEFAULT_MIN_DICE = 0.99
DEFAULT_CALIBRATION_CASES = 5
DEFAULT_MIN_CHANNELS = 8
METHODS = ("minmax", "entropy", "percentile")


class QuantizationError(ExportError):
    """The int8 model could not be made: no usable calibration cases, or a model that is not fp32."""


class Int8ParityError(QuantizationError):
    """The int8 model's masks do not agree with the fp32 model's masks well enough."""


# ----------------------------------------------------------------------------------- calibration


def preprocessed_windows(image, config: ModelConfig, *, overlap: float = 0.25) -> list[np.ndarray]:
    """The sliding windows (1, C, *patch) float32 that inference runs on ``image`` (a preprocessed
    channel-first MetaTensor), cut by MONAI's inferer itself so padding and overlap match."""
    import torch
    from monai.inferers import SlidingWindowInferer

    windows: list[np.ndarray] = []
    out_channels = config.out_channels

    def record(x):
        windows.extend(np.ascontiguousarray(w[None].numpy(), dtype=np.float32) for w in x)
        return torch.zeros((x.shape[0], out_channels, *x.shape[2:]), dtype=x.dtype)

    inferer = SlidingWindowInferer(
        roi_size=tuple(config.preprocessing.patch_size), sw_batch_size=1, overlap=overlap, mode="gaussian"
    )
    with torch.inference_mode():
        inferer(image.as_tensor()[None].float(), record)
    return windows


def find_cases(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], config: ModelConfig, *, what: str
):
    """Cases in the kit's layout (a case folder, a site folder of case folders, or files), via
    ``models.inference.discover_cases``; a clear error when there are none."""
    from neurofed.models.inference import InferenceInputError, discover_cases

    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    try:
        cases = discover_cases(items, config.modalities)
    except InferenceInputError as exc:
        raise QuantizationError(f"{what}: {exc}") from None
    if not cases:
        raise QuantizationError(f"{what}: no cases found in {', '.join(map(str, items))}")
    return cases


class WindowReader:
    """onnxruntime's ``CalibrationDataReader`` over the inference windows of some cases, loaded
    one case at a time (a 240x240x155 case is 18 windows of 96^3, 63 MB per modality)."""

    def __init__(self, cases, config: ModelConfig, *, input_name: str = "image", overlap: float = 0.25):
        self.cases = list(cases)
        self.config = config
        self.input_name = input_name
        self.overlap = overlap
        self.windows_seen = 0
        self._it: Iterator[np.ndarray] | None = None

    def _windows(self) -> Iterator[np.ndarray]:
        import torch

        from neurofed.models.inference import Segmenter, load_case

        prep = Segmenter(_NoSession(), self.config)
        for case in self.cases:
            with torch.inference_mode():
                image = prep.preprocess(load_case(case))
            yield from preprocessed_windows(image, self.config, overlap=self.overlap)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._windows()
        x = next(self._it, None)
        if x is None:
            return None
        self.windows_seen += 1
        return {self.input_name: x}

    def rewind(self) -> None:
        self._it = None
        self.windows_seen = 0


class _NoSession:  # Segmenter needs a session only to segment; here it only preprocesses
    def __call__(self, x):  # pragma: no cover - never called
        raise RuntimeError("no session")


# ----------------------------------------------------------------------------------------- parity


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty (they agree that there is no tumour)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


@dataclass(frozen=True)
class CaseDice:
    case_id: str
    dice: float
    fp32_voxels: int
    int8_voxels: int
    truth_dice_fp32: float | None = None
    truth_dice_int8: float | None = None


@dataclass
class Int8ParityReport:
    """Mask Dice of the int8 model against the fp32 model, case by case."""

    min_dice: float
    cases: list[CaseDice] = field(default_factory=list)

    @property
    def worst(self) -> float:
        return min((c.dice for c in self.cases), default=1.0)

    @property
    def mean(self) -> float:
        return float(np.mean([c.dice for c in self.cases])) if self.cases else 1.0

    @property
    def ok(self) -> bool:
        return bool(self.cases) and self.worst >= self.min_dice

    def summary(self) -> str:
        lines = [
            f"{c.case_id}: mask Dice int8 vs fp32 {c.dice:.4f} ({c.int8_voxels} vs {c.fp32_voxels} voxels)"
            for c in self.cases
        ]
        lines.append(
            f"worst {self.worst:.4f}, mean {self.mean:.4f}, required >= {self.min_dice:g} on every case"
        )
        return "\n".join(lines)


def check_int8_parity(
    fp32_path: str | os.PathLike[str],
    int8_path: str | os.PathLike[str],
    cases,
    *,
    min_dice: float = DEFAULT_MIN_DICE,
    threads: int = 0,
    labels: dict[str, np.ndarray] | None = None,
    raise_on_failure: bool = True,
) -> Int8ParityReport:
    """Segment every case with both models (the full ``neurofed infer`` path: preprocessing,
    sliding window, inversion to the input grid, threshold) and compare the masks by Dice.

    ``labels`` (case id -> ground-truth mask on the input grid) adds each model's Dice against
    the truth. Raises ``Int8ParityError`` when a case's Dice is below ``min_dice``."""
    from neurofed.models.inference import Segmenter, load_case
    from neurofed.models.onnx_session import create_session

    config = read_onnx_config(fp32_path)
    fp32 = Segmenter(create_session(fp32_path, threads=threads, device="cpu"), config)
    int8 = Segmenter(create_session(int8_path, threads=threads, device="cpu"), config)
    report = Int8ParityReport(min_dice=min_dice)
    for case in cases:
        loaded = load_case(case)
        ref, got = fp32.segment(loaded).mask, int8.segment(loaded).mask
        truth = None if labels is None else labels.get(case.case_id)
        report.cases.append(
            CaseDice(
                case.case_id,
                mask_dice(ref, got),
                int(ref.sum()),
                int(got.sum()),
                None if truth is None else mask_dice(ref, truth),
                None if truth is None else mask_dice(got, truth),
            )
        )
    if raise_on_failure and not report.ok:
        worst = min(report.cases, key=lambda c: c.dice)
        raise Int8ParityError(
            f"int8 model refused: mask Dice against the fp32 model is {worst.dice:.4f} on case "
            f"{worst.case_id} (required >= {min_dice:g} on each of {len(report.cases)} cases); "
            "calibrate on more or more typical cases, or use the fp32 model"
        )
    return report


# --------------------------------------------------------------------------------------- quantize


@dataclass(frozen=True)
class Int8Result:
    path: Path
    calibration_cases: int
    calibration_windows: int
    quantized_nodes: int
    parity: Int8ParityReport | None
    seconds: float


def is_int8(path: str | os.PathLike[str]) -> bool:
    return read_onnx_metadata(path).get(PRECISION_KEY) == "int8"


def conv_nodes_to_quantize(proto, min_channels: int = DEFAULT_MIN_CHANNELS) -> list[str]:
    """Names of the ``Conv`` nodes with at least ``min_channels`` input and output channels (see
    the module docstring for why the others stay fp32)."""
    shapes = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    names = []
    for node in proto.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in shapes:
            continue
        out_ch, in_per_group = shapes[node.input[1]][:2]
        if min(out_ch, in_per_group) >= min_channels:
            names.append(node.name)
    return names


def quantize_int8(
    fp32_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    calibration_data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    parity_data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    calibration_cases: int = DEFAULT_CALIBRATION_CASES,
    min_dice: float = DEFAULT_MIN_DICE,
    method: str = "minmax",
    min_channels: int = DEFAULT_MIN_CHANNELS,
    threads: int = 0,
    check: bool = True,
    reader: object | None = None,
    metadata: dict[str, str] | None = None,
) -> Int8Result:
    """Write an int8 (QDQ) copy of the fp32 neurofed ONNX model ``fp32_path`` to ``out_path``,
    calibrated on the first ``calibration_cases`` cases of ``calibration_data`` and checked on
    mask Dice against the fp32 model on ``parity_data`` (default: the calibration cases).

    The int8 file keeps the fp32 model's metadata (config, round, source), so ``neurofed infer``
    takes it like any model, and adds ``neurofed.precision = int8`` and ``neurofed.int8.*``
    (calibration cases and windows, method, parity figures, the fp32 file's sha256).
    ``reader`` replaces the calibration windows (an onnxruntime ``CalibrationDataReader``), for
    tests. Raises ``Int8ParityError`` (and writes nothing) when the check fails."""
    import time

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from neurofed.models.checkpoint import file_sha256
    from neurofed.models.export import INPUT_NAME, _save_atomically

    t0 = time.perf_counter()
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if method not in METHODS:
        raise QuantizationError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}")
    if not 0.0 < min_dice <= 1.0:
        raise QuantizationError(f"--min-dice must be in (0, 1], got {min_dice}")
    if calibration_cases < 1:
        raise QuantizationError(f"calibration needs at least one case, got {calibration_cases}")
    config = read_onnx_config(fp32_path)
    props = read_onnx_metadata(fp32_path)
    if props.get(PRECISION_KEY, "fp32") != "fp32":
        raise QuantizationError(f"{fp32_path}: already {props[PRECISION_KEY]}; quantize the fp32 model")
    if out_path.resolve() == fp32_path.resolve():
        raise QuantizationError(f"{out_path}: the int8 model would overwrite its fp32 source")
    calib = find_cases(calibration_data, config, what="calibration data")[:calibration_cases]
    held_out = parity_data is not None
    parity_cases = find_cases(parity_data, config, what="parity data") if held_out else calib
    if reader is None:
        reader = WindowReader(calib, config, input_name=INPUT_NAME)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.int8.tmp")
    try:
        with tempfile.TemporaryDirectory(prefix="neurofed-int8-") as work:
            pre = Path(work) / "pre.onnx"
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
            nodes = conv_nodes_to_quantize(onnx.load(str(pre)), min_channels)
            if not nodes:
                raise QuantizationError(
                    f"{fp32_path}: no convolution has {min_channels}+ input and output channels; "
                    "nothing worth quantizing (lower --min-channels)"
                )
            quantize_static(
                str(pre),
                str(Path(work) / "int8.onnx"),
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["Conv"],
                nodes_to_quantize=nodes,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method={
                    "minmax": CalibrationMethod.MinMax,
                    "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile,
                }[method],
                calibration_providers=["CPUExecutionProvider"],
                extra_options={"CalibTensorRangeSymmetric": False},
            )
            proto = onnx.load(str(Path(work) / "int8.onnx"))
        windows = getattr(reader, "windows_seen", 0)
        props.update(metadata or {})
        props.update(
            {
                PRECISION_KEY: "int8",
                INT8_PREFIX + "format": "QDQ, per-channel int8 weights, uint8 activations",
                INT8_PREFIX + "calibration_cases": str(len(calib)),
                INT8_PREFIX + "calibration_windows": str(windows),
                INT8_PREFIX + "calibration_method": method,
                INT8_PREFIX + "quantized_convs": str(len(nodes)),
                INT8_PREFIX + "fp32_sha256": file_sha256(fp32_path),
            }
        )
        _set_metadata(proto, props)
        _save_atomically(proto, tmp, external_data=False)
        report = None
        if check:
            report = check_int8_parity(fp32_path, tmp, parity_cases, min_dice=min_dice, threads=threads)
            props.update(
                {
                    INT8_PREFIX + "parity_cases": str(len(report.cases)),
                    INT8_PREFIX + "parity_held_out": str(held_out).lower(),
                    INT8_PREFIX + "parity_min_dice": f"{report.worst:.5f}",
                    INT8_PREFIX + "parity_required_dice": f"{min_dice:g}",
                }
            )
            _set_metadata(proto, props)
            _save_atomically(proto, tmp, external_data=False)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return Int8Result(out_path, len(calib), windows, len(nodes), report, time.perf_counter() - t0)


def _set_metadata(proto, props: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(k), str(v)


def describe_int8(props: dict[str, str]) -> str | None:
    """One line for ``neurofed infer``'s header, or None for an fp32 model."""
    if props.get(PRECISION_KEY) != "int8":
        return None
    n = props.get(INT8_PREFIX + "calibration_cases", "?")
    dice = props.get(INT8_PREFIX + "parity_min_dice")
    checked = f", mask Dice vs fp32 >= {dice}" if dice else ""
    return f"int8 (QDQ), calibrated on {n} cases{checked}"
