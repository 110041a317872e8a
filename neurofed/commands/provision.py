"""``neurofed provision``: create a federation's CA, certificates, keys, roster and broker config."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "provision"
EXAMPLE = """\
examples:
  neurofed provision --federation demo --sites site-01,site-02,site-03 --broker-host broker.example.org --out bundles
  neurofed provision --out bundles --add-site site-04     # existing bundles stay valid
  neurofed provision --out bundles --revoke site-02       # CRL + roster updated; restart the broker
  neurofed provision --out bundles --revoke site-02 --live  # ... and applied to the running broker:
                                                          # its connection closed, nobody restarted

Writes bundles/<participant>/ for the coordinator, each site and the broker; the CA private key stays
in bundles/.ca (keep it offline). Hand each site only its own folder.
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="create certificates, keys, roster and Mosquitto config for a federation",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="folder for the bundles (DIR/<participant>/)")
    p.add_argument("--federation", help="federation name (becomes the MQTT topic prefix nf/<name>/)")
    p.add_argument("--sites", help="comma-separated site ids, e.g. site-01,site-02")
    p.add_argument("--broker-host", help="host name or IP the participants use to reach the broker")
    p.add_argument("--broker-port", type=int, default=8883, help="TLS port of the broker (default 8883)")
    p.add_argument("--days", type=int, default=365, help="validity of the client certificates in days")
    p.add_argument("--add-site", metavar="SITE", help="add one site to an existing federation in --out")
    p.add_argument("--revoke", metavar="SITE", help="revoke one site of the federation in --out")
    p.add_argument(
        "--live",
        action="store_true",
        help="with --add-site/--revoke: apply the change to the running broker (SIGHUP: it reloads "
        "ACL and CRL) and, for --revoke, close the site's open connection; the coordinator takes "
        "the new roster from its bundle (DIR/coordinator) and sends it to the sites",
    )
    p.add_argument(
        "--broker-pid",
        type=int,
        help="with --live: the Mosquitto process to reload (default: DIR/broker/broker.pid)",
    )
    p.add_argument(
        "--broker-address",
        metavar="HOST:PORT",
        help="with --revoke --live: where to reach the broker (default: the provisioned host and port)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from neurofed.wire import provision as pv
    from neurofed.wire.errors import ProvisioningError

    out = Path(args.out)
    if args.add_site and args.revoke:
        raise ProvisioningError("give --add-site or --revoke, not both")
    if (args.broker_pid or args.broker_address) and not args.live:
        raise ProvisioningError("--broker-pid and --broker-address go with --live")
    if args.live and not (args.add_site or args.revoke):
        raise ProvisioningError("--live goes with --add-site or --revoke")
    if args.live:
        return _live(args, out)
    if args.add_site:
        res = pv.add_site(out, args.add_site, args.days)
        print(f"added {args.add_site} to {res.federation}: bundle {out / args.add_site}")
        print("  roster re-signed and copied into every bundle; restart the broker to load the new ACL")
        return 0
    if args.revoke:
        res = pv.revoke(out, args.revoke)
        print(f"revoked {args.revoke} in {res.federation}; CRL, ACL and roster updated")
        print(f"  restart the broker (neurofed broker --bundle {out / pv.BROKER}) to refuse it")
        return 0
    missing = [f for f in ("federation", "sites", "broker_host") if not getattr(args, f)]
    if missing:
        raise ProvisioningError(
            "a new federation needs " + ", ".join("--" + m.replace("_", "-") for m in missing)
        )
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    res = pv.provision(out, args.federation, sites, args.broker_host, args.broker_port, args.days)
    print(f"federation {res.federation}: {len(sites)} sites, broker {args.broker_host}:{args.broker_port}")
    for p in [pv.BROKER, *res.participants]:
        print(f"  {out / p}/")
    print(f"  CA private key in {out / pv.CA_DIR}/ (keep it offline; it is in no bundle)")
    return 0


def _live(args: argparse.Namespace, out: Path) -> int:
    from neurofed.wire.errors import ProvisioningError
    from neurofed.wire.membership import add_site_live, revoke_live

    if args.add_site:
        ch = add_site_live(out, args.add_site, days=args.days, broker_pid=args.broker_pid)
        print(f"added {args.add_site}: bundle {out / args.add_site}; broker {ch.broker_pid} reloaded its ACL")
        print("  the coordinator publishes the new roster; the site takes part from the next round")
        return 0
    host = port = None
    if args.broker_address:
        host, _, p = args.broker_address.rpartition(":")
        if not host or not p.isdigit():
            raise ProvisioningError(f"--broker-address must be HOST:PORT, got {args.broker_address!r}")
        port = int(p)
    ch = revoke_live(out, args.revoke, broker_pid=args.broker_pid, host=host, port=port)
    print(
        f"revoked {args.revoke}: broker {ch.broker_pid} reloaded ACL and CRL after {ch.reloaded_s:.2f} s, "
        f"its connection closed after {ch.closed_s:.2f} s"
    )
    print("  the coordinator publishes the new roster; a round in progress goes on without the site")
    return 0
