"""Faults for a federation on one machine: a seeded schedule and the means to inject each kind.

Every injection uses an outside, real mechanism: a SIGKILL to a process, the coordinator's own
``NEUROFED_FAULT`` points (``neurofed.coordinator.faults``), the broker's persistence file removed,
a network namespace's veth taken down, a tmpfs filled to its last byte, and MQTT messages published
with a site's own certificate. Nothing here knows whether the federation survives; the soak
(``neurofed.launch.soak``) checks that from what the surviving processes wrote.
"""

from __future__ import annotations

import errno
import json
import os
import random
import ssl
import subprocess
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from neurofed.errors import NeurofedError

KINDS = ("site-kill", "coordinator-kill", "broker-kill", "tamper-replay", "net-cut", "disk-full")
PLAIN_POINTS = ("after-aggregate", "after-persist", "after-register", "after-announce")
SECURE_POINTS = (*PLAIN_POINTS, "secagg-after-keysets", "secagg-after-inputs")


class ChaosError(NeurofedError):
    """A fault could not be injected (the federation's health is checked elsewhere)."""


@dataclass
class Fault:
    """One scheduled fault: its round, kind and the draws that place it."""

    round: int
    kind: str
    site: str = ""  # site-kill, tamper-replay, net-cut
    delay: float = 0.0  # seconds after the round's announcement
    point: str = ""  # coordinator-kill: the NEUROFED_FAULT point
    variant: str = ""  # broker-kill: "keep" (restart with its saved state) or "wipe" (without)

    def label(self) -> str:
        what = self.site or self.point
        return f"{self.kind}({', '.join(x for x in (what, self.variant) if x)})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def schedule(
    rounds: int, sites: Sequence[str], seed: int, *, secure: bool = False, max_delay: float = 2.0
) -> list[Fault]:
    """One fault per round, every kind at least once when ``rounds`` allows, the rest drawn at
    random; reproducible from ``seed``. A coordinator kill never lands in round 1 (a kill there
    leaves nothing registered to lose, so it would test less), nor a tamper-replay in the last
    round (its copies go out once the round took the site's update; after the last round the
    federation ends at once, so nothing would be left to refuse them). Broker kills alternate between
    keeping and dropping its saved state, starting with dropping it (the harder case)."""
    rng = random.Random(seed)  # a test schedule, never a secret
    kinds = list(KINDS)
    rng.shuffle(kinds)
    order = kinds[:rounds] + [rng.choice(KINDS) for _ in range(rounds - len(kinds))]
    tail = order[len(kinds) :]
    rng.shuffle(tail)
    order = order[: len(kinds)] + tail
    if order and order[0] == "coordinator-kill" and rounds > 1:
        order[0], order[1] = order[1], order[0]
    if rounds > 2 and order[-1] == "tamper-replay":
        swap = max(i for i in range(1, rounds - 1) if order[i] != "tamper-replay")
        order[-1], order[swap] = order[swap], order[-1]
    points = SECURE_POINTS if secure else PLAIN_POINTS
    out, brokers = [], 0
    for r, kind in enumerate(order, start=1):
        f = Fault(r, kind, delay=round(rng.uniform(0.2, max_delay), 2))
        if kind in ("site-kill", "tamper-replay", "net-cut"):
            f.site = rng.choice(list(sites))
        if kind == "coordinator-kill":
            f.point = rng.choice(points)
        if kind == "broker-kill":
            f.variant = ("wipe", "keep")[brokers % 2]
            brokers += 1
        out.append(f)
    return out


