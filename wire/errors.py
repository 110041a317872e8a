"""The wire's error hierarchy. ``ProtocolError`` is the only thing the decoder lets escape."""

from neurofed.errors import NeurofedError


class WireError(NeurofedError):
    """Base of all wire errors."""


class ProtocolError(WireError):
    """A message that violates the protocol (forged, tampered, replayed, malformed ...).

    ``reason`` is a short stable slug used in logs and rejection counters.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class TransportError(WireError):
    """The broker cannot be reached, refused us, or did not acknowledge in time."""


class ProvisioningError(WireError):
    """A bundle, roster or certificate that is missing, invalid or expired."""
