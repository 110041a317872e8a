"""Clinical inference: a new patient's NIfTI scan in, a tumour mask with the scan's own grid out.

Steps, each driven by the model's own metadata so nothing is guessed:
1. find the cases and the modalities the model needs with the kit's one reader
   (:mod:`neurofed.scans`: a file, a 4-D image, a case folder, a site folder, a federation root
   or a datalist; BraTS 2018-21 or 2023+ names) and check every file as ``check-data`` does;
2. the training preprocessing (``neurofed.models.preprocess.preprocess_transforms``: orientation, spacing,
   z-score over brain voxels);
3. sliding-window inference with the model's patch size through MONAI's inferer, each window run
   by onnxruntime (``neurofed.models.onnx_session``);
4. sigmoid, then the inverse of the spatial steps, threshold, and the mask written with the input's
   shape, affine and header (``neurofed.models.postprocess``), with the tumour volume in millilitres;
5. a JSON sidecar per mask with its plausibility checks (``neurofed.models.sidecar``).

Input requirements (as BraTS provides them): skull-stripped, the modalities co-registered to one
grid. Raw DICOM must first be converted (e.g. dcm2niix), co-registered and skull-stripped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neurofed.models.config import ModelConfig
from neurofed.models.errors import ModelError
from neurofed.models.sidecar import ModelInfo
from neurofed.scans import Case, Problem, Scan, discover, naming, read_case, reader
from neurofed.scans.problems import problem

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


# ------------------------------------------------------------------------------- inputs

# What a problem code means for infer's callers (each an InferenceInputError).
_ERROR_FOR = {
    "missing-modality": ModalityError,
    "duplicate-file": ModalityError,
    "grid-mismatch": ModalityError,
    "unknown-naming": ModalityError,
    "unreadable": NotNiftiError,
    "not-3d": ImageShapeError,
    "bad-spacing": SpacingError,
}
MIN_SPACING_MM = reader.MIN_SPACING_MM
MAX_SPACING_MM = reader.MAX_SPACING_MM
NIFTI_SUFFIXES = naming.NIFTI_SUFFIXES
stem = naming.stem
CaseInput = Case


def input_error(problems: Sequence[Problem]) -> InferenceInputError:
    """One exception for a list of problems: the class of the first error's code, every error's
    line in the message, the problems on ``.problems``."""
    errs = [p for p in problems if p.is_error] or list(problems)
    cls = _ERROR_FOR.get(errs[0].slug, InferenceInputError) if errs else InferenceInputError
    lines = [p.line() for p in errs]
    exc = cls(lines[0] if len(lines) == 1 else f"{len(lines)} input problems:\n  " + "\n  ".join(lines))
    exc.problems = list(problems)  # type: ignore[attr-defined]
    return exc


def discover_cases(
    inputs: Iterable[str | os.PathLike[str]],
    modalities: Sequence[str],
    *,
    on_warning: Callable[[Problem], None] | None = None,
) -> list[Case]:
    """Every case in ``inputs`` (files, case folders, site folders, federation roots, datalists:
    :func:`neurofed.scans.discover`), checked for what names alone tell (missing or doubled
    modalities, unknown names, case ids used twice) before any voxel is read."""
    found = discover(list(inputs), sections=("training", "test"))
    problems = list(found.problems)
    for case in found.cases:
        problems += case.problems
        missing = case.missing(modalities) if case.files else []  # a case without files says why already
        if missing:
            n = len(modalities)
            found_text = (
                f"the file name says {', '.join(case.available)}, but the model was trained on {', '.join(modalities)}"
                if len(case.files) == 1 and case.available
                else f"found: {', '.join(case.available) or 'none'}"
            )
            problems.append(
                problem(
                    "missing-modality",
                    f"the model needs {n} modalit{'y' if n == 1 else 'ies'} ({', '.join(modalities)}) but "
                    f"{', '.join(missing)} is missing ({found_text}); expected names like "
                    f"{naming.expected_names(tuple(modalities))}",
                    site=case.site,
                    case=case.case_id,
                    file=case.folder or "",
                )
            )
    if any(p.is_error for p in problems):
        raise input_error(problems)
    for p in problems:
        if on_warning is not None:
            on_warning(p)
    return found.cases


def load_case(case: Case, modalities: Sequence[str] | None = None) -> Scan:
    """Read and check the model's modalities of a case (one grid, finite, not all zero...)."""
    mods = tuple(modalities) if modalities else (case.available or ("flair",))
    scan, problems = read_case(case, mods, with_label=False)
    if scan is None:
        raise input_error(problems)
    return scan


