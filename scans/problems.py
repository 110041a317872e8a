"""Every data problem the kit knows, with a stable code and a severity.

An ``error`` is something ``train``, the site agent or ``infer`` refuses; a ``warning`` is
something they accept that a person should know about. ``check-data`` reports both, and nothing
else: the codes below are the whole list (docs/data.md explains each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from neurofed.errors import NeurofedError

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True)
class Check:
    code: str
    slug: str
    severity: str
    what: str


CHECKS: tuple[Check, ...] = (
    Check("NF-D001", "missing-modality", ERROR, "a modality the model needs has no file"),
    Check("NF-D002", "duplicate-file", ERROR, "two files name the same modality (or two labels)"),
    Check("NF-D003", "missing-label", ERROR, "a training case has no label file"),
    Check("NF-D004", "unreadable", ERROR, "not a readable NIfTI file (corrupt, truncated, missing)"),
    Check("NF-D005", "not-3d", ERROR, "an image is not one 3-D volume (2-D, or 4-D without channels)"),
    Check("NF-D006", "grid-mismatch", ERROR, "one case's images and label are not on one grid"),
    Check("NF-D007", "non-finite", ERROR, "NaN or infinite voxels"),
    Check("NF-D008", "empty-image", ERROR, "an image is all zeros"),
    Check("NF-D009", "bad-spacing", ERROR, "voxel spacing outside 0.1-10 mm or a singular affine"),
    Check("NF-D010", "unknown-naming", ERROR, "a folder of NIfTI files none of which the naming table knows"),
    Check("NF-D011", "case-not-found", ERROR, "an index (sites.csv, datalist) names a case with no files"),
    Check("NF-D012", "duplicate-case", ERROR, "one case id at two places (sites or folders)"),
    Check("NF-D013", "bad-index", ERROR, "sites.csv or a datalist JSON that cannot be read"),
    Check("NF-D014", "no-cases", ERROR, "nothing that looks like a case"),
    Check("NF-D015", "empty-folder", WARNING, "an empty case or site folder (skipped)"),
    Check(
        "NF-D016",
        "ignored-file",
        WARNING,
        "a NIfTI file in a case folder that the naming table does not know",
    ),
    Check("NF-D017", "empty-label", WARNING, "a label without any tumour voxel"),
    Check(
        "NF-D018",
        "mixed-grids",
        WARNING,
        "cases on different grids (each is resampled to the model's spacing)",
    ),
    Check("NF-D019", "anisotropic", WARNING, "very anisotropic voxels (largest/smallest spacing > 3)"),
    Check("NF-D020", "spacing-spread", WARNING, "cases whose spacing is far from the training spacing"),
)
BY_SLUG: dict[str, Check] = {c.slug: c for c in CHECKS}
BY_CODE: dict[str, Check] = {c.code: c for c in CHECKS}


@dataclass(frozen=True)
class Problem:
    """One finding: what (code, slug, severity), where (site, case, file) and a sentence."""

    code: str
    slug: str
    severity: str
    message: str
    site: str = ""
    case: str = ""
    file: str = ""

    @property
    def is_error(self) -> bool:
        return self.severity == ERROR

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "check": self.slug,
            "severity": self.severity,
            "site": self.site,
            "case": self.case,
            "file": self.file,
            "message": self.message,
        }

    def line(self) -> str:
        where = ""
        if self.case:
            where = f"case {self.case}" + (f" (site {self.site})" if self.site else "") + ": "
        elif self.site:
            where = f"site {self.site}: "
        return f"{self.code} {self.slug} [{self.severity}] {where}{self.message}"

    def __str__(self) -> str:
        return self.line()


def problem(slug: str, message: str, *, site: str = "", case: str = "", file: object = "") -> Problem:
    check = BY_SLUG[slug]
    return Problem(check.code, check.slug, check.severity, message, site, case, str(file or ""))


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.is_error]


class ScanError(NeurofedError):
    """Data that a command refuses; ``problems`` holds every finding (one line each in the message)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        errs = errors(self.problems) or self.problems
        head = f"{len(errs)} data problem(s):" if len(errs) > 1 else ""
        lines = [p.line() for p in errs]
        super().__init__("\n  ".join([head, *lines]) if head else lines[0] if lines else "data problem")

    @property
    def codes(self) -> list[str]:
        return [p.code for p in errors(self.problems)]
