"""Crypto cost of the wire against its lower bound.

Seal+sign (``neurofed.wire.sealing.seal_message``, all frames built) and verify+open (``neurofed.wire.receiver``)
of one update, against bare AES-256-GCM plus one SHA-256 pass over the same bytes (both from
``cryptography``/hashlib): the ratio is the figure (goal <= 1.3). Also the one-shot HPKE call
against X25519+HKDF+AES-GCM composed by hand, on the bulk and as a 32-byte key wrap, which is why
the bulk goes through AES-GCM and HPKE only wraps the content key.

    .venv/bin/python -m benchmarks.crypto [--mb 20] [--repeat 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from benchmarks.common import emit


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=20.0)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    from neurofed.wire import crypto
    from neurofed.wire.api import MessageKind
    from neurofed.wire.bundle import load_bundle
    from neurofed.wire.provision import provision
    from neurofed.wire.receiver import Receiver
    from neurofed.wire.sealing import seal_message

    n = int(args.mb * 1024 * 1024)
    data = os.urandom(n)
    with tempfile.TemporaryDirectory() as tmp:
        provision(Path(tmp), "bench", ["site-a"], "localhost", 8883)
        site, coord = load_bundle(Path(tmp) / "site-a"), load_bundle(Path(tmp) / "coordinator")

    key, nonce = os.urandom(32), os.urandom(12)
    aead = AESGCM(key)
    ct = aead.encrypt(nonce, data, None)
    t_aes_enc = best(lambda: aead.encrypt(nonce, data, None), args.repeat)
    t_aes_dec = best(lambda: aead.decrypt(nonce, ct, None), args.repeat)
    t_sha = best(lambda: hashlib.sha256(data).digest(), args.repeat)
    lower_seal, lower_open = t_aes_enc + t_sha, t_aes_dec + t_sha

    frames_box: list = []

    def seal() -> None:
        frames_box[:] = list(seal_message(site, MessageKind.UPDATE, 1, {"num_cases": 3}, data).frames)

    t_seal = best(seal, args.repeat)
    frames = frames_box[:]

    def open_() -> None:
        r = Receiver(coord)
        out = None
        for topic, fr in frames:
            out = r.decode(topic, fr) or out
        assert out is not None and len(out.payload) == n

    t_open = best(open_, args.repeat)

    sk = X25519PrivateKey.generate()
    pk = sk.public_key()
    info = b"bench"
    hp_ct = crypto.SUITE.encrypt(data, pk, info=info)
    t_hpke_enc = best(lambda: crypto.SUITE.encrypt(data, pk, info=info), args.repeat)
    t_hpke_dec = best(lambda: crypto.SUITE.decrypt(hp_ct, sk, info=info), args.repeat)
    comp_ct = crypto.composed_wrap(data, pk, info)
    t_comp_enc = best(lambda: crypto.composed_wrap(data, pk, info), args.repeat)
    t_comp_dec = best(lambda: crypto.composed_unwrap(comp_ct, sk, info), args.repeat)
    k32 = os.urandom(32)
    reps = 200
    t0 = time.perf_counter()
    for _ in range(reps):
        crypto.SUITE.decrypt(crypto.SUITE.encrypt(k32, pk, info=info), sk, info=info)
    t_wrap_hpke = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        crypto.composed_unwrap(crypto.composed_wrap(k32, pk, info), sk, info)
    t_wrap_comp = (time.perf_counter() - t0) / reps
    mb = n / 1e6
    wire_bytes = sum(len(f) for _, f in frames)
    emit(
        "crypto",
        {
            "payload_mb": round(mb, 2),
            "chunks": len(frames),
            "lower_bound_aes_gcm_enc_plus_sha256_s": round(lower_seal, 4),
            "lower_bound_aes_gcm_dec_plus_sha256_s": round(lower_open, 4),
            "aes_gcm_enc_MBps": round(mb / t_aes_enc),
            "sha256_MBps": round(mb / t_sha),
            "seal_sign_s": round(t_seal, 4),
            "verify_open_s": round(t_open, 4),
            "seal_sign_over_lower_bound": round(t_seal / lower_seal, 3),
            "verify_open_over_lower_bound": round(t_open / lower_open, 3),
            "envelope_bytes_over_payload": round(wire_bytes / n, 5),
            "hpke_oneshot_bulk_enc_s": round(t_hpke_enc, 4),
            "hpke_oneshot_bulk_dec_s": round(t_hpke_dec, 4),
            "composed_bulk_enc_s": round(t_comp_enc, 4),
            "composed_bulk_dec_s": round(t_comp_dec, 4),
            "hpke_oneshot_over_composed_bulk": round(
                (t_hpke_enc + t_hpke_dec) / (t_comp_enc + t_comp_dec), 3
            ),
            "key_wrap_unwrap_us_hpke": round(t_wrap_hpke * 1e6, 1),
            "key_wrap_unwrap_us_composed": round(t_wrap_comp * 1e6, 1),
            "goal": "seal/open within 1.3x of AES-GCM + one SHA-256 pass",
        },
    )


if __name__ == "__main__":
    main()
