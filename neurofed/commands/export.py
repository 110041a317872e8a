"""``neurofed export``: turn a weights checkpoint into a checked ONNX model for inference.

The ONNX file has dynamic batch and spatial axes and carries the model config (modalities and
their order, orientation, spacing, normalisation, patch size, threshold) in its metadata. Before
the command reports success the file passes onnx.checker's full check and matches the torch model
on random input and on a synthetic scan at several spatial sizes.
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
        "--checkpoint", required=True, help="neurofed .safetensors weights, or models:/<name>@<alias>"
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
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import os
    import tempfile

    import torch

    from neurofed.models.checkpoint import load_weights
    from neurofed.models.export import check_parity, export_onnx

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
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
