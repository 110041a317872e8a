"""Map the packages' own error types to one-line messages for the CLI.

Each package defines an error hierarchy rooted in ``NeurofedError``; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class NeurofedError(Exception):
    """Base of every error the kit raises on purpose; its message tells the user what to do."""


def format_user_error(exc: BaseException) -> str | None:
    if isinstance(exc, NeurofedError):
        return str(exc)
    return None
