"""``neurofed coordinator``: run the federation's rounds (announce, collect, aggregate, persist,
register) over the secure MQTT wire, resuming from its state folder after a crash."""

from __future__ import annotations

import argparse

NAME = "coordinator"
# The CLI stays import-light (no numpy at parser build); tests/coordinator/test_commands.py pins
# these to coordinator.strategies.STRATEGIES and coordinator.rounds.SITE_OPTIMIZER / LR_SCHEDULES.
STRATEGIES = ("fedavg", "fedprox", "fednova", "fedavgm", "fedadam", "fedyogi", "median", "trimmed-mean")
SITE_OPTIMIZER = ("reset", "continue-local", "continue-global")
COMPRESSIONS = ("none", "fp16", "int8", "int8-topk")  # neurofed.wire.compression.COMPRESSIONS


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
    p.add_argument(
        "--max-norm",
        type=float,
        help="bound each site's update norm (L2 of the delta) to this; with --secure-aggregation it is "
        "each site's own clip (default there 10)",
    )
    p.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="SecAgg+: sites send only masked updates and the coordinator learns only their weighted "
        "sum; rounds survive sites dropping out down to the threshold (needs 3+ sites; not with "
        "median, trimmed-mean, --fp16 or --site-optimizer continue-global)",
    )
    p.add_argument(
        "--secagg-k", type=int, help="secure aggregation: neighbours per site (default by site count)"
    )
    p.add_argument(
        "--secagg-t", type=int, help="secure aggregation: shares that reconstruct a secret (> k/2)"
    )
    p.add_argument(
        "--secagg-bits",
        type=int,
        choices=(32, 64),
        help="secure aggregation: ring size (default: 32 when it fits)",
    )
    p.add_argument(
        "--secagg-max-cases",
        type=int,
        default=4096,
        help="secure aggregation: most training cases all sites together may weigh (default 4096)",
    )
    p.add_argument(
        "--secagg-phase-timeout",
        type=float,
        default=60.0,
        help="secure aggregation: seconds for each key, share, echo and reveal step (default 60)",
    )
    p.add_argument("--state", help="state folder for resume (default: BUNDLE/../coordinator-state)")
    p.add_argument("--mlflow", help="MLflow tracking URI for round metrics and the model registry")
    p.add_argument("--model-size", choices=("default", "small", "tiny"), default="default", help="UNet size")
    p.add_argument(
        "--patch-size", type=int, help="training patch edge in voxels (multiple of 16; default 64)"
    )
    p.add_argument(
        "--spacing",
        type=_triple,
        help="voxel size in mm (RAS) the model trains at, e.g. 3 or 1,1,1; default: the median per axis of the "
        "sites' reported medians, collected before round 1",
    )
    p.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        default=None,
        help="how models and updates travel (set in the task; sites follow it): none (fp32 model, full "
        "weights up); fp16 (fp16 model, each site's change in fp16 added to the coordinator's fp32 "
        "weights: 0.5x bytes); int8 (8-bit changes both ways, about 0.25x: each site's change against "
        "the model it holds, with the rounding error kept at the site and added to its next change; the "
        "model as an 8-bit delta from the one the sites hold, the whole model for a site that missed "
        "rounds); int8-topk (int8 keeping only the largest --topk-density share of each tensor's "
        "changes, about 0.06x at 0.1; what is left out is carried to the next round). Default none",
    )
    p.add_argument(
        "--topk-density",
        type=float,
        default=None,
        help="int8-topk: share of each tensor's values sent per round, in (0, 1] (default 0.1)",
    )
    p.add_argument(
        "--fp16",
        action="store_true",
        help="the same as --compression fp16: the model in fp16 and each site's change (not its weights) "
        "in fp16, added to the coordinator's fp32 weights; half the bytes, measured Dice unchanged",
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
    p.add_argument(
        "--act",
        choices=("prelu", "leakyrelu"),
        default="prelu",
        help="the UNet's activation (default prelu, MONAI's; leakyrelu has no parameters, so DP-SGD "
        "computes fewer per-sample gradients)",
    )
    dp = p.add_argument_group(
        "differential privacy (sample-level DP-SGD at every site; the privacy unit is the patient; docs/privacy.md)"
    )
    dp.add_argument(
        "--dp-noise-multiplier",
        type=float,
        help="Gaussian noise std as a multiple of the clip (turns DP-SGD on)",
    )
    dp.add_argument(
        "--dp-max-grad-norm", type=float, help="clip each case's gradient to this L2 norm (default 1.0)"
    )
    dp.add_argument(
        "--dp-target-epsilon",
        type=float,
        help="each site solves its own noise so that --rounds rounds spend at most this epsilon; with "
        "--dp-noise-multiplier it is the budget instead: a site stops training once it is spent",
    )
    dp.add_argument("--dp-delta", type=float, help="the delta of (epsilon, delta)-DP (default 1e-5)")
    dp.add_argument(
        "--dp-accountant",
        choices=("rdp", "prv"),
        help="how each site computes its epsilon: rdp (Renyi DP, default) or prv (privacy random "
        "variables, Gopi et al. 2021: tighter, the same guarantee)",
    )
    cdp = p.add_argument_group(
        "client-level differential privacy (DP-FedAvg: each hospital's whole update is protected; "
        "--max-norm is each site's L2 clip, default 1; docs/privacy.md)"
    )
    cdp.add_argument(
        "--dp-client-noise-multiplier",
        type=float,
        help="Gaussian noise std on the sum of clipped updates, as a multiple of the clip (turns it on)",
    )
    cdp.add_argument(
        "--dp-client-target-epsilon",
        type=float,
        help="solve the noise so that --rounds rounds spend at most this epsilon; with "
        "--dp-client-noise-multiplier it is the budget instead: training ends once it is spent",
    )
    cdp.add_argument("--dp-client-delta", type=float, help="client-level delta (default 1e-5)")
    cdp.add_argument(
        "--dp-client-weights",
        choices=("uniform", "capped"),
        default="uniform",
        help="each site's weight in the noisy mean: uniform (1 each, default) or capped "
        "(min(cases / --dp-client-weight-cap, 1))",
    )
    cdp.add_argument(
        "--dp-client-weight-cap", type=int, help="capped weights: cases at which a site weighs 1 (default 64)"
    )
    cdp.add_argument(
        "--dp-client-adaptive-clip",
        action="store_true",
        help="move the clip towards a quantile of the sites' update norms (Andrew et al. 2021) from "
        "a noisy count of sites within it; the count's noise is part of the accounted budget",
    )
    cdp.add_argument(
        "--dp-client-target-quantile",
        type=float,
        help="adaptive clip: share of sites whose update should fit within the clip (default 0.5)",
    )
    cdp.add_argument(
        "--dp-client-clip-lr", type=float, help="adaptive clip: geometric learning rate (default 0.2)"
    )
    cdp.add_argument(
        "--dp-client-count-noise",
        type=float,
        help="adaptive clip: std of the noise on the count of sites within the clip (default "
        "max(sites / 20, 1.25 x the noise multiplier))",
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


def secure_settings(args: argparse.Namespace):
    """``--secure-aggregation`` and its parameters, or None."""
    if not getattr(args, "secure_aggregation", False):
        return None
    from neurofed.coordinator.secure import SecureSettings

    return SecureSettings(
        clip=args.max_norm if args.max_norm is not None else 10.0,
        k=args.secagg_k,
        t=args.secagg_t,
        bits=args.secagg_bits,
        max_total_weight=args.secagg_max_cases,
        phase_timeout=args.secagg_phase_timeout,
    )


def client_dp_settings(args: argparse.Namespace) -> dict:
    """The ``--dp-client-*`` and ``--dp-accountant`` flags as CoordinatorSettings fields."""
    keys = (
        "dp_accountant", "dp_client_noise_multiplier", "dp_client_target_epsilon", "dp_client_delta",
        "dp_client_weights", "dp_client_weight_cap", "dp_client_adaptive_clip", "dp_client_target_quantile",
        "dp_client_clip_lr", "dp_client_count_noise",
    )  # fmt: skip
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _compression(args: argparse.Namespace) -> str:
    from neurofed.errors import NeurofedError

    if args.fp16 and args.compression not in (None, "fp16"):
        raise NeurofedError(f"--fp16 is --compression fp16; drop it or --compression {args.compression}")
    if args.topk_density is not None and (args.compression or "none") != "int8-topk":
        raise NeurofedError("--topk-density is int8-topk's; add --compression int8-topk or drop it")
    return "fp16" if args.fp16 else args.compression or "none"


def model_config_from(args: argparse.Namespace) -> dict:
    from neurofed.models.config import preset

    pre: dict = {}
    if getattr(args, "patch_size", None):
        pre["patch_size"] = (args.patch_size,) * 3
    if getattr(args, "spacing", None):
        pre["spacing"] = tuple(args.spacing)
    cfg = preset(args.model_size, **pre)
    if getattr(args, "act", "prelu") != "prelu":
        import dataclasses

        cfg = dataclasses.replace(cfg, act=args.act)
    return cfg.to_dict()


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
            spacing_from_sites=not getattr(args, "spacing", None),
            seed=args.seed,
            fp16=args.fp16,
            compression=_compression(args),
            topk_density=args.topk_density,
            site_optimizer=args.site_optimizer,
            lr_schedule=args.lr_schedule,
            init_weights=Path(args.init_weights) if args.init_weights else None,
            secure=secure_settings(args),
            dp_noise_multiplier=args.dp_noise_multiplier,
            dp_max_grad_norm=args.dp_max_grad_norm,
            dp_target_epsilon=args.dp_target_epsilon,
            dp_delta=args.dp_delta,
            **client_dp_settings(args),
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
