"""Check every case under a path at once: ``neurofed check-data`` and ``train --check-only``.

``check(path, modalities, with_label=...)`` discovers the cases, reads each as the commands do
(:func:`neurofed.scans.reader.read_case`), adds the warnings that only show across cases (mixed
grids, spacings far from the training spacing), and returns a :class:`DataReport`: one
:class:`Problem` record per finding, good and bad case counts, the chosen spacing and its spread,
and label volumes per site.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nibabel.orientations import aff2axcodes

from neurofed.scans.discovery import Case, discover
from neurofed.scans.problems import Problem, problem
from neurofed.scans.reader import read_case
from neurofed.scans.spacing import SpacingSummary, far, summarise


@dataclass
class CaseSummary:
    site: str
    case: str
    ok: bool
    shape: tuple[int, ...] | None = None
    ras_spacing: tuple[float, float, float] | None = None
    label_ml: float | None = None
    orientation: str = ""


@dataclass
class DataReport:
    """What a check found. ``ok`` when no error (warnings allowed)."""

    path: str
    modalities: tuple[str, ...]
    with_label: bool
    problems: list[Problem] = field(default_factory=list)
    cases: list[CaseSummary] = field(default_factory=list)
    spacing: SpacingSummary | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.is_error]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.is_error]

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def good(self) -> list[CaseSummary]:
        return [c for c in self.cases if c.ok]

    @property
    def bad(self) -> list[CaseSummary]:
        return [c for c in self.cases if not c.ok]

    def sites(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for c in self.cases:
            s = out.setdefault(c.site, {"good": 0, "bad": 0})
            s["good" if c.ok else "bad"] += 1
        return dict(sorted(out.items()))

    def grids(self) -> dict[str, int]:
        return dict(Counter(_grid_key(c) for c in self.good).most_common())

    def label_ml(self) -> dict[str, dict[str, float]]:
        vols: dict[str, list[float]] = {}
        for c in self.good:
            if c.label_ml is not None:
                vols.setdefault(c.site, []).append(c.label_ml)
        return {
            s: {
                "min": float(np.min(v)),
                "median": float(np.median(v)),
                "max": float(np.max(v)),
                "cases": len(v),
            }
            for s, v in sorted(vols.items())
        }

    def label_range(self) -> dict[str, float] | None:
        vols = [c.label_ml for c in self.good if c.label_ml is not None]
        if not vols:
            return None
        return {
            "min": float(np.min(vols)),
            "median": float(np.median(vols)),
            "max": float(np.max(vols)),
            "cases": len(vols),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "modalities": list(self.modalities),
            "labels_required": self.with_label,
            "cases": {"good": len(self.good), "bad": len(self.bad), "total": len(self.cases)},
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "problems": [p.to_dict() for p in self.problems],
            "sites": self.sites(),
            "grids": self.grids(),
            "spacing": self.spacing.to_dict() if self.spacing else None,
            "label_ml": self.label_ml(),
            "bad_cases": [{"site": c.site, "case": c.case} for c in self.bad],
        }

    def format(self, *, limit: int | None = None) -> str:
        lines = []
        shown = self.problems if limit is None else self.problems[:limit]
        if self.problems:
            lines.append(f"{len(self.errors)} error(s), {len(self.warnings)} warning(s) in {self.path}:")
            lines += [
                f"  - {p.line()}" + (f"  [{p.file}]" if p.file and p.file not in p.message else "")
                for p in shown
            ]
            if len(shown) < len(self.problems):
                lines.append(f"  ... and {len(self.problems) - len(shown)} more (see --json)")
        else:
            lines.append(f"no problems in {self.path}")
        lines.append(
            f"{len(self.good)} good case(s), {len(self.bad)} bad, at {len(self.sites())} site(s) "
            f"(modalities {', '.join(self.modalities)}; labels {'required' if self.with_label else 'not needed'}):"
        )
        vols = self.label_ml()
        for site, n in self.sites().items():
            v = vols.get(site)
            extra = (
                f"; whole-tumour ml min {v['min']:.1f} / median {v['median']:.1f} / max {v['max']:.1f}"
                if v
                else ""
            )
            lines.append(f"  {site or '-'}: {n['good']} good, {n['bad']} bad{extra}")
        if self.grids():
            lines.append(
                "grids (shape orientation @ RAS spacing mm): "
                + ", ".join(f"{k} x{v}" for k, v in self.grids().items())
            )
        if self.spacing:
            lines.append(f"training spacing would be {self.spacing.describe()}")
        return "\n".join(lines)


def _grid_key(c: CaseSummary) -> str:
    shape = "x".join(map(str, c.shape or ()))
    sp = "x".join(f"{s:g}" for s in (c.ras_spacing or ()))
    return f"{shape} {c.orientation} @ {sp}".replace("  ", " ")


def check(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    modalities: Sequence[str] = ("flair",),
    with_label: bool = True,
    sites_csv: str | os.PathLike[str] | None = None,
    sections: Sequence[str] = ("training",),
    cases: Sequence[Case] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DataReport:
    """Read every case the way the commands do and collect every problem (``cases``: check these
    instead of discovering them, e.g. a site's training cases only)."""
    shown = path if isinstance(path, (str, os.PathLike)) else ", ".join(map(str, path))
    report = DataReport(path=str(shown), modalities=tuple(modalities), with_label=with_label)
    if cases is None:
        found = discover(path, sites_csv=sites_csv, sections=sections)
        report.problems += found.problems
        cases = found.cases
    for i, case in enumerate(cases):
        scan, problems = read_case(case, modalities, with_label=with_label)
        report.problems += problems
        if scan is None:
            report.cases.append(CaseSummary(case.site, case.case_id, False))
        else:
            report.cases.append(
                CaseSummary(
                    case.site,
                    case.case_id,
                    True,
                    scan.shape,
                    tuple(round(s, 4) for s in scan.ras_spacing),  # type: ignore[arg-type]
                    scan.label_ml,
                    "".join(aff2axcodes(scan.affine)),
                )
            )
        del scan
        if progress is not None:
            progress(i + 1, len(cases))
    _across_cases(report)
    return report


def _across_cases(report: DataReport) -> None:
    good = report.good
    if not good:
        return
    grids = report.grids()
    if len(grids) > 1:
        report.problems.append(
            problem(
                "mixed-grids",
                f"cases are on {len(grids)} grids ({', '.join(list(grids)[:6])}); each is resampled to the "
                "model's spacing, which is fine, but check that this is expected",
            )
        )
    report.spacing = summarise([c.ras_spacing for c in good if c.ras_spacing])
    for site in sorted({c.site for c in good}):
        off = [
            c for c in good if c.site == site and c.ras_spacing and far(c.ras_spacing, report.spacing.median)
        ]
        if off:
            names = ", ".join(c.case for c in off[:5]) + (" ..." if len(off) > 5 else "")
            report.problems.append(
                problem(
                    "spacing-spread",
                    f"{len(off)} case(s) ({names}) have a spacing more than 1.5x off the training spacing "
                    f"{'x'.join(f'{v:g}' for v in report.spacing.median)} mm on some axis; they are resampled "
                    "a lot (check the headers, or train at a spacing on purpose)",
                    site=site,
                )
            )
