"""Clinical inference: a new patient's NIfTI scan in, a tumour mask with the scan's own grid out.

Steps, each driven by the model's own metadata so nothing is guessed:
1. find the modalities the model needs (a FLAIR file, a case folder in BraTS 2018-21 or 2023
   naming, or a folder of such case folders) and check every file (NIfTI, 3-D, sane spacing,
   finite values, co-registered);
2. the training preprocessing (``neurofed.models.preprocess.preprocess_transforms``: orientation, spacing,
   z-score over brain voxels);
3. sliding-window inference with the model's patch size through MONAI's inferer, each window run
   by onnxruntime (``neurofed.models.onnx_session``);
4. sigmoid, then the inverse of the spatial steps, threshold, and the mask written with the input's
   shape, affine and header (``neurofed.models.postprocess``), with the tumour volume in millilitres.

Input requirements (as BraTS provides them): skull-stripped, the modalities co-registered to one
grid. Raw DICOM must first be converted (e.g. dcm2niix), co-registered and skull-stripped.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neurofed.models.config import ModelConfig
from neurofed.models.errors import ModelError

# ------------------------------------------------------------------------------------------ errors


class InferenceInputError(ModelError):
    """An input scan or folder that cannot be segmented; the message names the file."""


class NotNiftiError(InferenceInputError):
    """A file that is not NIfTI, or is truncated/corrupt."""


class ModalityError(InferenceInputError):
    """The inputs do not provide the modalities the model was trained on (number or names)."""


class ImageShapeError(InferenceInputError):
    """A 2-D (or otherwise not single 3-D) image."""


class SpacingError(InferenceInputError):
    """A voxel spacing outside what any MRI scanner produces (header probably wrong)."""


class ModelUriError(ModelError):
    """A ``--model`` that does not resolve to a usable ONNX file."""


# ------------------------------------------------------------------------------- modality names

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MIN_SPACING_MM = 0.1
MAX_SPACING_MM = 10.0

# BraTS 2018-21: <case>_flair / _t1 / _t1ce / _t2; BraTS 2023+: <case>-t2f / -t1n / -t1c / -t2w.
MODALITY_ALIASES: dict[str, tuple[str, ...]] = {
    "flair": ("flair", "t2f", "t2-flair", "t2flair"),
    "t1": ("t1", "t1n"),
    "t1ce": ("t1ce", "t1c", "t1gd"),
    "t2": ("t2", "t2w"),
}
LABEL_NAMES = ("seg", "label", "mask", "truth")


def is_nifti_name(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def modality_of(path: Path) -> str | None:
    """The modality a file's name announces (``BraTS-GLI-00000-000-t2f.nii.gz`` -> ``flair``)."""
    name = stem(path).lower()
    for modality, aliases in MODALITY_ALIASES.items():
        for alias in aliases:
            if name == alias or re.search(rf"(^|[_\-.]){re.escape(alias)}$", name):
                return modality
    return None


def is_label_name(path: Path) -> bool:
    name = stem(path).lower()
    return any(re.search(rf"(^|[_\-.]){w}$", name) for w in LABEL_NAMES)


@dataclass(frozen=True)
class CaseInput:
    """One patient: an id and one file per model modality, in the model's order."""

    case_id: str
    files: tuple[Path, ...]
    source: Path


def _expected_names(modalities: Sequence[str]) -> str:
    old = ", ".join(f"<case>_{m}.nii.gz" for m in modalities)
    new = ", ".join(f"<case>-{MODALITY_ALIASES.get(m, (m, m))[1]}.nii.gz" for m in modalities)
    return f"{old} (BraTS 2018-21) or {new} (BraTS 2023)"


