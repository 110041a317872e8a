"""``neurofed coordinator``: run the federation's rounds (announce, collect, aggregate, persist,
register) over the secure MQTT wire, resuming from its state folder after a crash."""

from __future__ import annotations

import argparse

NAME = "coordinator"
# The CLI stays import-light (no numpy at parser build); tests/coordinator/test_commands.py pins
# these to coordinator.strategies.STRATEGIES and coordinator.rounds.SITE_OPTIMIZER / LR_SCHEDULES.
STRATEGIES = ("fedavg", "fedprox", "fednova", "fedavgm", "fedadam", "fedyogi", "median", "trimmed-mean")
SITE_OPTIMIZER = ("reset", "continue-local", "continue-global")


def local_epochs(text: str) -> int | float:
    """``--local-epochs``: a positive number; whole numbers stay ints (as the task carries them)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number of epochs, got {text}")
    return int(value) if value.is_integer() else value


LR_SCHEDULES = ("constant", "cosine")
EXAMPLE = """\
example:
  neurofed coordinator --bundle bundles/coordinator --rounds 5 --min-sites 2 --round-timeout 600 \\
      --strategy fedavg --local-epochs 1 --mlflow http://127.0.0.1:5000

Restarting the same command resumes from --state (default: BUNDLE/../coordinator-state) at the
last persisted round; no round is lost or registered twice. SIGTERM (docker stop; exit 143)
or Ctrl-C stops it within seconds with that state kept. The federation ends with an
evaluation-only round, so every site scores the last model too. A new federation needs a new
--state; its sites may start before or after its coordinator.
"""


def _triple(text: str) -> tuple[float, float, float]:
    parts = [float(p) for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected one or three numbers, got {text!r}")
    return (parts[0], parts[1], parts[2])


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="run the federation's rounds (aggregation, quorum, deadlines, crash-resume, registry)",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bundle", required=True, help="the coordinator's bundle folder, DIR/coordinator")
    p.add_argument("--rounds", type=int, default=5, help="training rounds (default 5)")
    p.add_argument(
        "--min-sites", type=int, help="quorum: sites needed to close a round at its deadline (default: all)"
    )
    p.add_argument(
        "--round-timeout",
        type=float,
        default=600.0,
        help="seconds per round before the deadline (default 600)",
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="fedavg",
        help="aggregation strategy (default fedavg; fednova normalises each site's update by its local "
        "steps, for sites of very different sizes; fedavgm adds server momentum; median and trimmed-mean resist outliers)",
    )
    p.add_argument(
        "--local-epochs",
        type=local_epochs,
        default=1,
        help="local epochs per round at each site (default 1); a fraction such as 0.5 trains that share of "
        "an epoch's batches per round, the next round going on where it stopped (fewer local steps "
        "between averages: less drift apart on unlike sites)",
    )
    p.add_argument(
        "--mu", type=float, default=0.01, help="FedProx proximal weight, sent to the sites (default 0.01)"
    )
    p.add_argument(
        "--server-lr",
        type=float,
        help="fedavgm/fedadam/fedyogi: the server optimiser's learning rate (fedavgm default 1; "
        "fedadam/fedyogi default 1e-2, which the study's runs found unstable, see docs/study)",
    )
    p.add_argument(
        "--server-momentum",
        type=float,
        help="fedavgm: momentum of the server's update buffer, in [0, 1) (default 0.5; 0.9 diverged on "
        "the study's sites, see docs/study)",
    )
    p.add_argument("--max-norm", type=float, help="bound each site's update norm (L2 of the delta) to this")
    p.add_argument("--state", help="state folder for resume (default: BUNDLE/../coordinator-state)")
    p.add_argument("--mlflow", help="MLflow tracking URI for round metrics and the model registry")
    p.add_argument("--model-size", choices=("default", "small", "tiny"), default="default", help="UNet size")
    p.add_argument(
        "--patch-size", type=int, help="training patch edge in voxels (multiple of 16; default 64)"
    )
    p.add_argument("--spacing", type=_triple, help="voxel size in mm the model trains at, e.g. 3 or 1,1,1")
    p.add_argument(
        "--fp16",
        action="store_true",
        help="half-precision transfers: the model in fp16 and each site's change (not its weights) in fp16, "
        "added to the coordinator's fp32 weights; half the bytes, measured Dice unchanged",
    )
    p.add_argument(
        "--site-optimizer",
        choices=SITE_OPTIMIZER,
        default="reset",
        help="sites' Adam state between rounds: reset (fresh each round, FedAvg's convention), "
        "continue-local (keep each site's moments) or continue-global (sites send their moments, "
        "the coordinator averages them and sends them with the model; 3x the bytes); see docs/study "
        "for the measured effect",
    )
    p.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default="constant",
        help="sites' learning rate over the rounds: constant, or cosine (1 in the first round, decaying "
        "to near 0 in the last; measured effect in docs/study)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the initial model (default 0)")
    p.add_argument("--init-weights", help="start from this neurofed weights file instead of a fresh UNet")
    p.add_argument(
        "--linger",
        type=float,
        default=60.0,
        help="after the federation's end, stay up to this many seconds while sites have not left, "
        "publishing the end again if the broker comes back without it (default 60; sites leave at "
        "once on the end, so this costs nothing unless one is stopped or cut off; 0: exit at once)",
    )
    p.set_defaults(func=run)
    return p


def model_config_from(args: argparse.Namespace) -> dict:
    from neurofed.models.config import preset

    pre: dict = {}
    if getattr(args, "patch_size", None):
        pre["patch_size"] = (args.patch_size,) * 3
    if getattr(args, "spacing", None):
        pre["spacing"] = tuple(args.spacing)
    return preset(args.model_size, **pre).to_dict()


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from neurofed.coordinator.service import CoordinatorSettings, run_coordinator
    from neurofed.stopping import exit_on_sigterm

    # docker stop / a launcher's SIGTERM: stop like Ctrl-C (the state is kept, the broker gets a
    # DISCONNECT) within docker's 10-s grace, instead of dying without a goodbye
    exit_on_sigterm()
    results = run_coordinator(
        CoordinatorSettings(
            bundle=Path(args.bundle),
            rounds=args.rounds,
            min_sites=args.min_sites,
            round_timeout=args.round_timeout,
            strategy=args.strategy,
            local_epochs=args.local_epochs,
            mu=args.mu,
            max_norm=args.max_norm,
            server_lr=args.server_lr,
            server_momentum=args.server_momentum,
            state_dir=Path(args.state) if args.state else None,
            mlflow_uri=args.mlflow,
            model_config=model_config_from(args),
            seed=args.seed,
            fp16=args.fp16,
            site_optimizer=args.site_optimizer,
            lr_schedule=args.lr_schedule,
            init_weights=Path(args.init_weights) if args.init_weights else None,
            linger=args.linger,
        )
    )
    for r in results:
        dice = ", ".join(f"{s} {m['dice']:.3f}" for s, m in sorted(r.metrics.items()))
        what = "train" if r.train else "evaluate"
        print(
            f"round {r.round} ({what}): {len(r.sites)} updates, {r.num_cases} cases, "
            f"{len(r.rejected)} rejected, {r.seconds:.1f} s; Dice of model {r.round - 1}: {dice or '-'}"
        )
    return 0
