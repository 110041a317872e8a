"""An in-memory federation for the secure-aggregation tests: sites with identity keys, a roster,
and a driver that runs every phase with chosen sites dropping out at chosen points."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from neurofed.wire.secagg import RoundContext, SecAggClient, SecAggConfig, SecAggServer


@dataclass
class Fed:
    sites: list[str]
    identities: dict[str, Ed25519PrivateKey]
    roster: dict[str, object]

    @classmethod
    def make(cls, n: int) -> Fed:
        sites = [f"site-{i:02d}" for i in range(n)]
        ids = {s: Ed25519PrivateKey.generate() for s in sites}
        return cls(sites, ids, {s: k.public_key() for s, k in ids.items()})

    def config(self, length: int, clip: float = 10.0, attempt: int = 0, **kw) -> SecAggConfig:
        return SecAggConfig.create(
            RoundContext("testfed", "run-1", 3, attempt), self.sites, length, clip, **kw
        )

    def clients(self, config: SecAggConfig) -> dict[str, SecAggClient]:
        return {s: SecAggClient(s, config, self.identities[s], self.roster) for s in config.participants}


@dataclass
class Drops:
    """Who stops where: before sending a key set, before shares, before masked input (after
    shares), before echoing, before revealing."""

    keys: set[str] = field(default_factory=set)
    shares: set[str] = field(default_factory=set)
    masked: set[str] = field(default_factory=set)
    echo: set[str] = field(default_factory=set)
    reveal: set[str] = field(default_factory=set)


def run_round(
    fed: Fed, config: SecAggConfig, updates: dict, weights: dict, drops: Drops | None = None, mask_kw=None
):
    """All phases in memory; returns (result, server, clients, masked inputs by site).
    ``mask_kw(site, client)``: extra keyword arguments of that site's ``mask`` (counts, noise)."""
    d = drops or Drops()
    clients = fed.clients(config)
    server = SecAggServer(config, fed.roster)
    live = [s for s in config.participants if s not in d.keys]
    for s in live:
        server.add_keyset(s, clients[s].make_keyset())
    keysets = server.close_keysets()
    live = [s for s in live if s not in d.shares]
    for s in live:
        server.add_shares(s, clients[s].make_shares(keysets))
    server.close_shares()
    live = [s for s in live if s not in d.masked]
    masked = {}
    for s in live:
        extra = mask_kw(s, clients[s]) if mask_kw is not None else {}
        masked[s] = clients[s].mask(updates[s], weights[s], server.shares_for(s), **extra)
        server.add_masked_input(s, masked[s])
    survivor_list = server.close_inputs()
    live = [s for s in live if s not in d.echo]
    for s in live:
        server.add_echo(s, clients[s].consistency(survivor_list))
    request = server.unmask_request()
    for s in live:
        if s not in d.reveal:
            server.add_reveal(s, clients[s].unmask(request))
    return server.finish(), server, clients, masked


def to_shares(fed: Fed, cfg: SecAggConfig) -> tuple[dict[str, SecAggClient], SecAggServer, dict[str, bytes]]:
    """Every site's client, a server that has taken every key set and share bundle, and the
    relayed key sets."""
    clients = fed.clients(cfg)
    server = SecAggServer(cfg, fed.roster)
    for s, c in clients.items():
        server.add_keyset(s, c.make_keyset())
    keysets = server.close_keysets()
    for s, c in clients.items():
        server.add_shares(s, c.make_shares(keysets))
    server.close_shares()
    return clients, server, keysets


def fedavg(updates: dict, weights: dict, sites, clip: float) -> np.ndarray:
    """Plaintext weighted FedAvg of the clipped updates, float64."""
    total = sum(weights[s] for s in sites)
    acc = np.zeros_like(np.asarray(updates[sites[0]], dtype=np.float64))
    for s in sites:
        x = np.asarray(updates[s], dtype=np.float64)
        norm = np.linalg.norm(x)
        if norm > clip:
            x = x * (clip / norm)
        acc += weights[s] * x
    return acc / total


def random_updates(sites, length: int, seed: int = 0, scale: float = 0.05):
    """Test data (not secret): numpy's generator is fine for the updates themselves."""
    rng = np.random.default_rng(seed)
    ups = {s: (rng.standard_normal(length) * scale).astype(np.float32) for s in sites}
    ws = {s: int(rng.integers(5, 60)) for s in sites}
    return ups, ws