def case_from_folder(folder: Path, modalities: Sequence[str]) -> CaseInput:
    """Pick the model's modalities out of a case folder; error if one is missing or doubled."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_nifti_name(p) and not is_label_name(p))
    if not files:
        raise ModalityError(f"{folder}: no NIfTI images (.nii/.nii.gz) in this case folder")
    by_mod: dict[str, list[Path]] = {}
    for f in files:
        mod = modality_of(f)
        if mod is not None:
            by_mod.setdefault(mod, []).append(f)
    if len(modalities) == 1 and not by_mod and len(files) == 1:
        # one unnamed volume and a one-modality model: it can only be that modality
        return CaseInput(folder.name, (files[0],), folder)
    chosen: list[Path] = []
    missing = [m for m in modalities if m not in by_mod]
    if missing:
        found = ", ".join(f.name for f in files)
        raise ModalityError(
            f"{folder}: the model needs {len(modalities)} modalit{'y' if len(modalities) == 1 else 'ies'} "
            f"({', '.join(modalities)}) but {', '.join(missing)} is missing; found: {found}. "
            f"Expected file names like {_expected_names(modalities)}"
        )
    for m in modalities:
        if len(by_mod[m]) > 1:
            raise ModalityError(
                f"{folder}: more than one {m} image ({', '.join(p.name for p in by_mod[m])}); keep one"
            )
        chosen.append(by_mod[m][0])
    return CaseInput(folder.name, tuple(chosen), folder)


def case_from_file(path: Path, modalities: Sequence[str]) -> CaseInput:
    """A single file is a one-modality case (FLAIR for the study's model)."""
    if len(modalities) != 1:
        raise ModalityError(
            f"{path}: one image given, but the model needs {len(modalities)} modalities "
            f"({', '.join(modalities)}); pass the case folder holding {_expected_names(modalities)}"
        )
    announced = modality_of(path)
    if announced is not None and announced != modalities[0]:
        raise ModalityError(
            f"{path}: the file name says {announced}, but the model was trained on {modalities[0]}; "
            f"pass the {modalities[0]} image (e.g. {_expected_names(modalities)})"
        )
    case_id = re.sub(r"[_\-.](" + "|".join(MODALITY_ALIASES.get(modalities[0], ())) + ")$", "", stem(path))
    return CaseInput(case_id or stem(path), (path,), path)


def discover_cases(inputs: Iterable[str | os.PathLike[str]], modalities: Sequence[str]) -> list[CaseInput]:
    """Turn each INPUT (file, case folder, or folder of case folders) into cases."""
    cases: list[CaseInput] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_file():
            cases.append(case_from_file(path, modalities))
        elif path.is_dir():
            if any(p.is_file() and is_nifti_name(p) for p in path.iterdir()):
                cases.append(case_from_folder(path, modalities))
            else:
                subdirs = sorted(
                    d for d in path.iterdir() if d.is_dir() and any(is_nifti_name(p) for p in d.iterdir())
                )
                if not subdirs:
                    raise InferenceInputError(
                        f"{path}: neither a case folder (NIfTI files) nor a folder of case folders"
                    )
                cases.extend(case_from_folder(d, modalities) for d in subdirs)
        else:
            raise InferenceInputError(f"{path}: no such file or folder")
    ids = [c.case_id for c in cases]
    doubled = sorted({i for i in ids if ids.count(i) > 1})
    if doubled:
        raise InferenceInputError(f"case ids given twice: {', '.join(doubled)}; outputs would collide")
    return cases


# --------------------------------------------------------------------------------- loading + checks


@dataclass
class LoadedCase:
    case: CaseInput
    data: np.ndarray  # (C, X, Y, Z) float32 in the model's modality order
    reference: object  # the first modality's nibabel image: header and affine of the outputs
    affine: np.ndarray


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis, from the affine (what MONAI resamples from)."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.sqrt((a**2).sum(axis=0)))  # type: ignore[return-value]


def load_volume(path: Path) -> tuple[np.ndarray, object]:
    """Read one 3-D NIfTI image and check it; returns (float32 array, nibabel image)."""
    import zlib

    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    readable_errors = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error)
    try:
        img = nib.load(str(path))
    except readable_errors as exc:
        raise NotNiftiError(
            f"{path}: not a readable NIfTI image ({exc.__class__.__name__}: {exc}); "
            "convert scans to .nii.gz (e.g. with dcm2niix) first"
        ) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise NotNiftiError(f"{path}: is a {type(img).__name__}, not NIfTI; convert it to .nii.gz first")
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise ImageShapeError(
            f"{path}: a 2-D image (shape {tuple(img.shape)}); the model segments 3-D volumes: give the whole "
            "scan as one 3-D NIfTI file"
        )
    if len(shape) > 3:
        raise ImageShapeError(
            f"{path}: a {len(shape)}-D image (shape {tuple(img.shape)}); give one 3-D file per modality"
        )
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise SpacingError(f"{path}: the header's affine is singular or not finite; fix the NIfTI header")
    spacing = voxel_spacing(affine)
    if min(spacing) < MIN_SPACING_MM or max(spacing) > MAX_SPACING_MM:
        raise SpacingError(
            f"{path}: voxel spacing {tuple(round(s, 4) for s in spacing)} mm is outside "
            f"[{MIN_SPACING_MM}, {MAX_SPACING_MM}] mm, which no brain MRI has; the header (pixdim/"
            "sform/qform) is probably wrong: fix it before segmenting"
        )
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except readable_errors as exc:
        raise NotNiftiError(
            f"{path}: corrupt or truncated NIfTI data ({exc.__class__.__name__}: {exc})"
        ) from None
    if not np.all(np.isfinite(data)):
        raise InferenceInputError(f"{path}: image holds NaN or infinite values; the file is damaged")
    if not np.any(data):
        raise InferenceInputError(f"{path}: image is all zeros; nothing to segment")
    return data, img


