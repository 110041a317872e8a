"""Through a real Mosquitto, with a raw paho client holding a site's certificate (issue 21):

- a forged copy of one chunk of the site's genuine multi-chunk update (one bit flipped in its body,
  the same signed header), arriving before the message's key, before the genuine chunk or after
  it, spoils nothing: the coordinator's endpoint gets the genuine message intact and counts the
  forgery as ``tampered-chunk`` (the former receiver dropped the whole message on a differing
  duplicate, ``chunk-conflict``, and counted the genuine chunks after it as replays);
- the replay window survives a restart: an update taken before the coordinator's endpoint
  restarts, published again after, is ``replay`` (the window is persisted in ``seen_path``).
"""

from __future__ import annotations

import os
import time

import pytest

from neurofed.wire.api import MessageKind
from neurofed.wire.bundle import load_bundle
from neurofed.wire.envelope import new_run_id
from neurofed.wire.mqtt import MqttEndpoint
from neurofed.wire.sealing import seal_message
from tests.wire.helpers import RawClient, flip

pytestmark = pytest.mark.slow

META = {"num_cases": 3, "loss": 0.5}


def _update(broker, run: str, size: int = 20_000) -> tuple[bytes, list[tuple[str, bytes]]]:
    """site-a's genuine UPDATE for round 1 of ``run``: its payload and frames (4 KiB chunks)."""
    payload = os.urandom(size)
    sealed = seal_message(
        load_bundle(broker.bundle("site-a")), MessageKind.UPDATE, 1, META, payload, chunk_size=4096, run=run
    )
    return payload, [(t, bytes(f)) for t, f in sealed.frames]


def _receive(ep: MqttEndpoint, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = ep.receive(timeout=0.2)
        if m is not None:
            return m
    return None


def _wait_rejections(ep: MqttEndpoint, reason: str, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while ep.rejections.get(reason, 0) < n and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("when", ["before-the-key", "before", "after"])
def test_a_forged_chunk_through_the_broker_spoils_nothing(broker, when):
    run = new_run_id()
    coord = MqttEndpoint(broker.bundle("coordinator"), run=run)
    coord.start(timeout=20)
    site = RawClient(broker.bundle("site-a"), broker.port)
    try:
        payload, frames = _update(broker, run)
        assert len(frames) >= 5
        k = 2
        topic, genuine = frames[k]
        forged = (topic, flip(genuine, len(genuine) - 200))  # in the ciphertext; header untouched
        order = {
            "before-the-key": [forged, *frames],  # no key yet: kept as a candidate beside the genuine
            "before": [*frames[:k], forged, *frames[k:]],  # held first, displaced by the genuine
            "after": [*frames[: k + 1], forged, *frames[k + 1 :]],  # refused on arrival
        }[when]
        site.publish(order)
        msg = _receive(coord, 15)
        assert msg is not None, f"the genuine message was lost: {dict(coord.rejections)}"
        assert bytes(msg.payload) == payload and msg.meta == META and msg.sender == "site-a"
        _wait_rejections(coord, "tampered-chunk", 1)
        assert dict(coord.rejections) == {"tampered-chunk": 1}, "no chunk-conflict, no replay"
        (rec,) = coord.drain_rejected()
        assert (rec["reason"], rec["sender"], rec["kind"], rec["round"]) == (
            "tampered-chunk",
            "site-a",
            "update",
            1,
        )
    finally:
        site.close()
        coord.close()


def test_the_replay_window_survives_a_coordinator_restart(broker, tmp_path):
    run = new_run_id()
    seen = tmp_path / "seen-messages.log"
    payload, frames = _update(broker, run)

    def restart(seen_path):
        ep = MqttEndpoint(broker.bundle("coordinator"), run=run, seen_path=seen_path)
        ep.start(timeout=20)
        return ep

    site = RawClient(broker.bundle("site-a"), broker.port)
    try:
        first = restart(seen)
        try:
            site.publish(frames)
            msg = _receive(first, 15)
            assert msg is not None and bytes(msg.payload) == payload
        finally:
            first.close()
        assert msg.msg_id in seen.read_text()

        again = restart(seen)  # the same state: the same window
        try:
            site.publish(frames)
            _wait_rejections(again, "replay", len(frames))
            assert _receive(again, 1.0) is None, "a message taken before the restart was taken again"
            assert dict(again.rejections) == {"replay": len(frames)}
        finally:
            again.close()

        forgetful = restart(None)  # control: without the persisted window the same frames get in
        try:
            site.publish(frames)
            msg = _receive(forgetful, 15)
            assert msg is not None and bytes(msg.payload) == payload
        finally:
            forgetful.close()
    finally:
        site.close()
