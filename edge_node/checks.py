"""Validate a data folder before training: every problem at once, then a summary.

A hospital runs ``neurofed check-data PATH`` before joining a federation. It reads every file
(nothing is written or modified), lists every problem found with the case, the file and what is
wrong, then summarises cases per site, shapes, spacings and label volumes.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neurofed.edge_node.data import MODALITIES, Case, discover_cases, inspect_case
from neurofed.edge_node.errors import LayoutError


@dataclass
class DataReport:
    """What ``check-data`` found: problems (one line each) and a per-site summary."""

    path: str
    problems: list[str] = field(default_factory=list)
    cases: int = 0
    sites: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, int] = field(default_factory=dict)
    spacings: dict[str, int] = field(default_factory=dict)
    label_ml: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "problems": self.problems,
            "cases": self.cases,
            "sites": self.sites,
            "shapes": self.shapes,
            "spacings": self.spacings,
            "label_ml": self.label_ml,
        }

    def format(self) -> str:
        lines = []
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s) in {self.path}:")
            lines += [f"  - {p}" for p in self.problems]
        else:
            lines.append(f"no problems in {self.path}")
        lines.append(f"{self.cases} case(s) at {len(self.sites)} site(s):")
        for site, n in self.sites.items():
            vol = self.label_ml.get(site)
            extra = (
                f"; whole-tumour volume ml min {vol['min']:.1f} / median {vol['median']:.1f} / max {vol['max']:.1f}"
                if vol
                else ""
            )
            lines.append(f"  {site}: {n} case(s){extra}")
        lines.append("shapes: " + ", ".join(f"{k} x{v}" for k, v in self.shapes.items()))
        lines.append("spacings (mm): " + ", ".join(f"{k} x{v}" for k, v in self.spacings.items()))
        return "\n".join(lines)


def check_folder(
    path: str | os.PathLike[str],
    *,
    modalities: Sequence[str] = MODALITIES,
    require_label: bool = True,
    allow_empty_labels: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> DataReport:
    """Read every case under ``path``; collect every problem instead of stopping at the first."""
    report = DataReport(path=str(path))
    try:
        cases = discover_cases(path)
    except LayoutError as exc:
        report.problems.append(str(exc))
        return report
    report.cases = len(cases)
    report.problems += _stray_folders(Path(path), cases)
    shapes: Counter[str] = Counter()
    spacings: Counter[str] = Counter()
    volumes: dict[str, list[float]] = {}
    sites: Counter[str] = Counter()
    for i, case in enumerate(cases):
        sites[case.site] += 1
        if not case.files:
            report.problems.append(
                f"case {case.case_id} (site {case.site}): listed in sites.csv but no case folder with NIfTI files was found"
            )
            continue
        loaded, problems = inspect_case(
            case,
            modalities,
            with_label=require_label,
            require_nonempty_label=require_label and not allow_empty_labels,
        )
        report.problems += problems
        if loaded is not None:
            shapes["x".join(map(str, loaded.shape))] += 1
            spacings["x".join(f"{s:g}" for s in loaded.spacing)] += 1
            if loaded.label is not None:
                ml = float(loaded.label.sum()) * float(np.prod(loaded.spacing)) / 1000.0
                volumes.setdefault(case.site, []).append(ml)
        if progress is not None:
            progress(i + 1, len(cases))
    if len(shapes) > 1:
        report.problems.append(
            f"cases are on {len(shapes)} different grids ({', '.join(shapes)}); BraTS-style data shares one "
            "grid: resample/co-register, or train at a common spacing"
        )
    report.sites = dict(sorted(sites.items()))
    report.shapes = dict(shapes.most_common())
    report.spacings = dict(spacings.most_common())
    report.label_ml = {
        s: {"min": float(np.min(v)), "median": float(np.median(v)), "max": float(np.max(v))}
        for s, v in sorted(volumes.items())
    }
    return report


def _stray_folders(root: Path, cases: Sequence[Case]) -> list[str]:
    """Folders that look like case folders but were not picked up (e.g. unknown file names)."""
    if not root.is_dir():
        return []
    found = {c.files[0].parent for c in cases if c.files}
    out = []
    for folder in sorted(p for p in root.glob("*/*") if p.is_dir()) + sorted(
        p for p in root.glob("*") if p.is_dir()
    ):
        if folder in found or any(f.parent == folder for f in found) or folder in {f.parent for f in found}:
            continue
        niftis = [
            f.name for f in folder.iterdir() if f.is_file() and f.name.lower().endswith((".nii", ".nii.gz"))
        ]
        if niftis:
            out.append(
                f"{folder}: holds NIfTI files ({', '.join(sorted(niftis)[:4])}) that match no known naming "
                "(<case>_flair/t1/t1ce/t2/seg or <case>-t2f/t1n/t1c/t2w/seg)"
            )
    return out
