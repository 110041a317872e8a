"""``neurofed export``: turn a weights checkpoint into a checked ONNX model for inference.

The ONNX file has dynamic batch and spatial axes and carries the model config (modalities and
their order, orientation, spacing, normalisation, patch size, threshold) in its metadata. Before
the command reports success the file passes onnx.checker's full check and matches the torch model
on random input and on a synthetic scan at several spatial sizes.

With --int8 the output is an int8 (QDQ) model for CPU workstations, calibrated on a few local
cases (--calibration-data: a case folder, or a folder of case folders, as `neurofed infer` takes
them) and refused unless its tumour masks agree with the fp32 model's (Dice >= --min-dice on each
case, default 0.99). See docs/int8.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "export"
EXAMPLE = """\
examples:
  neurofed export --checkpoint runs/global_round_010.safetensors -o model.onnx
  neurofed export --checkpoint models:/demo-unet@champion -o champion.onnx --tracking-uri http://mlflow:5000
  neurofed export --checkpoint w.safetensors -o model.onnx --parity-sizes 64x64x64,96x128x160
  neurofed export --checkpoint models:/demo-unet@champion -o champion.int8.onnx --int8 --calibration-data site-01/
  neurofed export --checkpoint w.safetensors -o w.int8.onnx --int8 --calibration-data cases/ --parity-data held-out/
  neurofed export --checkpoint model.onnx -o model.int8.onnx --int8 --calibration-data cases/
