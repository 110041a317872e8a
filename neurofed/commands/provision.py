"""``neurofed provision``: create a federation's CA, certificates, keys, roster and broker config."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "provision"
EXAMPLE = """\
examples:
  neurofed provision --federation demo --sites site-01,site-02,site-03 --broker-host broker.example.org --out bundles
  neurofed provision --federation demo --sites site-01,site-02 --broker-host broker.example.org \\
      --kem mlkem768-x25519 --out bundles       # post-quantum sealing of every message (see --kem)
  neurofed provision --out bundles --add-site site-04     # existing bundles stay valid
  neurofed provision --out bundles --revoke site-02       # CRL + roster updated; restart the broker
  neurofed provision --out bundles --revoke site-02 --live  # ... and applied to the running broker:
                                                          # its connection closed, nobody restarted

bridged brokers (a region or hospital network with its own Mosquitto, bridged to the central one):
  neurofed provision --out bundles --bridge east --bridge-sites site-02,site-03 \
      --bridge-host broker.east.example.org               # writes bundles/broker.east/
  neurofed provision --out bundles --add-site site-05 --bridge east   # a new site on that broker
  (also together with --federation/--sites/--broker-host when the federation is created)

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
    p.add_argument(
        "--kem",
        choices=("x25519", "mlkem768-x25519"),
        default=None,
        help="how every sealed message (tasks, models, updates, secure-aggregation shares) wraps its "
        "content key, fixed for the federation's life and recorded in the signed roster: "
        "x25519 (default; HPKE DHKEM-X25519, 80 bytes per recipient) or mlkem768-x25519 (the hybrid "
        "ML-KEM-768+X25519 HPKE KEM: a recording of today's traffic stays sealed even against a "
        "future quantum computer, unless ML-KEM-768 and X25519 both fall; 1,168 bytes per recipient, "
        "a 1,216-byte key per participant; each bundle gets kem.key). It does not change the "
        "Ed25519 signatures, TLS, or the X25519 agreement of secure aggregation's pairwise masks "
        "(docs/security.md). --add-site follows the federation's KEM",
    )
    p.add_argument("--add-site", metavar="SITE", help="add one site to an existing federation in --out")
    p.add_argument("--revoke", metavar="SITE", help="revoke one site of the federation in --out")
    p.add_argument(
        "--bridge",
        metavar="REGION",
        help="a regional broker bridged to the central one (bundle DIR/broker.REGION, bridge "
        "identity bridge.REGION): with --bridge-sites and --bridge-host; with --add-site, the "
        "region whose broker the new site connects to",
    )
    p.add_argument("--bridge-sites", help="comma-separated sites that connect to the regional broker")
    p.add_argument("--bridge-host", help="host name or IP the regional broker's sites reach it by")
    p.add_argument(
        "--bridge-port", type=int, default=8883, help="TLS port of the regional broker (default 8883)"
    )
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
        help="with --live: the central Mosquitto process to reload (default: DIR/broker/broker.pid; "
        "a regional broker is found by DIR/broker.REGION/broker.pid)",
    )
    p.add_argument(
        "--broker-address",
        metavar="HOST:PORT",
        help="with --revoke --live: where to reach the broker the site connects to (default: its "
        "provisioned host and port, the regional broker's for a bridged site)",
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
    if (args.bridge_sites or args.bridge_host) and not args.bridge:
        raise ProvisioningError("--bridge-sites and --bridge-host go with --bridge REGION")
    if args.bridge and args.revoke:
        raise ProvisioningError("--revoke finds the site's broker itself; leave out --bridge")
    if args.bridge and args.add_site and (args.bridge_sites or args.bridge_host):
        raise ProvisioningError(
            "--add-site SITE --bridge REGION adds to an existing regional broker; create a region "
            "with --bridge REGION --bridge-sites ... --bridge-host HOST first"
        )
    if args.kem and (args.add_site or args.revoke):
        raise ProvisioningError(
            "--kem is chosen when the federation is created; --add-site and --revoke keep the "
            "federation's KEM (its roster records it)"
        )
    if args.live:
        return _live(args, out)
    if args.add_site:
        res = pv.add_site(out, args.add_site, args.days, region=args.bridge)
        print(f"added {args.add_site} to {res.federation}: bundle {out / args.add_site}")
        brokers = "the broker" if not args.bridge else f"the central broker and broker.{args.bridge}"
        print(f"  roster re-signed and copied into every bundle; restart {brokers} to load the new ACL")
        return 0
    if args.revoke:
        res = pv.revoke(out, args.revoke)
        print(f"revoked {args.revoke} in {res.federation}; CRL, ACL and roster updated")
        print(f"  restart the broker (neurofed broker --bundle {out / pv.BROKER}) to refuse it")
        return 0
    if args.bridge and not args.federation:
        return _bridge(args, out)
    missing = [f for f in ("federation", "sites", "broker_host") if not getattr(args, f)]
    if missing:
        raise ProvisioningError(
            "a new federation needs " + ", ".join("--" + m.replace("_", "-") for m in missing)
        )
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    kem = args.kem or "x25519"
    res = pv.provision(out, args.federation, sites, args.broker_host, args.broker_port, args.days, kem=kem)
    print(
        f"federation {res.federation}: {len(sites)} sites, broker {args.broker_host}:{args.broker_port}, "
        f"sealing KEM {kem}"
    )
    for p in [pv.BROKER, *res.participants]:
        print(f"  {out / p}/")
    print(f"  CA private key in {out / pv.CA_DIR}/ (keep it offline; it is in no bundle)")
    if args.bridge:
        _bridge(args, out)
    return 0


def _bridge(args: argparse.Namespace, out: Path) -> int:
    """A regional broker bridged to the central one, and its sites moved onto it."""
    from neurofed.wire import bridge
    from neurofed.wire import provision as pv
    from neurofed.wire.errors import ProvisioningError

    if not (args.bridge_sites and args.bridge_host):
        raise ProvisioningError(
            "--bridge REGION needs --bridge-sites a,b and --bridge-host HOST (or --add-site SITE "
            "to add a site to an existing region)"
        )
    sites = [s.strip() for s in args.bridge_sites.split(",") if s.strip()]
    pv.add_bridge(out, args.bridge, sites, args.bridge_host, args.bridge_port, args.days)
    folder = out / bridge.regional_folder(args.bridge)
    print(
        f"region {args.bridge}: broker {args.bridge_host}:{args.bridge_port} ({folder}/), "
        f"bridged to the central broker as {bridge.bridge_identity(args.bridge)}"
    )
    print(f"  sites on it: {', '.join(sites)} (their bundle.toml now names it; restart them)")
    print(f"  run it with `neurofed broker --bundle {folder}`; restart the central broker for its new ACL")
    return 0


def _live(args: argparse.Namespace, out: Path) -> int:
    from neurofed.wire.errors import ProvisioningError
    from neurofed.wire.membership import add_site_live, revoke_live

    if args.add_site:
        ch = add_site_live(out, args.add_site, days=args.days, broker_pid=args.broker_pid, region=args.bridge)
        where = f" and broker.{args.bridge}" if args.bridge else ""
        print(
            f"added {args.add_site}: bundle {out / args.add_site}; broker {ch.broker_pid}{where} "
            "reloaded the ACL"
        )
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
