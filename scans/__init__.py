"""The one scan reader: case discovery, the naming table, the data checks and the spacing rule.

Every command reads data through this room (``check-data``, ``train``, the site agent, ``infer``),
so what check-data passes is what they accept. It imports only nibabel and numpy, never torch or
MONAI, so the coordinator and ``check-data`` use it cheaply.

    found = discover("data")                       # cases + layout problems, headers only
    scan, problems = read_case(case, ("flair",))   # voxels, every problem of the case
    report = check("data", modalities=("flair",))  # every case, counts, spacing, label volumes
"""

from neurofed.scans.discovery import (
    SITES_CSV,
    Case,
    Discovery,
    discover,
    group_by_site,
    read_sites_csv,
    write_sites_csv,
)
from neurofed.scans.naming import DECATHLON_ORDER, MODALITIES, NIFTI_SUFFIXES, classify, is_nifti, stem
from neurofed.scans.problems import BY_CODE, BY_SLUG, CHECKS, ERROR, WARNING, Problem, ScanError
from neurofed.scans.reader import Scan, load_case, read_case
from neurofed.scans.report import DataReport, check
from neurofed.scans.spacing import (
    SpacingSummary,
    far,
    header_ras_spacing,
    median_of_medians,
    ras_spacing,
    summarise,
)

__all__ = [
    "BY_CODE",
    "BY_SLUG",
    "CHECKS",
    "DECATHLON_ORDER",
    "ERROR",
    "MODALITIES",
    "NIFTI_SUFFIXES",
    "SITES_CSV",
    "WARNING",
    "Case",
    "DataReport",
    "Discovery",
    "Problem",
    "Scan",
    "ScanError",
    "SpacingSummary",
    "check",
    "classify",
    "discover",
    "far",
    "group_by_site",
    "header_ras_spacing",
    "is_nifti",
    "load_case",
    "median_of_medians",
    "ras_spacing",
    "read_case",
    "read_sites_csv",
    "stem",
    "summarise",
    "write_sites_csv",
]
