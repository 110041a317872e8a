"""The site's side of secure aggregation: one ``SecAggClient`` per site and attempt.

Phases, each one method whose output the caller sends through the wire (see README.md)::

    client = SecAggClient(site, config, identity_key, roster_keys)   # fresh secrets
    keyset = client.make_keyset()                        # -> bytes, to the coordinator
    bundles = client.make_shares(keysets)                # {site: keyset bytes} -> {neighbour: sealed}
    masked = client.mask(update, weight, received)       # {sender: sealed} -> MaskedInput bytes
    echo = client.consistency(survivor_list)             # -> 64-byte signature
    reveal = client.unmask(unmask_request)               # -> Reveal bytes

Persist ``client.state()`` (a JSON-serialisable dict holding this attempt's secrets: store it like
the site's private keys, mode 0600) after each call and BEFORE sending its output. A restarted
site rebuilds the client with ``SecAggClient.from_state`` and repeats the pending call: every call
is idempotent and a repeat gives byte-identical output (keys, bundles, masked vector, reveal). A
site without its state for an attempt it already sent something in counts as dropped; it never
makes new secrets for that attempt. Masking a *different* update under the same state is refused
(``MaskReuseRefused``), as is revealing both shares of one neighbour (``BothSharesRequested``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from neurofed.wire import kem as kems
from neurofed.wire.errors import ProtocolError
from neurofed.wire.secagg.errors import BothSharesRequested, MaskReuseRefused, SecAggRoundFailed
from neurofed.wire.secagg.masking import clip_factor, l2_norm, masked_ring
from neurofed.wire.secagg.messages import (
    KeySet,
    MaskedInput,
    Reveal,
    RosterKeys,
    SurvivorList,
    UnmaskRequest,
    b64,
    open_bundle,
    raw_public,
    seal_bundle,
    seed_commitment,
    unb64,
    verify_echoes,
)
from neurofed.wire.secagg.params import SecAggConfig
from neurofed.wire.secagg.prg import coin_key, pair_mask_key, pair_sign, self_mask_key
from neurofed.wire.secagg.shamir import split_secret

log = logging.getLogger(__name__)

STATE_FORMAT = "neurofed-secagg-client/1"
PHASES = ("new", "keys", "shared", "masked", "echoed", "revealed")


def _fresh_secrets(kem: str) -> dict[str, str]:
    """All secrets of one attempt, from the operating system's CSPRNG (``cryptography``/os.urandom);
    with the hybrid KEM also a fresh ML-KEM-768+X25519 key pair that share bundles are sealed to."""
    secrets = {
        "mask_sk": b64(X25519PrivateKey.generate().private_bytes_raw()),
        "share_sk": b64(X25519PrivateKey.generate().private_bytes_raw()),
        "seed": b64(os.urandom(32)),
        "coin_seed": b64(os.urandom(32)),
        "noise_seed": b64(os.urandom(8)),
    }
    if kem == kems.MLKEM768_X25519:
        secrets["share_kem_sk"] = b64(kems.HybridKeyPair.generate().raw())
    return secrets


class SecAggClient:
    """One site in one attempt of a secure round. Not thread-safe; one call at a time."""

    def __init__(
        self,
        site: str,
        config: SecAggConfig,
        identity: Ed25519PrivateKey,
        roster: RosterKeys,
        *,
        state: Mapping[str, Any] | None = None,
        kem: str | None = None,
    ) -> None:
        """``kem``: the federation's KEM as this site's own roster records it; a config that names
        another (a coordinator trying to downgrade how shares are sealed) is refused."""
        if site not in config.participants:
            raise ProtocolError("secagg-not-participant", f"{site!r} is not asked to take part")
        if kem is not None and config.kem != kem:
            raise ProtocolError(
                "secagg-wrong-kem",
                f"the round seals shares with {config.kem}, but this federation's roster says {kem}",
            )
        self.site = site
        self.config = config
        self._identity = identity
        self._roster = roster
        if state is None:
            self._state: dict[str, Any] = {
                "format": STATE_FORMAT,
                "site": site,
                "config": config.to_dict(),
                "phase": "new",
                **_fresh_secrets(config.kem),
            }
        else:
            if state.get("format") != STATE_FORMAT or state.get("site") != site:
                raise ProtocolError("secagg-bad-state", "state belongs to another site or format")
            if SecAggConfig.from_dict(state["config"]) != config:
                raise ProtocolError("secagg-bad-state", "state belongs to another attempt")
            self._state = _copy(state)

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any],
        identity: Ed25519PrivateKey,
        roster: RosterKeys,
        kem: str | None = None,
    ) -> SecAggClient:
        """Rebuild a client from ``state()`` (after a restart); it goes on where it stopped."""
        return cls(
            str(state["site"]),
            SecAggConfig.from_dict(state["config"]),
            identity,
            roster,
            state=state,
            kem=kem,
        )

    def state(self) -> dict[str, Any]:
        """A JSON-serialisable copy of everything needed to resume (contains this attempt's secrets)."""
        return _copy(self._state)

    @property
    def phase(self) -> str:
        return str(self._state["phase"])

    # --- phase 1: keys -----------------------------------------------------------------------

    def make_keyset(self) -> bytes:
        """This attempt's signed key set (two fresh X25519 public keys and a seed commitment)."""
        st = self._state
        if "keyset" not in st:
            ks = KeySet(
                site=self.site,
                context=self.config.context,
                config_digest=self.config.digest,
                mask_key=raw_public(self._key("mask_sk")),
                share_key=raw_public(self._key("share_sk")),
                seed_commit=seed_commitment(self.config, self.site, unb64(st["seed"])),
                share_kem_key=self._kem_pair().public_bytes() if "share_kem_sk" in st else b"",
            ).signed(self._identity)
            st["keyset"] = b64(ks.to_bytes())
            self._advance("keys")
        return unb64(st["keyset"])

    # --- phase 2: shares ---------------------------------------------------------------------

    def make_shares(self, keysets: Mapping[str, bytes]) -> dict[str, bytes]:
        """Verify the relayed key sets and share the self-mask seed and mask key among the
        neighbours that have one, threshold t, each neighbour's bundle sealed to it.

        Raises ProtocolError for a key set that does not verify (reason in ``.reason``) and
        SecAggRoundFailed when fewer than t neighbours sent key sets."""
        self._require("keys")
        peers = self._verified_peers(keysets)
        st = self._state
        if "bundles" in st:  # a repeat (resume): the same bundles, if the same neighbours
            if peers != st["peers"]:
                raise ProtocolError(
                    "secagg-keyset-changed", "neighbours' key sets differ from the first call"
                )
            return {p: unb64(b) for p, b in st["bundles"].items()}
        if len(peers) < self.config.t:
            raise SecAggRoundFailed(
                "secagg-too-few-neighbours",
                f"{self.site}: {len(peers)} neighbours have key sets, threshold t={self.config.t}",
            )
        order = sorted(peers)
        seed_shares = split_secret(unb64(st["seed"]), self.config.t, len(order))
        key_shares = split_secret(unb64(st["mask_sk"]), self.config.t, len(order))
        share_sk = self._key("share_sk")
        bundles = {}
        for peer, (i, s_seed), (j, s_key) in zip(order, seed_shares, key_shares, strict=True):
            assert i == j
            bundles[peer] = seal_bundle(
                self.config,
                self.site,
                peer,
                share_sk,
                unb64(peers[peer]["share_key"]),
                i,
                s_seed,
                s_key,
                unb64(peers[peer].get("share_kem_key", "")),
            )
        st["peers"] = peers
        st["bundles"] = {p: b64(b) for p, b in bundles.items()}
        self._advance("shared")
        return bundles

    def _verified_peers(self, keysets: Mapping[str, bytes]) -> dict[str, dict[str, str]]:
        own = self.make_keyset()
        neighbours = set(self.config.neighbours(self.site))
        peers: dict[str, dict[str, str]] = {}
        seen_keys: set[bytes] = set()
        for sender, data in sorted(keysets.items()):
            if sender == self.site:
                if bytes(data) != own:
                    raise ProtocolError(
                        "secagg-keyset-substituted", "the relayed copy of our key set differs"
                    )
                continue
            ks = KeySet.from_bytes(data)
            ks.verify(self.config, self._roster, sender=sender)
            for key in (ks.mask_key, ks.share_key, *([ks.share_kem_key] if ks.share_kem_key else [])):
                if key in seen_keys:
                    raise ProtocolError(
                        "secagg-duplicate-key", f"{sender!r} reuses a public key of another site"
                    )
                seen_keys.add(key)
            if sender in neighbours:
                peers[sender] = {"mask_key": b64(ks.mask_key), "share_key": b64(ks.share_key)}
                if ks.share_kem_key:
                    peers[sender]["share_kem_key"] = b64(ks.share_kem_key)
        return peers

    # --- phase 3: masked input ---------------------------------------------------------------

    @property
    def noise_seed(self) -> int:
        """This attempt's secret seed of the site's distributed DP noise (persisted with the
        state, so a restarted site adds the same noise and re-sends byte-identical input)."""
        raw = self._state.get("noise_seed")
        if raw is None:
            raw = self._state["noise_seed"] = b64(os.urandom(8))
        return int.from_bytes(unb64(raw), "little")

    def mask(
        self,
        update: np.ndarray,
        weight: int,
        received: Mapping[str, bytes],
        *,
        counts: Sequence[int] = (),
        noise: np.ndarray | None = None,
    ) -> bytes:
        """Open the neighbours' share bundles, then clip ``update`` (flat, ``config.length``
        coordinates) to L2 norm ``config.clip``, quantize it with stochastic rounding, multiply
        by ``weight`` (the case count) and add the self mask and one pairwise mask per neighbour
        that sent a bundle. Returns ``MaskedInput`` bytes for the coordinator.

        ``counts`` (``config.counts`` integers) go after the update unweighted; ``noise`` (int64,
        ``config.length`` values; required when ``config.noise_std`` > 0) is added to the quantized,
        weighted input before masking: the site's share of the distributed DP noise.

        Deterministic given the state: repeating the call (after a restart) with the same update,
        weight, counts and bundles gives the same bytes; anything else raises MaskReuseRefused."""
        self._require("shared")
        cfg, st = self.config, self._state
        vec = np.ascontiguousarray(update).reshape(-1)
        if vec.size != cfg.length - cfg.counts:
            raise ValueError(
                f"update has {vec.size} coordinates, the round expects {cfg.length - cfg.counts}"
            )
        if len(counts) != cfg.counts:
            raise ValueError(f"the round expects {cfg.counts} count values, got {len(counts)}")
        if (noise is None) != (cfg.noise_std == 0 and cfg.count_noise_std == 0):
            raise ValueError("distributed noise must be given exactly when the round's config asks for it")
        if noise is not None and (noise.dtype != np.int64 or noise.shape != (cfg.length,)):
            raise ValueError(f"noise must be {cfg.length} int64 values")
        if int(weight) != weight or not 1 <= weight <= cfg.max_total_weight:
            raise ValueError(f"weight must be an integer in 1..{cfg.max_total_weight}, got {weight}")
        weight = int(weight)
        digest = self._input_digest(vec, weight, received, counts)
        if "masked_digest" in st and st["masked_digest"] != digest:
            log.error("secagg %s: refused to mask a second, different input in %s", self.site, cfg.context)
            raise MaskReuseRefused(f"{self.site} already masked another input under these keys")
        senders = sorted(received)
        if len(senders) < cfg.t:
            raise SecAggRoundFailed(
                "secagg-too-few-neighbours", f"{self.site}: bundles from {len(senders)} neighbours, t={cfg.t}"
            )
        shares = self._open_bundles(received)

        mask_sk = self._key("mask_sk")
        masks = [(self_mask_key(cfg, self.site, unb64(st["seed"])), +1)]
        for peer in senders:
            shared = mask_sk.exchange(X25519PublicKey.from_public_bytes(unb64(st["peers"][peer]["mask_key"])))
            masks.append((pair_mask_key(cfg, self.site, peer, shared), pair_sign(self.site, peer)))
        ring = masked_ring(
            vec,
            factor=clip_factor(l2_norm(vec), cfg.clip),
            scale=cfg.scale,
            weight=weight,
            coin_key=coin_key(cfg, self.site, unb64(st["coin_seed"])),
            dtype=cfg.dtype,
            masks=masks,
            tail=counts,
            noise=noise,
        )

        st["received"] = shares
        st["masked_digest"] = digest
        st["masked_with"] = senders
        self._advance("masked")
        return MaskedInput(self.site, cfg.digest, weight, tuple(senders), ring).to_bytes()

    def _input_digest(
        self, vec: np.ndarray, weight: int, received: Mapping[str, bytes], counts: Sequence[int] = ()
    ) -> str:
        h = hashlib.sha256(self.config.context.info("input", self.site, vec.dtype.str, weight))
        h.update(memoryview(vec).cast("B"))
        if counts:
            h.update(b"counts" + b",".join(str(int(c)).encode() for c in counts))
        for sender in sorted(received):
            h.update(hashlib.sha256(sender.encode() + b"\x00" + bytes(received[sender])).digest())
        return h.hexdigest()

    def _open_bundles(self, received: Mapping[str, bytes]) -> dict[str, dict[str, Any]]:
        peers = self._state["peers"]
        share_sk = self._key("share_sk")
        kem_pair = self._kem_pair() if "share_kem_sk" in self._state else None
        out = {}
        for sender, sealed in sorted(received.items()):
            if sender not in peers:
                raise ProtocolError("secagg-unexpected-bundle", f"bundle from {sender!r}, not a neighbour")
            idx, s_seed, s_key = open_bundle(
                self.config,
                bytes(sealed),
                sender,
                self.site,
                share_sk,
                unb64(peers[sender]["share_key"]),
                kem_pair,
            )
            out[sender] = {"index": idx, "seed_share": b64(s_seed), "key_share": b64(s_key)}
        return out

    # --- phase 4: consistency ----------------------------------------------------------------

    def consistency(self, survivor_list: bytes) -> bytes:
        """Check the coordinator's survivor list and echo it: the returned Ed25519 signature is
        this site's commitment to that one list; it never echoes or answers for another."""
        self._require("masked")
        lst = self._check_list(survivor_list)
        self._commit(lst)
        return self._identity.sign(lst.echo_bytes())

    # --- phase 5: unmask ---------------------------------------------------------------------

    def unmask(self, request: bytes) -> bytes:
        """Answer an unmask request (survivor list plus echoes) with ``Reveal`` bytes: for each
        neighbour that sent us shares, its self-mask-seed share if it survived, its mask-key
        share if it dropped. Refuses (ProtocolError) unless at least t survivors echoed that same
        list and it names at least max(t, 3) survivors; raises BothSharesRequested if the list
        would turn a neighbour's answer into the other kind of share."""
        self._require("masked")
        req = UnmaskRequest.from_bytes(request)
        lst = self._check_list(req.survivor_list)
        verify_echoes(lst, req.echoes, self._roster, self.config.t)
        self._commit(lst)
        st = self._state
        survivors = set(lst.survivors)
        seed_shares, key_shares = {}, {}
        revealed = st.setdefault("revealed", {})
        for peer in st["masked_with"]:
            kind = "seed" if peer in survivors else "key"
            if revealed.get(peer, kind) != kind:
                self._refuse_both([peer])
            share = st["received"][peer]
            target = seed_shares if kind == "seed" else key_shares
            target[peer] = (int(share["index"]), unb64(share[f"{kind}_share"]))
        for peer in st["masked_with"]:
            revealed[peer] = "seed" if peer in survivors else "key"
        self._advance("revealed")
        return Reveal(self.site, lst.digest, seed_shares, key_shares).to_bytes()

    def _check_list(self, data: bytes) -> SurvivorList:
        lst = SurvivorList.from_bytes(data)
        lst.check(self.config)
        if self.site not in lst.survivors:
            raise ProtocolError("secagg-not-survivor", f"{self.site} is not on the survivor list")
        return lst

    def _commit(self, lst: SurvivorList) -> None:
        """Bind this site to one survivor list per attempt (the first it echoes or answers)."""
        st = self._state
        if "echoed" not in st:
            st["echoed"] = lst.digest.hex()
            st["echoed_survivors"] = list(lst.survivors)
            self._advance("echoed")
            return
        if st["echoed"] == lst.digest.hex():
            return
        before, now = set(st["echoed_survivors"]), set(lst.survivors)
        flipped = [p for p in st["masked_with"] if (p in before) != (p in now)]
        if flipped:
            self._refuse_both(flipped)
        log.error(
            "secagg %s: refused a second, different survivor list in %s", self.site, self.config.context
        )
        raise ProtocolError("secagg-survivors-changed", "a different survivor list was already echoed")

    def _refuse_both(self, peers: list[str]) -> None:
        log.error(
            "secagg %s: coordinator asked for both shares of %s in %s; refused",
            self.site,
            ", ".join(peers),
            self.config.context,
        )
        raise BothSharesRequested(f"{self.site} was asked for both shares of {', '.join(peers)}")

    # --- helpers -----------------------------------------------------------------------------

    def _key(self, name: str) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(unb64(self._state[name]))

    def _kem_pair(self) -> kems.HybridKeyPair:
        return kems.HybridKeyPair.from_raw(unb64(self._state["share_kem_sk"]))

    def _require(self, phase: str) -> None:
        if PHASES.index(self.phase) < PHASES.index(phase):
            raise ProtocolError(
                "secagg-out-of-order", f"{self.site} is in phase {self.phase!r}, needs {phase!r}"
            )

    def _advance(self, phase: str) -> None:
        if PHASES.index(phase) > PHASES.index(self.phase):
            self._state["phase"] = phase


def _copy(state: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(state))
