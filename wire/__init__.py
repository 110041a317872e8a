"""The secure wire shared by edge nodes and the coordinator: envelopes, crypto, chunking,
provisioning and the MQTT 5 transport. Knows nothing of torch training or MLflow.
See wire/PROTOCOL.md for the topics, message kinds and state machine."""

from neurofed.wire.api import COORDINATOR, Endpoint, Message, MessageKind
from neurofed.wire.errors import ProtocolError, ProvisioningError, TransportError, WireError

__all__ = [
    "COORDINATOR",
    "Endpoint",
    "Message",
    "MessageKind",
    "ProtocolError",
    "ProvisioningError",
    "TransportError",
    "WireError",
]
