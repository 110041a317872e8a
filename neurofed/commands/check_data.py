"""``neurofed check-data``: report every problem in a data folder, then a summary."""

from __future__ import annotations

import argparse

EXAMPLE = """\
example:
  neurofed check-data data                 # a federation root (sites.csv) or site folders
  neurofed check-data data/site-01         # one hospital's folder
  neurofed check-data dataset.json --modalities flair --json report.json

exit status 0 when no problem is found, 1 otherwise. Nothing is modified.
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "check-data",
        help="validate scans and labels: every problem at once, then a summary",
        description=(
            "Read every case (BraTS 2018-21 or 2023+ folders, or a MONAI/Decathlon datalist JSON) and report "
            "every problem found: unreadable files, missing modalities, shape or affine mismatches, non-finite "
            "voxels, 2-D images, empty labels. Then summarise cases per site, shapes, spacings and label volumes."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="data folder or datalist JSON")
    p.add_argument(
        "--modalities",
        default="flair,t1,t1ce,t2",
        help="comma-separated modalities that must be present (default flair,t1,t1ce,t2)",
    )
    p.add_argument(
        "--no-labels", action="store_true", help="the cases are unlabelled (do not require seg files)"
    )
    p.add_argument("--allow-empty-labels", action="store_true", help="accept labels without any tumour voxel")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import json

    from rich.progress import Progress

    from neurofed.edge_node.checks import check_folder

    mods = [m.strip() for m in args.modalities.split(",") if m.strip()]
    with Progress(transient=True) as bar:
        task = bar.add_task("checking cases", total=None)
        report = check_folder(
            args.path,
            modalities=mods,
            require_label=not args.no_labels,
            allow_empty_labels=args.allow_empty_labels,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    print(report.format())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report.to_dict(), fh, indent=2)
    return 0 if report.ok else 1
