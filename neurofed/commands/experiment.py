"""``neurofed experiment``: the study's comparison (FL vs centralized vs single sites)."""

from __future__ import annotations

import argparse

from neurofed.commands.coordinator import LR_SCHEDULES, SITE_OPTIMIZER, STRATEGIES, local_epochs

EXAMPLE = """\
examples:
  neurofed experiment --out results-quick                      # synthetic data, quick profile
  neurofed experiment --profile full --out results-full         # 10 sites, 165 cases, 200 half-epoch rounds (under 60 min on 2 cores)
  neurofed experiment --data /brats2021 --site-map sites.csv --out results-brats   # real BraTS folders

  neurofed experiment --dp-target-epsilon 1,2,4,8 --dp-delta 1e-5 --out results-dp   # + DP arms

Writes OUT/results.json (Dice and HD95 per arm and site, FL/CDS ratio; with DP arms each one's
epsilon, delta, noise and clip), OUT/dice_per_round.png, OUT/arms.png and, with DP arms,
OUT/privacy_utility.png; with --mlflow, logs them to the experiment 'neurofed-experiment'.
"""


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {n}")
    return n


def _epsilons(text: str) -> tuple[float, ...]:
    """``1,2,4,8``: the target epsilons of the DP arms, each positive and finite."""
    import math

    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma list of numbers such as 1,2,4,8, got {text!r}") from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise argparse.ArgumentTypeError(
            f"target epsilons must be positive and finite (the arms without DP are infinity), got {text!r}"
        )
    return tuple(sorted(set(values)))


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from neurofed.experiment import PROFILES

    p = sub.add_parser(
        "experiment",
        help="reproduce the study: federated vs centralized vs single-site on the same test cases",
        description=(
            "Runs centralized data sharing (pooled), federated averaging through the real stack "
            "(coordinator, edge processes, broker, encryption), each site alone, the FLAIR-threshold "
            "baseline and optionally cyclic institutional incremental learning, all on one splits.json, "
            "with one model, one seed and equal budgets (centralized epochs = rounds x local epochs)."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", help="federation folder DATA/<site>/<case>/ (default: synthesize into OUT/data)")
    p.add_argument(
        "--site-map", help="CSV case,site for real BraTS folders (copied to DATA/sites.csv semantics)"
    )
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument(
        "--profile", choices=sorted(PROFILES), default="quick", help="sizes and budget (default quick)"
    )
    p.add_argument("--rounds", type=int, help="override the profile's rounds")
    p.add_argument(
        "--local-epochs",
        type=local_epochs,
        help="override the profile's local epochs (a fraction such as 0.5: that share of an epoch per round)",
    )
    p.add_argument("--model-size", choices=("default", "small", "tiny"), help="override the profile's UNet")
    p.add_argument(
        "--fl-strategy",
        choices=STRATEGIES,
        help="the FL arm's aggregation (default: the profile's; quick: fedavg, the study's; full: "
        "fedprox, FedAvg's averaging with a proximal term on the sites)",
    )
    p.add_argument(
        "--fl-server-lr", type=float, help="the FL arm's server learning rate (fedavgm, fedadam, fedyogi)"
    )
    p.add_argument("--fl-server-momentum", type=float, help="the FL arm's server momentum (fedavgm)")
    p.add_argument("--fl-mu", type=float, help="the FL arm's proximal weight (fedprox; default 0.01)")
    p.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        help="every arm's learning rate over the rounds (constant | cosine; centralized and single "
        "sites follow the same factor by epoch; default: the profile's)",
    )
    p.add_argument(
        "--site-optimizer",
        default=None,
        choices=SITE_OPTIMIZER,
        help="the FL arm's sites' Adam state between rounds (default: the profile's)",
    )
    p.add_argument(
        "--arms",
        default="threshold,cds,single,fl",
        help="comma list of threshold, cds, single, fl, ciil (default: all but ciil); with "
        "--dp-target-epsilon, cds and fl bring their DP arms, and cds_dp, fl_dp run those alone",
    )
    p.add_argument(
        "--train-seed",
        type=int,
        help="seed of the initial weights, patch sampling and augmentation in every arm, FL sites "
        "included (default: the profile's seed); the data and the split stay, so repeats with other "
        "values size the run-to-run spread",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        help="processes that train the centralized, single-site and CIIL arms side by side before "
        "FL (default: one per CPU core, at most 2; 1: one after another)",
    )
    p.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="the FL arm runs SecAgg+ (neurofed coordinator --secure-aggregation; 3+ sites)",
    )
    dp = p.add_argument_group(
        "differential privacy (DP arms beside the others; docs/privacy.md, docs/study/privacy-utility.md)"
    )
    dp.add_argument(
        "--dp-target-epsilon",
        type=_epsilons,
        help="comma list (1,2,4,8): for each epsilon, an FL arm with DP-SGD at every site through the "
        "real stack and a CDS arm with DP-SGD on the pooled cases, both spending at most that epsilon "
        "over the same rounds; with several, OUT/privacy_utility.png plots test Dice against epsilon",
    )
    dp.add_argument("--dp-delta", type=float, help="the DP arms' delta (default 1e-5)")
    dp.add_argument(
        "--dp-max-grad-norm", type=float, help="the DP arms' per-case gradient clip (default 1.0)"
    )
    dp.add_argument(
        "--dp-batch-size",
        type=_positive_int,
        help="the DP arms' expected cases per DP-SGD step, at every site and pooled (sampling rate = this "
        "/ training cases; default the trainer's 2): the noise is added once per step, so a larger "
        "batch carries less noise per case",
    )
    p.add_argument(
        "--compression",
        choices=("none", "fp16", "int8", "int8-topk"),
        default=None,
        help="the FL arm's update and model encoding (neurofed coordinator --compression; default none): "
        "rerun with the same --train-seed and without it to see what compression costs in Dice",
    )
    p.add_argument(
        "--topk-density",
        type=float,
        help="int8-topk: share of each tensor's values sent (coordinator default)",
    )
    p.add_argument("--mlflow", help="MLflow tracking URI to log the experiment to")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.set_defaults(func=run)
    return p


