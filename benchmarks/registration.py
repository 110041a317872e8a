"""Registration time per round against model size, and as a share of a typical round.

For each model size (tiny, small, default) it registers ``--rounds`` rounds of real weights on a
real MLflow server (SQLite, proxied artifacts, started here) through ``FederationTracker`` and
times each ``register_round`` (ONNX export, MLflow folder, upload, version, aliases) and
``record_evaluation``. A typical round is taken as one local epoch of ``--cases`` 64^3 patches at
one site (sites train in parallel), measured here as forward+backward+Adam steps of the same
model with one thread; pass ``--round-seconds`` to use a measured round time instead.
Registration runs off the round's critical path, so the share is background work, not delay.

    .venv/bin/python -m benchmarks.registration [--rounds 3] [--sizes tiny,small,default]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.common import emit


def train_step_seconds(cfg, side: int = 64, reps: int = 3) -> float:
    import torch

    from neurofed.models.unet import build_unet

    model = build_unet(cfg)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(1, cfg.in_channels, side, side, side)
    y = (torch.rand(1, 1, side, side, side) > 0.9).float()
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="tiny,small,default")
    ap.add_argument("--cases", type=int, default=16, help="training cases per site per round (typical round)")
    ap.add_argument(
        "--round-seconds", type=float, default=None, help="use this round time instead of estimating"
    )
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from neurofed.mlflow_server.server import MlflowServer
    from neurofed.mlflow_server.tracking import FederationTracker
    from neurofed.models.checkpoint import save_weights
    from neurofed.models.config import preset
    from neurofed.models.unet import build_unet, count_parameters
    from tests.fixtures.mlflow import free_port

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="nf-bench-reg-") as tmp:
        t0 = time.perf_counter()
        with MlflowServer(port=free_port(), state_dir=Path(tmp) / "state", startup_timeout=180) as srv:
            startup = time.perf_counter() - t0
            for size in args.sizes.split(","):
                cfg = preset(size)
                model = build_unet(cfg)
                tr = FederationTracker(srv.url, f"bench-{size}-{uuid.uuid4().hex[:4]}", {"size": size})
                reg, ev = [], []
                for r in range(1, args.rounds + 1):
                    torch.manual_seed(r)
                    w = save_weights(Path(tmp) / f"{size}-{r}.safetensors", build_unet(cfg).state_dict(), cfg)
                    t = time.perf_counter()
                    tr.register_round(r, w, cfg, sites={"site-a": 8, "site-b": 8}, cases=16)
                    reg.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    tr.record_evaluation(r, 0.5 + 0.01 * r, {"site-a": 0.5, "site-b": 0.5})
                    ev.append(time.perf_counter() - t)
                tr.close()
                step = train_step_seconds(cfg)
                round_s = args.round_seconds or step * args.cases
                reg_med = statistics.median(reg[1:] if len(reg) > 1 else reg)  # first includes warm-up
                results[size] = {
                    "params": count_parameters(model),
                    "weights_mb": round(Path(w).stat().st_size / 1e6, 2),
                    "register_s_first": round(reg[0], 3),
                    "register_s_median": round(reg_med, 3),
                    "record_evaluation_s_median": round(statistics.median(ev), 3),
                    "train_step_64cube_s": round(step, 3),
                    "typical_round_s": round(round_s, 2),
                    "registration_share_of_round": round((reg_med + statistics.median(ev)) / round_s, 4),
                }
    emit(
        "registration",
        {
            "rounds_per_size": args.rounds,
            "server_startup_s": round(startup, 1),
            "typical_round": (
                f"given: {args.round_seconds} s"
                if args.round_seconds
                else f"one local epoch of {args.cases} 64^3 cases at one site, 1 thread"
            ),
            "sizes": results,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
