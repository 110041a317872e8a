"""Find cases at every level a hospital points a command at, without reading image data.

``discover(path)`` takes, and tells apart:

* a **datalist JSON** (MONAI/Decathlon): entries whose ``image`` is one 4-D file (channel order
  from the JSON's ``modality`` table, the Decathlon order FLAIR, T1w, T1gd, T2w if absent) or a
  list of 3-D files in that order; ``site`` per entry, else ``sites.csv`` beside it, else the
  JSON's name;
* a **federation root** with ``sites.csv`` (``case,site``): case folders under ``<site>/`` or
  directly under the root (real BraTS folders plus a mapping);
* a **root of site folders** ``<site>/<case>/...``;
* a **site folder** ``<case>/...`` (the site id is the folder's name);
* a **case folder** holding the files themselves (named by :mod:`neurofed.scans.naming`);
* a **single NIfTI file**: a 3-D file named by the table, an unnamed 3-D file (a one-modality
  model reads it as its modality), or a 4-D image in the Decathlon order.

Nothing here raises for bad data: what it finds wrong is returned as
:class:`~neurofed.scans.problems.Problem` records (empty folders, duplicate files, unknown
names, unreadable indexes, case ids used twice), and the cases it could not make sense of carry
their problems with them, so every command counts and reports them the same way.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from neurofed.scans.naming import (
    DECATHLON_ORDER,
    MODALITIES,
    channel_order,
    classify,
    expected_names,
    is_nifti,
    stem,
)
from neurofed.scans.problems import Problem, problem

SITES_CSV = "sites.csv"


@dataclass(frozen=True)
class Case:
    """One subject: where its images and label are, and which site holds it.

    Either ``images`` maps modality -> 3-D file, or ``image4d`` is one 4-D file whose last axis
    holds the modalities in ``channel_order``; ``unnamed`` is a lone 3-D file whose name says no
    modality (only a one-modality model can read it). ``problems`` are what discovery found wrong
    with the case's files (duplicates, unknown names): they travel with it.
    """

    case_id: str
    site: str
    images: dict[str, Path] = field(default_factory=dict)
    label: Path | None = None
    image4d: Path | None = None
    channel_order: tuple[str, ...] = DECATHLON_ORDER
    layout: str = "brats2021"
    unnamed: Path | None = None
    problems: tuple[Problem, ...] = ()

    @property
    def available(self) -> tuple[str, ...]:
        if self.image4d is not None:
            return tuple(self.channel_order)
        return tuple(m for m in MODALITIES if m in self.images)

    def missing(self, modalities: Sequence[str]) -> list[str]:
        if self.unnamed is not None and len(modalities) == 1 and not self.images:
            return []
        return [m for m in modalities if m not in self.available]

    @property
    def files(self) -> list[Path]:
        out = [self.image4d] if self.image4d is not None else list(self.images.values())
        out += [self.unnamed] if self.unnamed is not None else []
        return out + ([self.label] if self.label is not None else [])

    @property
    def folder(self) -> Path | None:
        files = self.files
        return files[0].parent if files else None


@dataclass
class Discovery:
    """The cases found under one or more paths, and the layout problems met on the way."""

    cases: list[Case] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def all_problems(self) -> list[Problem]:
        return self.problems + [p for c in self.cases for p in c.problems]


# ------------------------------------------------------------------------------------- folders


def _visible(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        return []


def _holds_nifti(folder: Path) -> bool:
    return any(p.is_file() and is_nifti(p) for p in _visible(folder))


def read_case_folder(folder: Path, site: str) -> Case:
    """The case in ``folder``, named by the table; its naming problems travel with it."""
    images: dict[str, list[Path]] = {}
    labels: list[Path] = []
    unknown: list[Path] = []
    namings: set[str] = set()
    for f in _visible(folder):
        if not (f.is_file() and is_nifti(f)):
            continue
        name = classify(f)
        if name.role == "image":
            images.setdefault(str(name.modality), []).append(f)
            namings.add(str(name.naming))
        elif name.role == "label":
            labels.append(f)
        else:
            unknown.append(f)
    cid = folder.name
    found: list[Problem] = []
    for m, files in images.items():
        if len(files) > 1:
            found.append(
                problem(
                    "duplicate-file",
                    f"more than one {m} file ({', '.join(f.name for f in files)}); keep exactly one",
                    site=site,
                    case=cid,
                    file=files[1],
                )
            )
    if len(labels) > 1:
        found.append(
            problem(
                "duplicate-file",
                f"more than one label file ({', '.join(f.name for f in labels)}); keep exactly one",
                site=site,
                case=cid,
                file=labels[1],
            )
        )
    if not images and not labels:
        found.append(
            problem(
                "unknown-naming",
                f"{folder} holds NIfTI files ({', '.join(f.name for f in unknown[:4])}) that match no known "
                f"naming; expected e.g. {expected_names(MODALITIES)}",
                site=site,
                case=cid,
                file=unknown[0] if unknown else folder,
            )
        )
    else:
        found += [
            problem(
                "ignored-file",
                f"{f.name}: the naming table does not know this file; it is ignored",
                site=site,
                case=cid,
                file=f,
            )
            for f in unknown
        ]
    layout = "brats2023" if namings == {"brats2023"} else "brats2021" if namings <= {"brats2021"} else "mixed"
    return Case(
        case_id=cid,
        site=site,
        images={m: files[0] for m, files in images.items()},
        label=labels[0] if labels else None,
        layout=layout,
        problems=tuple(found),
    )


def _case_folders(parent: Path, site: str, out: Discovery) -> int:
    """Cases in the case folders under ``parent`` (a site folder); empty ones are reported."""
    n = 0
    for d in _visible(parent):
        if not d.is_dir():
            continue
        if _holds_nifti(d):
            out.cases.append(read_case_folder(d, site))
            n += 1
        elif not any(p.is_dir() for p in _visible(d)):
            out.problems.append(
                problem(
                    "empty-folder",
                    f"{d}: empty case folder (no NIfTI file); skipped",
                    site=site,
                    case=d.name,
                    file=d,
                )
            )
    return n


def read_sites_csv(path: Path) -> tuple[dict[str, str], list[Problem]]:
    """``case,site`` rows -> ({case: site}, problems). A header row is optional."""
    mapping: dict[str, str] = {}
    found: list[Problem] = []
    try:
        with path.open(newline="") as fh:
            for i, row in enumerate(csv.reader(fh)):
                row = [c.strip() for c in row]
                if not row or not any(row) or row[0].startswith("#"):
                    continue
                if i == 0 and [c.lower() for c in row[:2]] == ["case", "site"]:
                    continue
                if len(row) < 2 or not row[0] or not row[1]:
                    found.append(problem("bad-index", f"line {i + 1} is not 'case,site': {row!r}", file=path))
                    continue
                mapping[row[0]] = row[1]
    except (OSError, UnicodeDecodeError) as exc:
        found.append(problem("bad-index", f"cannot read the site mapping ({exc})", file=path))
    return mapping, found


def write_sites_csv(path: Path, cases: Iterable[Case]) -> None:
    rows = sorted((c.case_id, c.site) for c in cases)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case", "site"])
        w.writerows(rows)


def _federation_by_csv(root: Path, csv_path: Path, out: Discovery) -> None:
    mapping, found = read_sites_csv(csv_path)
    out.problems += found
    for case_id, site in sorted(mapping.items()):
        folder = next((p for p in (root / site / case_id, root / case_id) if p.is_dir()), None)
        if folder is not None and _holds_nifti(folder):
            out.cases.append(read_case_folder(folder, site))
            continue
        where = (
            f"{folder} is empty" if folder else f"neither {root / site / case_id} nor {root / case_id} exists"
        )
        bad = problem(
            "case-not-found",
            f"listed in {csv_path.name} but {where}",
            site=site,
            case=case_id,
            file=folder or "",
        )
        out.cases.append(Case(case_id=case_id, site=site, problems=(bad,)))


def _directory(root: Path, out: Discovery, sites_csv: Path | None) -> None:
    csv_path = sites_csv or root / SITES_CSV
    if csv_path.is_file():
        _federation_by_csv(root, csv_path, out)
        return
    if _holds_nifti(root):  # a case folder
        out.cases.append(read_case_folder(root, root.parent.name or root.name))
        return
    subdirs = [d for d in _visible(root) if d.is_dir()]
    if any(_holds_nifti(d) for d in subdirs):  # a site folder
        _case_folders(root, root.name, out)
        return
    for site_dir in subdirs:  # a root of site folders
        if _case_folders(site_dir, site_dir.name, out) == 0 and not any(
            p.site == site_dir.name for p in out.problems
        ):
            out.problems.append(
                problem(
                    "empty-folder",
                    f"{site_dir}: a site folder without any case folder",
                    site=site_dir.name,
                    file=site_dir,
                )
            )


def _single_file(path: Path, out: Discovery) -> None:
    name = classify(path)
    if name.role == "image":
        out.cases.append(
            Case(
                case_id=name.case_stem or stem(path),
                site="",
                images={str(name.modality): path},
                layout=str(name.naming),
            )
        )
        return
    if name.role == "label":
        out.problems.append(
            problem("unknown-naming", f"{path.name} is a label file, not an image to read", file=path)
        )
        return
    ndim = _header_ndim(path)
    if ndim == 4:
        out.cases.append(Case(case_id=stem(path), site="", image4d=path, layout="4d"))
    else:  # 3-D, or unreadable: reading it reports why
        out.cases.append(Case(case_id=stem(path), site="", unnamed=path, layout="file"))


def _header_ndim(path: Path) -> int | None:
    import nibabel as nib

    try:
        shape = [s for s in nib.load(str(path)).shape]
    except Exception:  # noqa: BLE001 - any failure to read is reported when the file is read
        return None
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    return len(shape)


# ------------------------------------------------------------------------------------ datalists


def _datalist(path: Path, out: Discovery, sections: Sequence[str], sites_csv: Path | None) -> None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        out.problems.append(problem("bad-index", f"not a readable datalist JSON ({exc})", file=path))
        return
    if not isinstance(data, dict):
        out.problems.append(
            problem("bad-index", "a datalist must be a JSON object with a 'training' list", file=path)
        )
        return
    order = DECATHLON_ORDER
    if isinstance(data.get("modality"), dict):
        try:
            order = channel_order([data["modality"][k] for k in sorted(data["modality"], key=int)])
        except (KeyError, ValueError):
            out.problems.append(
                problem(
                    "bad-index",
                    f"'modality' table {data['modality']!r} names a modality the naming table does not know",
                    file=path,
                )
            )
            return
    csv_path = sites_csv or path.parent / SITES_CSV
    site_map: dict[str, str] = {}
    if csv_path.is_file():
        site_map, found = read_sites_csv(csv_path)
        out.problems += found
    base = path.parent
    for section in sections:
        entries = data.get(section, [])
        if not isinstance(entries, list):
            out.problems.append(
                problem("bad-index", f"section {section!r} must be a list of entries", file=path)
            )
            continue
        for i, entry in enumerate(entries):
            if isinstance(entry, str):
                entry = {"image": entry}
            if not isinstance(entry, dict) or "image" not in entry:
                out.problems.append(problem("bad-index", f"{section}[{i}] has no 'image'", file=path))
                continue
            case = _datalist_entry(entry, base, order)
            if case is None:
                out.problems.append(
                    problem(
                        "bad-index",
                        f"{section}[{i}] lists {len(entry['image'])} images but the modality table has "
                        f"{len(order)} ({', '.join(order)})",
                        file=path,
                    )
                )
                continue
            site = str(entry.get("site") or site_map.get(case.case_id) or path.stem)
            out.cases.append(replace(case, site=site))


def _datalist_entry(entry: dict, base: Path, order: tuple[str, ...]) -> Case | None:
    img = entry["image"]
    label = base / entry["label"] if entry.get("label") else None
    if isinstance(img, list):
        if len(img) != len(order):
            return None
        cid = entry.get("case") or stem(Path(img[0]))
        images = {m: base / p for m, p in zip(order, img, strict=True)}
        return Case(case_id=str(cid), site="", images=images, label=label, layout="datalist")
    cid = entry.get("case") or stem(Path(img))
    return Case(
        case_id=str(cid), site="", image4d=base / img, label=label, channel_order=order, layout="decathlon"
    )


# ------------------------------------------------------------------------------------ entry point


def discover(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    sites_csv: str | os.PathLike[str] | None = None,
    sections: Sequence[str] = ("training",),
) -> Discovery:
    """Every case under ``paths`` (one or several), sorted by (site, case), and what is wrong
    with the layout. Only names and headers are read; :func:`neurofed.scans.reader.read_case`
    reads and checks the voxels."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = Discovery()
    csv_path = Path(sites_csv) if sites_csv else None
    for raw in paths:
        path = Path(raw)
        if path.is_file() and path.suffix.lower() == ".json":
            _datalist(path, out, sections, csv_path)
        elif path.is_file():
            _single_file(path, out)
        elif path.is_dir():
            _directory(path, out, csv_path)
        else:
            out.problems.append(problem("no-cases", f"{path}: no such file or folder", file=path))
    if not out.cases and not any(p.slug in ("no-cases", "bad-index") for p in out.problems):
        where = ", ".join(str(p) for p in paths)
        out.problems.append(
            problem(
                "no-cases",
                f"{where}: no cases found. Expected <site>/<case>/{expected_names(('flair',))}, a "
                f"{SITES_CSV} mapping case,site, or a datalist JSON",
                file=where,
            )
        )
    _mark_duplicates(out)
    out.cases.sort(key=lambda c: (c.site, c.case_id))
    return out


def _mark_duplicates(out: Discovery) -> None:
    where: dict[str, list[int]] = {}
    for i, c in enumerate(out.cases):
        where.setdefault(c.case_id, []).append(i)
    for cid, idx in where.items():
        if len(idx) < 2:
            continue
        places = [f"{out.cases[i].site or '-'}:{out.cases[i].folder or '?'}" for i in idx]
        for i in idx:
            c = out.cases[i]
            dup = problem(
                "duplicate-case",
                f"case id {cid!r} appears {len(idx)} times ({', '.join(places)}); case ids must be unique",
                site=c.site,
                case=cid,
                file=c.folder or "",
            )
            out.cases[i] = replace(c, problems=(*c.problems, dup))


def group_by_site(cases: Iterable[Case]) -> dict[str, list[Case]]:
    out: dict[str, list[Case]] = {}
    for c in cases:
        out.setdefault(c.site, []).append(c)
    return dict(sorted(out.items()))
