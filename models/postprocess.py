"""From the network's probabilities on the preprocessed grid back to the patient's scan: undo
resampling and reorientation, threshold, measure and write NIfTI.

The mask must overlay the input in any viewer, so it gets the input's exact shape, affine and
header (orientation codes included). Probabilities are brought back with trilinear interpolation
and thresholded afterwards, which gives a smoother boundary than resampling a binary mask.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Segmentation:
    """The result on the input's grid: a probability map and its binary mask."""

    probability: np.ndarray  # float32, input's spatial shape
    mask: np.ndarray  # uint8, input's spatial shape
    affine: np.ndarray
    volume_ml: float


def invert_to_input(prob, image, transform) -> np.ndarray:
    """Apply the inverse of ``transform``'s spatial steps (those recorded on ``image``, a MONAI
    MetaTensor that went through it) to ``prob`` (channel-first, on ``image``'s grid) and return
    a numpy array of shape (C, *original spatial shape)."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    pred = MetaTensor(prob, affine=image.affine, meta=dict(image.meta))
    pred.applied_operations = list(image.applied_operations)
    inverter = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=False)
    out = inverter({"pred": pred, "image": image})["pred"]
    return np.asarray(out.detach().cpu().numpy(), dtype=np.float32)


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in millilitres (|det| of the affine's 3x3 part is mm^3)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def segment(prob_on_input: np.ndarray, affine: np.ndarray, threshold: float) -> Segmentation:
    """Threshold the probability (channel 0) on the input grid and measure the tumour volume."""
    prob = np.clip(prob_on_input[0] if prob_on_input.ndim == 4 else prob_on_input, 0.0, 1.0)
    mask = (prob > threshold).astype(np.uint8)
    return Segmentation(
        probability=prob.astype(np.float32),
        mask=mask,
        affine=np.asarray(affine, dtype=np.float64),
        volume_ml=float(mask.sum()) * voxel_volume_ml(affine),
    )


def write_like(data: np.ndarray, reference, path: str | os.PathLike[str], *, dtype, description: str) -> Path:
    """Save ``data`` as NIfTI with ``reference``'s (a nibabel image) header and affine, written to
    a temporary name and renamed, so a half-written mask never looks finished."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = reference.header.copy()
    cls = type(reference) if isinstance(reference, (nib.Nifti1Image, nib.Nifti2Image)) else nib.Nifti1Image
    img = cls(np.asarray(data, dtype=dtype), reference.affine, header=header)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["descrip"] = description.encode()[:79]
    # keep the input's qform and sform (and their codes) so viewers place the mask identically
    qform, qcode = reference.header.get_qform(coded=True)
    sform, scode = reference.header.get_sform(coded=True)
    if qcode:
        img.set_qform(qform, int(qcode))
    if scode:
        img.set_sform(sform, int(scode))
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    tmp = path.with_name(f".{path.name}.tmp{suffix}")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
