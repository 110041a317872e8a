"""The naming table: which file names are which modality, which are labels, and nothing else.

One table for every command (``check-data``, ``train``, the site agent, ``infer``). A file is
``<anything><sep><token><ext>`` where ``sep`` is ``_``, ``-`` or ``.``, ``token`` is matched
case-insensitively and ``ext`` is ``.nii.gz`` or ``.nii`` (any case), or the whole stem is the
token (``flair.nii.gz``):

========  =====================  ==============  ===============================
modality  BraTS 2018-21          BraTS 2023+     other spellings accepted
========  =====================  ==============  ===============================
flair     ``_flair``             ``-t2f``        ``t2flair``, ``t2-flair``
t1        ``_t1``                ``-t1n``        ``t1w``
t1ce      ``_t1ce``              ``-t1c``        ``t1gd``, ``t1-gd``
t2        ``_t2``                ``-t2w``        ``t2w`` (either separator)
label     ``_seg``               ``-seg``        ``label``, ``labels``, ``mask``, ``truth``
========  =====================  ==============  ===============================

Two files of one case that name the same modality (``_flair.nii`` beside ``_flair.nii.gz``,
``-t2f`` beside ``_flair``) are a problem (``NF-D002``), never resolved by picking one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
# Channel order of the Medical Segmentation Decathlon Task01_BrainTumour 4-D images.
DECATHLON_ORDER: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
SEPARATORS = ("_", "-", ".")

# token -> (modality, naming it belongs to)
MODALITY_TOKENS: dict[str, tuple[str, str]] = {
    "flair": ("flair", "brats2021"),
    "t1": ("t1", "brats2021"),
    "t1ce": ("t1ce", "brats2021"),
    "t2": ("t2", "brats2021"),
    "t2f": ("flair", "brats2023"),
    "t1n": ("t1", "brats2023"),
    "t1c": ("t1ce", "brats2023"),
    "t2w": ("t2", "brats2023"),
    "t2flair": ("flair", "other"),
    "t2-flair": ("flair", "other"),
    "t1w": ("t1", "other"),
    "t1gd": ("t1ce", "other"),
    "t1-gd": ("t1ce", "other"),
}
LABEL_TOKENS: tuple[str, ...] = ("seg", "label", "labels", "mask", "truth")

# Spellings used by Decathlon dataset.json "modality" tables (and ours), for 4-D channel orders.
CHANNEL_NAMES: dict[str, str] = {
    **{k: v[0] for k, v in MODALITY_TOKENS.items()},
    "t1-weighted": "t1",
    "t2-weighted": "t2",
}

_BY_LENGTH = sorted([*MODALITY_TOKENS, *LABEL_TOKENS], key=len, reverse=True)


def is_nifti(path: Path | str) -> bool:
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def strip_nifti(name: str) -> str | None:
    """The name without ``.nii.gz``/``.nii`` (any case), or None if it is not a NIfTI name."""
    low = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return None


def stem(path: Path | str) -> str:
    name = Path(path).name
    return strip_nifti(name) or Path(name).stem


@dataclass(frozen=True)
class FileName:
    """What a file's name says: ``role`` is ``image``, ``label`` or None (not in the table)."""

    role: str | None
    modality: str | None = None
    naming: str | None = None
    case_stem: str = ""


def classify(path: Path | str) -> FileName:
    """Look a NIfTI file's name up in the table (``BraTS-GLI-00000-000-t2f.nii.gz`` -> flair)."""
    base = strip_nifti(Path(path).name)
    if base is None:
        return FileName(None)
    low = base.lower()
    for token in _BY_LENGTH:
        if low == token:
            rest = ""
        elif any(low.endswith(sep + token) for sep in SEPARATORS):
            rest = base[: -len(token) - 1]
        else:
            continue
        if token in LABEL_TOKENS:
            return FileName("label", None, None, rest)
        modality, naming = MODALITY_TOKENS[token]
        return FileName("image", modality, naming, rest)
    return FileName(None, case_stem=base)


def channel_order(names: list[str]) -> tuple[str, ...]:
    """A 4-D image's modality order from a datalist's table; KeyError for an unknown name."""
    return tuple(CHANNEL_NAMES[str(n).strip().lower()] for n in names)


def expected_names(modalities: tuple[str, ...] | list[str]) -> str:
    old = ", ".join(f"<case>_{m}.nii.gz" for m in modalities)
    new_tokens = {v[0]: k for k, v in MODALITY_TOKENS.items() if v[1] == "brats2023"}
    new = ", ".join(f"<case>-{new_tokens[m]}.nii.gz" for m in modalities if m in new_tokens)
    return f"{old} (BraTS 2018-21) or {new} (BraTS 2023+)"
