"""Find and load brain-tumour cases from the layouts hospitals actually hold.

Three layouts are recognised:

* BraTS 2018-2021: ``<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz``;
* BraTS 2023+: ``<case>/<case>-{t2f,t1n,t1c,t2w,seg}.nii.gz`` (mapped to flair/t1/t1ce/t2);
* a MONAI/Decathlon datalist JSON, including the Decathlon brain-tumour style where one 4-D image
  holds all modalities (channel order FLAIR, T1w, t1gd, T2w unless the JSON's ``modality`` says
  otherwise).

Sites: a site folder ``DATA/<site>/<case>/...``, or a root holding ``sites.csv`` (``case,site``)
with case folders either under their site folder or directly under the root (real BraTS folders
plus a mapping CSV). Whole tumour = label > 0.

Loading validates as it reads (shape, affine, finite voxels, dimensionality) and reports every
problem of a case at once, so a hospital fixes its data in one pass rather than one error at a time.
"""

from __future__ import annotations

import csv
import json
import os
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neurofed.edge_node.errors import CaseError, LayoutError

MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
# Channel order of the Medical Segmentation Decathlon Task01_BrainTumour 4-D images.
DECATHLON_ORDER: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
SITES_CSV = "sites.csv"
NIFTI_SUFFIXES = (".nii.gz", ".nii")

# Every spelling of a modality seen in BraTS releases and Decathlon dataset.json files.
MODALITY_ALIASES: dict[str, str] = {
    "flair": "flair",
    "t2f": "flair",
    "t2-flair": "flair",
    "t2flair": "flair",
    "t1": "t1",
    "t1n": "t1",
    "t1w": "t1",
    "t1ce": "t1ce",
    "t1c": "t1ce",
    "t1gd": "t1ce",
    "t1-gd": "t1ce",
    "t2": "t2",
    "t2w": "t2",
}
LABEL_NAMES = ("seg", "label", "mask")
_BRATS2023 = {"t2f": "flair", "t1n": "t1", "t1c": "t1ce", "t2w": "t2"}


@dataclass(frozen=True)
class Case:
    """One subject: where its images and label are, and which site holds it.

    Either ``images`` maps modality -> 3-D file, or ``image4d`` is one 4-D file whose last axis
    holds the modalities in ``channel_order``. ``label`` is None for unlabelled cases.
    """

    case_id: str
    site: str
    images: dict[str, Path] = field(default_factory=dict)
    label: Path | None = None
    image4d: Path | None = None
    channel_order: tuple[str, ...] = DECATHLON_ORDER
    layout: str = "brats2021"

    @property
    def available(self) -> tuple[str, ...]:
        if self.image4d is not None:
            return tuple(self.channel_order)
        return tuple(m for m in MODALITIES if m in self.images)

    def missing(self, modalities: Sequence[str]) -> list[str]:
        return [m for m in modalities if m not in self.available]

    @property
    def files(self) -> list[Path]:
        out = [self.image4d] if self.image4d is not None else list(self.images.values())
        return out + ([self.label] if self.label is not None else [])


@dataclass
class LoadedCase:
    """Arrays of one case after validation: image (C, X, Y, Z) float32, label (1, X, Y, Z) uint8."""

    case: Case
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.image.shape[1:])


# --------------------------------------------------------------------------- discovery


def _strip_nifti(name: str) -> str | None:
    for suf in NIFTI_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return None


def _case_from_folder(folder: Path, site: str) -> Case | None:
    """A case folder in either BraTS naming, or None if it holds no recognisable NIfTI file."""
    images: dict[str, Path] = {}
    label: Path | None = None
    layout = None
    for f in sorted(folder.iterdir()):
        stem = _strip_nifti(f.name)
        if stem is None or not f.is_file():
            continue
        m = re.search(r"[_-]([A-Za-z0-9]+)$", stem)
        if not m:
            continue
        key = m.group(1).lower()
        if key in LABEL_NAMES:
            label = f
        elif key in MODALITY_ALIASES:
            images[MODALITY_ALIASES[key]] = f
            if layout is None:
                layout = "brats2023" if key in _BRATS2023 else "brats2021"
    if not images and label is None:
        return None
    return Case(case_id=folder.name, site=site, images=images, label=label, layout=layout or "brats2021")


def _case_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _looks_like_case(folder: Path) -> bool:
    return any(_strip_nifti(f.name) is not None for f in folder.iterdir() if f.is_file())


