"""``neurofed train``: the centralized (pooled) or single-site arm."""

from __future__ import annotations

import argparse

EXAMPLE = """\
example:
  neurofed train --data data --epochs 20 --out runs/cds                 # all sites pooled
  neurofed train --data data --sites site-03 --epochs 20 --out runs/s03 # single-site arm
  neurofed train --data data --epochs 40 --out runs/cds --resume        # continue to epoch 40
  neurofed train --data data --check-only                          # pre-flight only

Before training, every case of every site is read and checked (the checks of `neurofed
check-data`); any error stops the run with every problem listed at once. The spacing the model
trains at is the median per RAS axis over the training cases (logged with its spread) and is
recorded in the model config with the training cases' label volumes.

writes RUN/model.safetensors, RUN/checkpoint.safetensors (resumable) and RUN/metrics.json
(Dice and HD95 per case, per site and overall on the held-out test cases of splits.json).
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train the 3D-UNet on pooled sites (centralized arm) or a subset (single-site arm)",
        description=(
            "Train the MONAI 3D-UNet on the training cases of the chosen sites (all by default) and score it on "
            "the held-out test cases of every site, as fixed by DATA/splits.json (created once if absent)."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="federation root (sites.csv), site folders or datalist JSON")
    p.add_argument("--sites", help="comma-separated site ids to train on (default: all, pooled)")
    p.add_argument(
        "--epochs", type=int, help="total epochs (with --resume: the target epoch); required to train"
    )
    p.add_argument("--out", help="run folder; required to train")
    p.add_argument(
        "--model-size", choices=["default", "small", "tiny"], default="default", help="UNet preset"
    )
    p.add_argument("--modalities", default="flair", help="input channels, comma-separated (default flair)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, sampling and augmentation")
    p.add_argument("--device", default="auto", help="auto (cuda with AMP when present), cpu or cuda")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.safetensors")
    p.add_argument(
        "--check-only",
        action="store_true",
        help="only the pre-flight: check every case as training would read it, list every problem, exit",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    if args.check_only:
        from neurofed.edge_node.centralized import preflight

        report = preflight(args.data, modalities, progress=True)
        print(report.format())
        return 0 if report.ok else 1
    if args.epochs is None or args.out is None:
        from neurofed.edge_node.errors import TrainingError

        raise TrainingError("--epochs and --out are required to train (only --check-only runs without them)")
    from neurofed.edge_node.centralized import train_arm
    from neurofed.edge_node.training import TrainConfig, set_torch_threads

    set_torch_threads()
    sites = [s.strip() for s in args.sites.split(",") if s.strip()] if args.sites else None
    metrics = train_arm(
        args.data,
        args.out,
        epochs=args.epochs,
        sites=sites,
        model_size=args.model_size,
        modalities=modalities,
        train_config=TrainConfig(lr=args.lr, seed=args.seed),
        resume=args.resume,
        device=args.device,
    )
    o = metrics["overall"]
    print(
        f"{metrics['arm']} on {', '.join(metrics['sites'])}: test Dice {o['dice']:.4f}, "
        f"HD95 {o['hd95']:.2f} mm over {metrics['test_cases']} cases -> {args.out}/metrics.json"
    )
    return 0
