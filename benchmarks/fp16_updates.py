"""Half-precision models and updates on the wire: bytes saved and Dice lost.

The same federation runs twice through the real stack (provisioning, private Mosquitto with mTLS,
one edge process per site, the coordinator; `neurofed experiment`'s FL arm), once in float32 and
once with ``neurofed coordinator --fp16`` (global model and site updates cast to float16 on the
wire, back to float32 at each end). Same data, seed, initial weights and budget. Reported: bytes
of one update and of the global model in each precision (their ratio), and the final global
model's Dice on the held-out test cases of every site.

    .venv/bin/python -m benchmarks.fp16_updates [--sites 3 --cases 48 --shape 32 --rounds 4 --epochs 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--cases", type=int, default=48)
    ap.add_argument("--shape", type=int, default=32)
    ap.add_argument("--model", default="tiny", choices=("tiny", "small", "default"))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)

    from neurofed.experiment import Arms, Profile, run_federated_arm
    from neurofed.launch.local import make_data
    from neurofed.wire.payload import encode_state

    work = Path(args.out or tempfile.mkdtemp(prefix="nf-fp16-"))
    shape = (args.shape,) * 3
    make_data(work / "data", args.sites, args.cases, shape)
    profile = Profile(
        name="fp16-bench",
        sites=args.sites,
        cases=args.cases,
        shape=shape,
        model_size=args.model,
        rounds=args.rounds,
        local_epochs=args.epochs,
    )
    arms = Arms(work / "data", profile, device="cpu")
    runs = {}
    for label, extra in (("fp32", []), ("fp16", ["--fp16"])):
        t0 = time.time()
        fl = run_federated_arm(
            work / "data", work / label, profile, arms.model_config, None, coordinator_args=extra
        )
        test = arms.evaluate_state(fl["state"])
        model_bytes = len(encode_state(fl["state"], fp16=label == "fp16"))
        runs[label] = {
            "update_bytes_median": int(statistics.median(fl["update_bytes"])),
            "model_bytes": model_bytes,
            "test_dice_mean": round(test["dice"]["mean"], 4),
            "test_dice_std": round(test["dice"]["std"], 4),
            "val_dice_per_round": [round(c["dice"], 4) for c in fl["curve"]],
            "seconds": round(time.time() - t0, 1),
        }
    return emit(
        "fp16_updates",
        {
            "config": {
                "sites": args.sites,
                "cases": args.cases,
                "shape": list(shape),
                "model": args.model,
                "rounds": args.rounds,
                "local_epochs": args.epochs,
                "test_cases": test["cases"],
            },
            "runs": runs,
            "update_bytes_ratio_fp16_over_fp32": round(
                runs["fp16"]["update_bytes_median"] / runs["fp32"]["update_bytes_median"], 4
            ),
            "dice_difference_fp16_minus_fp32": round(
                runs["fp16"]["test_dice_mean"] - runs["fp32"]["test_dice_mean"], 4
            ),
        },
    )


if __name__ == "__main__":
    main()
