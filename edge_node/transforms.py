"""MONAI dictionary transforms for training: the shared preprocessing, then foreground crop,
positive/negative patch sampling, flips and intensity augmentation.

The deterministic part runs once per case and is cached (sites stay warm between rounds); only
the random part runs every epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from neurofed.edge_node.data import LoadedCase
from neurofed.models.config import Preprocessing
from neurofed.models.preprocess import IMAGE, LABEL, preprocess_transforms


def to_monai(loaded: LoadedCase) -> dict:
    """The arrays of a validated case as MetaTensors carrying their affine, channel first."""
    affine = torch.as_tensor(loaded.affine, dtype=torch.float64)
    meta = {"original_channel_dim": 0, "filename_or_obj": loaded.case.case_id}
    out = {
        IMAGE: MetaTensor(
            torch.from_numpy(np.ascontiguousarray(loaded.image)), affine=affine, meta=dict(meta)
        )
    }
    if loaded.label is not None:
        out[LABEL] = MetaTensor(
            torch.from_numpy(loaded.label.astype(np.float32)), affine=affine.clone(), meta=dict(meta)
        )
    return out


def deterministic_transforms(pre: Preprocessing, patch_size: Sequence[int], *, crop: bool = True) -> Compose:
    """Preprocessing (orientation, spacing, z-score) -> crop to the brain -> pad up to one patch."""
    steps = [preprocess_transforms(pre, with_label=True, load=False)]
    if crop:
        steps.append(CropForegroundd(keys=[IMAGE, LABEL], source_key=IMAGE, margin=2, allow_smaller=True))
    steps.append(SpatialPadd(keys=[IMAGE, LABEL], spatial_size=tuple(patch_size)))
    return Compose(steps)


def eval_transforms(pre: Preprocessing) -> Compose:
    """Exactly the inference preprocessing: the whole volume, no crop (scores are per full case)."""
    return preprocess_transforms(pre, with_label=True, load=False)


def random_transforms(
    patch_size: Sequence[int],
    *,
    num_samples: int = 2,
    augment: bool = True,
    pos: float = 1.0,
    neg: float = 1.0,
) -> Compose:
    """Patch sampling (``pos``:``neg`` tumour-centred vs background-centred) plus augmentation."""
    steps: list = [
        RandCropByPosNegLabeld(
            keys=[IMAGE, LABEL],
            label_key=LABEL,
            spatial_size=tuple(patch_size),
            pos=pos,
            neg=neg,
            num_samples=num_samples,
            image_key=IMAGE,
            image_threshold=0.0,
            allow_smaller=False,
        )
    ]
    if augment:
        steps += [
            RandFlipd(keys=[IMAGE, LABEL], prob=0.5, spatial_axis=0),
            RandFlipd(keys=[IMAGE, LABEL], prob=0.5, spatial_axis=1),
            RandFlipd(keys=[IMAGE, LABEL], prob=0.5, spatial_axis=2),
            RandScaleIntensityd(keys=IMAGE, factors=0.1, prob=0.5),
            RandShiftIntensityd(keys=IMAGE, offsets=0.1, prob=0.5),
            RandGaussianNoised(keys=IMAGE, prob=0.15, std=0.05),
        ]
    return Compose(steps)
