"""onnxruntime against torch eager on a full 240x240x155 volume, same model, same sliding window.

Each engine runs in its own process (so peak memory is its own), with the same thread count for
torch and onnxruntime, at each of several sliding-window batch sizes; engines alternate over
rounds so a load spike from other work on the machine hits both. The figure is the ratio of each
engine's best time (its best batch size, best round), plus the masks' agreement.

    .venv/bin/python -m benchmarks.onnx_vs_torch            # default UNet, 96^3 windows, 2 threads
    .venv/bin/python -m benchmarks.onnx_vs_torch --quick    # small model, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit

ENGINES = ("torch", "ort", "ort-plain", "interleaved")


def _rss_mb(field: str = "VmRSS") -> float:
    """Resident (VmRSS) or peak resident (VmHWM) memory of this process. Not ru_maxrss: Linux
    carries it over fork+exec from the parent, which holds torch too."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def interleaved(args: argparse.Namespace) -> None:
    """Both engines in one process, calls alternating window batch by window batch, best of
    several: on a machine shared with other work this is the steadiest comparison."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from neurofed.models.checkpoint import load_model
    from neurofed.models.onnx_session import create_session

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.weights)
    model.eval()
    tuned = create_session(args.model, threads=args.threads, device="cpu")
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    plain = ort.InferenceSession(args.plain_model, so, providers=["CPUExecutionProvider"])
    engines = {
        "torch": lambda x: model(torch.from_numpy(x)),
        "ort": tuned.run_numpy,
        "ort-plain": lambda x: plain.run(None, {"image": x})[0],
    }
    out: dict[str, dict[str, float]] = {e: {} for e in engines}
    rng = np.random.default_rng(0)
    for bs in args.batches:
        x = rng.standard_normal((bs, 1, args.roi, args.roi, args.roi)).astype(np.float32)
        best = dict.fromkeys(engines, float("inf"))
        with torch.inference_mode():
            for fn in engines.values():
                fn(x)  # warm-up
            for _ in range(args.reps):
                for name, fn in engines.items():
                    t0 = time.perf_counter()
                    fn(x)
                    best[name] = min(best[name], time.perf_counter() - t0)
        for name in engines:
            out[name][str(bs)] = best[name] / bs
    print(json.dumps({"engine": "interleaved", "seconds_per_window": out}))


def worker(args: argparse.Namespace) -> None:
    """Time one engine over the batch sizes; print JSON."""
    if args.engine == "interleaved":
        interleaved(args)
        return
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import numpy as np
    import torch
    from monai.inferers import SlidingWindowInferer

    torch.set_num_threads(args.threads)
    volume = torch.from_numpy(np.load(args.volume))[None, None]
    rss_start = _rss_mb()
    if args.engine == "torch":
        from neurofed.models.checkpoint import load_model

        model, _ = load_model(args.weights)
        model.eval()
        predictor = model
    elif args.engine == "ort":
        from neurofed.models.onnx_session import create_session

        predictor = create_session(args.model, threads=args.threads, device="cpu")
    else:  # a default session, as a plain export would be run
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(args.plain_model, so, providers=["CPUExecutionProvider"])

        def predictor(x):
            return torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])

    rss_loaded = _rss_mb()
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}
    roi = (args.roi,) * 3
    prob = None
    for bs in args.batches:
        inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=bs, overlap=args.overlap, mode="gaussian")
        with torch.inference_mode():
            predictor(torch.zeros(bs, 1, *roi))  # warm-up (allocations, kernel selection)
            t0, c0 = time.perf_counter(), time.process_time()
            logits = inferer(volume, predictor)
            times[str(bs)] = time.perf_counter() - t0
            cpu[str(bs)] = time.process_time() - c0
        if prob is None:
            prob = torch.sigmoid(logits)[0, 0].numpy()
    if args.save_prob:
        np.save(args.save_prob, prob)
    peak = _rss_mb("VmHWM")
    print(
        json.dumps(
            {
                "engine": args.engine,
                "seconds": times,
                "cpu_seconds": cpu,
                "rss_before_model_mb": round(rss_start, 1),
                "rss_after_model_mb": round(rss_loaded, 1),
                "peak_rss_mb": round(peak, 1),
            }
        )
    )


def _run_worker(engine: str, common: list[str], extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.onnx_vs_torch", "--worker", engine, *common, *extra]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode:
        raise RuntimeError(f"{engine} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=ENGINES, dest="engine", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--plain-model", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--volume", help=argparse.SUPPRESS)
    p.add_argument("--save-prob", help=argparse.SUPPRESS)
    p.add_argument("--size", default="240,240,155", help="volume size (default 240,240,155)")
    p.add_argument("--roi", type=int, default=96, help="sliding-window size (default 96)")
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,2,4", help="sliding-window batch sizes to try")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per engine")
    p.add_argument("--reps", type=int, default=4, help="repetitions per batch size, interleaved part")
    p.add_argument(
        "--plain",
        action="store_true",
        help="also time the export without graph rewrites in a default onnxruntime session",
    )
    p.add_argument("--model-size", default="default", choices=("default", "small", "tiny"))
    p.add_argument("--quick", action="store_true", help="small model, 128x128x96, one round")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    if args.engine:
        worker(args)
        return {}
    if args.quick:
        args.model_size, args.size, args.rounds, args.roi, args.batches = "small", "128,128,96", 1, 64, [1, 2]

    import numpy as np
    import onnxruntime
    import torch

    from neurofed.models.checkpoint import save_weights
    from neurofed.models.config import preset
    from neurofed.models.export import synthetic_scan
    from neurofed.models.unet import build_unet, count_parameters

    load_start = os.getloadavg()[0]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    size = tuple(int(s) for s in args.size.split(","))
    config = preset(args.model_size, patch_size=(args.roi,) * 3)
    model = build_unet(config)
    engines = ["torch", "ort"] + (["ort-plain"] if args.plain else [])
    with tempfile.TemporaryDirectory() as tmp:
        from neurofed.models.export import export_onnx

        weights = save_weights(Path(tmp) / "w.safetensors", model.state_dict(), config)
        t0 = time.perf_counter()
        onnx_path = export_onnx(model.state_dict(), config, Path(tmp) / "m.onnx")
        export_s = time.perf_counter() - t0
        plain_path = export_onnx(model.state_dict(), config, Path(tmp) / "plain.onnx", optimise=False)
        vol_path = Path(tmp) / "vol.npy"
        np.save(vol_path, synthetic_scan(size, seed=1))
        common = [
            f"--model={onnx_path}",
            f"--plain-model={plain_path}",
            f"--weights={weights}",
            f"--volume={vol_path}",
            f"--roi={args.roi}",
            f"--overlap={args.overlap}",
            f"--threads={args.threads}",
            f"--batches={','.join(map(str, args.batches))}",
        ]
        runs: dict[str, list[dict]] = {e: [] for e in engines}
        for r in range(args.rounds):
            order = engines if r % 2 == 0 else engines[::-1]
            for e in order:
                extra = [f"--save-prob={tmp}/{e}.npy"] if r == 0 else []
                runs[e].append(_run_worker(e, common, extra))
                print(f"round {r} {e}: {runs[e][-1]['seconds']}", file=sys.stderr)
        inter = _run_worker("interleaved", common, [f"--reps={args.reps}"])["seconds_per_window"]
        print(f"interleaved: {inter}", file=sys.stderr)
        prob_t, prob_o = np.load(f"{tmp}/torch.npy"), np.load(f"{tmp}/ort.npy")
    thr = config.preprocessing.threshold
    differ = (prob_t > thr) != (prob_o > thr)
    outside = differ & (np.abs(prob_t - thr) > 1e-3)

    def best(engine: str) -> tuple[float, int]:
        cands = [(t, int(bs)) for run in runs[engine] for bs, t in run["seconds"].items()]
        return min(cands)

    summary = {}
    for e in engines:
        t, bs = best(e)
        batches = list(runs[e][0]["seconds"])
        summary[e] = {
            "best_seconds": round(t, 3),
            "best_sw_batch": bs,
            "seconds_by_sw_batch": {b: round(min(run["seconds"][b] for run in runs[e]), 3) for b in batches},
            # CPU time of the process (all its threads): steadier than wall time when other work
            # shares the cores, though it also counts onnxruntime's spin-waiting threads.
            "cpu_seconds_by_sw_batch": {
                b: round(min(run.get("cpu_seconds", {}).get(b, float("nan")) for run in runs[e]), 3)
                for b in batches
            },
            "peak_rss_mb": max(run["peak_rss_mb"] for run in runs[e]),
            "rss_after_model_mb": max(run["rss_after_model_mb"] for run in runs[e]),
        }
    result = {
        "benchmark": "onnx_vs_torch",
        "volume": list(size),
        "roi": args.roi,
        "overlap": args.overlap,
        "blend": "gaussian",
        "threads": args.threads,
        "model": args.model_size,
        "parameters": count_parameters(model),
        "export_seconds": round(export_s, 2),
        "engines": summary,
        "speedup_ort_over_torch": round(summary["torch"]["best_seconds"] / summary["ort"]["best_seconds"], 3),
        "speedup_ort_over_torch_cpu_time": round(
            min(summary["torch"]["cpu_seconds_by_sw_batch"].values())
            / min(summary["ort"]["cpu_seconds_by_sw_batch"].values()),
            3,
        ),
        "interleaved_seconds_per_window": {
            e: {b: round(t, 4) for b, t in v.items()} for e, v in inter.items()
        },
        "interleaved_speedup_ort_over_torch": round(
            min(inter["torch"].values()) / min(inter["ort"].values()), 3
        ),
        "interleaved_speedup_ort_over_plain_ort": round(
            min(inter["ort-plain"].values()) / min(inter["ort"].values()), 3
        ),
        "mask_voxels_differing": int(differ.sum()),
        "mask_voxels_differing_outside_1e-3": int(outside.sum()),
        "max_prob_diff": float(np.max(np.abs(prob_t - prob_o))),
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "load_avg_1m_at_start": load_start,
            "load_avg_1m_at_end": os.getloadavg()[0],
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
    }
    if "ort-plain" in summary:
        result["speedup_tuned_over_plain_ort"] = round(
            summary["ort-plain"]["best_seconds"] / summary["ort"]["best_seconds"], 3
        )
    name = "onnx_vs_torch_quick" if args.quick else "onnx_vs_torch"
    emit(name, result)
    return result


if __name__ == "__main__":
    main()
