"""Chunk sizing and splitting.

Mosquitto disconnects a client whose packet exceeds ``max_packet_size`` and paho then resends the
same packet for ever, so the sender must never emit a packet over the maximum the broker announced
in CONNACK. Chunks are sized well below it (1 MiB by default: QoS 1 chunks pipeline, which is
faster than one huge packet), and any single packet that would still not fit is refused locally.
Splitting is lazy (memoryview slices) so payloads above MQTT's 256 MiB packet limit stream through.
"""

from __future__ import annotations

from collections.abc import Iterator

from neurofed.wire.errors import TransportError

DEFAULT_CHUNK = 1024 * 1024
MQTT_MAX_PACKET = 268_435_455
MIN_CHUNK = 16 * 1024
# Room for the MQTT fixed and variable header (topic, packet id, properties) and the envelope.
PACKET_MARGIN = 64 * 1024


def plan_chunk_size(wanted: int, broker_max_packet: int | None) -> int:
    """The chunk plaintext size to use under a broker's maximum packet size."""
    limit = broker_max_packet or MQTT_MAX_PACKET
    size = min(wanted, limit - PACKET_MARGIN)
    if size < MIN_CHUNK:
        raise TransportError(
            f"the broker's maximum packet size ({limit} bytes) leaves no room for {MIN_CHUNK}-byte chunks; "
            "raise max_packet_size in mosquitto.conf to at least 1 MiB"
        )
    return size


def packet_size(topic: str, payload_len: int) -> int:
    """Upper bound of an MQTT 5 PUBLISH packet's size (QoS 1, no properties but a few bytes)."""
    remaining = 2 + len(topic.encode()) + 2 + 1 + 16 + payload_len
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2097152 else 4
    return 1 + length_bytes + remaining


def check_packet(topic: str, payload_len: int, broker_max_packet: int | None) -> None:
    """Refuse locally a packet the broker would answer by disconnecting us."""
    limit = broker_max_packet or MQTT_MAX_PACKET
    size = packet_size(topic, payload_len)
    if size > limit:
        raise TransportError(
            f"a {size}-byte packet on {topic} exceeds the broker's maximum packet size of {limit} bytes; "
            "this message kind is sent as one packet: make it smaller"
        )


def chunk_count(total: int, chunk_size: int) -> int:
    return max(1, -(-total // chunk_size))


def iter_chunks(prefix: bytes, payload: bytes | memoryview, chunk_size: int) -> Iterator[bytes | memoryview]:
    """Split the virtual concatenation ``prefix + payload`` into ``chunk_size`` pieces without
    copying the payload (only the first chunk, which holds the prefix, is concatenated)."""
    view = memoryview(payload).cast("B") if not isinstance(payload, memoryview) else payload.cast("B")
    total = len(prefix) + len(view)
    n = chunk_count(total, chunk_size)
    for i in range(n):
        start, end = i * chunk_size, min((i + 1) * chunk_size, total)
        if start < len(prefix):
            head = prefix[start : min(end, len(prefix))]
            tail = view[0 : max(0, end - len(prefix))]
            yield bytes(head) + bytes(tail)
        else:
            yield view[start - len(prefix) : end - len(prefix)]