def load_case(case: CaseInput) -> LoadedCase:
    """Load every modality and check they share one grid (co-registered, as BraTS ships them)."""
    arrays, ref, ref_affine = [], None, None
    for f in case.files:
        data, img = load_volume(f)
        affine = np.asarray(img.affine, dtype=np.float64)
        if ref is None:
            ref, ref_affine = img, affine
        elif data.shape != arrays[0].shape or not np.allclose(affine, ref_affine, atol=1e-3):
            raise ModalityError(
                f"{f}: grid (shape {data.shape}) differs from {case.files[0].name} (shape {arrays[0].shape}) "
                "or its affine does; the modalities must be co-registered to one grid"
            )
        arrays.append(data)
    return LoadedCase(case, np.stack(arrays), ref, ref_affine)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- inference


@dataclass(frozen=True)
class InferenceSettings:
    """How the sliding window runs; the patch size and threshold come from the model."""

    sw_batch_size: int = 1
    overlap: float = 0.25
    blend: str = "gaussian"
    probabilities: bool = False


@dataclass
class CaseResult:
    case_id: str
    mask_path: Path
    probability_path: Path | None
    volume_ml: float
    shape: tuple[int, ...]
    seconds: float
    inputs: tuple[Path, ...] = field(default_factory=tuple)


def output_paths(
    case: CaseInput, out: Path, *, single: bool, probabilities: bool
) -> tuple[Path, Path | None]:
    """``-o mask.nii.gz`` for one case; otherwise ``-o DIR`` gets ``DIR/<case>_mask.nii.gz``."""
    if single and out.name.lower().endswith(NIFTI_SUFFIXES):
        mask = out
        prob = out.with_name(stem(out) + "_prob" + (".nii.gz" if out.name.endswith(".gz") else ".nii"))
    else:
        mask = out / f"{case.case_id}_mask.nii.gz"
        prob = out / f"{case.case_id}_prob.nii.gz"
    return mask, (prob if probabilities else None)


