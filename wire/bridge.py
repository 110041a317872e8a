"""Bridged brokers: a regional Mosquitto that some sites connect to, bridged to the central one.

A hospital network or a second region runs its own broker; the coordinator stays on the central
broker. The regional broker has the same TLS listener, CRL and per-site ACL as the central one
(for its own sites only) plus a ``connection`` block: an MQTT 5 bridge over mutual TLS, with a
certificate of its own issued by the federation CA. Its identity, ``bridge.<region>``, contains a
dot, which no site id may (``provision.ID_RE``), so no site can ever be given the bridge's rights.

Directions, exactly what the protocol needs (wire/PROTOCOL.md):
- out (regional -> central): ``update/#``, ``metrics/#``, ``secagg/#``, ``status/#``: what sites send;
- in (central -> regional): ``task``, ``roster``, ``model/#``, ``receipts/#``, ``relay/#``: what
  the coordinator sends. No pattern is in both lists, so nothing loops.

Per-site rules hold at both ends: the regional ACL lets each site publish only under its own id
(a site cannot publish as another, nor read any site's updates), and the central ACL lets the
bridge's identity publish only on the topics of the sites of its region (a compromised regional
broker cannot speak for a site elsewhere) and read only the coordinator's kinds. The out patterns
are wildcards on purpose: adding or revoking a regional site changes only the two ACL files, which
Mosquitto reloads on SIGHUP (it does not reload a bridge's topic lines). Messages are signed
end to end, so the coordinator still checks each against the site's own key; a message that came
through the bridge arrives under the bridge's identity, never the site's.

This module writes text only; ``neurofed.wire.provision`` issues the certificates and writes the files.
"""

from __future__ import annotations

BRIDGE_PREFIX = "bridge."  # identity (certificate CN, MQTT username and client id) of a bridge
REGIONAL_PREFIX = "broker."  # bundle folder of a regional broker: DIR/broker.<region>/
BRIDGE_CERT, BRIDGE_KEY = "bridge.crt", "bridge.key"

# Sites' kinds leave the region; the coordinator's kinds come in. QoS 1 each way.
OUT_TOPICS = ("update/#", "metrics/#", "secagg/#", "status/#")
IN_TOPICS = ("task", "roster", "model/#", "receipts/#", "relay/#")
# Seconds before a dropped bridge reconnects, then backing off with jitter up to the cap.
RESTART_BASE_S, RESTART_CAP_S = 2, 30


def bridge_identity(region: str) -> str:
    """The bridge's certificate CN on the central broker."""
    return f"{BRIDGE_PREFIX}{region}"


def regional_folder(region: str) -> str:
    """The regional broker's bundle folder under the provisioning output."""
    return f"{REGIONAL_PREFIX}{region}"


def site_region(state: dict, site: str) -> str | None:
    """The region whose broker ``site`` connects to, or None for the central broker."""
    for region, b in state.get("bridges", {}).items():
        if site in b["sites"]:
            return region
    return None


def bridged_sites(state: dict) -> set[str]:
    return {s for b in state.get("bridges", {}).values() for s in b["sites"]}


def broker_address(state: dict, site: str) -> tuple[str, int]:
    """Host and port of the broker ``site`` connects to (written into its bundle.toml)."""
    region = site_region(state, site)
    if region is None:
        return str(state["broker_host"]), int(state["broker_port"])
    b = state["bridges"][region]
    return str(b["host"]), int(b["port"])


def central_acl_section(federation: str, region: str, sites: list[str]) -> list[str]:
    """The bridge identity's rights on the central broker: read the coordinator's kinds, write
    only the sites' kinds of its own region's sites."""
    p = f"nf/{federation}"
    lines = [
        f"# Bridge from region {region}: publishes for its sites only, reads the coordinator's kinds.",
        f"user {bridge_identity(region)}",
        *(f"topic read {p}/{t}" for t in IN_TOPICS),
    ]
    for s in sites:
        lines += [
            f"topic write {p}/update/{s}/#",
            f"topic write {p}/metrics/{s}/#",
            f"topic write {p}/secagg/{s}/#",
            f"topic write {p}/status/{s}",
        ]
    return [*lines, ""]


def bridge_block(federation: str, region: str, central_host: str, central_port: int) -> str:
    """The ``connection`` block of the regional broker's mosquitto.conf."""
    p = f"nf/{federation}"
    ident = bridge_identity(region)
    topics = [f"topic {p}/{t} out 1" for t in OUT_TOPICS] + [f"topic {p}/{t} in 1" for t in IN_TOPICS]
    return "\n".join(
        [
            "",
            f"# Bridge to the central broker, mutual TLS with its own certificate ({ident}, issued by",
            "# the federation CA). MQTT 5, so retained tasks, models and rosters stay retained here",
            "# (retain as published) and nothing is echoed back (no local). A persistent session on",
            "# each side keeps QoS 1 messages queued while the link is down.",
            "connection central",
            f"address {central_host}:{int(central_port)}",
            "bridge_protocol_version mqttv50",
            f"remote_clientid {ident}",
            f"local_clientid {ident}.local",
            "cleansession false",
            "start_type automatic",
            f"restart_timeout {RESTART_BASE_S} {RESTART_CAP_S}",
            "keepalive_interval 60",
            "notifications true",
            "notifications_local_only true",
            "bridge_cafile ca.crt",
            f"bridge_certfile {BRIDGE_CERT}",
            f"bridge_keyfile {BRIDGE_KEY}",
            "bridge_tls_version tlsv1.2",
            "bridge_insecure false",
            "# Sites' kinds go to the coordinator; the coordinator's kinds come to the sites.",
            *topics,
            "",
        ]
    )
