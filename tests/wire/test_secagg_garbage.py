"""Garbage from an authenticated peer: every message of the protocol, truncated, bit-flipped,
replaced by random bytes or by JSON of the wrong shape, is refused with a ``ProtocolError`` (a
reason the coordinator logs and the site answers with), never another exception that would end a
coordinator's or a site's loop, and the round still completes on the honest messages.

The wire's signatures stop tampering in transit, so these bytes are what a malicious site sends
the coordinator under its own signature, or a malicious coordinator relays to the sites."""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from neurofed.wire.errors import ProtocolError
from neurofed.wire.secagg import SecAggClient, SecAggServer
from neurofed.wire.secagg.messages import MASKED_MAGIC, pack_bundles
from tests.wire.secagg_helpers import Fed, fedavg, random_updates

LENGTH = 1000
WEIGHT = 3


def mutants(good: bytes, seed: int) -> Iterator[bytes]:
    """Truncations and single bit flips of ``good``, random bytes, empty input, JSON documents of
    the wrong type, and ``good``'s own JSON fields (when it is a JSON object) set to wrong values."""
    rnd = random.Random(seed)
    good = bytes(good)
    yield b""
    yield rnd.randbytes(len(good))
    yield from (good[:i] for i in range(1, min(24, len(good))))  # inside the magic and lengths
    for _ in range(25):
        i = rnd.randrange(len(good))
        yield good[:i]
        flipped = bytearray(good)
        flipped[i] ^= 1 << rnd.randrange(8)
        yield bytes(flipped)
    yield from (b"null", b"[]", b"{}", b'"x"', b"1e999", b'{"site": 5}', b"\xff\xfe")
    try:
        doc = json.loads(good)
    except ValueError:
        return
    if isinstance(doc, dict):
        yield from (json.dumps(d).encode() for d in wrong_fields(doc))


def wrong_fields(doc: dict) -> Iterator[dict]:
    for key in doc:
        for value in (None, 1, -1, 2**70, "x", [], {}):
            yield {**doc, key: value}


def masked_mutants(good: bytes, seed: int) -> Iterator[bytes]:
    """``mutants`` and a masked input whose JSON header (between the magic with its length and
    the vector) has a field of the wrong type or value."""
    yield from mutants(good, seed)
    start = len(MASKED_MAGIC) + 4
    (hlen,) = struct.unpack(">I", good[len(MASKED_MAGIC) : start])
    head, vec = json.loads(good[start : start + hlen]), good[start + hlen :]
    for doc in wrong_fields(head):
        h = json.dumps(doc).encode()
        yield MASKED_MAGIC + struct.pack(">I", len(h)) + h + vec
    yield MASKED_MAGIC + struct.pack(">I", 2**31) + good[start:]  # a header longer than the message


def refused(
    what: str, take: Callable[[bytes], object], good: bytes, seed: int, make: Callable = mutants
) -> int:
    """Feed every mutant to ``take``; anything but acceptance or a ProtocolError fails the test.
    Returns how many were refused (a fuzz that refuses nothing tests nothing)."""
    count = 0
    for bad in make(good, seed):
        try:
            take(bad)
        except ProtocolError:
            count += 1
        except Exception as exc:  # noqa: BLE001 - the point: no other exception may escape
            pytest.fail(f"{what}: {type(exc).__name__} escaped for input {bad[:60]!r}: {exc}")
    return count


def test_every_message_of_a_round_refuses_garbage_and_the_round_completes():
    fed = Fed.make(4)
    cfg = fed.config(LENGTH)
    clients = fed.clients(cfg)
    ups, _ = random_updates(fed.sites, LENGTH)

    def restored(site: str) -> SecAggClient:  # a copy of a site at its current phase
        return SecAggClient.from_state(clients[site].state(), fed.identities[site], fed.roster)

    keysets = {s: c.make_keyset() for s, c in clients.items()}
    n = refused(
        "key set", lambda b: SecAggServer(cfg, fed.roster).add_keyset("site-00", b), keysets["site-00"], 1
    )
    assert n > 40
    server = SecAggServer(cfg, fed.roster)
    for s in fed.sites:
        server.add_keyset(s, keysets[s])
    relayed = server.close_keysets()
    n = refused(
        "relayed key set",
        lambda b: restored("site-00").make_shares({**relayed, "site-01": b}),
        relayed["site-01"],
        2,
    )
    assert n > 40

    bundles = {s: c.make_shares(relayed) for s, c in clients.items()}

    def at_shares() -> SecAggServer:
        srv = SecAggServer(cfg, fed.roster)
        for s in fed.sites:
            srv.add_keyset(s, keysets[s])
        srv.close_keysets()
        return srv

    assert (
        refused(
            "share bundles",
            lambda b: at_shares().add_shares("site-00", b),
            pack_bundles(bundles["site-00"]),
            3,
        )
        > 40
    )
    for s in fed.sites:
        server.add_shares(s, bundles[s])
    server.close_shares()
    mine = server.shares_for("site-00")
    sender = next(iter(mine))
    n = refused(
        "relayed share bundle",
        lambda b: restored("site-00").mask(ups["site-00"], WEIGHT, {**mine, sender: b}),
        mine[sender],
        4,
    )
    assert n > 40

    masked = {s: clients[s].mask(ups[s], WEIGHT, server.shares_for(s)) for s in fed.sites}

    def at_inputs() -> SecAggServer:
        srv = at_shares()
        for s in fed.sites:
            srv.add_shares(s, bundles[s])
        srv.close_shares()
        return srv

    # a flipped bit in the vector itself is a valid (garbage) input: out of scope, see PROTOCOL.md
    assert (
        refused("masked input", lambda b: at_inputs().add_masked_input("site-03", b), masked["site-03"], 5)
        > 20
    )
    for s in fed.sites:
        server.add_masked_input(s, masked[s])
    survivors = server.close_inputs()
    assert refused("survivor list", lambda b: restored("site-00").consistency(b), survivors, 6) > 40

    echoes = {s: clients[s].consistency(survivors) for s in fed.sites}
    probe = at_inputs()
    for s in fed.sites:
        probe.add_masked_input(s, masked[s])
    probe.close_inputs()
    assert refused("echo", lambda b: probe.add_echo("site-02", b), echoes["site-02"], 7) > 40
    for s in fed.sites:
        server.add_echo(s, echoes[s])
    request = server.unmask_request()
    assert refused("unmask request", lambda b: restored("site-00").unmask(b), request, 8) > 40

    reveals = {s: clients[s].unmask(request) for s in fed.sites}
    assert refused("reveal", lambda b: server.add_reveal("site-02", b), reveals["site-02"], 9) > 40
    for s in fed.sites:
        server.add_reveal(s, reveals[s])
    result = server.finish()
    want = fedavg(ups, dict.fromkeys(fed.sites, WEIGHT), fed.sites, cfg.clip)
    assert np.max(np.abs(result.mean - want)) <= cfg.error_bound