LoadedCase = Scan


def modality_of(path: Path) -> str | None:
    """The modality a file's name announces in the naming table (``...-t2f.nii.gz`` -> flair)."""
    name = naming.classify(path)
    return name.modality if name.role == "image" else None


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis, from the affine (what MONAI resamples from)."""
    from neurofed.scans.spacing import axis_spacing

    return axis_spacing(affine)


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
    mask_path: Path | None  # None when refused as implausible
    probability_path: Path | None
    volume_ml: float
    shape: tuple[int, ...]
    seconds: float
    inputs: tuple[Path, ...] = field(default_factory=tuple)
    sidecar_path: Path | None = None
    warnings: list[dict[str, str]] = field(default_factory=list)
    refused: bool = False


def output_paths(case: Case, out: Path, *, single: bool, probabilities: bool) -> tuple[Path, Path | None]:
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
            "spatial_shape": np.asarray(loaded.image.shape[1:]),
            "original_affine": loaded.affine,
        }
        img = MetaTensor(
            torch.from_numpy(np.ascontiguousarray(loaded.image)),
            affine=torch.from_numpy(loaded.affine),
            meta=meta,
        )
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
        if on_input.shape[1:] != loaded.image.shape[1:]:  # pragma: no cover - guards MONAI changes
            raise ModelError(
                f"{loaded.case.case_id}: inverted output shape {on_input.shape[1:]} differs from the input "
                f"{loaded.image.shape[1:]}"
            )
        return segment(on_input, loaded.affine, self.config.preprocessing.threshold)

    def run_case(
        self,
        case: Case,
        out: Path,
        *,
        single: bool,
        progress: bool = False,
        model: ModelInfo | None = None,
        fail_on_implausible: bool = False,
    ) -> CaseResult:
        """Segment one case; write its mask (and probabilities) and its JSON sidecar."""
        from neurofed.models.postprocess import write_like
        from neurofed.models.sidecar import assess, sidecar_path, write_sidecar

        t0 = time.perf_counter()
        loaded = load_case(case, self.config.modalities)
        seg = self.segment(loaded, progress=progress)
        mask_path, prob_path = output_paths(
            case, out, single=single, probabilities=self.settings.probabilities
        )
        check = assess(seg.mask, loaded.image, loaded.affine, self.config.training_data)
        refused = fail_on_implausible and check.implausible
        if not refused:
            write_like(
                seg.mask, loaded.reference, mask_path, dtype=np.uint8, description="neurofed tumour mask"
            )
            if prob_path is not None:
                write_like(
                    seg.probability,
                    loaded.reference,
                    prob_path,
                    dtype=np.float32,
                    description="neurofed p(tumour)",
                )
        side = write_sidecar(
            sidecar_path(mask_path),
            case_id=case.case_id,
            inputs=[str(f) for f in case.files],
            mask=None if refused else str(mask_path),
            model=model or ModelInfo(source="", sha256="", config_digest=self.config.digest()),
            plausibility=check,
            refused=refused,
        )
        return CaseResult(
            case.case_id,
            None if refused else mask_path,
            None if refused else prob_path,
            seg.volume_ml,
            tuple(seg.mask.shape),
            time.perf_counter() - t0,
            tuple(case.files),
            sidecar_path=side,
            warnings=check.warnings,
            refused=refused,
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
    on_error: Callable[[Case, InferenceInputError], None] | None = None,
    model: ModelInfo | None = None,
    fail_on_implausible: bool = False,
    on_warning: Callable[[Problem], None] | None = None,
) -> list[CaseResult]:
    """Segment every case in ``inputs`` with the ONNX model; the library form of `neurofed infer`.

    All inputs are discovered and named before any work, so a wrong folder fails in a second,
    not after an hour of batch work. ``out`` is a mask file for one case, a folder otherwise.
    With ``on_error``, a case whose files turn out unusable (corrupt, 2-D, absurd spacing...) is
    handed to it and the batch goes on; without, the first such case raises. Every mask gets a
    JSON sidecar (``neurofed.models.sidecar``); ``fail_on_implausible`` writes no mask for an
    implausible one (the result says ``refused``).
    """
    from neurofed.models.export import read_onnx_config
    from neurofed.models.onnx_session import create_session

    config = read_onnx_config(onnx_path)
    cases = discover_cases(inputs, config.modalities, on_warning=on_warning)
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
            res = segmenter.run_case(
                case, out, single=single, model=model, fail_on_implausible=fail_on_implausible
            )
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
