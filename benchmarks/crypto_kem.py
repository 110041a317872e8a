"""What the post-quantum sealing option costs: ``x25519`` against ``mlkem768-x25519``.

A federation provisioned with ``--kem mlkem768-x25519`` wraps every message's content key with the
hybrid ML-KEM-768+X25519 HPKE KEM instead of DHKEM-X25519. The bulk is AES-256-GCM either way, so
the cost is per recipient: 1,168 instead of 80 bytes per wrapped key and the KEM's arithmetic. On
the messages of a federation of ``--sites`` sites, for each KEM: a model of ``--model-mb``
broadcast to every site, a 1 KiB message to every site (a task), a 1 KiB update to the coordinator
(seal+sign of all frames, then verify+open at one receiver, best of ``--repeat``; bytes on the
wire and the key block), a secure-aggregation site's key set and share bundles (which the hybrid
KEM also seals), and the roster's size. Prints one JSON object (``crypto-kem``).

    .venv/bin/python -m benchmarks.crypto_kem [--sites 10] [--model-mb 19.3] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import emit
from benchmarks.crypto import best

KEMS = ("x25519", "mlkem768-x25519")


def seal_open(sender: Any, receiver: Any, kind: Any, payload: bytes, repeat: int) -> dict[str, float]:
    """Seal+sign every frame of one message, then verify+open it at ``receiver``."""
    from neurofed.wire.envelope import decode_frame
    from neurofed.wire.receiver import Receiver
    from neurofed.wire.sealing import seal_message

    box: list = []

    def seal() -> None:
        box[:] = list(seal_message(sender, kind, 1, {"num_cases": 3}, payload).frames)

    t_seal = best(seal, repeat)
    frames = box[:]

    def open_() -> None:
        out = None
        r = Receiver(receiver)
        for topic, fr in frames:
            out = r.decode(topic, fr) or out
        assert out is not None and out.payload == payload

    t_open = best(open_, repeat)
    return {
        "seal_sign_ms": round(t_seal * 1e3, 3),
        "verify_open_ms": round(t_open * 1e3, 3),
        "wire_bytes": sum(len(f) for _, f in frames),
        "key_block_bytes": len(decode_frame(frames[0][1]).keys_bytes),
    }


def secagg_site(kem: str, sites: int, repeat: int) -> dict[str, float]:
    """One site of a secure round of ``sites`` (k = n - 1 up to 10 sites): its key set, sharing
    with every neighbour, and opening the neighbours' bundles before masking 1,024 values."""
    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from neurofed.wire.secagg import RoundContext, SecAggClient, SecAggConfig

    ids = [f"site-{i:02d}" for i in range(sites)]
    keys = {s: Ed25519PrivateKey.generate() for s in ids}
    roster = {s: k.public_key() for s, k in keys.items()}
    times: dict[str, list[float]] = {"keyset": [], "shares": [], "open": []}
    sizes: dict[str, int] = {}
    for attempt in range(repeat):
        cfg = SecAggConfig.create(RoundContext("bench", "run", 1, attempt), ids, 1024, 10.0, kem=kem)
        t = time.perf_counter()
        clients = {s: SecAggClient(s, cfg, keys[s], roster) for s in ids}  # fresh secrets
        keysets = {s: c.make_keyset() for s, c in clients.items()}
        times["keyset"].append((time.perf_counter() - t) / sites)
        me = ids[0]
        t = time.perf_counter()
        mine = clients[me].make_shares(keysets)
        times["shares"].append(time.perf_counter() - t)
        received = {s: clients[s].make_shares(keysets)[me] for s in ids[1:] if me in cfg.neighbours(s)}
        t = time.perf_counter()
        clients[me].mask(np.zeros(1024, np.float32), 1, received)
        times["open"].append(time.perf_counter() - t)
        sizes = {"keyset_bytes": len(keysets[me]), "share_bundle_bytes": len(next(iter(mine.values())))}
    return {
        "fresh_keys_and_keyset_ms": round(min(times["keyset"]) * 1e3, 3),
        "share_to_all_neighbours_ms": round(min(times["shares"]) * 1e3, 3),
        "open_bundles_and_mask_1k_ms": round(min(times["open"]) * 1e3, 3),
        **sizes,
    }


def measure(kem: str, sites: int, model: bytes, repeat: int) -> dict[str, Any]:
    from neurofed.wire.api import MessageKind
    from neurofed.wire.bundle import load_bundle
    from neurofed.wire.provision import provision

    site_ids = [f"site-{i:02d}" for i in range(sites)]
    small = os.urandom(1024)
    with tempfile.TemporaryDirectory() as tmp:
        provision(Path(tmp), "bench", site_ids, "localhost", 8883, kem=kem)
        coord = load_bundle(Path(tmp) / "coordinator")
        site = load_bundle(Path(tmp) / site_ids[0])
        roster_bytes = (Path(tmp) / "coordinator" / "roster.json").stat().st_size
    mb = len(model) / 1e6
    return {
        f"model_{mb:g}MB_to_{sites}_sites": seal_open(coord, site, MessageKind.MODEL, model, repeat),
        f"small_1KiB_to_{sites}_sites": seal_open(coord, site, MessageKind.TASK, small, repeat * 20),
        "small_1KiB_update_to_coordinator": seal_open(site, coord, MessageKind.UPDATE, small, repeat * 20),
        f"secagg_site_of_{sites}": secagg_site(kem, sites, repeat),
        "roster_bytes": roster_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument(
        "--model-mb", type=float, default=19.3, help="the broadcast model (default UNet: 19.3 MB)"
    )
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    model = os.urandom(int(args.model_mb * 1e6))
    out = {kem: measure(kem, args.sites, model, args.repeat) for kem in KEMS}
    x, pq = out["x25519"], out["mlkem768-x25519"]
    ratios = {
        name: {
            "seal_sign": round(pq[name]["seal_sign_ms"] / x[name]["seal_sign_ms"], 3),
            "verify_open": round(pq[name]["verify_open_ms"] / x[name]["verify_open_ms"], 3),
            "wire_bytes": round(pq[name]["wire_bytes"] / x[name]["wire_bytes"], 5),
            "extra_wire_bytes": pq[name]["wire_bytes"] - x[name]["wire_bytes"],
        }
        for name in x
        if isinstance(x[name], dict) and "wire_bytes" in x[name]
    }
    emit(
        "crypto_kem",
        {
            "sites": args.sites,
            "model_mb": args.model_mb,
            "repeat": args.repeat,
            **out,
            "mlkem768-x25519_over_x25519": ratios,
            "note": "seal = every frame built and signed; open = one receiver verifies and opens all",
        },
    )


if __name__ == "__main__":
    main()