class Segmenter:
    """One loaded model, ready for many cases: the session and the preprocessing are built once."""

    def __init__(self, session, config: ModelConfig, settings: InferenceSettings | None = None) -> None:
        from neurofed.models.preprocess import preprocess_transforms
        from neurofed.models.unet import check_spatial_size

        self.session = session
        self.config = config
        self.settings = settings or InferenceSettings()
        pre = config.preprocessing
        check_spatial_size(pre.patch_size, config, where="the model's patch size")
        if config.out_channels != 1:
            raise ModelError(
                f"the model has {config.out_channels} output channels; whole-tumour models have 1"
            )
        self.transform = preprocess_transforms(pre, with_label=False, load=False)

    def preprocess(self, loaded: LoadedCase):
        import torch
        from monai.data import MetaTensor

        meta = {
            "original_channel_dim": 0,
            "filename_or_obj": str(loaded.case.files[0]),
            "spatial_shape": np.asarray(loaded.data.shape[1:]),
            "original_affine": loaded.affine,
        }
        img = MetaTensor(torch.from_numpy(loaded.data), affine=torch.from_numpy(loaded.affine), meta=meta)
        return self.transform({"image": img})["image"]

    def probabilities(self, image, progress: bool = False):
        """Sliding-window logits on the preprocessed grid, as sigmoid probabilities."""
        import torch
        from monai.inferers import SlidingWindowInferer

        s = self.settings
        inferer = SlidingWindowInferer(
            roi_size=tuple(self.config.preprocessing.patch_size),
            sw_batch_size=s.sw_batch_size,
            overlap=s.overlap,
            mode=s.blend,
            progress=progress,
        )
        with torch.inference_mode():
            logits = inferer(image.as_tensor()[None].float(), self.session)
            return torch.sigmoid(logits[0])

    def segment(self, loaded: LoadedCase, progress: bool = False):
        from neurofed.models.postprocess import invert_to_input, segment

        image = self.preprocess(loaded)
        prob = self.probabilities(image, progress=progress)
        on_input = invert_to_input(prob, image, self.transform)
        if on_input.shape[1:] != loaded.data.shape[1:]:  # pragma: no cover - guards MONAI changes
            raise ModelError(
                f"{loaded.case.source}: inverted output shape {on_input.shape[1:]} differs from the input "
                f"{loaded.data.shape[1:]}"
            )
        return segment(on_input, loaded.affine, self.config.preprocessing.threshold)

    def run_case(self, case: CaseInput, out: Path, *, single: bool, progress: bool = False) -> CaseResult:
        from neurofed.models.postprocess import write_like

        t0 = time.perf_counter()
        loaded = load_case(case)
        seg = self.segment(loaded, progress=progress)
        mask_path, prob_path = output_paths(
            case, out, single=single, probabilities=self.settings.probabilities
        )
        write_like(seg.mask, loaded.reference, mask_path, dtype=np.uint8, description="neurofed tumour mask")
        if prob_path is not None:
            write_like(
                seg.probability,
                loaded.reference,
                prob_path,
                dtype=np.float32,
                description="neurofed p(tumour)",
            )
        return CaseResult(
            case.case_id,
            mask_path,
            prob_path,
            seg.volume_ml,
            tuple(seg.mask.shape),
            time.perf_counter() - t0,
            case.files,
        )


def run_inference(
    inputs: Sequence[str | os.PathLike[str]],
    onnx_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    settings: InferenceSettings | None = None,
    threads: int = 0,
    device: str = "auto",
    session=None,
    on_case: Callable[[CaseResult], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_error: Callable[[CaseInput, InferenceInputError], None] | None = None,
) -> list[CaseResult]:
    """Segment every case in ``inputs`` with the ONNX model; the library form of `neurofed infer`.

    All inputs are discovered and named before any work, so a wrong folder fails in a second,
    not after an hour of batch work. ``out`` is a mask file for one case, a folder otherwise.
    With ``on_error``, a case whose files turn out unusable (corrupt, 2-D, absurd spacing...) is
    handed to it and the batch goes on; without, the first such case raises.
    """
    from neurofed.models.export import read_onnx_config
    from neurofed.models.onnx_session import create_session

    config = read_onnx_config(onnx_path)
    cases = discover_cases(inputs, config.modalities)
    if not cases:
        raise InferenceInputError("no input given")
    out = Path(out)
    single = len(cases) == 1
    if not single and out.name.lower().endswith(NIFTI_SUFFIXES):
        raise InferenceInputError(
            f"{out}: {len(cases)} cases to segment, so -o must be a folder, not a .nii.gz file"
        )
    if session is None:
        session = create_session(onnx_path, threads=threads, device=device)
    segmenter = Segmenter(session, config, settings)
    results = []
    for i, case in enumerate(cases):
        try:
            res = segmenter.run_case(case, out, single=single)
        except InferenceInputError as exc:
            if on_error is None:
                raise
            on_error(case, exc)
        else:
            results.append(res)
            if on_case:
                on_case(res)
        if progress:
            progress(i + 1, len(cases))
    return results
