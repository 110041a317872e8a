"""Errors of the coordinator package."""

from neurofed.errors import NeurofedError


class CoordinatorError(NeurofedError):
    """A coordinator setting, state folder or round that cannot be used; the message says why."""


class StateError(CoordinatorError):
    """A resume snapshot that is missing, corrupt or belongs to another federation."""


class UpdateRejected(CoordinatorError):
    """A site's update that failed a check before aggregation. ``reason`` is a short stable slug
    (``wrong-round``, ``late``, ``duplicate``, ``shape-mismatch``, ``non-finite`` ...)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