"""


def _sizes(text: str) -> list[tuple[int, int, int]]:
    out = []
    for part in text.split(","):
        dims = part.lower().split("x")
        if len(dims) != 3 or not all(d.strip().isdigit() for d in dims):
            raise argparse.ArgumentTypeError(f"{part!r} is not a size like 64x64x64")
        out.append(tuple(int(d) for d in dims))
    return out  # type: ignore[return-value]


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="export a checkpoint to ONNX (checked against torch)",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="neurofed .safetensors weights, or models:/<name>@<alias>; with --int8 also an fp32 .onnx",
    )
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or newer (default 17)")
    p.add_argument(
        "--dynamo", action="store_true", help="use torch's dynamo exporter (slower to export, same graph)"
    )
    p.add_argument("--external-data", action="store_true", help="write the weights to <output>.data")
    p.add_argument(
        "--parity-sizes", type=_sizes, help="spatial sizes for the parity check, e.g. 64x64x64,64x96x128"
    )
    p.add_argument("--no-parity", action="store_true", help="skip the torch-vs-onnxruntime check")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (default: MLFLOW_TRACKING_URI)")
    q = p.add_argument_group("int8 for CPU workstations")
    q.add_argument("--int8", action="store_true", help="write an int8 (QDQ) model calibrated on local cases")
    q.add_argument("--calibration-data", metavar="DIR", help="case folder or folder of cases to calibrate on")
    q.add_argument(
        "--calibration-cases",
        type=int,
        default=5,
        metavar="N",
        help="calibrate on the first N cases (default 5)",
    )
    q.add_argument(
        "--parity-data",
        metavar="DIR",
        help="held-out cases for the Dice check (default: the calibration cases)",
    )
    q.add_argument(
        "--min-dice",
        type=float,
        default=0.99,
        help="required mask Dice of int8 against fp32 on every case (default 0.99)",
    )
    q.add_argument(
        "--calibration-method",
        choices=("minmax", "entropy", "percentile"),
        default="minmax",
        help="activation ranges (default minmax; the others hold every window's activations in memory)",
    )
    q.add_argument("--threads", type=int, default=0, help="threads for the Dice check (0: one per core)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import os
    import tempfile

    import torch

    from neurofed.models.checkpoint import load_weights
    from neurofed.models.export import check_parity, export_onnx

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.int8 or args.calibration_data:
        return run_int8(args)
    with tempfile.TemporaryDirectory(prefix="neurofed-export-") as tmp:
        source = args.checkpoint
        if source.startswith(("models:/", "runs:/")):
            weights = _fetch_weights(source, Path(tmp), args.tracking_uri)
        else:
            weights = Path(source)
        state, config, meta = load_weights(weights)
        extra = {k: v for k, v in meta.items() if k.startswith("neurofed.") and k != "neurofed.model_config"}
        extra["neurofed.source"] = str(source)
        path = export_onnx(
            state,
            config,
            args.output,
            opset=args.opset,
            metadata=extra,
            dynamo=args.dynamo,
            external_data=True if args.external_data else None,
        )
    print(
        f"wrote {path} (opset {max(args.opset, 18) if args.dynamo else args.opset}, dynamic batch and spatial axes)"
    )
    if not args.no_parity:
        report = check_parity(state, config, path, sizes=args.parity_sizes)
        print("parity with torch:")
        print(report.summary())
    return 0


def run_int8(args: argparse.Namespace) -> int:
    """fp32 model (a given .onnx, the registry's sha256-checked ONNX, or a fresh export of the
    weights checked against torch) -> int8 model checked against it on mask Dice."""
    import tempfile

    from neurofed.models.export import ExportError
    from neurofed.models.quantize import quantize_int8

    if not args.int8:
        raise ExportError("--calibration-data is for --int8 exports; add --int8")
    if not args.calibration_data:
        raise ExportError("--int8 needs --calibration-data DIR: a few local cases to calibrate on")
    with tempfile.TemporaryDirectory(prefix="neurofed-int8-") as tmp:
        source = args.checkpoint
        if source.startswith(("models:/", "runs:/")):
            fp32 = _fetch_onnx(source, Path(tmp), args.tracking_uri)
        elif source.endswith(".onnx"):
            fp32 = Path(source)
        else:
            fp32 = _export_fp32(args, Path(source), Path(tmp) / "fp32.onnx")
        print(f"quantizing {source} on up to {args.calibration_cases} cases of {args.calibration_data}")
        result = quantize_int8(
            fp32,
            args.output,
            args.calibration_data,
            parity_data=args.parity_data,
            calibration_cases=args.calibration_cases,
            min_dice=args.min_dice,
            method=args.calibration_method,
            threads=args.threads,
            metadata={"neurofed.source": str(source)},
        )
    print(
        f"wrote {result.path} (int8 QDQ: {result.quantized_nodes} convolutions int8, calibrated on "
        f"{result.calibration_cases} cases / {result.calibration_windows} windows, {result.seconds:.0f} s)"
    )
    if result.parity is not None:
        held = "held-out cases" if args.parity_data else "the calibration cases"
        print(f"mask Dice against the fp32 model on {held}:")
        print(result.parity.summary())
    return 0


def _export_fp32(args: argparse.Namespace, weights: Path, dst: Path) -> Path:
    from neurofed.models.checkpoint import load_weights
    from neurofed.models.export import check_parity, export_onnx

    state, config, meta = load_weights(weights)
    extra = {k: v for k, v in meta.items() if k.startswith("neurofed.") and k != "neurofed.model_config"}
    path = export_onnx(state, config, dst, opset=args.opset, metadata=extra, dynamo=args.dynamo)
    if not args.no_parity:
        check_parity(state, config, path, sizes=args.parity_sizes)
        print("fp32 export matches torch")
    return path


def _fetch_onnx(uri: str, dst: Path, tracking_uri: str | None) -> Path:
    """The registered ONNX file itself (sha256-checked by the registry), not a re-export."""
    from neurofed.mlflow_server.resolve import resolve_model

    return Path(resolve_model(uri, dst, tracking_uri=tracking_uri).onnx_path)


def _fetch_weights(uri: str, dst: Path, tracking_uri: str | None) -> Path:
    from neurofed.models.inference import ModelUriError

    try:
        from neurofed.mlflow_server.registry import fetch_model
    except ImportError as exc:
        raise ModelUriError(f"{uri}: registry URIs need mlflow_server.registry ({exc})") from None
    from neurofed.errors import NeurofedError

    try:
        fetched = fetch_model(uri, dst, tracking_uri=tracking_uri)
    except NeurofedError:
        raise
    except Exception as exc:
        raise ModelUriError(f"{uri}: does not resolve ({exc.__class__.__name__}: {exc})") from None
    if getattr(fetched, "weights_path", None) is None:
        raise ModelUriError(
            f"{uri}: the registered model has no weights file, only ONNX ({fetched.onnx_path})"
        )
    return Path(fetched.weights_path)
