"""``neurofed infer``: segment the whole tumour on new scans with an exported (or registered) model.

INPUT is a FLAIR NIfTI file, a case folder holding the model's modalities (BraTS 2018-21 names
such as <case>_flair.nii.gz or 2023 names such as <case>-t2f.nii.gz), or a folder of case folders.
The preprocessing (orientation, resampling to the training spacing, z-score over brain voxels)
comes from the model itself. The mask is written on the input's own grid (shape, affine and
orientation) and the tumour volume is printed in millilitres.

Input requirements, as BraTS provides them: skull-stripped, modalities co-registered to one grid.
From DICOM: convert with dcm2niix, co-register to the FLAIR (or SRI24 atlas) and skull-strip
(e.g. HD-BET) before running this.
"""

from __future__ import annotations

import argparse

NAME = "infer"
EXAMPLE = """\
examples:
  neurofed infer scan_flair.nii.gz --model model.onnx -o mask.nii.gz
  neurofed infer BraTS-GLI-00001-000/ --model models:/demo-unet@champion -o out/ --probabilities
  neurofed infer cases/ --model model.onnx -o masks/ --sw-batch 2 --threads 4
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="segment new NIfTI scans with an ONNX model (onnxruntime)",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="FLAIR file, case folder, or folder of cases")
    p.add_argument(
        "--model", required=True, help="model.onnx, a neurofed .safetensors, or models:/<name>@<alias>"
    )
    p.add_argument("-o", "--output", required=True, help="mask file (one case) or folder (several)")
    p.add_argument("--probabilities", action="store_true", help="also write the tumour probability map")
    p.add_argument("--sw-batch", type=int, default=1, help="sliding windows per onnxruntime call (default 1)")
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (default 0.25)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: one per core)")
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: CUDA if present"
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (default: MLFLOW_TRACKING_URI)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import os
    import sys
    import tempfile
    import warnings

    from neurofed.models.errors import ModelError

    if args.sw_batch < 1:
        raise ModelError(f"--sw-batch must be 1 or more, got {args.sw_batch}")
    if not 0 <= args.overlap < 1:
        raise ModelError(f"--overlap must be in [0, 1), got {args.overlap}")
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from neurofed.models.export import read_onnx_config, read_onnx_metadata
    from neurofed.mlflow_server.resolve import resolve_model
    from neurofed.models.inference import InferenceSettings, discover_cases, run_inference
    from neurofed.models.onnx_session import create_session
    from neurofed.models.quantize import describe_int8

    torch.set_num_threads(args.threads or (os.cpu_count() or 1))
    warnings.filterwarnings("ignore", module="monai")
    with tempfile.TemporaryDirectory(prefix="neurofed-infer-") as tmp:
        resolved = resolve_model(args.model, tmp, tracking_uri=args.tracking_uri)
        config = read_onnx_config(resolved.onnx_path)
        cases = discover_cases(args.inputs, config.modalities)  # fail fast, before loading the session
        session = create_session(resolved.onnx_path, threads=args.threads, device=args.device)
        pre = config.preprocessing
        checked = " (sha256 checked against the registry)" if resolved.sha256 else ""
        print(f"model: {resolved.source}{checked}")
        print(
            f"  modalities {', '.join(pre.modalities)}; {pre.orientation}, spacing {pre.spacing} mm, "
            f"{pre.normalisation}, patch {'x'.join(map(str, pre.patch_size))}, threshold {pre.threshold}"
        )
        precision = describe_int8(read_onnx_metadata(resolved.onnx_path))
        if precision:
            print(f"  {precision}")
        print(f"  running on {session.describe()}")
        settings = InferenceSettings(
            sw_batch_size=args.sw_batch, overlap=args.overlap, probabilities=args.probabilities
        )
        total = 0.0
        with Progress(
            TextColumn("segmenting"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=True,
            disable=not sys.stderr.isatty(),
        ) as bar:
            task = bar.add_task("cases", total=len(cases))

            def report(res) -> None:
                nonlocal total
                total += res.volume_ml
                extra = f", probabilities {res.probability_path}" if res.probability_path else ""
                bar.console.print(
                    f"{res.case_id}: tumour volume {res.volume_ml:.2f} ml -> {res.mask_path}{extra} "
                    f"({res.seconds:.1f} s)",
                    highlight=False,
                    soft_wrap=True,
                )

            failed: list[str] = []

            def skip(case, exc) -> None:
                failed.append(case.case_id)
                bar.console.print(f"{case.case_id}: skipped: {exc}", highlight=False, soft_wrap=True)

            results = run_inference(
                args.inputs,
                resolved.onnx_path,
                args.output,
                settings=settings,
                session=session,
                on_case=report,
                progress=lambda done, _n: bar.update(task, completed=done),
                on_error=skip if len(cases) > 1 else None,
            )
    if len(cases) > 1:
        print(f"{len(results)} cases segmented, {total:.2f} ml tumour in all")
    if failed:
        print(f"{len(failed)} of {len(cases)} cases failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