def fl_coordinator_args(args: argparse.Namespace) -> list[str]:
    """The ``neurofed coordinator`` options the FL arm gets from this command's flags."""
    if args.topk_density is not None and args.compression != "int8-topk":
        raise SystemExit(
            "--topk-density applies to --compression int8-topk only: add --compression int8-topk"
        )
    out = ["--secure-aggregation"] if args.secure_aggregation else []
    if args.compression:
        out += ["--compression", args.compression]
    if args.topk_density is not None:
        out += ["--topk-density", str(args.topk_density)]
    return out


def run(args: argparse.Namespace) -> int:
    import json
    import shutil
    from pathlib import Path

    from neurofed.stopping import exit_on_sigterm

    # SIGTERM (a scheduler, `timeout`, `kill`) unwinds like Ctrl-C: the FL arm's broker and
    # site processes and the arms' worker processes are stopped on the way out, not orphaned
    exit_on_sigterm()
    fl_args = fl_coordinator_args(args)  # a wrong combination fails here, not after the other arms

    from neurofed.errors import NeurofedError
    from neurofed.experiment import PROFILES, run_experiment, with_overrides

    profile = with_overrides(
        PROFILES[args.profile],
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        model_size=args.model_size,
        fl_strategy=args.fl_strategy,
        site_optimizer=args.site_optimizer,
        fl_server_lr=args.fl_server_lr,
        fl_server_momentum=args.fl_server_momentum,
        fl_mu=args.fl_mu,
        train_seed=args.train_seed,
        lr_schedule=args.lr_schedule,
        workers=args.workers,
        dp_target_epsilons=args.dp_target_epsilon,
        dp_delta=args.dp_delta,
        dp_max_grad_norm=args.dp_max_grad_norm,
        dp_batch_size=args.dp_batch_size,
    )
    dp_set = (args.dp_delta, args.dp_max_grad_norm, args.dp_batch_size)
    if any(v is not None for v in dp_set) and not args.dp_target_epsilon:
        raise NeurofedError(
            "--dp-delta, --dp-max-grad-norm and --dp-batch-size set the DP arms; "
            "add --dp-target-epsilon 1,2,4,8"
        )
    if args.dp_target_epsilon:
        from neurofed.models.privacy import DPConfig, PrivacyConfigError

        try:  # a bad delta or clip is said now, not after the other arms have trained
            for eps in args.dp_target_epsilon:
                DPConfig(max_grad_norm=profile.dp_max_grad_norm, target_epsilon=eps, delta=profile.dp_delta)
        except PrivacyConfigError as exc:
            raise NeurofedError(str(exc)) from None
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - {"threshold", "cds", "single", "fl", "ciil", "cds_dp", "fl_dp"})
    if unknown:
        raise NeurofedError(f"unknown arm(s) {', '.join(unknown)}: see neurofed experiment --help")
    if {"cds_dp", "fl_dp"} & set(arms) and not args.dp_target_epsilon:
        raise NeurofedError("the arms cds_dp and fl_dp need --dp-target-epsilon (e.g. 1,2,4,8)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.data:
        data = Path(args.data).resolve()
        if args.site_map:
            # Real BraTS: every case folder under DATA, sites from the CSV. Work on a view with
            # one folder per site (symlinks), so each edge process sees only its own site.
            from neurofed.edge_node.data import discover_cases

            view = out / "data-view"
            cases = discover_cases(data, sites_csv=args.site_map)
            for c in cases:
                folder = Path(next(iter(c.images.values())) if c.images else c.image4d).parent
                dst = view / c.site / folder.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists():
                    dst.symlink_to(folder, target_is_directory=True)
            shutil.copy(args.site_map, view / "sites.csv")
            data = view
    else:
        from neurofed.edge_node.synth import synthesize

        data = out / "data"
        if not (data / "sites.csv").is_file():
            print(f"synthesizing {profile.cases} cases for {profile.sites} sites into {data} ...")
            synthesize(data, sites=profile.sites, cases=profile.cases, seed=profile.seed, shape=profile.shape)
    results = run_experiment(
        data,
        out,
        profile,
        arms=arms,
        tracking_uri=args.mlflow,
        device=args.device,
        coordinator_args=fl_args,
    )
    rows = {k: v["dice"]["mean"] for k, v in results["arms"].items() if isinstance(v, dict) and "dice" in v}
    print(
        json.dumps(
            {
                "dice": rows,
                "fl_over_cds": results.get("fl_over_cds"),
                "fl_minus_cds": results.get("fl_minus_cds"),
                **(
                    {"privacy_utility": results["privacy_utility"]["points"]}
                    if "privacy_utility" in results
                    else {}
                ),
            },
            indent=2,
        )
    )
    print(f"results: {out / 'results.json'}; plots: {', '.join(results['plots'])}")
    return 0
