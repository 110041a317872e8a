"""Errors of secure aggregation, all in the wire's hierarchy (``neurofed.wire.errors``).

- A message that must be refused (forged key set, wrong context, a share request that would reveal
  too much ...) raises ``ProtocolError`` with a stable ``secagg-*`` reason slug, like the rest of
  the wire; two cases a site must log specifically have their own subclasses.
- A round that cannot complete (too few survivors, too few shares) raises ``SecAggRoundFailed``:
  the caller retries the round with a new attempt number and fresh keys, never with the same ones.
- Impossible parameters (threshold above the degree, fewer than three sites ...) raise
  ``SecAggParameterError`` when the configuration is made or read.
"""

from __future__ import annotations

from neurofed.wire.errors import ProtocolError, WireError


class SecAggParameterError(WireError, ValueError):
    """Parameters that cannot give a sound round (k, t, ring size, clip, weights)."""


class SecAggRoundFailed(WireError):
    """This attempt cannot complete; retry the round with ``attempt + 1`` and fresh keys.

    ``reason`` is a short stable slug for logs and counters, as in ``ProtocolError``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class BothSharesRequested(ProtocolError):
    """The coordinator asked one site for both the self-mask share and the mask-key share of the
    same peer (across two survivor lists of one attempt). Answering would unmask that peer's input,
    so the site refuses and logs it; the attempt is abandoned."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("secagg-both-shares", detail)


class MaskReuseRefused(ProtocolError):
    """A second, different input under masks already used for one input (after a restart, say).
    The difference of the two masked vectors would be the difference of the inputs in clear, so the
    site refuses; it counts as dropped for this attempt."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("secagg-mask-reuse", detail)
