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
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from neurofed.wire import provision as pv
    from neurofed.wire.errors import ProvisioningError

    out = Path(args.out)
    if args.add_site and args.revoke:
        raise ProvisioningError("give --add-site or --revoke, not both")
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
