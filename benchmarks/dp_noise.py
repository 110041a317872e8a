"""What client-level DP's noise costs per round: the coordinator's central Gaussian noise
(ChaCha20 + Box-Muller) on a whole model, a site's Skellam share under secure aggregation, the
masking step with and without that share, and the accountant's time to solve a noise multiplier.

    .venv/bin/python -m benchmarks.dp_noise [--params 1200000 4800000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import emit


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(min(times), 4)


def _mask_seconds(cfg, ids: dict, roster: dict, extra: dict) -> float:
    """One site's masking step (clip, quantize, noise, masks) of a zero update, in seconds."""
    from neurofed.wire.secagg import SecAggClient, SecAggServer

    sites = list(cfg.participants)
    clients = {s: SecAggClient(s, cfg, ids[s], roster) for s in sites}
    server = SecAggServer(cfg, roster)
    for s in sites:
        server.add_keyset(s, clients[s].make_keyset())
    keysets = server.close_keysets()
    for s in sites:
        server.add_shares(s, clients[s].make_shares(keysets))
    server.close_shares()
    t0 = time.perf_counter()
    clients[sites[0]].mask(
        np.zeros(cfg.length - cfg.counts, np.float32), 1, server.shares_for(sites[0]), **extra
    )
    return round(time.perf_counter() - t0, 4)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, nargs="+", default=[1_200_000, 4_800_000])
    args = ap.parse_args(argv)

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from neurofed.edge_node.privacy import skellam_noise
    from neurofed.models.client_privacy import solve_client_noise
    from neurofed.models.dp_noise import SecureGaussian
    from neurofed.wire.secagg import RoundContext, SecAggConfig

    out: dict = {"sizes": {}}
    for n in args.params:
        row: dict = {}
        mean = np.zeros(n, np.float64)
        row["central_gaussian_s"] = _best(lambda mean=mean: SecureGaussian().add_to(mean, 0.01))
        sites = [f"s{i}" for i in range(5)]
        ids = {s: Ed25519PrivateKey.generate() for s in sites}
        roster = {s: k.public_key() for s, k in ids.items()}
        for label, kw in (("plain", {}), ("noisy", {"noise_std": 0.5, "counts": 1, "count_noise_std": 2.0})):
            cfg = SecAggConfig.create(
                RoundContext("bench", "run", 1, 0),
                sites,
                n + kw.get("counts", 0),
                1.0,
                max_total_weight=5,
                **kw,
            )
            if label == "noisy":
                segments = [(n, cfg.site_noise_variance), (1, cfg.site_count_variance)]
                row["skellam_share_s"] = _best(lambda segments=segments: skellam_noise(segments, 7))
                row["noisy_scale_log2"] = cfg.scale_log2
                extra = {"counts": [1], "noise": skellam_noise(segments, 7)}
            else:
                row["plain_scale_log2"] = cfg.scale_log2
                extra = {}
            row[f"mask_{label}_s"] = _mask_seconds(cfg, ids, roster, extra)
        out["sizes"][str(n)] = row
    t0 = time.perf_counter()
    z = solve_client_noise(8.0, 1e-5, 1.0, 50)
    out["solve_client_noise"] = {
        "epsilon": 8.0,
        "rounds": 50,
        "z": round(z, 4),
        "s": round(time.perf_counter() - t0, 3),
    }
    return emit("dp_noise", out)


if __name__ == "__main__":
    main()
