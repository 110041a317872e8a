"""The coordinator's side of secure aggregation: one ``SecAggServer`` per attempt.

It collects each phase's messages (``add_*``, each checked; a refused message raises
ProtocolError with a ``secagg-*`` reason and changes nothing), closes the phase when the round
state machine says so (all expected sites answered, or the deadline passed), and hands out what
goes to the sites next. Masked inputs are folded into one running sum in the ring as they arrive,
so memory is one model-sized vector of ring words plus small bookkeeping, whatever the number of
sites; no individual unmasked update ever exists here. The server is single-use: after
``SecAggRoundFailed`` the caller starts a new attempt (``attempt + 1``, a new config, fresh
client keys); it never reuses one.

::

    server = SecAggServer(config, roster_keys)
    server.add_keyset(site, keyset_bytes)              # each site
    keysets = server.close_keysets()                   # -> {site: keyset bytes}, relay to all
    server.add_shares(site, bundles)                   # {recipient: sealed}, each site
    server.close_shares()
    server.shares_for(site)                            # -> {sender: sealed}, to each site
    server.add_masked_input(site, masked_bytes)        # each site
    survivors = server.close_inputs()                  # -> survivor list bytes, to survivors
    server.add_echo(site, signature)                   # each survivor
    request = server.unmask_request()                  # -> bytes, to survivors
    server.add_reveal(site, reveal_bytes)              # until server.ready()
    result = server.finish()                           # -> SecAggResult (sum, total weight)
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from neurofed.wire.errors import ProtocolError
from neurofed.wire.secagg.errors import SecAggRoundFailed
from neurofed.wire.secagg.messages import (
    KeySet,
    MaskedInput,
    Reveal,
    RosterKeys,
    SurvivorList,
    UnmaskRequest,
    seed_commitment,
    signing_key,
    unpack_bundles,
    verify_echoes,
)
from neurofed.wire.secagg.params import SecAggConfig
from neurofed.wire.secagg.prg import apply_streams, pair_mask_key, pair_sign, self_mask_key
from neurofed.wire.secagg.quantize import from_ring
from neurofed.wire.secagg.shamir import combine_secret

log = logging.getLogger(__name__)

PHASES = ("keys", "shares", "masked", "consistency", "unmask", "done", "failed")
MAX_SUBSETS = 256  # share subsets tried when a reconstruction fails its check (a bad share)


@dataclass
class SecAggResult:
    """What the coordinator learns: the unmasked weighted sum, the total weight and who took part.

    ``mean_of(start, stop)`` is ``sum_u w_u * clip(x_u) / sum_u w_u`` over ``survivors`` for
    coordinates ``start..stop``, to within ``error_bound`` per coordinate (float64). The sum stays
    in ring words (``ring_sum``, one model-sized vector) and the mean is made a slice at a time, so
    the coordinator turns it into new weights tensor by tensor without a whole float64 copy
    (twice the model) beside it; ``mean`` is the whole vector at once. ``release()`` drops the sum
    once the weights are made."""

    total_weight: int
    survivors: tuple[str, ...]
    recovered: tuple[str, ...]  # dropped after sharing: their masks were removed, input not counted
    left_out: tuple[str, ...]  # no key set or no shares: never part of the sum
    weights: dict[str, int]
    error_bound: float
    ring_sum: np.ndarray | None = None  # the update's coordinates (not the counts), unmasked
    scale: float = 1.0  # ring units per unit of the update (2**scale_log2)
    bytes_in: dict[str, int] = field(default_factory=dict)
    bytes_out: dict[str, int] = field(default_factory=dict)
    counts: tuple[int, ...] = ()  # the sums of the config's count coordinates (with their noise)

    @property
    def length(self) -> int:
        return 0 if self.ring_sum is None else int(self.ring_sum.size)

    def mean_of(self, start: int, stop: int) -> np.ndarray:
        """The weighted mean of coordinates ``start..stop`` (float64, a fresh array)."""
        if self.ring_sum is None:
            raise RuntimeError("the secure sum was released")
        return from_ring(self.ring_sum[start:stop]).astype(np.float64) / (self.scale * self.total_weight)

    @property
    def mean(self) -> np.ndarray:
        return self.mean_of(0, self.length)

    @property
    def weighted_sum(self) -> np.ndarray:
        return self.mean * self.total_weight

    def release(self) -> None:
        """Drop the sum (the model-sized vector); the rest of the result stays."""
        self.ring_sum = None


class SecAggServer:
    """Collects one attempt's messages phase by phase and unmasks only the sum."""

    def __init__(self, config: SecAggConfig, roster: RosterKeys) -> None:
        self.config = config
        self._roster = roster
        self.phase = "keys"
        self._keysets: dict[str, KeySet] = {}
        self._keyset_bytes: dict[str, bytes] = {}
        self._bundles: dict[str, dict[str, bytes]] = {}
        self._u1: tuple[str, ...] = ()
        self._u2: tuple[str, ...] = ()
        self._inputs: dict[str, tuple[int, bytes]] = {}  # site -> (weight, digest of the message)
        self._acc: np.ndarray | None = None
        self._total_weight = 0
        self._list: SurvivorList | None = None
        self._echoes: dict[str, bytes] = {}
        self._seed_shares: dict[str, dict[int, bytes]] = {}
        self._key_shares: dict[str, dict[int, bytes]] = {}
        self._revealed: set[str] = set()
        self.bytes_in: dict[str, int] = {}
        self.bytes_out: dict[str, int] = {}

    # --- keys --------------------------------------------------------------------------------

    def add_keyset(self, sender: str, data: bytes) -> None:
        """Accept ``sender``'s signed key set, or raise ProtocolError (forged, wrong attempt ...)."""
        self._in_phase("keys", "key set")
        ks = KeySet.from_bytes(data)
        ks.verify(self.config, self._roster, sender=sender)
        if self._duplicate(sender, self._keyset_bytes, bytes(data)):
            return
        used = {k for other in self._keysets.values() for k in (other.mask_key, other.share_key)}
        if ks.mask_key in used or ks.share_key in used:
            raise ProtocolError("secagg-duplicate-key", f"{sender!r} reuses a public key of another site")
        self._keysets[sender] = ks
        self._keyset_bytes[sender] = bytes(data)
        self._count(self.bytes_in, "keys", len(data))

    def close_keysets(self) -> dict[str, bytes]:
        """End the key phase; return ``{site: key set bytes}`` to relay to every site (or use
        ``keysets_for(site)`` to send each site only its neighbours')."""
        self._in_phase("keys", "close")
        self._u1 = tuple(sorted(self._keysets))
        if len(self._u1) < self.config.min_survivors:
            self._fail(
                "secagg-too-few-keysets", f"{len(self._u1)} key sets, need {self.config.min_survivors}"
            )
        self.phase = "shares"
        return dict(self._keyset_bytes)

    def keysets_for(self, site: str) -> dict[str, bytes]:
        """The key sets ``site`` needs: its own and its neighbours'."""
        want = set(self.config.neighbours(site)) | {site}
        out = {s: b for s, b in self._keyset_bytes.items() if s in want}
        self._count(self.bytes_out, "keys", sum(map(len, out.values())))
        return out

    # --- shares ------------------------------------------------------------------------------

    def add_shares(self, sender: str, bundles: Mapping[str, bytes] | bytes) -> None:
        """Accept ``sender``'s sealed bundles ``{recipient: sealed}`` (or ``pack_bundles`` bytes):
        exactly one for each neighbour that has a key set."""
        self._in_phase("shares", "share bundles")
        if isinstance(bundles, (bytes, bytearray, memoryview)):
            bundles = unpack_bundles(bytes(bundles))
        if sender not in self._u1:
            raise ProtocolError("secagg-no-keyset", f"{sender!r} sent shares without a key set")
        expected = set(self.config.neighbours(sender)) & set(self._u1)
        if set(bundles) != expected:
            raise ProtocolError(
                "secagg-wrong-recipients",
                f"{sender!r} shared with {sorted(bundles)}, expected {sorted(expected)}",
            )
        if any(len(b) < 12 + 16 for b in bundles.values()):
            raise ProtocolError("secagg-malformed", f"{sender!r} sent a truncated bundle")
        clean = {r: bytes(b) for r, b in bundles.items()}
        if self._duplicate(sender, self._bundles, clean):
            return
        self._bundles[sender] = clean
        self._count(self.bytes_in, "shares", sum(map(len, clean.values())))

    def close_shares(self) -> None:
        """End the share phase; from now on ``shares_for`` hands each site its bundles."""
        self._in_phase("shares", "close")
        self._u2 = tuple(sorted(self._bundles))
        if len(self._u2) < self.config.min_survivors:
            self._fail(
                "secagg-too-few-sharers", f"{len(self._u2)} sites shared, need {self.config.min_survivors}"
            )
        u2 = set(self._u2)
        for u in self._u2:
            if len(set(self.config.neighbours(u)) & u2) < self.config.t:
                self._fail(
                    "secagg-too-few-neighbours", f"{u} has fewer than t={self.config.t} sharing neighbours"
                )
        self.phase = "masked"

    def shares_for(self, recipient: str) -> dict[str, bytes]:
        """``{sender: sealed bundle}`` for ``recipient``, from every site that shared."""
        if PHASES.index(self.phase) < PHASES.index("masked"):
            raise ProtocolError("secagg-out-of-order", "close the share phase first")
        out = {s: b[recipient] for s, b in self._bundles.items() if recipient in b}
        self._count(self.bytes_out, "shares", sum(map(len, out.values())))
        return out

    # --- masked inputs -----------------------------------------------------------------------

    def add_masked_input(self, sender: str, data: bytes | memoryview, digest: bytes | None = None) -> None:
        """Check ``sender``'s masked input and add it to the running sum in the ring.

        ``digest`` identifies the input when ``sender`` sends again (a repeat is ignored, a
        different input refused): a digest the caller already verified over the message that
        carried it (the wire's signed SHA-256), or None to hash the input here."""
        self._in_phase("masked", "masked input")
        cfg = self.config
        msg = MaskedInput.from_bytes(data)
        if msg.site != sender:
            raise ProtocolError("secagg-wrong-sender", f"{sender!r} sent the input of {msg.site!r}")
        if sender not in self._u2:
            raise ProtocolError("secagg-no-shares", f"{sender!r} sent input without having shared its keys")
        if msg.config_digest != cfg.digest:
            raise ProtocolError("secagg-wrong-config", f"input of {sender!r} is for another attempt")
        if msg.vector.dtype != cfg.dtype or msg.vector.size != cfg.length:
            raise ProtocolError("secagg-wrong-shape", f"{sender!r}: {msg.vector.size} x {msg.vector.dtype}")
        expected = tuple(sorted(set(cfg.neighbours(sender)) & set(self._u2)))
        if msg.masked_with != expected:
            raise ProtocolError(
                "secagg-wrong-mask-set",
                f"{sender!r} masked with {list(msg.masked_with)}, expected {list(expected)}",
            )
        if digest is None:
            digest = hashlib.sha256(memoryview(data)).digest()
        if sender in self._inputs:
            if self._inputs[sender][1] != digest:
                log.error("secagg: %s sent two different inputs in %s", sender, cfg.context)
                raise ProtocolError("secagg-duplicate", f"{sender!r} already sent a different input")
            return
        if not 1 <= msg.weight or self._total_weight + msg.weight > cfg.max_total_weight:
            raise ProtocolError(
                "secagg-weight-over-budget",
                f"{sender!r} weight {msg.weight}: total would pass {cfg.max_total_weight}",
            )
        if self._acc is None:
            self._acc = np.zeros(cfg.length, dtype=cfg.dtype)
        np.add(self._acc, msg.vector, out=self._acc)
        self._total_weight += msg.weight
        self._inputs[sender] = (msg.weight, digest)
        self._count(self.bytes_in, "masked", len(data))

    def close_inputs(self) -> bytes:
        """End the input phase; return the survivor list to send to every survivor. Fails the
        attempt when fewer than max(t, 3) inputs arrived or some mask could not be removed."""
        self._in_phase("masked", "close")
        cfg = self.config
        u3 = set(self._inputs)
        if len(u3) < cfg.min_survivors:
            self._fail(
                "secagg-too-few-survivors",
                f"{len(u3)} masked inputs, never unmask fewer than {cfg.min_survivors}",
            )
        for u in self._u2:
            holders = len(set(cfg.neighbours(u)) & u3)
            if holders < cfg.t:
                self._fail(
                    "secagg-unrecoverable",
                    f"only {holders} surviving neighbours hold shares of {u}, t={cfg.t}",
                )
        self._list = SurvivorList(cfg.context, cfg.digest, tuple(sorted(u3)))
        self.phase = "consistency"
        data = self._list.to_bytes()
        self._count(self.bytes_out, "consistency", len(data) * len(u3))
        return data

    # --- consistency -------------------------------------------------------------------------

    def add_echo(self, sender: str, signature: bytes) -> None:
        """A survivor's signature over the survivor list."""
        self._in_phase("consistency", "echo")
        assert self._list is not None
        if sender not in self._list.survivors:
            raise ProtocolError("secagg-not-survivor", f"{sender!r} is not on the survivor list")
        try:
            signing_key(self._roster, sender).verify(bytes(signature), self._list.echo_bytes())
        except Exception:
            raise ProtocolError("secagg-bad-echo", f"echo of {sender!r} does not verify") from None
        self._echoes[sender] = bytes(signature)
        self._count(self.bytes_in, "consistency", len(signature))

    @property
    def echo_count(self) -> int:
        return len(self._echoes)

    def unmask_request(self) -> bytes:
        """The survivor list with the echoes collected; fails the attempt below t echoes."""
        self._in_phase("consistency", "close")
        assert self._list is not None
        req = UnmaskRequest(self._list.to_bytes(), dict(self._echoes))
        try:
            verify_echoes(self._list, req.echoes, self._roster, self.config.t)
        except ProtocolError as exc:
            self._fail(exc.reason, exc.detail)
        self.phase = "unmask"
        data = req.to_bytes()
        self._count(self.bytes_out, "unmask", len(data) * len(self._list.survivors))
        return data

    # --- unmask ------------------------------------------------------------------------------

    def add_reveal(self, sender: str, data: bytes) -> None:
        """A survivor's shares: self-mask-seed shares of surviving neighbours, mask-key shares of
        dropped ones. Anything else is refused (the coordinator never holds both for one site)."""
        self._in_phase("unmask", "reveal")
        assert self._list is not None
        rev = Reveal.from_bytes(data)
        if rev.site != sender or sender not in self._list.survivors:
            raise ProtocolError(
                "secagg-wrong-sender", f"{sender!r} is not a survivor or sent another's reveal"
            )
        if rev.survivors_digest != self._list.digest:
            raise ProtocolError("secagg-wrong-survivors", f"{sender!r} answered another survivor list")
        if sender in self._revealed:
            return
        survivors = set(self._list.survivors)
        dropped = set(self._u2) - survivors
        nbrs = set(self.config.neighbours(sender))
        if not set(rev.seed_shares) <= nbrs & survivors or not set(rev.key_shares) <= nbrs & dropped:
            raise ProtocolError(
                "secagg-wrong-share-kind", f"{sender!r} revealed shares that were not asked for"
            )
        for peer, (idx, share) in rev.seed_shares.items():
            self._seed_shares.setdefault(peer, {}).setdefault(idx, share)
        for peer, (idx, share) in rev.key_shares.items():
            self._key_shares.setdefault(peer, {}).setdefault(idx, share)
        self._revealed.add(sender)
        self._count(self.bytes_in, "unmask", len(data))

    def missing(self) -> dict[str, int]:
        """Sites whose masks cannot be removed yet, with the number of shares still needed."""
        assert self._list is not None
        t, out = self.config.t, {}
        for u in self._list.survivors:
            out[u] = t - len(self._seed_shares.get(u, {}))
        for v in set(self._u2) - set(self._list.survivors):
            out[v] = t - len(self._key_shares.get(v, {}))
        return {s: n for s, n in sorted(out.items()) if n > 0}

    def ready(self) -> bool:
        """True when every mask can be removed (``finish`` will not lack shares)."""
        return self.phase == "unmask" and not self.missing()

    def finish(self) -> SecAggResult:
        """Reconstruct the survivors' self-mask seeds and the dropped sites' mask keys, remove
        every mask from the sum and return the weighted mean. Fails the attempt if shares are
        missing or do not reconstruct (checked against the key sets)."""
        self._in_phase("unmask", "finish")
        assert self._list is not None and self._acc is not None
        cfg, acc = self.config, self._acc
        if self.missing():
            self._fail("secagg-too-few-shares", f"shares missing for {self.missing()}")
        survivors = self._list.survivors
        dropped = tuple(sorted(set(self._u2) - set(survivors)))
        masks = []  # every mask still in the sum, removed together in one pass over it
        for u in survivors:
            ks = self._keysets[u]
            seed = self._reconstruct(
                u, self._seed_shares[u], lambda s, u=u, ks=ks: seed_commitment(cfg, u, s) == ks.seed_commit
            )
            masks.append((self_mask_key(cfg, u, seed), -1))
        for v in dropped:
            ks = self._keysets[v]
            raw = self._reconstruct(v, self._key_shares[v], lambda s, ks=ks: _public_of(s) == ks.mask_key)
            sk = X25519PrivateKey.from_private_bytes(raw)
            for u in survivors:
                if v in cfg.neighbours(u):
                    shared = sk.exchange(X25519PublicKey.from_public_bytes(self._keysets[u].mask_key))
                    masks.append((pair_mask_key(cfg, u, v, shared), -pair_sign(u, v)))
        apply_streams(acc, masks)
        total = self._total_weight
        update_len = cfg.length - cfg.counts
        counts = tuple(int(c) for c in from_ring(acc[update_len:])) if cfg.counts else ()
        self._acc = None
        self.phase = "done"
        return SecAggResult(
            ring_sum=acc[:update_len],
            scale=cfg.scale,
            total_weight=total,
            survivors=survivors,
            recovered=dropped,
            left_out=tuple(p for p in cfg.participants if p not in self._u2),
            weights={s: w for s, (w, _) in sorted(self._inputs.items())},
            error_bound=cfg.error_bound,
            bytes_in=dict(self.bytes_in),
            bytes_out=dict(self.bytes_out),
            counts=counts,
        )

    def _reconstruct(self, site: str, shares: Mapping[int, bytes], check: Callable[[bytes], bool]) -> bytes:
        items = sorted(shares.items())
        for combo in itertools.islice(itertools.combinations(items, self.config.t), MAX_SUBSETS):
            try:
                secret = combine_secret(list(combo))
            except ValueError:  # not even a 32-byte value: a bad share among these
                continue
            if check(secret):
                return secret
        self._fail("secagg-bad-shares", f"the shares of {site} do not reconstruct its committed secret")
        raise AssertionError  # unreachable

    # --- helpers -----------------------------------------------------------------------------

    def _in_phase(self, phase: str, what: str) -> None:
        if self.phase != phase:
            raise ProtocolError("secagg-out-of-phase", f"{what} in phase {self.phase!r}, expected {phase!r}")

    def _duplicate(self, sender: str, held: Mapping[str, object], value: object) -> bool:
        if sender not in held:
            return False
        if held[sender] != value:
            raise ProtocolError("secagg-duplicate", f"{sender!r} already sent a different message")
        return True

    def _fail(self, reason: str, detail: str) -> None:
        self.phase = "failed"
        self._acc = None
        log.warning(
            "secagg %s failed (%s: %s); retry with attempt %d",
            self.config.context,
            reason,
            detail,
            self.config.context.attempt + 1,
        )
        raise SecAggRoundFailed(reason, detail)

    @staticmethod
    def _count(d: dict[str, int], phase: str, n: int) -> None:
        d[phase] = d.get(phase, 0) + n


def _public_of(raw: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
