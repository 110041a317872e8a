"""Errors of the edge node. Each message names the case and the file and says what to do."""

from __future__ import annotations

from neurofed.errors import NeurofedError


class EdgeNodeError(NeurofedError):
    """Something at the hospital side that the user can fix (data, configuration, checkpoints)."""


class DataError(EdgeNodeError):
    """Input scans or labels that cannot be used as they are."""


class LayoutError(DataError):
    """A folder or datalist that matches none of the supported layouts."""


class CaseError(DataError):
    """One case (or several) with unreadable, inconsistent or incomplete files.

    ``problems`` holds every problem found in the case, not only the first one.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems) if self.problems else "invalid case")


class SplitError(DataError):
    """A splits.json that does not match the cases on disk."""


class TrainingError(EdgeNodeError):
    """Training cannot start or resume (no cases, mismatched checkpoint, bad options)."""