def read_sites_csv(path: Path) -> dict[str, str]:
    """``case,site`` rows -> {case: site}. A header row is optional."""
    mapping: dict[str, str] = {}
    try:
        with path.open(newline="") as fh:
            for i, row in enumerate(csv.reader(fh)):
                row = [c.strip() for c in row]
                if not row or not any(row) or row[0].startswith("#"):
                    continue
                if i == 0 and [c.lower() for c in row[:2]] == ["case", "site"]:
                    continue
                if len(row) < 2 or not row[0] or not row[1]:
                    raise LayoutError(f"{path}: line {i + 1} is not 'case,site': {row!r}")
                mapping[row[0]] = row[1]
    except OSError as exc:
        raise LayoutError(f"{path}: cannot read the site mapping ({exc})") from None
    return mapping


def write_sites_csv(path: Path, cases: Iterable[Case]) -> None:
    rows = sorted((c.case_id, c.site) for c in cases)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case", "site"])
        w.writerows(rows)


def discover_cases(
    path: str | os.PathLike[str], *, sites_csv: str | os.PathLike[str] | None = None
) -> list[Case]:
    """Every case under ``path`` with its site, sorted by (site, case).

    ``path`` may be a datalist JSON, a root holding ``sites.csv`` (or given ``sites_csv``), a root
    of site folders, or one site folder (the site id is then the folder name). Files are only
    listed here, not read: validation happens in :func:`load_case` and ``neurofed check-data``.
    """
    root = Path(path)
    if root.is_file() and root.suffix.lower() == ".json":
        return load_datalist(root, sites_csv=sites_csv)
    if not root.is_dir():
        raise LayoutError(f"{root}: no such data folder or datalist JSON")
    csv_path = Path(sites_csv) if sites_csv else root / SITES_CSV
    cases: list[Case] = []
    if csv_path.is_file():
        mapping = read_sites_csv(csv_path)
        missing = []
        for case_id, site in sorted(mapping.items()):
            folder = next((p for p in (root / site / case_id, root / case_id) if p.is_dir()), None)
            case = _case_from_folder(folder, site) if folder else None
            if case is None:
                missing.append(case_id)
                case = Case(case_id=case_id, site=site)  # an empty case: validation reports it
            cases.append(case)
    else:
        subdirs = _case_folders(root)
        if subdirs and all(_looks_like_case(d) for d in subdirs):  # one site folder
            cases = [c for d in subdirs if (c := _case_from_folder(d, root.name))]
        else:
            for site_dir in subdirs:
                for d in _case_folders(site_dir):
                    if c := _case_from_folder(d, site_dir.name):
                        cases.append(c)
    if not cases:
        raise LayoutError(
            f"{root}: no cases found. Expected <site>/<case>/<case>_flair.nii.gz (BraTS 2018-21), "
            f"<case>-t2f.nii.gz (BraTS 2023+), a {SITES_CSV} mapping case,site, or a datalist JSON"
        )
    _check_unique(cases, root)
    return sorted(cases, key=lambda c: (c.site, c.case_id))


