"""Read one case's voxels and check them: every problem at once, each with its code.

``read_case(case, modalities, with_label=...)`` is what ``train``, the site agent and ``infer``
load cases with, and what ``check-data`` runs on every case, so check-data refuses exactly what
the commands refuse. Only the modalities asked for (and the label, when asked) are read.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neurofed.scans.discovery import Case
from neurofed.scans.naming import expected_names
from neurofed.scans.problems import Problem, ScanError, errors, problem
from neurofed.scans.spacing import anisotropic, axis_spacing, ras_spacing

MIN_SPACING_MM = 0.1
MAX_SPACING_MM = 10.0
GRID_ATOL = 1e-3


@dataclass
class Scan:
    """A checked case: image (C, X, Y, Z) float32 in the order asked for, label (1, X, Y, Z) uint8
    (whole tumour = label > 0) or None, the grid's affine, and a 3-D nibabel image whose header
    and affine outputs copy (``reference``)."""

    case: Case
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    reference: Any = None
    warnings: list[Problem] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along the stored axes (mm)."""
        return axis_spacing(self.affine)

    @property
    def ras_spacing(self) -> tuple[float, float, float]:
        return ras_spacing(self.affine)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.image.shape[1:])

    @property
    def label_ml(self) -> float | None:
        if self.label is None:
            return None
        return float(self.label.sum()) * float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0


class _Reader:
    def __init__(self, case: Case) -> None:
        self.case = case
        self.problems: list[Problem] = list(case.problems)
        self.grid: tuple[tuple[int, ...], np.ndarray, Path] | None = None
        self.reference: Any = None

    def add(self, slug: str, message: str, file: object = "") -> None:
        self.problems.append(problem(slug, message, site=self.case.site, case=self.case.case_id, file=file))

    def load(self, path: Path, *, four_d: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
        """(data, affine) of a checked file, or None with the problem recorded."""
        import nibabel as nib
        from nibabel.filebasedimages import ImageFileError
        from nibabel.spatialimages import HeaderDataError

        unreadable = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error, MemoryError)
        if not path.is_file():
            self.add("unreadable", f"{path.name}: file does not exist", path)
            return None
        try:
            img = nib.load(str(path))
        except unreadable as exc:
            self.add(
                "unreadable",
                f"{path.name}: not a readable NIfTI image, unreadable or corrupt ({type(exc).__name__}: {exc}); "
                "re-export it (from DICOM: dcm2niix)",
                path,
            )
            return None
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            self.add(
                "unreadable", f"{path.name}: a {type(img).__name__}, not NIfTI; convert it to .nii.gz", path
            )
            return None
        shape = list(int(s) for s in img.shape)
        while len(shape) > (4 if four_d else 3) and shape[-1] == 1:
            shape.pop()
        want = 4 if four_d else 3
        if len(shape) < 3 or min(shape[:3]) < 2:
            self.add(
                "not-3d",
                f"{path.name}: a 2-D image (shape {tuple(img.shape)}); a 3-D volume is required: give the whole scan as one 3-D NIfTI file",
                path,
            )
            return None
        if len(shape) != want:
            need = (
                "a 4-D image (X, Y, Z, modality) is required"
                if four_d
                else "give one 3-D file per modality (a 4-D image is read only unnamed or from a datalist)"
            )
            self.add(
                "not-3d", f"{path.name}: a {len(shape)}-D image (shape {tuple(img.shape)}); {need}", path
            )
            return None
        affine = np.asarray(img.affine, dtype=np.float64)
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            self.add(
                "bad-spacing",
                f"{path.name}: the header's affine is singular or not finite; fix the NIfTI header",
                path,
            )
            return None
        sp = axis_spacing(affine)
        if min(sp) < MIN_SPACING_MM or max(sp) > MAX_SPACING_MM:
            self.add(
                "bad-spacing",
                f"{path.name}: voxel spacing {tuple(round(s, 4) for s in sp)} mm is outside "
                f"[{MIN_SPACING_MM}, {MAX_SPACING_MM}] mm, which no brain MRI has; fix the header (pixdim/sform/qform)",
                path,
            )
            return None
        try:
            data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
        except unreadable as exc:
            self.add(
                "unreadable",
                f"{path.name}: corrupt or truncated NIfTI data ({type(exc).__name__}: {exc})",
                path,
            )
            return None
        if self.reference is None:
            self.reference = img.slicer[..., 0] if four_d and img.ndim == 4 else img
        return data, affine

    def on_grid(self, shape: tuple[int, ...], affine: np.ndarray, path: Path) -> bool:
        if self.grid is None:
            self.grid = (shape, affine, path)
            return True
        ref_shape, ref_affine, ref_path = self.grid
        if shape != ref_shape:
            self.add(
                "grid-mismatch",
                f"{path.name} has shape {shape} but {ref_path.name} has {ref_shape}; the modalities and label must be co-registered to one grid",
                path,
            )
            return False
        if not np.allclose(affine, ref_affine, atol=GRID_ATOL):
            self.add(
                "grid-mismatch",
                f"{path.name} has a different affine (orientation/spacing/origin) from {ref_path.name}; "
                "the modalities and label must be co-registered to one grid",
                path,
            )
            return False
        return True

    def voxels(self, data: np.ndarray, path: Path, what: str) -> bool:
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            self.add(
                "non-finite",
                f"{path.name} ({what}) has {bad} non-finite voxels (NaN or inf); fix or re-export it",
                path,
            )
            return False
        if not np.any(data):
            self.add("empty-image", f"{path.name} ({what}) is all zeros; nothing to read", path)
            return False
        return True


