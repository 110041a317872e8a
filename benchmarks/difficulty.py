"""Is the synthetic benchmark hard enough to mean something? On the default data (165 cases,
10 sites, 64^3, seed 0) compare, on the same held-out test cases of splits.json:

* the FLAIR-threshold baseline (best single z-scored FLAIR threshold on the training cases),
* the pooled (centralized) UNet,
* single-site UNets for the ``--top-sites`` largest sites (small sites do worse still),

all with the same epochs. Pass criteria printed: threshold < pooled, best single site <= pooled - 0.05.

    .venv/bin/python -m benchmarks.difficulty [--data DIR] [--epochs 8] [--model-size small] [--patch 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="existing synthetic federation (default: generate the default one)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--model-size", default="small", choices=["default", "small", "tiny"])
    ap.add_argument(
        "--patch",
        type=int,
        default=0,
        help="patch edge (multiple of 16); 0: whole volume, as `neurofed train` does",
    )
    ap.add_argument("--top-sites", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--out", default=None, help="run folder (default: a temp folder)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from neurofed.edge_node.centralized import _json_safe, model_config_for, resolve_cases, train_arm
    from neurofed.edge_node.evaluation import flair_threshold_baseline
    from neurofed.edge_node.splits import select
    from neurofed.edge_node.synth import synthesize
    from neurofed.edge_node.training import TrainConfig

    t0 = time.perf_counter()
    work = Path(args.out or tempfile.mkdtemp(prefix="nf-difficulty-"))
    data = Path(args.data) if args.data else work / "data"
    if not args.data:
        synthesize(data, sites=10, cases=165, seed=0)
    cases, splits, _ = resolve_cases(data)
    base = flair_threshold_baseline(select(cases, splits, "train"), select(cases, splits, "test"))
    cfg = model_config_for(cases, args.model_size, patch_size=(args.patch,) * 3 if args.patch else None)
    tc = TrainConfig(lr=args.lr, batch_size=2, num_samples=2)
    arms = {"pooled": None}
    sizes = {s: len(p["train"]) for s, p in splits["sites"].items()}
    for s in sorted(sizes, key=lambda s: -sizes[s])[: args.top_sites]:
        arms[s] = [s]
    results = {}
    for name, sites in arms.items():
        m = train_arm(
            data,
            work / name,
            epochs=args.epochs,
            sites=sites,
            train_config=tc,
            model_config=cfg,
            show_progress=False,
        )
        results[name] = {
            "dice": m["overall"]["dice"],
            "hd95": m["overall"]["hd95"],
            "train_cases": m["train_cases"],
            "seconds": m["seconds"],
        }
        print(json.dumps(_json_safe({name: results[name]})), flush=True)
    pooled = results["pooled"]["dice"]
    best_single = max(v["dice"] for k, v in results.items() if k != "pooled")
    out = {
        "benchmark": "difficulty",
        "data": str(data),
        "test_cases": base.test.num_cases,
        "epochs": args.epochs,
        "model": args.model_size,
        "patch": list(cfg.preprocessing.patch_size),
        "flair_threshold": {
            "threshold": base.threshold,
            "train_dice": base.train_dice,
            "test_dice": base.test.dice,
        },
        "arms": results,
        "pooled_minus_threshold": pooled - base.test.dice,
        "pooled_minus_best_single": pooled - best_single,
        "threshold_below_unet": base.test.dice < pooled,
        "single_site_gap_ok": pooled - best_single >= 0.05,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
    }
    emit("difficulty", _json_safe(out))  # undefined HD95 (empty mask) -> null; one JSON line


if __name__ == "__main__":
    main()