def _check_unique(cases: Sequence[Case], where: Path) -> None:
    seen: dict[str, str] = {}
    for c in cases:
        if c.case_id in seen and seen[c.case_id] != c.site:
            raise LayoutError(
                f"{where}: case id {c.case_id!r} appears at sites {seen[c.case_id]!r} and {c.site!r}; "
                "case ids must be unique across the federation"
            )
        seen[c.case_id] = c.site


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
        for site in sorted(set(read_sites_csv(own).values())):
            claims.setdefault(site, f"its {SITES_CSV} lists {site}")
        return claims
    parent_csv = here.parent / SITES_CSV
    if parent_csv.is_file():
        mapping = read_sites_csv(parent_csv)
        for d in _case_folders(here):
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
    path: str | os.PathLike[str],
    *,
    sections: Sequence[str] = ("training",),
    sites_csv: str | os.PathLike[str] | None = None,
) -> list[Case]:
    """Cases of a MONAI/Decathlon datalist JSON (paths relative to the JSON's folder).

    An entry's ``image`` is one 4-D file (Decathlon brain tumour) or a list of 3-D files, one per
    modality in the order of the JSON's ``modality`` table (Decathlon order if absent). An entry's
    ``site`` key, else ``sites.csv`` next to the JSON, else the JSON's name gives the site.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LayoutError(f"{path}: not a readable datalist JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LayoutError(f"{path}: a datalist must be a JSON object with a 'training' list")
    order = DECATHLON_ORDER
    if isinstance(data.get("modality"), dict):
        try:
            names = [data["modality"][k] for k in sorted(data["modality"], key=int)]
            order = tuple(MODALITY_ALIASES[str(n).lower()] for n in names)
        except (KeyError, ValueError):
            raise LayoutError(
                f"{path}: 'modality' table {data['modality']!r} names a modality not among "
                f"{sorted(set(MODALITY_ALIASES))}"
            ) from None
    csv_path = Path(sites_csv) if sites_csv else path.parent / SITES_CSV
    site_map = read_sites_csv(csv_path) if csv_path.is_file() else {}
    default_site = path.stem
    base = path.parent
    cases: list[Case] = []
    for section in sections:
        entries = data.get(section, [])
        if not isinstance(entries, list):
            raise LayoutError(f"{path}: section {section!r} must be a list of entries")
        for i, entry in enumerate(entries):
            if isinstance(entry, str):
                entry = {"image": entry}
            if not isinstance(entry, dict) or "image" not in entry:
                raise LayoutError(f"{path}: {section}[{i}] has no 'image'")
            img = entry["image"]
            label = base / entry["label"] if entry.get("label") else None
            if isinstance(img, list):
                if len(img) != len(order):
                    raise LayoutError(
                        f"{path}: {section}[{i}] lists {len(img)} images but the modality table has "
                        f"{len(order)} ({', '.join(order)})"
                    )
                first = Path(img[0]).name
                cid = entry.get("case") or _strip_nifti(first) or first
                images = {m: base / p for m, p in zip(order, img, strict=True)}
                case = Case(case_id=str(cid), site="", images=images, label=label, layout="datalist")
            else:
                name = Path(img).name
                cid = entry.get("case") or _strip_nifti(name) or name
                case = Case(
                    case_id=str(cid),
                    site="",
                    image4d=base / img,
                    label=label,
                    channel_order=order,
                    layout="decathlon",
                )
            site = str(entry.get("site") or site_map.get(case.case_id) or default_site)
            cases.append(_replace_site(case, site))
    if not cases:
        raise LayoutError(f"{path}: datalist has no entries in {', '.join(sections)}")
    _check_unique(cases, path)
    return sorted(cases, key=lambda c: (c.site, c.case_id))


def _replace_site(case: Case, site: str) -> Case:
    from dataclasses import replace

    return replace(case, site=site)


def group_by_site(cases: Iterable[Case]) -> dict[str, list[Case]]:
    out: dict[str, list[Case]] = {}
    for c in cases:
        out.setdefault(c.site, []).append(c)
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- loading + validation


def _read_nifti(path: Path, case: Case, problems: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(data, affine) or None with a problem recorded. Never raises for bad files."""
    import nibabel as nib

    where = f"case {case.case_id} (site {case.site}): {path}"
    if not path.is_file():
        problems.append(f"{where}: file does not exist")
        return None
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        affine = np.asarray(img.affine, dtype=np.float64)
    except (
        OSError,
        EOFError,
        ValueError,
        zlib.error,
        nib.filebasedimages.ImageFileError,
        MemoryError,
    ) as exc:
        problems.append(
            f"{where}: unreadable or corrupt NIfTI ({type(exc).__name__}: {exc}); re-export the file"
        )
        return None
    return data, affine


def _as_3d(data: np.ndarray, path: Path, case: Case, problems: list[str]) -> np.ndarray | None:
    where = f"case {case.case_id} (site {case.site}): {path}"
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim < 3 or min(data.shape[:3]) <= 1:
        problems.append(f"{where}: image is {data.ndim}-D with shape {data.shape}; a 3-D volume is required")
        return None
    if data.ndim > 3:
        problems.append(f"{where}: expected a 3-D volume, got shape {data.shape}")
        return None
    return data


