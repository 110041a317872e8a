"""The deterministic preprocessing shared by training and inference (MONAI dictionary transforms).

Training (edge_node) adds cropping, patch sampling and augmentation after these; inference
(models.inference) runs exactly these, then inverts the spatial steps for the output mask. Keeping
the chain in one place is what makes "the same preprocessing as training" true.
"""

from __future__ import annotations

from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Lambdad,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    Spacingd,
)

from neurofed.models.config import Preprocessing

IMAGE = "image"
LABEL = "label"


def whole_tumour(label):
    """BraTS labels (1 necrosis, 2 oedema, 4 or 3 enhancing) -> whole tumour = label > 0."""
    return (label > 0).astype(label.dtype) if hasattr(label, "astype") else (label > 0).to(label.dtype)


def preprocess_transforms(pre: Preprocessing, *, with_label: bool, load: bool = True) -> Compose:
    """Load (if ``load``) -> channel first -> orientation -> spacing -> z-score over brain voxels.

    ``image`` may be one file (FLAIR, or a 4-D file holding all modalities) or a list of files,
    one per modality in ``pre.modalities`` order; MONAI stacks a list as channels.
    """
    keys = [IMAGE, LABEL] if with_label else [IMAGE]
    steps = []
    if load:
        steps.append(LoadImaged(keys=keys, image_only=True))
    steps += [
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes=pre.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(
            keys=keys,
            pixdim=pre.spacing,
            mode=("bilinear", "nearest") if with_label else "bilinear",
        ),
    ]
    if pre.normalisation == "zscore-nonzero":
        steps.append(NormalizeIntensityd(keys=IMAGE, nonzero=True, channel_wise=True))
    elif pre.normalisation != "none":
        raise ValueError(f"unknown normalisation {pre.normalisation!r}")
    if with_label:
        steps.append(Lambdad(keys=LABEL, func=whole_tumour))
    steps.append(EnsureTyped(keys=keys, track_meta=True))
    return Compose(steps)