# -- the state disk ---------------------------------------------------------------------------------
def mount_tmpfs(folder: Path, size_mb: int) -> str | None:
    """Mount a ``size_mb`` tmpfs on ``folder``; return why not (not root, no mount), or None."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "a tmpfs for the coordinator's state needs root (mount)"
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={int(size_mb)}m,mode=0755", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    return None if done.returncode == 0 else f"cannot mount a tmpfs: {done.stderr.strip()}"


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill_disk(folder: Path) -> Path:
    """Write zeros to ``folder/.filler`` until the file system refuses another byte (the bulk
    reserved in one call, so the disk is full within milliseconds, not after seconds of writes)."""
    path = folder / ".filler"
    with open(path, "wb", buffering=0) as fh:
        st = os.statvfs(folder)
        bulk = st.f_bavail * st.f_frsize - (1 << 20)
        if bulk > 0:
            try:
                os.posix_fallocate(fh.fileno(), 0, bulk)
                fh.seek(bulk)
            except OSError:
                fh.seek(0)
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return path


# -- the network ----------------------------------------------------------------------------------
def set_link(veth: str, up: bool) -> None:
    """Take the host end of a site's veth down (the site is cut off) or up again."""
    done = subprocess.run(["ip", "link", "set", veth, "up" if up else "down"], capture_output=True, text=True)
    if done.returncode != 0:
        raise ChaosError(f"ip link set {veth}: {done.stderr.strip()}")


# -- messages with a site's own certificate --------------------------------------------------------
def site_update(state: Path, round: int) -> tuple[dict[str, Any], bytes] | None:
    """The meta block and payload of ``round``'s update as the site sent it (its state keeps the
    payload until the round closes and the meta in ``agent.json``), or None if not there yet
    (``update_stored``, which the site records once the file is whole, comes first)."""
    try:
        rs = json.loads((state / "agent.json").read_text())["rounds"][str(round)]
        if not rs.get("update_stored"):
            return None
        payload = (state / f"update-r{round:04d}.safetensors").read_bytes()
    except (OSError, KeyError, ValueError):
        return None
    meta = {k: rs.get(k) for k in ("num_cases", "model_digest", "loss", "train_seconds", "local_steps")}
    for key in ("encoding", "base_digest", "dp"):
        if rs.get(key) is not None:
            meta[key] = rs[key]
    return meta, payload


def publish_as(
    bundle_dir: Path, host: str, port: int, frames: Iterable[tuple[str, bytes]], timeout: float = 20.0
) -> int:
    """Publish ``(topic, bytes)`` at QoS 1 through the broker with the site's own certificate
    (the broker takes the certificate's CN as client id: the site's own connection is displaced
    for the moment this takes, as with a stolen certificate). Returns how many the broker took."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    ready = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"chaos-{os.getpid()}", protocol=mqtt.MQTTv5)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(bundle_dir / "ca.crt"))
    ctx.load_cert_chain(str(bundle_dir / "client.crt"), str(bundle_dir / "client.key"))
    c.tls_set_context(ctx)
    c.on_connect = lambda *a: ready.set()
    c.connect(host, port, 30, clean_start=True)
    c.loop_start()
    try:
        if not ready.wait(timeout):
            raise ChaosError(f"no CONNACK for {bundle_dir.name}'s certificate from {host}:{port}")
        infos = [c.publish(topic, bytes(data), qos=1) for topic, data in frames]
        for info in infos:
            info.wait_for_publish(timeout)
        return sum(1 for i in infos if i.is_published())
    finally:
        c.disconnect()
        c.loop_stop()


def tamper_and_replay(
    bundle_dir: Path, host: str, port: int, run: str, round: int, meta: dict[str, Any], payload: bytes
) -> dict[str, Any]:
    """Publish, with the site's certificate and keys, (1) its round update sealed again with one
    bit of its last chunk's ciphertext flipped (a tampered chunk) and (2) the same update sealed
    again intact (a replay of what the coordinator already holds). Returns what was sent."""
    from neurofed.wire.api import MessageKind
    from neurofed.wire.bundle import load_bundle
    from neurofed.wire.sealing import seal_message

    bundle = load_bundle(bundle_dir)
    chunk = 64 * 1024
    tampered = list(
        seal_message(bundle, MessageKind.UPDATE, round, meta, payload, run=run, chunk_size=chunk).frames
    )
    topic, data = tampered[-1]
    flipped = bytearray(data)
    flipped[-1] ^= 0x01
    tampered[-1] = (topic, bytes(flipped))
    replay = list(
        seal_message(bundle, MessageKind.UPDATE, round, meta, payload, run=run, chunk_size=chunk).frames
    )
    taken = publish_as(bundle_dir, host, port, [*tampered, *replay])
    return {"frames": len(tampered) + len(replay), "taken_by_broker": taken}