def inspect_case(  # noqa: C901, PLR0915 - one flat list of checks, each a few lines
    case: Case,
    modalities: Sequence[str] = ("flair",),
    *,
    with_label: bool = True,
    require_nonempty_label: bool = False,
    atol: float = 1e-3,
) -> tuple[LoadedCase | None, list[str]]:
    """Read and validate a case; return (arrays or None, every problem found).

    Checks: files exist and are readable; each is 3-D (the Decathlon file 4-D with enough
    channels); modalities and label share one shape and one affine; no NaN/inf voxel; the label is
    non-empty when ``require_nonempty_label``.
    """
    problems: list[str] = []
    who = f"case {case.case_id} (site {case.site})"
    channels: list[np.ndarray] = []
    ref: tuple[tuple[int, ...], np.ndarray, Path] | None = None

    def check_geometry(shape: tuple[int, ...], affine: np.ndarray, path: Path) -> None:
        nonlocal ref
        if ref is None:
            ref = (shape, affine, path)
            return
        if shape != ref[0]:
            problems.append(f"{who}: {path.name} has shape {shape} but {ref[2].name} has {ref[0]}")
        elif not np.allclose(affine, ref[1], atol=atol):
            problems.append(
                f"{who}: {path.name} has a different affine (orientation/spacing/origin) from "
                f"{ref[2].name}; co-register the modalities and label to one grid"
            )

    missing = case.missing(modalities)
    if missing:
        problems.append(
            f"{who}: missing modality {', '.join(missing)} in {case.image4d or _case_dir(case)} "
            f"(found: {', '.join(case.available) or 'none'}; needed: {', '.join(modalities)})"
        )
    if case.image4d is not None:
        got = _read_nifti(case.image4d, case, problems)
        if got is not None:
            data, affine = got
            if data.ndim != 4 or min(data.shape[:3]) <= 1:
                problems.append(
                    f"{who}: {case.image4d} has shape {data.shape}; a 4-D image (X, Y, Z, modality) is required"
                )
            elif data.shape[3] < len(case.channel_order):
                problems.append(
                    f"{who}: {case.image4d} holds {data.shape[3]} channels, the modality table names "
                    f"{len(case.channel_order)} ({', '.join(case.channel_order)})"
                )
            else:
                check_geometry(tuple(data.shape[:3]), affine, case.image4d)
                for m in modalities:
                    if m in case.channel_order:
                        channels.append(data[..., case.channel_order.index(m)])
    else:
        for m in modalities:
            if m not in case.images:
                continue
            path = case.images[m]
            got = _read_nifti(path, case, problems)
            if got is None:
                continue
            vol = _as_3d(got[0], path, case, problems)
            if vol is None:
                continue
            check_geometry(vol.shape, got[1], path)
            channels.append(vol)
    for m, ch in zip([m for m in modalities if m in case.available], channels, strict=False):
        bad = int(ch.size - np.count_nonzero(np.isfinite(ch)))
        if bad:
            src = case.image4d or case.images.get(m)
            problems.append(
                f"{who}: {src} ({m}) has {bad} non-finite voxels (NaN or inf); fix or re-export it"
            )
    label = None
    if with_label:
        if case.label is None:
            problems.append(f"{who}: no label file (<case>_seg.nii.gz) in {_case_dir(case)}")
        else:
            got = _read_nifti(case.label, case, problems)
            if got is not None:
                vol = _as_3d(got[0], case.label, case, problems)
                if vol is not None:
                    check_geometry(vol.shape, got[1], case.label)
                    if not np.all(np.isfinite(vol)):
                        problems.append(f"{who}: {case.label} has non-finite label values")
                    else:
                        label = (vol > 0).astype(np.uint8)[None]
                        if require_nonempty_label and not label.any():
                            problems.append(
                                f"{who}: {case.label} is empty (no tumour voxel); a labelled case needs a tumour"
                            )
    if problems or ref is None or len(channels) != len(modalities):
        return None, problems or [f"{who}: nothing to load"]
    image = np.stack(channels).astype(np.float32, copy=False)
    return LoadedCase(case=case, image=image, label=label, affine=ref[1]), []


def _case_dir(case: Case) -> Path | str:
    files = case.files
    return files[0].parent if files else f"<{case.case_id}>"


def load_case(
    case: Case,
    modalities: Sequence[str] = ("flair",),
    *,
    with_label: bool = True,
    require_nonempty_label: bool = False,
) -> LoadedCase:
    """Validated arrays of one case; raises :class:`CaseError` listing every problem found."""
    loaded, problems = inspect_case(
        case, modalities, with_label=with_label, require_nonempty_label=require_nonempty_label
    )
    if loaded is None:
        raise CaseError(problems)
    return loaded


def native_spacing(cases: Sequence[Case], modality: str | None = None) -> tuple[float, float, float]:
    """Voxel size (mm) of the first case's image, read from its header only.

    Train at the data's own spacing (``Preprocessing(spacing=native_spacing(cases))``) unless you
    mean to resample: a model config left at 1 mm on 3 mm synthetic data would make every volume
    27 times larger.
    """
    import nibabel as nib

    if not cases:
        raise LayoutError("no cases to read a spacing from")
    c = cases[0]
    path = c.image4d or (c.images.get(modality) if modality else None) or next(iter(c.images.values()), None)
    if path is None:
        raise LayoutError(f"case {c.case_id}: no image file to read a spacing from")
    try:
        zooms = nib.load(str(path)).header.get_zooms()[:3]
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise CaseError([f"case {c.case_id} (site {c.site}): {path}: unreadable header ({exc})"]) from None
    return tuple(round(float(z), 4) for z in zooms)  # type: ignore[return-value]
