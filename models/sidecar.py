"""A JSON sidecar beside every mask, and the plausibility checks a clinical pipeline needs.

``<mask>.json`` holds the tumour volume (ml), the fraction of the mask outside the brain (brain =
voxels where any input modality is non-zero, as BraTS images are skull-stripped), the number of
connected components and the largest one's volume, the model (source, registry version, sha256,
config digest), the training label-volume range it was checked against, and the warnings:

* ``NF-I001 outside-brain``: more than half of the mask lies outside the brain;
* ``NF-I002 volume-out-of-range``: the volume is more than ``VOLUME_FACTOR`` times the largest
  training label volume recorded with the model;
* ``NF-I003 volume-range-unknown``: the model records no training label volumes, so the volume
  was not checked (a note, never a failure).

``neurofed infer --fail-on-implausible`` refuses a case with NF-I001 or NF-I002: no mask is
written, the sidecar says why, and the command exits non-zero.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

OUTSIDE_LIMIT = 0.5
VOLUME_FACTOR = 2.0
IMPLAUSIBLE = ("NF-I001", "NF-I002")


@dataclass(frozen=True)
class ModelInfo:
    """Which model made a mask (written into every sidecar)."""

    source: str
    sha256: str
    version: str | None = None
    config_digest: str = ""
    sha256_checked: bool = False


@dataclass
class Plausibility:
    volume_ml: float
    outside_brain_fraction: float
    components: int
    largest_component_ml: float
    brain_ml: float
    training_label_ml: dict[str, Any] | None
    warnings: list[dict[str, str]] = field(default_factory=list)

    @property
    def implausible(self) -> bool:
        return any(w["code"] in IMPLAUSIBLE for w in self.warnings)


def assess(
    mask: np.ndarray, image: np.ndarray, affine: np.ndarray, training_data: dict | None
) -> Plausibility:
    """Measure a mask (X, Y, Z) against its input (C, X, Y, Z) and the training label volumes."""
    from scipy import ndimage

    voxel_ml = float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    m = np.asarray(mask) > 0
    brain = np.any(np.asarray(image) != 0, axis=0)
    n = int(m.sum())
    outside = float((m & ~brain).sum()) / n if n else 0.0
    labels, count = ndimage.label(m)
    largest = int(np.bincount(labels.ravel())[1:].max()) if count else 0
    volume = n * voxel_ml
    rng = (training_data or {}).get("label_ml")
    p = Plausibility(
        volume_ml=round(volume, 3),
        outside_brain_fraction=round(outside, 4),
        components=int(count),
        largest_component_ml=round(largest * voxel_ml, 3),
        brain_ml=round(float(brain.sum()) * voxel_ml, 3),
        training_label_ml=dict(rng) if rng else None,
    )
    if n and outside > OUTSIDE_LIMIT:
        p.warnings.append(
            {
                "code": "NF-I001",
                "check": "outside-brain",
                "message": f"{outside:.0%} of the mask lies outside the brain (non-zero input voxels); "
                "the model or the input is probably wrong (not skull-stripped? another modality?)",
            }
        )
    if rng:
        top = float(rng["max"]) * VOLUME_FACTOR
        if volume > top:
            p.warnings.append(
                {
                    "code": "NF-I002",
                    "check": "volume-out-of-range",
                    "message": f"tumour volume {volume:.1f} ml is more than {VOLUME_FACTOR:g}x the largest training "
                    f"label ({float(rng['max']):.1f} ml; range {float(rng['min']):.1f}-{float(rng['max']):.1f} ml)",
                }
            )
    else:
        p.warnings.append(
            {
                "code": "NF-I003",
                "check": "volume-range-unknown",
                "message": "the model records no training label volumes, so the tumour volume was not checked "
                "against them",
            }
        )
    return p


def sidecar_path(mask_path: Path) -> Path:
    name = mask_path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return mask_path.with_name(name[: -len(suffix)] + ".json")
    return mask_path.with_name(name + ".json")


def write_sidecar(
    path: str | os.PathLike[str],
    *,
    case_id: str,
    inputs: list[str],
    mask: str | None,
    model: ModelInfo,
    plausibility: Plausibility,
    refused: bool = False,
) -> Path:
    """Write the sidecar atomically (temp file + rename)."""
    path = Path(path)
    p = plausibility
    record = {
        "case": case_id,
        "inputs": inputs,
        "mask": mask,
        "refused": refused,
        "volume_ml": p.volume_ml,
        "outside_brain_fraction": p.outside_brain_fraction,
        "brain_ml": p.brain_ml,
        "components": p.components,
        "largest_component_ml": p.largest_component_ml,
        "training_label_ml": p.training_label_ml,
        "model": {
            "source": model.source,
            "version": model.version,
            "sha256": model.sha256,
            "sha256_checked_against_registry": model.sha256_checked,
            "config_digest": model.config_digest,
        },
        "warnings": p.warnings,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path