def _images(r: _Reader, case: Case, modalities: Sequence[str]) -> list[np.ndarray]:
    channels: list[np.ndarray] = []
    if case.image4d is not None:
        got = r.load(case.image4d, four_d=True)
        if got is None:
            return []
        data, affine = got
        if data.shape[3] < len(case.channel_order):
            r.add(
                "not-3d",
                f"{case.image4d.name} holds {data.shape[3]} channels, the modality order names "
                f"{len(case.channel_order)} ({', '.join(case.channel_order)})",
                case.image4d,
            )
            return []
        r.on_grid(tuple(data.shape[:3]), affine, case.image4d)
        for m in modalities:
            if m in case.channel_order:
                ch = data[..., case.channel_order.index(m)]
                if r.voxels(ch, case.image4d, m):
                    channels.append(ch)
        return channels
    sources = (
        [(modalities[0], case.unnamed)]
        if case.unnamed is not None and not case.images and len(modalities) == 1
        else [(m, case.images[m]) for m in modalities if m in case.images]
    )
    for m, path in sources:
        got = r.load(path)
        if got is None:
            continue
        data, affine = got
        if r.on_grid(data.shape, affine, path) and r.voxels(data, path, m):
            channels.append(data)
    return channels


def read_case(
    case: Case,
    modalities: Sequence[str] = ("flair",),
    *,
    with_label: bool = True,
) -> tuple[Scan | None, list[Problem]]:
    """Read and check a case: (the arrays, or None when an error was found; every problem found).

    Warnings (empty label, very anisotropic voxels, ignored files) come back with a loaded case
    too. ``with_label`` is what training asks (a label must exist); ``infer`` reads without.
    """
    r = _Reader(case)
    missing = case.missing(modalities) if case.files else []  # a case without files says why already
    if missing:
        r.add(
            "missing-modality",
            f"missing {', '.join(missing)} (found: {', '.join(case.available) or 'none'}; needed: "
            f"{', '.join(modalities)}); expected names like {expected_names(tuple(missing))}",
            case.folder or case.image4d or "",
        )
    channels = _images(r, case, modalities) if case.files else []
    label = None
    if with_label:
        if case.label is None:
            if case.files:
                r.add(
                    "missing-label", f"no label file (<case>_seg.nii.gz) in {case.folder}", case.folder or ""
                )
        else:
            got = r.load(case.label)
            if got is not None and r.on_grid(got[0].shape, got[1], case.label):
                vol = got[0]
                if not np.all(np.isfinite(vol)):
                    r.add("non-finite", f"{case.label.name} has non-finite label values", case.label)
                else:
                    label = (vol > 0).astype(np.uint8)[None]
                    if not label.any():
                        r.add("empty-label", f"{case.label.name} has no tumour voxel", case.label)
    if r.grid is not None and anisotropic(axis_spacing(r.grid[1])):
        sp = "x".join(f"{s:g}" for s in ras_spacing(r.grid[1]))
        r.add(
            "anisotropic",
            f"voxels of {sp} mm (RAS) are very anisotropic; results along the thick axis are coarse",
            r.grid[2],
        )
    if (
        errors(r.problems)
        or r.grid is None
        or len(channels) != len(modalities)
        or (with_label and label is None)
    ):
        if not errors(r.problems):  # defensive: never fail without saying why
            r.add("unreadable", "nothing could be read for this case", case.folder or "")
        return None, r.problems
    image = np.stack(channels).astype(np.float32, copy=False)
    scan = Scan(case, image, label, r.grid[1], r.reference, [p for p in r.problems if not p.is_error])
    return scan, r.problems


def load_case(case: Case, modalities: Sequence[str] = ("flair",), *, with_label: bool = True) -> Scan:
    """A checked case; raises :class:`ScanError` listing every error found."""
    scan, problems = read_case(case, modalities, with_label=with_label)
    if scan is None:
        raise ScanError(problems)
    return scan
