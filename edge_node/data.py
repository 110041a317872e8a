"""The hospital side's view of its data: :mod:`neurofed.scans` (the one reader every command
uses), with the edge node's errors.

``discover_cases`` raises :class:`LayoutError` when the layout itself is wrong (no cases, an
unreadable index, a case id used twice); ``load_case`` raises :class:`CaseError` listing every
error of a case. ``training_spacing`` is the training spacing rule (median per RAS axis over the
training cases, :mod:`neurofed.scans.spacing`). Layouts, names and problem codes: docs/data.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from neurofed.edge_node.errors import CaseError, LayoutError
from neurofed.scans import (
    DECATHLON_ORDER,
    MODALITIES,
    SITES_CSV,
    Case,
    SpacingSummary,
    discover,
    group_by_site,
    header_ras_spacing,
    read_case,
    read_sites_csv,
    summarise,
    write_sites_csv,
)
from neurofed.scans import Scan as LoadedCase

log = logging.getLogger(__name__)

__all__ = [
    "DECATHLON_ORDER",
    "MODALITIES",
    "SITES_CSV",
    "Case",
    "LoadedCase",
    "discover_cases",
    "group_by_site",
    "inspect_case",
    "load_case",
    "load_datalist",
    "data_site_mismatch",
    "read_sites_csv",
    "sites_claimed_by",
    "training_spacing",
    "write_sites_csv",
]

# discovery problems that leave no usable list of cases
_LAYOUT = ("no-cases", "bad-index", "duplicate-case")


def discover_cases(
    path: str | os.PathLike[str], *, sites_csv: str | os.PathLike[str] | None = None
) -> list[Case]:
    """Every case under ``path`` with its site, sorted by (site, case); see
    :func:`neurofed.scans.discover`. Cases with problems are kept (reading them reports why)."""
    found = discover(path, sites_csv=sites_csv)
    fatal = [p for p in found.all_problems() if p.slug in _LAYOUT]
    if fatal:
        raise LayoutError("; ".join(p.line() for p in fatal))
    for p in found.problems:
        log.warning("%s", p.line())
    return found.cases


def sites_claimed_by(folder: str | os.PathLike[str], known_sites: Iterable[str] = ()) -> dict[str, str]:
    """The sites a data folder says it holds, each with the evidence (one phrase): its own
    ``sites.csv``; else its parent's ``sites.csv`` (rows for the case folders in it, or a site
    named like the folder); and a folder named like one of ``known_sites`` (the federation's
    participants). Empty when nothing says: a hospital may name its folder as it likes."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    here = folder.resolve()
    claims: dict[str, str] = {}
    own = here / SITES_CSV
    if own.is_file():
        for site in sorted(set(read_sites_csv(own)[0].values())):
            claims.setdefault(site, f"its {SITES_CSV} lists {site}")
        return claims
    parent_csv = here.parent / SITES_CSV
    if parent_csv.is_file():
        mapping, _ = read_sites_csv(parent_csv)
        for d in sorted(p for p in here.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if d.name in mapping:
                claims.setdefault(
                    mapping[d.name], f"{parent_csv} lists its case {d.name} under {mapping[d.name]}"
                )
        if here.name in set(mapping.values()):
            claims.setdefault(here.name, f"{parent_csv} has a site {here.name}")
    if here.name in set(known_sites):
        claims.setdefault(here.name, f"the folder is named {here.name}, a participant of the federation")
    return claims


def data_site_mismatch(
    folder: str | os.PathLike[str], participant: str, known_sites: Iterable[str] = ()
) -> str | None:
    """One line saying why ``folder`` looks like another site's data than ``participant``'s, or
    None when nothing says so (see :func:`sites_claimed_by`)."""
    others = {s: why for s, why in sites_claimed_by(folder, known_sites).items() if s != participant}
    if not others:
        return None
    names = " and ".join(sorted(others))
    return f"data folder {folder} belongs to {names}, not to {participant} ({others[min(others)]})"


def load_datalist(
    path: str | os.PathLike[str], *, sites_csv: str | os.PathLike[str] | None = None
) -> list[Case]:
    """Cases of a MONAI/Decathlon datalist JSON (its ``training`` section)."""
    return discover_cases(path, sites_csv=sites_csv)


def inspect_case(
    case: Case, modalities: Sequence[str] = ("flair",), *, with_label: bool = True
) -> tuple[LoadedCase | None, list[str]]:
    """(arrays or None, every error found, one line each)."""
    scan, problems = read_case(case, modalities, with_label=with_label)
    return scan, [p.line() for p in problems if p.is_error]


def load_case(case: Case, modalities: Sequence[str] = ("flair",), *, with_label: bool = True) -> LoadedCase:
    """Validated arrays of one case; raises :class:`CaseError` listing every error found."""
    scan, problems = inspect_case(case, modalities, with_label=with_label)
    if scan is None:
        raise CaseError(problems)
    return scan


def training_spacing(cases: Sequence[Case]) -> SpacingSummary:
    """The training spacing: median per RAS axis over ``cases`` (headers only), with its spread."""
    spacings = []
    for c in cases:
        path = c.image4d or c.unnamed or next(iter(c.images.values()), None)
        if path is None:
            continue
        try:
            spacings.append(header_ras_spacing(path))
        except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds; the case check names it
            raise CaseError(
                [f"case {c.case_id} (site {c.site}): {path}: unreadable header ({exc})"]
            ) from None
    if not spacings:
        raise LayoutError("no cases to read a spacing from")
    return summarise(spacings)


def native_spacing(cases: Sequence[Case], modality: str | None = None) -> tuple[float, float, float]:
    """The training spacing (median per RAS axis of ``cases``); kept for callers of the old name."""
    return training_spacing(cases).median
