"""A site's part in a secure-aggregation round: the client of ``neurofed.wire.secagg`` driven by
the round's TASK and the coordinator's RELAY messages, persisted between steps.

The site trains as in any round, keeps the flat update delta (the float tensors' change from the
round's model, in the order of their sorted names; divided by its local steps under FedNova) on
its own disk, and sends it only masked. Every step's output is computed from the persisted client
state and that state is written (mode 0600: it holds this attempt's secrets) before the output is
sent, so a site restarted in the middle of a secure round sends byte-identical messages again; a
new attempt (fresh keys) starts over, with the same trained delta. The client refuses to mask a
second, different input under the same keys and to reveal both shares of one neighbour.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from neurofed.wire.secagg import SecAggClient, SecAggConfig, pack_bundles, unpack_bundles

log = logging.getLogger(__name__)

ENCODING = "secagg"


def flat_delta(trained: Mapping[str, Any], start: Mapping[str, Any], scale: float = 1.0) -> np.ndarray:
    """The float tensors' change ``trained - start``, flattened in sorted-name order (float32).

    float32 tensors are subtracted in float32 straight into the output (IEEE subtraction rounds
    the exact difference once, as the float64 route does); anything else, or a FedNova scale,
    goes through float64."""
    names = sorted(k for k, v in start.items() if _is_float(v))
    pairs = [(_np(trained[k]), _np(start[k])) for k in names]
    out = np.empty(sum(b.size for _, b in pairs), dtype=np.float32)
    at = 0
    for a, b in pairs:
        part = out[at : at + b.size]
        if scale == 1.0 and a.dtype == b.dtype == np.float32 and a.size == b.size:
            np.subtract(a.reshape(-1), b.reshape(-1), out=part)
        else:
            part[:] = ((a.astype(np.float64) - b.astype(np.float64)) * scale).reshape(-1)
        at += b.size
    return out


def _np(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):
        return v.detach().cpu().numpy()
    return np.asarray(v)


def _is_float(v: Any) -> bool:
    if hasattr(v, "is_floating_point"):
        return bool(v.is_floating_point())
    return np.issubdtype(np.asarray(v).dtype, np.floating)


class SiteSecAgg:
    """One site's secure-aggregation state for the current round and attempt."""

    def __init__(
        self,
        site: str,
        state_dir: Path,
        identity: Any,
        roster_keys: Mapping[str, Any],
        kem: str | None = None,
    ) -> None:
        self.site = site
        self.kem = kem  # the federation's KEM from this site's roster: a config naming another is refused
        self.state_dir = Path(state_dir)
        self.identity = identity
        self.roster_keys = dict(roster_keys)
        self.client: SecAggClient | None = None
        self.round = -1
        self.attempt = -1
        self.sent: set[str] = set()
        self.left_out = False  # the current attempt's config does not include this site
        self._delta: tuple[int, np.ndarray | None] | None = None  # one round's delta (or none yet)

    # -- files ----------------------------------------------------------------------------------
    def _state_path(self, r: int, attempt: int) -> Path:
        return self.state_dir / f"secagg-r{r:04d}-a{attempt}.json"

    def _sent_path(self, r: int, attempt: int) -> Path:
        return self.state_dir / f"secagg-r{r:04d}-a{attempt}.sent"

    def delta_path(self, r: int) -> Path:
        return self.state_dir / f"secure-delta-r{r:04d}.npy"

    def save_delta(self, r: int, vec: np.ndarray) -> None:
        """Keep round ``r``'s delta on disk (a restarted site masks the same one) and at hand."""
        tmp = self.delta_path(r).with_suffix(".tmp.npy")
        np.save(tmp, vec, allow_pickle=False)
        os.replace(tmp, self.delta_path(r))
        self._delta = (r, vec)

    def load_delta(self, r: int) -> np.ndarray | None:
        """Round ``r``'s delta: the one this process saved, else the disk's (looked for once a
        round: only ``save_delta`` makes one afterwards, and the agent asks at every poll)."""
        if self._delta is not None and self._delta[0] == r:
            return self._delta[1]
        path = self.delta_path(r)
        vec = np.load(path, allow_pickle=False) if path.is_file() else None
        self._delta = (r, vec)
        return vec

    def _persist(self) -> None:
        assert self.client is not None
        path = self._state_path(self.round, self.attempt)
        tmp = path.with_suffix(".tmp")
        data = json.dumps(self.client.state()).encode()  # one shot: json's C encoder
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        self._sent_path(self.round, self.attempt).write_text("\n".join(sorted(self.sent)))

    def prune(self, keep_round: int) -> None:
        """Forget other rounds' secrets and deltas (a finished attempt's keys serve nothing)."""
        for p in self.state_dir.glob("secagg-r*-a*.*"):
            try:
                if int(p.name[8:12]) != keep_round:
                    p.unlink(missing_ok=True)
            except ValueError:
                continue
        for p in self.state_dir.glob("secure-delta-r*.npy"):
            if p != self.delta_path(keep_round):
                p.unlink(missing_ok=True)
        if self._delta is not None and self._delta[0] != keep_round:
            self._delta = None

    def forget(self) -> None:
        """Drop every round's secure state and delta: the coordinator started a new federation run
        (or a round over with another model), and a delta trained for the old one must never be
        masked for the new one."""
        for p in [*self.state_dir.glob("secagg-r*-a*.*"), *self.state_dir.glob("secure-delta-r*.npy")]:
            p.unlink(missing_ok=True)
        self.client, self.round, self.attempt = None, -1, -1
        self.sent, self.left_out, self._delta = set(), False, None

    # -- the attempt ----------------------------------------------------------------------------
    def begin(self, r: int, secagg: Mapping[str, Any]) -> bool:
        """The TASK's attempt: restore this site's client for it, or start a fresh one. False
        when the attempt's config leaves this site out (the coordinator retried over the sites
        that still answered): the site takes no part and waits for the next round."""
        attempt = int(secagg["attempt"])
        if (r, attempt) == (self.round, self.attempt) and (self.client is not None or self.left_out):
            return not self.left_out
        config = SecAggConfig.from_dict(secagg["config"])
        if config.context.round != r or config.context.attempt != attempt:
            raise ValueError(f"secure config names round {config.context.round}, the task {r}")
        self.round, self.attempt = r, attempt
        path = self._state_path(r, attempt)
        for old in self.state_dir.glob(f"secagg-r{r:04d}-a*.json"):
            if old != path:
                old.unlink(missing_ok=True)  # an abandoned attempt's secrets
        self.left_out = self.site not in config.participants
        if self.left_out:
            self.client, self.sent = None, set()
            log.warning(
                "%s: round %d attempt %d is built over %d other sites and leaves this one out; "
                "it takes part again from the next round",
                self.site, r, attempt, config.n,
            )  # fmt: skip
            return False
        if path.is_file():
            state = json.loads(path.read_text())
            self.client = SecAggClient.from_state(state, self.identity, self.roster_keys, kem=self.kem)
            sent = self._sent_path(r, attempt)
            self.sent = set(sent.read_text().split()) if sent.is_file() else set()
            log.info("%s: resuming secure aggregation round %d attempt %d", self.site, r, attempt)
        else:
            self.client = SecAggClient(self.site, config, self.identity, self.roster_keys, kem=self.kem)
            self.sent = set()
            log.info("%s: secure aggregation round %d attempt %d: fresh keys", self.site, r, attempt)
        return True

    def keyset(self) -> bytes:
        assert self.client is not None
        out = self.client.make_keyset()
        self._persist()
        return out

    def shares(self, relayed_keysets: bytes) -> bytes:
        assert self.client is not None
        import base64

        keysets = {k: base64.b64decode(v) for k, v in json.loads(relayed_keysets).items()}
        bundles = self.client.make_shares(keysets)
        self._persist()
        return pack_bundles(bundles)

    def masked(self, relayed_shares: bytes, delta: np.ndarray, weight: int) -> bytes | None:
        """The masked input, or None when no bundle came for this site (it was left out)."""
        assert self.client is not None
        import base64

        mine = json.loads(relayed_shares).get(self.site)
        if mine is None:
            return None
        cfg = self.client.config
        kw: dict[str, Any] = {}
        if cfg.counts:  # the adaptive clip's centred bit: +1 within the clip, -1 not
            within = float(np.linalg.norm(np.asarray(delta, dtype=np.float64))) <= cfg.clip
            kw["counts"] = [1 if within else -1] + [0] * (cfg.counts - 1)
        if cfg.noise_std or cfg.count_noise_std:  # client-level DP: this site's share of the noise
            from neurofed.edge_node.privacy import skellam_noise

            kw["noise"] = skellam_noise(
                [(cfg.length - cfg.counts, cfg.site_noise_variance), (cfg.counts, cfg.site_count_variance)],
                self.client.noise_seed,
            )
        out = self.client.mask(delta, weight, unpack_bundles(base64.b64decode(mine)), **kw)
        self._persist()
        return out

    def echo(self, survivors: bytes) -> bytes:
        assert self.client is not None
        out = self.client.consistency(survivors)
        self._persist()
        return out

    def reveal(self, request: bytes) -> bytes:
        assert self.client is not None
        out = self.client.unmask(request)
        self._persist()
        return out

    def mark_sent(self, step: str) -> None:
        self.sent.add(step)
        self._sent_path(self.round, self.attempt).write_text("\n".join(sorted(self.sent)))
