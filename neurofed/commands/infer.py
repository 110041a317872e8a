"""``neurofed infer``: segment the whole tumour on new scans with an exported (or registered) model.

INPUT is anything `neurofed check-data` reads: a FLAIR NIfTI file, a 4-D image (Decathlon order
FLAIR, T1w, T1gd, T2w), a case folder holding the model's modalities (BraTS 2018-21 names such as
<case>_flair.nii.gz or 2023+ names such as <case>-t2f.nii.gz), a site folder, a federation root
with sites.csv, or a datalist JSON (its training and test entries); see docs/data.md.
The preprocessing (orientation, resampling to the training spacing, z-score over brain voxels)
comes from the model itself. The mask is written on the input's own grid (shape, affine and
orientation) and the tumour volume is printed in millilitres. Beside each mask, <mask>.json holds
the volume, the fraction of the mask outside the brain, connected components, the model (version,
sha256) and warnings: NF-I001 (mostly outside the brain), NF-I002 (volume far above the training
cases' range), NF-I003 (the model records no training volumes). --fail-on-implausible refuses
NF-I001/NF-I002 cases: no mask, the sidecar says why, exit status 1.

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
  neurofed infer BRATS_001.nii.gz --model runs/cds/checkpoint.safetensors -o out/ --fail-on-implausible
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="segment new NIfTI scans with an ONNX model (onnxruntime)",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="file, 4-D image, case/site folder, federation root or datalist",
    )
    p.add_argument(
        "--model",
        required=True,
        help="model.onnx, `neurofed train`'s model.safetensors or checkpoint.safetensors, or models:/<name>@<alias>",
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
    p.add_argument(
        "--fail-on-implausible",
        action="store_true",
        help="refuse a mask mostly outside the brain or far above the training volumes (no mask written, exit 1)",
    )
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

    from neurofed.mlflow_server.resolve import resolve_model
    from neurofed.models.checkpoint import file_sha256
    from neurofed.models.export import read_onnx_config, read_onnx_metadata
    from neurofed.models.inference import InferenceSettings, discover_cases, run_inference
    from neurofed.models.onnx_session import create_session
    from neurofed.models.quantize import describe_int8
    from neurofed.models.sidecar import ModelInfo

    torch.set_num_threads(args.threads or (os.cpu_count() or 1))
    warnings.filterwarnings("ignore", module="monai")
    with tempfile.TemporaryDirectory(prefix="neurofed-infer-") as tmp:
        resolved = resolve_model(args.model, tmp, tracking_uri=args.tracking_uri)
        config = read_onnx_config(resolved.onnx_path)
        cases = discover_cases(args.inputs, config.modalities)  # fail fast, before loading the session
        model_info = ModelInfo(
            source=resolved.source,
            sha256=file_sha256(resolved.onnx_path),
            version=resolved.version,
            config_digest=config.digest(),
            sha256_checked=resolved.sha256 is not None,
        )
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
        label_ml = (config.training_data or {}).get("label_ml")
        if not label_ml:
            print("  the model records no training label volumes: volumes are not checked against them")
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

            failed: list[str] = []

            def report(res) -> None:
                nonlocal total
                total += res.volume_ml
                extra = f", probabilities {res.probability_path}" if res.probability_path else ""
                where = (
                    f"REFUSED (no mask written), see {res.sidecar_path}"
                    if res.refused
                    else str(res.mask_path)
                )
                bar.console.print(
                    f"{res.case_id}: tumour volume {res.volume_ml:.2f} ml -> {where}{extra} ({res.seconds:.1f} s)",
                    highlight=False,
                    soft_wrap=True,
                )
                for w in res.warnings:
                    if w["code"] != "NF-I003":
                        bar.console.print(
                            f"  warning {w['code']} {w['check']}: {w['message']}",
                            highlight=False,
                            soft_wrap=True,
                        )
                if res.refused:
                    failed.append(res.case_id)

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
                model=model_info,
                fail_on_implausible=args.fail_on_implausible,
                on_warning=lambda p: bar.console.print(
                    f"warning {p.line()}", highlight=False, soft_wrap=True
                ),
            )
    if len(cases) > 1:
        print(f"{len(results)} cases segmented, {total:.2f} ml tumour in all")
    if failed:
        print(f"{len(failed)} of {len(cases)} cases failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
