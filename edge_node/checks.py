"""Validate a data folder before training: every problem at once, then a summary.

A hospital runs ``neurofed check-data PATH`` before joining a federation. It reads every case the
way ``train``, the site agent and ``infer`` read it (:mod:`neurofed.scans`, nothing is written or
modified), so it reports exactly what they would refuse (errors) plus what they accept but a
person should know (warnings), one coded record per problem; then good and bad case counts per
site, grids, the spacing training would choose and label volumes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from neurofed.scans import DataReport, check

__all__ = ["DataReport", "check_folder"]


def check_folder(
    path: str | os.PathLike[str],
    *,
    modalities: Sequence[str] = ("flair",),
    require_label: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> DataReport:
    """Read every case under ``path``; collect every problem instead of stopping at the first.

    The defaults are ``neurofed train``'s (FLAIR, labels required); ``require_label=False`` is
    what ``infer`` needs.
    """
    return check(path, modalities=tuple(modalities), with_label=require_label, progress=progress)
