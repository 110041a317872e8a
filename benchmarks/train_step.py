"""Step time of the default 3D-UNet (forward + backward + Adam, batch 1 unless ``--batch``, DiceCE)
at 64^3, 96^3 and 128^3 on this machine, with voxels/s and peak memory, as JSON.

Each size runs in its own process so that its peak resident memory is its own. Torch uses
``--threads`` threads (default 1: processes share the CPU here). Each size is measured in the
trainer's CPU layout (channels-last, ``neurofed.edge_node.training.memory_format_for``) and in PyTorch's
default NCDHW layout, one process after the other, and the ratio is reported: the reason the
trainer uses channels-last, measured in one run. The gain depends on the batch: none at batch 1
here, about 1.9x at the trainer's batch of 2 (``--batch 2 --model-size small``).

    .venv/bin/python -m benchmarks.train_step [--sizes 64 96 128] [--steps 3] [--threads 1]
        [--model-size default|small|tiny] [--batch 1]

``--dp`` measures what sample-level DP-SGD costs instead (``benchmarks/results/train_step_dp.json``):
at each size, for the small and the default UNet, the trainer's non-DP step against the DP-SGD
step (Opacus per-sample gradients, clipping and noise: ``neurofed.edge_node.privacy.PrivateStep``)
on the same batch of crops, with MONAI's PReLU (per-sample gradients through Opacus's functorch
path) and with LeakyReLU (``--act leakyrelu``: no parameters), each in its own process:

    .venv/bin/python -m benchmarks.train_step --dp [--sizes 64] [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

from benchmarks.common import emit


def one_size(size: int, steps: int, threads: int, model_size: str, layout: str, batch: int = 1) -> dict:
    """One process, one configuration. ``layout``: ``default`` or ``channels-last`` (plain steps),
    ``dp`` or ``dp-leakyrelu`` (DP-SGD steps, channels-last, as the site trainer runs them)."""
    import dataclasses

    import torch

    torch.set_num_threads(threads)
    from monai.losses import DiceCELoss

    from neurofed.models.config import preset
    from neurofed.models.unet import build_unet, count_parameters

    cfg = preset(model_size)
    if layout == "dp-leakyrelu":
        cfg = dataclasses.replace(cfg, act="leakyrelu")
    torch.manual_seed(0)
    fmt = torch.contiguous_format if layout == "default" else torch.channels_last_3d
    model = build_unet(cfg).to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(sigmoid=True)
    x = torch.randn(batch, cfg.in_channels, size, size, size).to(memory_format=fmt)
    y = (torch.rand(batch, 1, size, size, size) > 0.9).float()
    private = None
    if layout.startswith("dp"):
        from neurofed.edge_node.privacy import DPStep, PrivateStep

        private = PrivateStep(model, opt, DPStep(1.0, 1.0, 0.1, 1), expected_batch_size=batch)
    times = []
    for i in range(steps + 1):  # the first step warms up allocators and kernels
        t0 = time.perf_counter()
        if private is not None:
            private.step([(x, y)], loss_fn)
        else:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return {
        "size": size,
        "layout": layout,
        "step_s_median": round(median, 4),
        "step_s_min": round(times[0], 4),
        "voxels_per_s": round(batch * size**3 / median),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "params": count_parameters(model),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model-size", default="default", choices=["default", "small", "tiny"])
    ap.add_argument("--batch", type=int, default=1, help="cases per step (the trainer's default is 2)")
    ap.add_argument("--dp", action="store_true", help="DP-SGD step against the plain step (small, default)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--layout", default="channels-last", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(
            json.dumps(
                one_size(args.child, args.steps, args.threads, args.model_size, args.layout, args.batch)
            )
        )
        return
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.dp:
        dp_costs(args, env)
        return
    rows = []
    for size in args.sizes:
        by_layout = {}
        for layout in ("default", "channels-last"):
            cmd = [sys.executable, "-m", "benchmarks.train_step", "--child", str(size), "--steps", str(args.steps),
                   "--threads", str(args.threads), "--model-size", args.model_size, "--layout", layout,
                   "--batch", str(args.batch)]  # fmt: skip
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=True)
            by_layout[layout] = json.loads(out.stdout.strip().splitlines()[-1])
        row = by_layout["channels-last"]  # the trainer's layout on CPU
        row["default_layout_step_s_median"] = by_layout["default"]["step_s_median"]
        row["default_layout_peak_rss_mb"] = by_layout["default"]["peak_rss_mb"]
        row["channels_last_speedup"] = round(by_layout["default"]["step_s_median"] / row["step_s_median"], 3)
        rows.append(row)
    base = rows[0]["step_s_median"]
    for r in rows:
        r["step_ratio_vs_first"] = round(r["step_s_median"] / base, 3)
    result = {
        "benchmark": "train_step",
        "model": args.model_size,
        "batch": args.batch,
        "threads": args.threads,
        "rows": rows,
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
        },
    }
    emit("train_step", result)  # one JSON line, as make bench (run_all) reads it


def _child(size: int, args: argparse.Namespace, env: dict, model_size: str, layout: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--child", str(size), "--steps", str(args.steps),
           "--threads", str(args.threads), "--model-size", model_size, "--layout", layout,
           "--batch", str(args.batch)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def dp_costs(args: argparse.Namespace, env: dict) -> None:
    """Plain step vs DP-SGD step (PReLU and LeakyReLU) for the small and default UNet."""
    rows = []
    for model_size in ("small", "default"):
        for size in args.sizes:
            plain = _child(size, args, env, model_size, "channels-last")
            row = {
                "model": model_size,
                "size": size,
                "params": plain["params"],
                "plain_step_s": plain["step_s_median"],
                "plain_peak_rss_mb": plain["peak_rss_mb"],
            }
            for layout in ("dp", "dp-leakyrelu"):
                dp = _child(size, args, env, model_size, layout)
                key = layout.replace("-", "_")
                row[f"{key}_step_s"] = dp["step_s_median"]
                row[f"{key}_peak_rss_mb"] = dp["peak_rss_mb"]
                row[f"{key}_time_ratio"] = round(dp["step_s_median"] / plain["step_s_median"], 2)
                row[f"{key}_memory_ratio"] = round(dp["peak_rss_mb"] / plain["peak_rss_mb"], 2)
            rows.append(row)
    emit(
        "train_step_dp",
        {
            "batch": args.batch,
            "threads": args.threads,
            "steps": args.steps,
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "note": "median step (forward, backward, Adam); DP: Opacus per-sample gradients, clipping, "
            "noise; peak RSS of the process; channels-last on CPU as the site trainer runs",
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
