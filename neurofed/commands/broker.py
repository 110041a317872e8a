"""``neurofed broker``: run Mosquitto in the foreground with a provisioned broker bundle."""

from __future__ import annotations

import argparse

NAME = "broker"
EXAMPLE = """\
example:
  neurofed broker --bundle bundles/broker

Mosquitto logs to stderr and keeps retained and queued messages in bundles/broker/data/ across
restarts. Stop it with Ctrl-C or SIGTERM (passed on to Mosquitto, which saves its data first).
After `neurofed provision --revoke`, restart it to load the new CRL.
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
    """Mosquitto as a child that gets every stop signal this process gets.

    Without forwarding, SIGTERM (``docker stop``, systemd, a supervisor, a test harness) killed
    this process and left Mosquitto running, orphaned, on the port. In a container Mosquitto
    never saved its persistence file: as PID 1 (a plain ``docker run``) this process ignored
    SIGTERM, which the kernel does for PID 1 without a handler, until Docker's SIGKILL; under an
    init (compose's ``init: true``) it died at once and the container's end killed Mosquitto.
    Forwarded, Mosquitto exits cleanly and saves retained and queued messages (SIGHUP reloads
    its configuration). The process stays ``neurofed broker`` rather than exec'ing Mosquitto:
    the image's HEALTHCHECK finds its role by that command line."""
    import signal

    from neurofed.wire.broker import popen_broker

    # forwarding needs this process alive; SIGKILLed, the kernel stops Mosquitto, except when
    # Mosquitto started as root (it changes user, which clears that: see popen_broker)
    proc = popen_broker(args.bundle)

    def forward(signum: int, frame: object) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    return proc.wait()
