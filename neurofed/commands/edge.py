"""``neurofed edge``: a hospital's long-running site agent. It verifies each task, scores the
global model on the local validation split, trains locally and sends only weights, case counts
and aggregate metrics (encrypted to the coordinator); scans never leave the site."""

from __future__ import annotations

import argparse

NAME = "edge"
EXAMPLE = """\
example:
  neurofed edge --bundle bundles/site-01 --data data/site-01

The agent reconnects by itself, picks up the current task and model after a restart without the
coordinator resending them, never trains a round twice, and resends its update when the
coordinator's receipts lack it. Everything it sent is listed in STATE/audit.jsonl.
It exits (0) when the federation it took part in ends; started after a federation ended (the
broker keeps that end), it waits for the next one's coordinator. SIGTERM (docker stop) exits 143
after telling the broker it is offline.
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="run a site agent: local evaluation and training for each federated round",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bundle", required=True, help="this site's bundle folder, DIR/<site>")
    p.add_argument(
        "--data", required=True, help="this site's data folder (DATA/<site>, as `neurofed synth` writes it)"
    )
    p.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto", help="training device (default auto)"
    )
    p.add_argument("--state", help="state folder (default: BUNDLE/../<site>-state)")
    p.add_argument("--threads", type=int, help="torch threads (default: OMP_NUM_THREADS or 1)")
    p.add_argument(
        "--resend-after", type=float, default=10.0, help="seconds before a missing receipt triggers a resend"
    )
    p.add_argument("--batch-size", type=int, help="training batch size (default: the trainer's)")
    p.add_argument(
        "--data-site-mismatch-ok",
        action="store_true",
        help="run although --data looks like another participant's folder (its name, or a sites.csv "
        "next to or in it, names another site): only a warning then",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of this site's patch sampling and augmentation (default 0; the train/val/test split "
        "does not depend on it)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import logging
    import os
    from pathlib import Path

    from neurofed.edge_node.errors import EdgeNodeError

    data = Path(args.data)
    if not data.is_dir():
        raise EdgeNodeError(f"--data {data}: no such folder (give this site's folder, e.g. data/site-01)")
    from neurofed.wire.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    if bundle.role != "site":
        raise EdgeNodeError(f"{args.bundle} is the {bundle.role}'s bundle; give this site's DIR/<site>")
    check_data_site(
        data, bundle.participant, bundle.roster.participants, args.bundle, args.data_site_mismatch_ok
    )
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    from neurofed.edge_node.lean import skip_unused_imports

    skip_unused_imports()  # before MONAI loads: about 130 MB less per site process
    from neurofed.edge_node.agent import SiteAgent
    from neurofed.edge_node.training import LocalTrainer, TrainConfig, set_torch_threads
    from neurofed.models.config import ModelConfig
    from neurofed.wire.mqtt import MqttEndpoint

    set_torch_threads()
    state = Path(args.state or Path(args.bundle).parent / f"{bundle.participant}-state")
    tc = TrainConfig(seed=args.seed, **({"batch_size": args.batch_size} if args.batch_size else {}))

    def make_trainer(cfg: dict) -> LocalTrainer:
        return LocalTrainer(
            data, ModelConfig.from_dict(cfg) if cfg else ModelConfig(), tc, device=args.device
        )

    from neurofed.stopping import exit_on_sigterm, leaving

    # docker stop / a launcher's SIGTERM: leave the broker properly (offline status, DISCONNECT)
    exit_on_sigterm()
    from neurofed.edge_node.data import discover_cases, training_spacing

    # the coordinator sets the spacing; without its --spacing it takes the sites' medians
    # A folder without readable cases does not stop the agent: it stays connected (and healthy)
    # and says why it cannot take part; the first task it gets fails with the same cause.
    report: dict = {}
    try:
        spacing = training_spacing(discover_cases(data))
    except EdgeNodeError as exc:
        logging.getLogger("neurofed.edge").warning(
            "%s: no spacing to report (%s); check the folder with `neurofed check-data %s`",
            bundle.participant, str(exc).splitlines()[0], data,
        )  # fmt: skip
    else:
        report["spacing"] = spacing.to_dict()
        logging.getLogger("neurofed.edge").info(
            "%s: cases' spacing %s", bundle.participant, spacing.describe()
        )
    # the run this site last took part in, and the replay window, survive a restart
    endpoint = MqttEndpoint(bundle, run=SiteAgent.saved_run(state), seen_path=state / "seen-messages.log")
    endpoint.start()
    try:
        # secure aggregation: this site signs its key sets and echoes; the roster's keys check others',
        # and its KEM says how share bundles must be sealed (a task naming another is refused)
        identity = (
            bundle.sign_key,
            {x: bundle.roster.get(x).signing_key() for x in bundle.roster.sites},
            bundle.roster.kem,
        )
        SiteAgent(
            endpoint,
            make_trainer,
            state,
            resend_after=args.resend_after,
            report=report,
            secure_identity=identity,
        ).run()
    finally:
        leaving()  # a SIGTERM now (the federation is over, the launcher tears down) waits for this
        endpoint.close()
    return 0


def check_data_site(data, participant: str, known_ids, bundle_arg, mismatch_ok: bool) -> None:
    """Refuse (or, with ``--data-site-mismatch-ok``, warn about) a data folder that says it is
    another participant's: its name, or a sites.csv in or next to it, names another site."""
    import sys

    from neurofed.edge_node.data import data_site_mismatch
    from neurofed.edge_node.errors import DataError

    problem = data_site_mismatch(data, participant, known_ids)
    if problem is None:
        return
    if mismatch_ok:
        print(f"neurofed: warning: {problem}; going on (--data-site-mismatch-ok)", file=sys.stderr)
        return
    raise DataError(
        f"{problem}, whose bundle is {bundle_arg}; give {participant}'s own data folder "
        f"(or --data-site-mismatch-ok if it is {participant}'s data under another name)"
    )
