"""The training spacing, chosen on purpose.

The model resamples every scan to one voxel size after reorienting it to RAS, so that voxel size
is a property of RAS axes, not of the axes a file happens to be stored in: a coronal file stored
(R, S, A) at 0.9 x 5 x 0.9 mm is 0.9 x 0.9 x 5 mm in RAS. The rule, as nnU-Net's: **the median
per RAS axis over all training cases**. The spread (min and max per axis) is logged and recorded
with the model; a case (or a site's median) more than ``FAR`` times off the chosen spacing on any
axis gets a warning (``NF-D020 spacing-spread``). In a federation the coordinator sets the
spacing: its ``--spacing``, or else the median per axis of the sites' reported medians.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Spacing = tuple[float, float, float]
FAR = 1.5  # a spacing this many times larger or smaller than the training spacing is "far"
ANISOTROPY = 3.0  # largest / smallest voxel side above which a case is "very anisotropic"
RULE = "median per RAS axis over the training cases"


def axis_spacing(affine: np.ndarray) -> Spacing:
    """Voxel size in mm along each stored array axis."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.sqrt((a**2).sum(axis=0)))  # type: ignore[return-value]


def ras_spacing(affine: np.ndarray) -> Spacing:
    """Voxel size in mm along R, A and S: the array axes permuted as reorienting to RAS does."""
    from nibabel.orientations import io_orientation

    per_axis = axis_spacing(affine)
    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    out = [0.0, 0.0, 0.0]
    for i, (ras_axis, _flip) in enumerate(ornt[:3]):
        out[int(ras_axis)] = per_axis[i]
    return tuple(out)  # type: ignore[return-value]


def header_ras_spacing(path: Any) -> Spacing:
    """RAS spacing from a NIfTI header alone (no voxel data read)."""
    import nibabel as nib

    return ras_spacing(np.asarray(nib.load(str(path)).affine, dtype=np.float64))


def _round(v: Sequence[float]) -> Spacing:
    return tuple(round(float(x), 4) for x in v)  # type: ignore[return-value]


@dataclass(frozen=True)
class SpacingSummary:
    """The chosen spacing (median per RAS axis), its spread and how many cases it came from."""

    median: Spacing
    min: Spacing
    max: Spacing
    cases: int
    rule: str = RULE

    def to_dict(self) -> dict[str, Any]:
        return {
            "median": list(self.median),
            "min": list(self.min),
            "max": list(self.max),
            "cases": self.cases,
            "rule": self.rule,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpacingSummary:
        return cls(
            median=_round(d["median"]),
            min=_round(d.get("min", d["median"])),
            max=_round(d.get("max", d["median"])),
            cases=int(d.get("cases", 0)),
            rule=str(d.get("rule", RULE)),
        )

    def describe(self) -> str:
        fmt = "x".join
        return (
            f"{fmt(f'{v:g}' for v in self.median)} mm (RAS; {self.rule}, {self.cases} case(s); "
            f"range {fmt(f'{v:g}' for v in self.min)} to {fmt(f'{v:g}' for v in self.max)})"
        )

    @property
    def uneven(self) -> bool:
        """Cases differ a lot: some case is ``FAR`` off the median on some axis."""
        return far(self.min, self.median) or far(self.max, self.median)


def summarise(spacings: Sequence[Sequence[float]]) -> SpacingSummary:
    """The median per axis (the training spacing) with min and max, of RAS spacings."""
    if not spacings:
        raise ValueError("no spacings to choose from")
    arr = np.asarray(spacings, dtype=np.float64).reshape(-1, 3)
    return SpacingSummary(
        median=_round(np.median(arr, axis=0)),
        min=_round(arr.min(axis=0)),
        max=_round(arr.max(axis=0)),
        cases=len(arr),
    )


def median_of_medians(medians: Sequence[Sequence[float]]) -> Spacing:
    """The federation's spacing from the sites' reported per-axis medians."""
    return _round(np.median(np.asarray(medians, dtype=np.float64).reshape(-1, 3), axis=0))


def far(spacing: Sequence[float], reference: Sequence[float], factor: float = FAR) -> bool:
    """True when some axis is more than ``factor`` times larger or smaller than the reference."""
    s = np.asarray(spacing, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    ratio = np.maximum(s / r, r / s)
    return bool(np.any(ratio > factor + 1e-9))


def anisotropic(spacing: Sequence[float], limit: float = ANISOTROPY) -> bool:
    return max(spacing) / max(min(spacing), 1e-9) > limit
