"""``neurofed site``: run this hospital's edge node as a Docker container (up, status, logs, down).

Thin over ``neurofed.edge_node.launcher`` (the Docker SDK): one command instead of a long ``docker run`` line,
with the scans mounted read-only, the bundle handed to the non-root container user, state on a
named volume, restart policy ``unless-stopped`` and, with ``--gpus``, a GPU device request.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "site"
EXAMPLE = """\
examples:
  neurofed site up --bundle bundles/site-01 --data /srv/brats/site-01
  neurofed site up --bundle bundles/site-01 --data /srv/brats/site-01 --gpus all --image neurofed:gpu
  neurofed site status                      # every site container on this host
  neurofed site logs --name neurofed-site-01 --follow
  neurofed site down --name neurofed-site-01 [--purge]   # --purge also deletes the state volume

The container is named neurofed-<site> unless --name is given. --edge-args passes options to
`neurofed edge` inside the container, e.g. --edge-args "--device cuda --threads 4".
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="start/inspect/stop this site's edge-node container (Docker)",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=("up", "status", "logs", "down"), help="what to do")
    p.add_argument("--bundle", help="up: this site's bundle folder, DIR/<site>")
    p.add_argument("--data", help="up: this site's scans (mounted read-only at /data)")
    p.add_argument("--image", default="neurofed:latest", help="up: image to run (default neurofed:latest)")
    p.add_argument("--name", help="container name (default neurofed-<site> from the bundle)")
    p.add_argument("--gpus", help="up: 'all', a count, or device ids (0,1): request GPUs")
    p.add_argument("--network", help="up: Docker network mode, e.g. host (default: Docker's bridge)")
    p.add_argument(
        "--bundle-mount",
        action="store_true",
        help="up: bind-mount the bundle read-only instead of copying it in (host files must be readable by uid 10001)",
    )
    p.add_argument(
        "--replace", action="store_true", help="up: remove an existing container of that name first"
    )
    p.add_argument(
        "--data-site-mismatch-ok",
        action="store_true",
        help="up: start although --data looks like another participant's folder (only a warning then)",
    )
    p.add_argument("--tail", default="100", help="logs: lines from the end (default 100, or 'all')")
    p.add_argument("--follow", action="store_true", help="logs: keep streaming")
    p.add_argument("--purge", action="store_true", help="down: also delete the state volume")
    p.add_argument(
        "--edge-args",
        default="",
        help="up: extra arguments for `neurofed edge`, one string, e.g. '--threads 4'",
    )
    p.set_defaults(func=run)
    return p


def _name(args: argparse.Namespace) -> str:
    from neurofed.edge_node.launcher import LauncherError, default_name, site_identity

    if args.name:
        return args.name
    if args.bundle:
        return default_name(site_identity(Path(args.bundle))[0])
    raise LauncherError(f"`neurofed site {args.action}` needs --name (or --bundle to derive it)")


def run(args: argparse.Namespace) -> int:
    from neurofed.edge_node.launcher import LauncherError, SiteLauncher, SiteSpec
    from neurofed.errors import NeurofedError

    if args.action == "up":
        if not args.bundle or not args.data:
            raise LauncherError("`neurofed site up` needs --bundle DIR/<site> and --data PATH")
        # here, not in the container: there the folder is mounted as /data/<site>, without its parent
        from neurofed.commands.edge import check_data_site
        from neurofed.edge_node.launcher import site_identity
        from neurofed.wire.roster import Roster

        if Path(args.data).is_dir():
            site = site_identity(Path(args.bundle))[0]
            try:  # the names only (the container verifies the roster's signature)
                roster = Roster.from_json((Path(args.bundle) / "roster.json").read_bytes())
                known = list(roster.participants)
            except (OSError, ValueError, NeurofedError):
                known = []
            check_data_site(Path(args.data), site, known, args.bundle, args.data_site_mismatch_ok)
    launcher = SiteLauncher()
    if args.action == "up":
        import shlex

        extra = shlex.split(args.edge_args)
        spec = SiteSpec(
            bundle=Path(args.bundle),
            data=Path(args.data),
            image=args.image,
            name=args.name,
            gpus=args.gpus,
            network=args.network,
            bundle_mode="mount" if args.bundle_mount else "copy",
            extra_args=extra,
        )
        st = launcher.up(spec, replace=args.replace)
        print(f"started {st.name} (site {st.site}, image {st.image}): {st.status}")
        print(f"  neurofed site status --name {st.name}   |   neurofed site logs --name {st.name} --follow")
        return 0
    if args.action == "status":
        rows = [launcher.status(_name(args))] if (args.name or args.bundle) else launcher.list()
        if not rows:
            print("no neurofed site containers on this host")
            return 0
        for st in rows:
            health = st.health or "no health check"
            print(
                f"{st.name}\tsite={st.site}\t{st.status}\thealth={health}\trestarts={st.restarts}\timage={st.image}"
            )
            if st.health_log and st.health != "healthy":
                print(f"  last health check: {st.health_log}")
        return 0 if all(st.status == "running" for st in rows) else 1
    if args.action == "logs":
        tail = "all" if args.tail == "all" else int(args.tail)
        for chunk in launcher.logs(_name(args), tail=tail, follow=args.follow):
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        return 0
    name = _name(args)
    launcher.down(name, purge=args.purge)
    print(f"stopped and removed {name}" + (" and its state volume" if args.purge else ""))
    return 0
