"""``neurofed check-data``: report every problem in a data folder, then a summary."""

from __future__ import annotations

import argparse

EXAMPLE = """\
example:
  neurofed check-data data                 # a federation root (sites.csv) or site folders
  neurofed check-data data/site-01         # one hospital's folder
  neurofed check-data dataset.json --modalities flair,t1ce --json report.json
  neurofed check-data scans/ --no-labels   # what `neurofed infer` would accept

It checks exactly what `neurofed train` (labels required) or `neurofed infer` (--no-labels) would
refuse (errors, codes NF-D001..NF-D014) and warns about what they accept but a person should know
(NF-D015..NF-D020); the codes are listed in docs/data.md. Exit status 0 when there is no error
(warnings allowed), 1 otherwise. Nothing is modified.
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "check-data",
        help="validate scans and labels: every problem at once, then a summary",
        description=(
            "Read every case (a case folder, a site folder, a federation root with sites.csv, or a "
            "MONAI/Decathlon datalist JSON; BraTS 2018-21 or 2023+ names) as train and infer read it and report "
            "every problem with a stable code: missing or duplicate modalities, unreadable files, grid mismatches, "
            "non-finite or all-zero images, absurd spacings, empty folders. Then good and bad cases per site, "
            "grids, the spacing training would choose and label volumes."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="data folder or datalist JSON")
    p.add_argument(
        "--modalities",
        default="flair",
        help="comma-separated modalities the model reads, as train's --modalities (default flair)",
    )
    p.add_argument(
        "--no-labels", action="store_true", help="the cases are unlabelled (do not require seg files)"
    )
    p.add_argument(
        "--json",
        metavar="FILE",
        help="also write the report as JSON: one record per problem (code, severity, site, case, file, message), "
        "good and bad case counts",
    )
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
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    print(report.format())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report.to_dict(), fh, indent=2)
    return 0 if report.ok else 1
