"""``neurofed synth``: write a synthetic multi-institution BraTS-like federation."""

from __future__ import annotations

import argparse

EXAMPLE = """\
example:
  neurofed synth --out data --sites 10 --cases 165 --seed 0
  neurofed synth --out tiny --sites 3 --cases 12 --shape 32 32 32

writes data/<site>/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz and data/sites.csv
(site ids site-01, site-02, ... are the participant ids used by `neurofed provision`).
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "synth",
        help="generate synthetic BraTS-like institutions (skull-stripped brains, tumours, site effects)",
        description=(
            "Generate synthetic institutions in the BraTS 2018-21 layout: skull-stripped brains on one grid, "
            "four modalities, a tumour with FLAIR-bright oedema, FLAIR-bright look-alikes, per-site scanner "
            "signatures and unequal case counts. Deterministic in --seed."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--sites", type=int, default=10, help="number of institutions (default 10)")
    p.add_argument("--cases", type=int, default=165, help="total cases over all sites (default 165)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[64, 64, 64],
        metavar=("X", "Y", "Z"),
        help="volume size in voxels over a 192 mm field of view (default 64 64 64; multiples of 16 suit the UNet)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from neurofed.edge_node.synth import synthesize

    if args.sites < 1 or args.cases < args.sites:
        from neurofed.edge_node.errors import EdgeNodeError

        raise EdgeNodeError(f"need --cases >= --sites >= 1 (got {args.cases} cases for {args.sites} sites)")
    with Progress() as bar:
        task = bar.add_task("synthesising cases", total=args.cases)
        summary = synthesize(
            args.out,
            sites=args.sites,
            cases=args.cases,
            seed=args.seed,
            shape=args.shape,
            progress=lambda done, total: bar.update(task, completed=done),
        )
    counts = ", ".join(f"{s}: {n}" for s, n in summary.sites.items())
    print(
        f"wrote {args.cases} cases at {args.sites} sites to {summary.out} in {summary.seconds:.1f} s "
        f"(shape {summary.shape}, spacing {summary.spacing} mm)\n  {counts}"
    )
    return 0
