"""``neurofed broker``: run Mosquitto in the foreground with a provisioned broker bundle."""

from __future__ import annotations

import argparse

NAME = "broker"
EXAMPLE = """\
example:
  neurofed broker --bundle bundles/broker

Mosquitto logs to stderr and keeps retained and queued messages in bundles/broker/data/ across
restarts. Stop it with Ctrl-C. After `neurofed provision --revoke`, restart it to load the new CRL.
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="run the MQTT broker (Mosquitto, mTLS + ACLs) from a provisioned bundle",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bundle", required=True, help="the broker bundle folder, DIR/broker")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import os
    import signal
    import subprocess

    from wire.broker import broker_command

    cmd, cwd = broker_command(args.bundle)
    proc = subprocess.Popen(cmd, cwd=cwd)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT if os.name == "posix" else signal.SIGTERM)
        return proc.wait(30)
