"""Cost of the secure-aggregation core (``neurofed.wire.secagg``), in one process, no transport.

For each model size (1.2 M and 4.8 M parameters: the two UNets of the study; 5 M as the design's
reference figure) a 10-site round with default k and t runs every phase in memory, once with all
sites and once with 3 of 10 dropped after sharing. Reported: per-site time of each phase (median
over sites; ``mask_s`` is the whole masked input: clip, quantize, weight, self mask and k pairwise
AES-256-CTR masks), the mask-generation part alone, the coordinator's fold per input and its
unmasking, bytes per phase per site against the float32 update, and the error against plaintext
FedAvg next to its stated bound.

    .venv/bin/python -m benchmarks.secagg_core [--sizes 1200000,4800000,5000000] [--sites 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from benchmarks.common import emit, peak_rss_mb
from neurofed.wire.secagg import RoundContext, SecAggClient, SecAggConfig, SecAggServer
from neurofed.wire.secagg.prg import apply_stream, derive_key


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def run(length: int, n: int, dropped: int, clip: float = 10.0) -> dict:
    sites = [f"site-{i:02d}" for i in range(n)]
    ids = {s: Ed25519PrivateKey.generate() for s in sites}
    roster = {s: k.public_key() for s, k in ids.items()}
    cfg = SecAggConfig.create(RoundContext("bench", "run", 1, dropped), sites, length, clip)
    clients = {s: SecAggClient(s, cfg, ids[s], roster) for s in sites}
    server = SecAggServer(cfg, roster)
    rng = np.random.default_rng(0)  # benchmark data, not secrets
    ups = {s: (rng.standard_normal(length) * 1e-3).astype(np.float32) for s in sites}
    ws = {s: int(rng.integers(10, 60)) for s in sites}
    t = {k: [] for k in ("keyset", "shares", "mask", "fold", "echo", "reveal")}
    size = {
        k: []
        for k in ("keyset", "shares_out", "shares_in", "masked", "survivors", "echo", "request", "reveal")
    }

    for s in sites:
        ks, dt = timed(clients[s].make_keyset)
        t["keyset"].append(dt)
        size["keyset"].append(len(ks))
        server.add_keyset(s, ks)
    keysets = server.close_keysets()
    for s in sites:
        b, dt = timed(clients[s].make_shares, keysets)
        t["shares"].append(dt)
        size["shares_out"].append(sum(map(len, b.values())))
        server.add_shares(s, b)
    server.close_shares()
    live = sites[dropped:]
    for s in live:
        got = server.shares_for(s)
        size["shares_in"].append(sum(map(len, got.values())))
        m, dt = timed(clients[s].mask, ups[s], ws[s], got)
        t["mask"].append(dt)
        size["masked"].append(len(m))
        _, dt = timed(server.add_masked_input, s, m)
        t["fold"].append(dt)
    lst, close_s = timed(server.close_inputs)
    for s in live:
        e, dt = timed(clients[s].consistency, lst)
        t["echo"].append(dt)
        size["echo"].append(len(e))
        size["survivors"].append(len(lst))
        server.add_echo(s, e)
    req = server.unmask_request()
    for s in live:
        r, dt = timed(clients[s].unmask, req)
        t["reveal"].append(dt)
        size["request"].append(len(req))
        size["reveal"].append(len(r))
        server.add_reveal(s, r)
    res, finish_s = timed(server.finish)

    total = sum(ws[s] for s in live)
    want = sum(ws[s] * ups[s].astype(np.float64) for s in live) / total
    return {
        "length": length,
        "sites": n,
        "dropped_after_sharing": dropped,
        "k": cfg.k,
        "t": cfg.t,
        "ring_bits": cfg.bits,
        "scale_log2": cfg.scale_log2,
        "error_bound": cfg.error_bound,
        "max_abs_error_vs_fedavg": float(np.max(np.abs(res.mean - want))),
        "site_s_median": {k: statistics.median(v) for k, v in t.items() if k != "fold"},
        "site_mask_s_max": max(t["mask"]),
        "coordinator_fold_s_per_input": statistics.median(t["fold"]),
        "coordinator_close_inputs_s": close_s,
        "coordinator_unmask_s": finish_s,
        "bytes_per_site": {k: int(statistics.median(v)) for k, v in size.items() if v},
        "float32_update_bytes": 4 * length,
        "masked_over_float32": statistics.median(size["masked"]) / (4 * length),
    }


def mask_generation(length: int, masks: int, bits: int = 32) -> float:
    """Seconds to add ``masks`` AES-256-CTR masks to a vector of ``length`` ring words (best of 3)."""
    acc = np.zeros(length, dtype=np.dtype(f"<u{bits // 8}"))
    keys = [derive_key(bytes([i]) * 32, b"bench") for i in range(masks)]
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for k in keys:
            apply_stream(acc, k, 1)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1200000,4800000")
    ap.add_argument("--sites", type=int, default=10)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rounds = []
    for length in sizes:
        rounds.append(run(length, args.sites, 0))
        rounds.append(run(length, args.sites, 3))
    gen = {
        "5M_one_mask_u32_s": mask_generation(5_000_000, 1),
        "5M_ten_masks_u32_s": mask_generation(5_000_000, 10),
        "5M_ten_masks_u64_s": mask_generation(5_000_000, 10, 64),
    }
    emit("secagg_core", {"rounds": rounds, "mask_generation": gen, "peak_rss_mb": peak_rss_mb()})


if __name__ == "__main__":
    main()
