"""int8 ONNX against fp32 onnxruntime and torch eager on a CPU workstation, in one run.

Quality: synthesize a small BraTS-like federation, train the default UNet briefly with the kit's
own centralized trainer, export it, quantize it with ``neurofed.models.quantize`` on a few of the
training cases, then segment held-out test cases (never used for calibration) with fp32 and int8
through the full inference path: mask Dice of int8 against fp32, and each model's Dice against
the ground truth.

Speed: the tuned fp32 set-up of ``benchmarks.onnx_vs_torch`` (its own worker processes: torch
eager, onnxruntime with the tuned session) and the int8 model in the same onnxruntime worker, on
a 240x240x155 volume with 96^3 windows, 2 threads, each engine at its best sliding-window batch;
engines alternate over rounds. Then a per-window interleaved comparison in one process (the
steadiest figure on a shared machine), and onnxruntime's per-operator profile of both models.

    .venv/bin/python -m benchmarks.int8_inference            # about 10 minutes on 2 cores
    .venv/bin/python -m benchmarks.int8_inference --quick    # small model, small volume, 1 epoch
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit
from benchmarks.onnx_vs_torch import _run_worker


def cpu_facts() -> dict[str, object]:
    """CPU model and the int8 dot-product extensions onnxruntime's MLAS can use."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "int8_flags": {f: f in flags for f in wanted},
    }


def op_profile(path: str, x, threads: int, reps: int = 2) -> dict[str, object]:
    """onnxruntime's per-operator kernel time for one window (mean of ``reps`` runs)."""
    import onnxruntime as ort

    from neurofed.models.onnx_session import session_options

    so = session_options(threads, profile=True)
    so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "nf-int8-profile")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    sess.run(None, {"image": x})
    for _ in range(reps):
        sess.run(None, {"image": x})
    profile_file = Path(sess.end_profiling())
    events = json.loads(profile_file.read_text())
    profile_file.unlink(missing_ok=True)
    per_op: dict[str, float] = {}
    nodes: dict[str, int] = {}
    runs = [e for e in events if e.get("name") == "model_run"]
    keep_after = runs[1]["ts"] if len(runs) > 1 else 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= keep_after:
            op = e["args"]["op_name"]
            per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1000 / reps
            nodes[e["name"]] = op
    total = sum(per_op.values())
    count: dict[str, int] = {}
    for op in nodes.values():
        count[op] = count.get(op, 0) + 1
    return {
        "ms_per_window": round(total, 1),
        "ops": {
            op: {"ms": round(ms, 1), "share": round(ms / total, 3), "nodes": count.get(op, 0)}
            for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])
        },
    }


def interleaved(models: dict[str, str], weights: str, roi: int, threads: int, batches, reps: int):
    """fp32 onnxruntime, int8 onnxruntime and torch eager, calls alternating window batch by
    window batch in one process, best of ``reps``: seconds per window."""
    import numpy as np
    import torch

    from neurofed.models.checkpoint import load_model
    from neurofed.models.onnx_session import create_session

    torch.set_num_threads(threads)
    model, _ = load_model(weights)
    model.eval()
    engines = {name: create_session(p, threads=threads, device="cpu").run_numpy for name, p in models.items()}
    engines["torch"] = lambda x: model(torch.from_numpy(x))
    out: dict[str, dict[str, float]] = {e: {} for e in engines}
    rng = np.random.default_rng(0)
    for bs in batches:
        x = rng.standard_normal((bs, 1, roi, roi, roi)).astype(np.float32)
        best = dict.fromkeys(engines, float("inf"))
        with torch.inference_mode():
            for fn in engines.values():
                fn(x)
            for _ in range(reps):
                for name, fn in engines.items():
                    t0 = time.perf_counter()
                    fn(x)
                    best[name] = min(best[name], time.perf_counter() - t0)
        for name in engines:
            out[name][str(bs)] = round(best[name] / bs, 4)
    return out


