"""``neurofed demo``: a whole federation on this machine in one command (what `make demo` runs).

Synthetic institutions, provisioning, a private Mosquitto on a free port, the embedded MLflow
(its own server on a free port; a local SQLite store if that cannot start), the coordinator and
one edge process per site (one torch thread each), a live view of the rounds, and at the end the
federated model's Dice per site and where to look next.
"""

from __future__ import annotations

import argparse

from neurofed.commands.coordinator import SITE_OPTIMIZER

NAME = "demo"
EXAMPLE = """\
example:
  neurofed demo                       # quick: 3 sites, 3 rounds, small UNet, 48^3 volumes (< 5 min)
  neurofed demo --profile full        # 10 sites, 165 cases, the study's UNet (long on a CPU)
  neurofed demo --sites 4 --rounds 5 --out demo-run

Everything lands in --out (default ./demo): data/, bundles/, logs/, coordinator-state/, mlflow/.
"""

PROFILES = {
    # sites, cases, shape, model size, rounds, local epochs, round timeout (s)
    "quick": {
        "sites": 3,
        "cases": 48,
        "shape": 48,
        "model": "small",
        "rounds": 3,
        "epochs": 8,
        "timeout": 300,
    },
    "full": {
        "sites": 10,
        "cases": 165,
        "shape": 64,
        "model": "default",
        "rounds": 10,
        "epochs": 2,
        "timeout": 1800,
    },
}


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="run a complete federation on this machine (data, broker, MLflow, coordinator, sites)",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick", help="sizes (default quick)")
    p.add_argument("--sites", type=int, help="number of sites (default: the profile's)")
    p.add_argument("--rounds", type=int, help="training rounds (default: the profile's)")
    p.add_argument("--strategy", default="fedavg", help="aggregation strategy (default fedavg)")
    p.add_argument("--out", default="demo", help="working folder (default ./demo; reused data is kept)")
    p.add_argument("--mlflow", help="use this tracking URI instead of starting the embedded MLflow")
    p.add_argument("--no-mlflow", action="store_true", help="run without MLflow (no registry)")
    p.add_argument(
        "--fp16",
        action="store_true",
        help="half-precision transfers: the model in fp16, updates as fp16 changes (half the bytes); "
        "the same as --compression fp16",
    )
    p.add_argument(
        "--compression",
        choices=("none", "fp16", "int8", "int8-topk"),
        help="how models and updates travel (see neurofed coordinator --help; default none)",
    )
    p.add_argument(
        "--site-optimizer",
        choices=SITE_OPTIMIZER,
        default="reset",
        help="sites' Adam state between rounds (see neurofed coordinator --help; default reset)",
    )
    p.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="SecAgg+: the coordinator sees only the sum of the sites' masked updates (3+ sites)",
    )
    p.add_argument(
        "--kem",
        choices=("x25519", "mlkem768-x25519"),
        default="x25519",
        help="how every sealed message wraps its key (see neurofed provision --help; default x25519, "
        "mlkem768-x25519 is the post-quantum hybrid)",
    )
    dp = p.add_argument_group("differential privacy (DP-SGD at every site; see neurofed coordinator --help)")
    dp.add_argument("--dp-noise-multiplier", type=float, help="noise std as a multiple of the clip")
    dp.add_argument("--dp-max-grad-norm", type=float, help="per-case gradient clip (default 1.0)")
    dp.add_argument("--dp-target-epsilon", type=float, help="epsilon each site may spend over the rounds")
    dp.add_argument("--dp-delta", type=float, help="delta (default 1e-5)")
    cdp = p.add_argument_group("client-level DP (DP-FedAvg; see neurofed coordinator --help)")
    cdp.add_argument("--dp-client-noise-multiplier", type=float, help="noise std on the sum, times the clip")
    cdp.add_argument("--dp-client-target-epsilon", type=float, help="client-level epsilon over the rounds")
    cdp.add_argument(
        "--dp-client-adaptive-clip", action="store_true", help="adapt the clip to the median norm"
    )
    cdp.add_argument(
        "--max-norm", type=float, help="each site's L2 clip of its update (client DP: default 1)"
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from neurofed.launch.demo import DemoSettings, run_demo

    prof = dict(PROFILES[args.profile])
    if args.sites:
        prof["sites"] = args.sites
        if args.profile == "quick":
            prof["cases"] = 8 * args.sites
    if args.rounds:
        prof["rounds"] = args.rounds
    return run_demo(
        DemoSettings(
            out=args.out,
            strategy=args.strategy,
            fp16=args.fp16,
            secure_aggregation=args.secure_aggregation,
            compression=args.compression or "none",
            kem=args.kem,
            site_optimizer=args.site_optimizer,
            mlflow=None if args.no_mlflow else (args.mlflow or "embedded"),
            dp_noise_multiplier=args.dp_noise_multiplier,
            dp_max_grad_norm=args.dp_max_grad_norm,
            dp_target_epsilon=args.dp_target_epsilon,
            dp_delta=args.dp_delta,
            dp_client_noise_multiplier=args.dp_client_noise_multiplier,
            dp_client_target_epsilon=args.dp_client_target_epsilon,
            dp_client_adaptive_clip=args.dp_client_adaptive_clip,
            max_norm=args.max_norm,
            **prof,
        )
    )