def quality(work: Path, args: argparse.Namespace) -> dict[str, object]:
    """Train briefly, export, quantize on training cases, score on the test split."""
    import nibabel as nib
    import numpy as np

    from neurofed.edge_node.centralized import resolve_cases, train_arm
    from neurofed.edge_node.splits import select
    from neurofed.edge_node.synth import synthesize
    from neurofed.edge_node.training import TrainConfig
    from neurofed.models.checkpoint import load_weights
    from neurofed.models.export import export_onnx
    from neurofed.models.inference import discover_cases
    from neurofed.models.quantize import check_int8_parity, quantize_int8

    data = work / "data"
    t0 = time.perf_counter()
    synthesize(data, sites=2, cases=args.cases, seed=0)
    cases, splits, _ = resolve_cases(data)
    train, test = select(cases, splits, "train"), select(cases, splits, "test")
    metrics = train_arm(
        data,
        work / "arm",
        epochs=args.epochs,
        model_size=args.model_size,
        train_config=TrainConfig(lr=5e-3, batch_size=2, num_samples=2),
        show_progress=False,
    )
    train_s = time.perf_counter() - t0
    weights = work / "arm" / "model.safetensors"
    state, config, _ = load_weights(weights)
    fp32 = export_onnx(state, config, work / "fp32.onnx")

    def folder(name: str, chosen) -> Path:  # a folder of case folders, as a site would have them
        d = work / name
        d.mkdir()
        for c in chosen:
            (d / c.case_id).symlink_to(Path(c.images["flair"]).parent, target_is_directory=True)
        return d

    calib_dir = folder("calibration", train[: args.calibration_cases])
    test_dir = folder("test", test)
    labels = {c.case_id: np.asarray(nib.load(str(c.label)).dataobj) > 0 for c in test}
    # the check runs below with the ground truth too, so the figures come back even on a miss
    res = quantize_int8(fp32, work / "model.int8.onnx", calib_dir, check=False, threads=args.threads)
    report = check_int8_parity(
        fp32,
        res.path,
        discover_cases([test_dir], config.modalities),
        labels=labels,
        threads=args.threads,
        raise_on_failure=False,
    )
    truth_fp32 = [c.truth_dice_fp32 for c in report.cases]
    truth_int8 = [c.truth_dice_int8 for c in report.cases]
    return {
        "weights": str(weights),
        "fp32": str(fp32),
        "int8": str(res.path),
        "config": config,
        "figures": {
            "model": args.model_size,
            "train_cases": len(train),
            "epochs": args.epochs,
            "train_seconds": round(train_s, 1),
            "torch_test_dice_from_trainer": metrics["overall"]["dice"],
            "calibration_cases": res.calibration_cases,
            "calibration_windows": res.calibration_windows,
            "quantized_convs": res.quantized_nodes,
            "quantize_and_check_seconds": round(res.seconds, 1),
            "test_cases": len(report.cases),
            "mask_dice_int8_vs_fp32": {
                "min": round(report.worst, 5),
                "mean": round(report.mean, 5),
                "per_case": {c.case_id: round(c.dice, 5) for c in report.cases},
            },
            "test_dice_fp32_ort": round(float(np.mean(truth_fp32)), 5),
            "test_dice_int8": round(float(np.mean(truth_int8)), 5),
            "test_dice_int8_minus_fp32": round(float(np.mean(truth_int8) - np.mean(truth_fp32)), 5),
        },
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="240,240,155", help="timing volume (default 240,240,155)")
    p.add_argument("--roi", type=int, default=96, help="sliding-window size for timing (default 96)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,2,4", help="sliding-window batch sizes to try")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per engine")
    p.add_argument("--reps", type=int, default=4, help="repetitions per batch, interleaved part")
    p.add_argument("--model-size", default="default", choices=("default", "small", "tiny"))
    p.add_argument("--cases", type=int, default=60, help="synthetic cases (2 sites)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs for the quality part")
    p.add_argument("--calibration-cases", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small model, 128x128x96, 1 epoch, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.model_size, args.size, args.rounds, args.roi = "small", "128,128,96", 1, 64
        args.batches, args.epochs, args.cases, args.reps = "1,2", 1, 16, 2
    batches = [int(b) for b in args.batches.split(",")]
    os.environ.setdefault("PYTHONWARNINGS", "ignore")

    import numpy as np
    import onnxruntime
    import torch

    from neurofed.models.export import read_onnx_metadata, synthetic_scan
    from neurofed.models.quantize import describe_int8

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    size = tuple(int(s) for s in args.size.split(","))
    with tempfile.TemporaryDirectory(prefix="nf-int8-bench-") as tmp:
        work = Path(tmp)
        q = quality(work, args)
        print(f"quality: {json.dumps(q['figures'])}", file=sys.stderr, flush=True)
        vol_path = work / "vol.npy"
        np.save(vol_path, synthetic_scan(size, seed=1))
        models = {"ort-fp32": q["fp32"], "ort-int8": q["int8"]}
        common = [
            f"--weights={q['weights']}",
            f"--volume={vol_path}",
            f"--roi={args.roi}",
            "--overlap=0.25",
            f"--threads={args.threads}",
            f"--batches={args.batches}",
        ]
        engines = ["torch", "ort-fp32", "ort-int8"]
        runs: dict[str, list[dict]] = {e: [] for e in engines}
        for r in range(args.rounds):
            for e in engines if r % 2 == 0 else engines[::-1]:
                worker = "torch" if e == "torch" else "ort"
                extra = [f"--model={models.get(e, q['fp32'])}"]
                if r == 0:
                    extra.append(f"--save-prob={tmp}/{e}.npy")
                runs[e].append(_run_worker(worker, common, extra))
                print(f"round {r} {e}: {runs[e][-1]['seconds']}", file=sys.stderr, flush=True)
        inter = interleaved(models, q["weights"], args.roi, args.threads, batches, args.reps)
        print(f"interleaved: {inter}", file=sys.stderr, flush=True)
        x = synthetic_scan((args.roi,) * 3, seed=2)[None, None]
        profiles = {e: op_profile(models[e], x, args.threads) for e in models}
        probs = {e: np.load(f"{tmp}/{e}.npy") for e in engines}
        int8_note = describe_int8(read_onnx_metadata(q["int8"]))

    thr = q["config"].preprocessing.threshold
    masks = {e: probs[e] > thr for e in engines}

    def dice(a, b) -> float:
        s = int(a.sum()) + int(b.sum())
        return 1.0 if s == 0 else 2 * int((a & b).sum()) / s

    summary = {}
    for e in engines:
        t, bs = min((t, int(b)) for run in runs[e] for b, t in run["seconds"].items())
        summary[e] = {
            "best_seconds": round(t, 3),
            "best_sw_batch": bs,
            "seconds_by_sw_batch": {
                b: round(min(run["seconds"][b] for run in runs[e]), 3) for b in runs[e][0]["seconds"]
            },
            "cpu_seconds_by_sw_batch": {
                b: round(min(run["cpu_seconds"][b] for run in runs[e]), 3) for b in runs[e][0]["seconds"]
            },
            "peak_rss_mb": max(run["peak_rss_mb"] for run in runs[e]),
        }

    def ratio(a: str, b: str) -> float:
        return round(summary[a]["best_seconds"] / summary[b]["best_seconds"], 3)

    def inter_ratio(a: str, b: str) -> float:
        return round(min(inter[a].values()) / min(inter[b].values()), 3)

    result = {
        "volume": list(size),
        "roi": args.roi,
        "overlap": 0.25,
        "threads": args.threads,
        "model": args.model_size,
        "int8_model": int8_note,
        "engines": summary,
        "speedup_int8_over_fp32_ort": ratio("ort-fp32", "ort-int8"),
        "speedup_int8_over_torch": ratio("torch", "ort-int8"),
        "speedup_fp32_ort_over_torch": ratio("torch", "ort-fp32"),
        "interleaved_seconds_per_window": inter,
        "interleaved_speedup_int8_over_fp32_ort": inter_ratio("ort-fp32", "ort-int8"),
        "interleaved_speedup_int8_over_torch": inter_ratio("torch", "ort-int8"),
        "goal_1_5x_over_fp32_ort_met": ratio("ort-fp32", "ort-int8") >= 1.5,
        "timing_volume_mask_dice_int8_vs_fp32": round(dice(masks["ort-int8"], masks["ort-fp32"]), 5),
        "timing_volume_mask_dice_fp32_ort_vs_torch": round(dice(masks["ort-fp32"], masks["torch"]), 5),
        "quality": q["figures"],
        "operator_profile_per_window": profiles,
        "machine": {
            **cpu_facts(),
            "load_avg_1m_at_start": round(load_start, 2),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
    }
    emit("int8_inference_quick" if args.quick else "int8_inference", result)
    return result


if __name__ == "__main__":
    main()
