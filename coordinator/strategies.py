"""Aggregation strategies: one small interface, thin classes over ``neurofed.coordinator.aggregate``.

The round loop (``neurofed.coordinator.rounds``) lives once, outside the strategies, and drives them:

    cfg = strategy.configure(round, site, base)   # a fresh dict per site (never shared)
    strategy.begin(round, global_weights)
    strategy.add(site, update, num_cases, local_steps)  # as each checked update arrives
    new_global = strategy.result()                # None: keep the previous global model
    meta, tensors = strategy.state()              # persisted with the round; load_state() on resume

The FedAvg family folds updates in as they arrive (memory flat in the number of sites); the order
statistics (median, trimmed mean) spill each update to a safetensors file and reduce tensor by
tensor, so memory holds one tensor per site at a time, never whole models.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from neurofed.coordinator.aggregate import WeightedMean, Weights, clip_update, coordinate_median, trimmed_mean
from neurofed.coordinator.errors import CoordinatorError, UpdateRejected

log = logging.getLogger(__name__)


class Strategy(ABC):
    """Base: optional update-norm bound, per-site configuration, persistence hooks."""

    name: ClassVar[str] = "base"
    needs_local_steps: ClassVar[bool] = False  # FedNova: updates without local_steps are rejected

    def __init__(self, *, max_norm: float | None = None) -> None:
        if max_norm is not None and not max_norm > 0:
            raise CoordinatorError(f"--max-norm must be positive, got {max_norm}")
        self.max_norm = max_norm
        self.round = 0
        self._global: Weights | None = None
        self.clipped: dict[str, float] = {}
        # client-level DP in plain mode: noise on the mean before any server step (ClientDP.add_noise)
        self.mean_noise: Callable[[Weights, float], Weights] | None = None

    # -- round configuration -------------------------------------------------------------
    def configure(self, round: int, site: str, base: Mapping[str, Any]) -> dict[str, Any]:
        """The instructions for ``site`` in ``round``: a fresh dict every call (Flower's wart
        #2704 was one mutable config shared by every client)."""
        return dict(base)

    # -- aggregation ------------------------------------------------------------------------
    def begin(self, round: int, global_weights: Mapping[str, np.ndarray]) -> None:
        self.round = round
        self._global = dict(global_weights)
        self.clipped = {}
        self.local_steps: dict[str, int] = {}
        self._begin()

    def add(
        self, site: str, update: Mapping[str, np.ndarray], num_cases: int, local_steps: int | None = None
    ) -> None:
        """Fold in one checked update (full weights, not a delta) from ``site``, which took
        ``local_steps`` optimiser steps (reported by the site; FedNova needs it)."""
        if self._global is None:
            raise RuntimeError("Strategy.add before begin")
        if local_steps is None and self.needs_local_steps:
            raise UpdateRejected(
                "missing-local-steps", f"{self.name} needs each site's local_steps; {site} sent none"
            )
        if local_steps is not None:
            self.local_steps[site] = int(local_steps)
        if self.max_norm is not None:
            update, norm = clip_update(update, self._global, self.max_norm)
            if norm > self.max_norm * (1 + 1e-5):  # a site's own clip, off by float32 rounding, is no news
                self.clipped[site] = norm
                log.warning(
                    "round %d: update from %s clipped (norm %.4g > bound %.4g)",
                    self.round,
                    site,
                    norm,
                    self.max_norm,
                )
        self._add(site, update, num_cases)

    def add_aggregate(self, update: Mapping[str, np.ndarray], total_cases: int) -> None:
        """Fold in the round's one already-averaged update (full weights) behind ``total_cases``
        cases: what secure aggregation unmasks. Only the strategies on the mean take it."""
        if self._global is None:
            raise RuntimeError("Strategy.add_aggregate before begin")
        self._add_aggregate(update, total_cases)

    def _add_aggregate(self, update: Mapping[str, np.ndarray], total_cases: int) -> None:
        raise CoordinatorError(
            f"--strategy {self.name} needs individual updates; it cannot run on a secure sum"
        )

    @abstractmethod
    def _begin(self) -> None: ...

    @abstractmethod
    def _add(self, site: str, update: Mapping[str, np.ndarray], num_cases: int) -> None: ...

    @abstractmethod
    def result(self) -> Weights | None:
        """The new global weights, or None (no usable update: keep the previous model)."""

    # -- persistence --------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], Weights]:
        """JSON-able settings/counters and named tensors to persist with the round."""
        return {"name": self.name, "max_norm": self.max_norm}, {}

    def load_state(self, meta: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
        if meta.get("name") not in (None, self.name):
            raise CoordinatorError(
                f"saved state belongs to strategy {meta.get('name')!r}, not {self.name!r}: resume with "
                f"--strategy {meta.get('name')} or start with a fresh --state folder"
            )

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op for most strategies
        """Release what the strategy holds between rounds (spill files)."""


class FedAvg(Strategy):
    """McMahan et al.: the mean of the sites' weights, weighted by their number of training cases."""

    name = "fedavg"

    def _begin(self) -> None:
        self._mean = WeightedMean()

    def _add(self, site: str, update: Mapping[str, np.ndarray], num_cases: int) -> None:
        self._mean.add(update, float(num_cases))

    def _add_aggregate(self, update: Mapping[str, np.ndarray], total_cases: int) -> None:
        self._mean.add_mean(update, float(total_cases))

    def result(self) -> Weights | None:
        total = self._mean.total_weight
        mean = self._mean.result()
        if mean is not None and self.mean_noise is not None:
            mean = self.mean_noise(mean, total)
        return mean


class FedProx(FedAvg):
    """FedAvg on the server; the proximal term (mu/2 ||w - w_global||^2) is added by each site's
    trainer, so the server's only part is sending ``mu`` in the round's configuration."""

    name = "fedprox"

    def __init__(self, *, mu: float = 0.01, max_norm: float | None = None) -> None:
        super().__init__(max_norm=max_norm)
        if not mu >= 0:
            raise CoordinatorError(f"FedProx mu must be >= 0, got {mu}")
        self.mu = mu

    def configure(self, round: int, site: str, base: Mapping[str, Any]) -> dict[str, Any]:
        cfg = super().configure(round, site, base)
        cfg["mu"] = self.mu
        return cfg

    def state(self) -> tuple[dict[str, Any], Weights]:
        meta, tensors = super().state()
        meta["mu"] = self.mu
        return meta, tensors


def _server_step(
    global_weights: Mapping[str, np.ndarray],
    mean: Mapping[str, np.ndarray],
    step: Callable[[str, np.ndarray], np.ndarray],
) -> Weights:
    """``global + step(name, mean - global)`` per floating tensor, in float64 and cast back; the
    counters (integer tensors) take the sites' mean as is. FedNova and FedOpt differ only in
    ``step``."""
    out: Weights = {}
    for name, g in global_weights.items():
        g = np.asarray(g)
        if not np.issubdtype(g.dtype, np.floating):
            out[name] = mean[name]
            continue
        g64 = g.astype(np.float64)
        out[name] = (g64 + step(name, mean[name].astype(np.float64) - g64)).astype(g.dtype)
    return out


def _save_buffers(prefix: str, buffers: Mapping[str, np.ndarray]) -> Weights:
    """A server optimiser's per-tensor buffers as snapshot tensors named ``<prefix>/<tensor>``."""
    return {f"{prefix}/{name}": b.astype(np.float32) for name, b in buffers.items()}


def _load_buffers(prefix: str, tensors: Mapping[str, np.ndarray]) -> Weights:
    """The inverse of :func:`_save_buffers`, back in float64 (the precision the steps run in)."""
    start = f"{prefix}/"
    return {
        k[len(start) :]: np.asarray(v, dtype=np.float64) for k, v in tensors.items() if k.startswith(start)
    }


class FedNova(FedAvg):
    """Wang et al. 2020 (normalised averaging): each site's change is divided by the optimiser
    steps it took, the per-step changes are averaged by cases, and the result is scaled back by
    the case-weighted mean number of steps.

    Why: with whole local epochs a site with 41 cases takes eight times the steps of one with 5,
    so under FedAvg its direction dominates the average far beyond its share of the data (here
    about 75 % of the update for 36 % of the cases) and the small sites' scanners are
    under-learned. With equal steps everywhere FedNova is exactly FedAvg.

    Memory stays flat: a streaming mean with weights n_i/tau_i gives M, and
    w_global + (sum n_i tau_i / N^2) * (sum n_i/tau_i) * (M - w_global) is FedNova's update.
    """

    name = "fednova"
    needs_local_steps = True

    def _begin(self) -> None:
        super()._begin()
        self._n = 0.0  # N: cases
        self._a = 0.0  # sum n_i / tau_i
        self._t = 0.0  # sum n_i * tau_i

    def _add(self, site: str, update: Mapping[str, np.ndarray], num_cases: int) -> None:
        tau = float(self.local_steps[site])
        n = float(num_cases)
        self._mean.add(update, n / tau)
        self._n += n
        self._a += n / tau
        self._t += n * tau

    def _add_aggregate(self, update: Mapping[str, np.ndarray], total_cases: int) -> None:
        # the secure sum is already FedNova's update (coordinator/secure.py scales it): scale 1
        self._mean.add_mean(update, 1.0)
        self._n = self._a = self._t = 1.0

    def result(self) -> Weights | None:
        mean = super().result()
        if mean is None or self._global is None:
            return None
        scale = self._t * self._a / (self._n * self._n)  # 1 when every site took the same steps
        return _server_step(self._global, mean, lambda _name, delta: scale * delta)


class FedAvgM(FedAvg):
    """Hsu et al. 2019 (FedAvg with server momentum): the FedAvg mean minus the global model is
    accumulated in a momentum buffer ``v = momentum * v + (mean - global)`` and the global model
    moves by ``server_lr * v``; the buffer persists across rounds (and restarts).

    Why: each round FedAvg moves the model by the average of the sites' changes, which is about one
    small site's worth of optimiser steps; pooled training over the same epochs takes ten times
    as many. Momentum keeps walking a direction the sites agree on round after round (at most
    1 / (1 - momentum) times as far in steady state), so federated training is not starved of
    progress at an equal epoch budget. Flower's ``FedAvgM`` has the same two knobs. Measured on the
    study's synthetic sites (docs/study): momentum 0.5 (the default) reaches FedAvg's plateau in
    fewer rounds; 0.9, Hsu et al.'s value with untouched site learning rates, diverged there.
    """

    name = "fedavgm"

    def __init__(self, *, eta: float = 1.0, momentum: float = 0.5, max_norm: float | None = None) -> None:
        super().__init__(max_norm=max_norm)
        if not 0.0 <= momentum < 1.0:
            raise CoordinatorError(f"--server-momentum must be in [0, 1), got {momentum}")
        self.eta, self.momentum = eta, momentum
        self.v: Weights = {}

    def result(self) -> Weights | None:
        mean = super().result()
        if mean is None or self._global is None:
            return None
        return _server_step(self._global, mean, self._momentum_step)

    def _momentum_step(self, name: str, delta: np.ndarray) -> np.ndarray:
        v = self.v.get(name)
        v = delta if v is None else self.momentum * v + delta
        self.v[name] = v
        return self.eta * v

    def state(self) -> tuple[dict[str, Any], Weights]:
        meta, tensors = super().state()
        meta.update(eta=self.eta, momentum=self.momentum)
        tensors.update(_save_buffers("v", self.v))
        return meta, tensors

    def load_state(self, meta: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
        super().load_state(meta, tensors)
        self.v = _load_buffers("v", tensors)


class FedOpt(FedAvg):
    """Reddi et al. (adaptive federated optimisation): the FedAvg mean minus the global model is a
    pseudo-gradient for a server optimiser whose moments persist across rounds (and restarts)."""

    name = "fedopt"

    def __init__(
        self,
        *,
        eta: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        max_norm: float | None = None,
    ) -> None:
        super().__init__(max_norm=max_norm)
        self.eta, self.beta1, self.beta2, self.tau = eta, beta1, beta2, tau
        self.t = 0
        self.m: Weights = {}
        self.v: Weights = {}

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1.0 - self.beta2) * d2

    def result(self) -> Weights | None:
        avg = super().result()
        if avg is None or self._global is None:
            return None
        self.t += 1
        return _server_step(self._global, avg, self._adaptive_step)

    def _adaptive_step(self, name: str, delta: np.ndarray) -> np.ndarray:
        """One server-optimiser step for tensor ``name`` from its pseudo-gradient ``delta``."""
        m = self.m.get(name)
        v = self.v.get(name)
        m = (1.0 - self.beta1) * delta if m is None else self.beta1 * m + (1.0 - self.beta1) * delta
        d2 = delta * delta
        v = (1.0 - self.beta2) * d2 if v is None else self._second_moment(v, d2)
        self.m[name], self.v[name] = m, v
        return self.eta * m / (np.sqrt(v) + self.tau)

    def state(self) -> tuple[dict[str, Any], Weights]:
        meta, tensors = super().state()
        meta.update(t=self.t, eta=self.eta, beta1=self.beta1, beta2=self.beta2, tau=self.tau)
        tensors.update(_save_buffers("m", self.m))
        tensors.update(_save_buffers("v", self.v))
        return meta, tensors

    def load_state(self, meta: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
        super().load_state(meta, tensors)
        self.t = int(meta.get("t", 0))
        self.m = _load_buffers("m", tensors)
        self.v = _load_buffers("v", tensors)


class FedAdam(FedOpt):
    name = "fedadam"


class FedYogi(FedOpt):
    """Yogi's second moment grows or shrinks additively (sign rule), which tames Adam's v when
    pseudo-gradients are sparse or noisy across rounds."""

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta2) * d2 * np.sign(v - d2)


class _Spilled(Strategy):
    """Keeps each update on disk (safetensors) and reduces tensor by tensor."""

    def __init__(self, *, spill_dir: str | Path | None = None, max_norm: float | None = None) -> None:
        super().__init__(max_norm=max_norm)
        self._spill_root = Path(spill_dir) if spill_dir else None
        self._dir: Path | None = None
        self._files: list[Path] = []

    def _begin(self) -> None:
        self.close()
        if self._spill_root is not None:
            self._spill_root.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-r{self.round}-", dir=self._spill_root))
        self._files = []

    def _add(self, site: str, update: Mapping[str, np.ndarray], num_cases: int) -> None:
        from safetensors.numpy import save_file

        assert self._dir is not None
        path = self._dir / f"{len(self._files):05d}.safetensors"
        save_file({k: np.asarray(v, order="C") for k, v in update.items()}, str(path))
        self._files.append(path)

    @abstractmethod
    def _reduce(self, arrays: list[np.ndarray]) -> np.ndarray: ...

    def result(self) -> Weights | None:
        from safetensors import safe_open

        if not self._files or self._global is None:
            return None
        handles = [safe_open(str(p), framework="numpy") for p in self._files]
        try:
            out: Weights = {}
            for name in self._global:
                arrays = [h.get_tensor(name) for h in handles]
                out[name] = self._reduce(arrays)
            return out
        finally:
            del handles

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._files = []


class Median(_Spilled):
    """Coordinate-wise median (Yin et al. 2018): one site sending huge values cannot move it."""

    name = "median"

    def _reduce(self, arrays: list[np.ndarray]) -> np.ndarray:
        return coordinate_median(arrays)


class TrimmedMean(_Spilled):
    """Coordinate-wise mean after dropping the ``beta`` fraction of lowest and highest values."""

    name = "trimmed-mean"

    def __init__(
        self, *, beta: float = 0.2, spill_dir: str | Path | None = None, max_norm: float | None = None
    ) -> None:
        super().__init__(spill_dir=spill_dir, max_norm=max_norm)
        if not 0 <= beta < 0.5:
            raise CoordinatorError(f"trimmed-mean beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def _reduce(self, arrays: list[np.ndarray]) -> np.ndarray:
        # with few sites, trim at least one value each side when that still leaves one
        n = len(arrays)
        beta = self.beta
        if n >= 3 and math.floor(beta * n) == 0 and beta > 0:
            beta = 1.0 / n
        return trimmed_mean(arrays, beta)

    def state(self) -> tuple[dict[str, Any], Weights]:
        meta, tensors = super().state()
        meta["beta"] = self.beta
        return meta, tensors


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedNova, FedAvgM, FedAdam, FedYogi, Median, TrimmedMean)
}


def make_strategy(
    name: str,
    *,
    mu: float = 0.01,
    max_norm: float | None = None,
    spill_dir: str | Path | None = None,
    server_lr: float | None = None,
    server_momentum: float | None = None,
    **opts: Any,
) -> Strategy:
    """Build a strategy by its CLI name (``fedavg``, ``fedprox``, ``fednova``, ``fedavgm``,
    ``fedadam``, ``fedyogi``, ``median``, ``trimmed-mean``)."""
    if name not in STRATEGIES:
        raise CoordinatorError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    if server_lr is not None:
        if not issubclass(cls, (FedOpt, FedAvgM)):
            raise CoordinatorError(
                f"--server-lr is the server optimiser's learning rate of fedavgm, fedadam and fedyogi; "
                f"{name} has none (drop the flag or choose --strategy fedavgm)"
            )
        if not server_lr > 0:
            raise CoordinatorError(f"--server-lr must be positive, got {server_lr}")
        opts["eta"] = server_lr
    if server_momentum is not None:
        if cls is not FedAvgM:
            raise CoordinatorError(
                f"--server-momentum is fedavgm's; {name} has none (drop the flag or choose --strategy fedavgm)"
            )
        opts["momentum"] = server_momentum
    if cls is FedProx:
        return FedProx(mu=mu, max_norm=max_norm)
    if issubclass(cls, _Spilled):
        return cls(spill_dir=spill_dir, max_norm=max_norm, **opts)
    return cls(max_norm=max_norm, **opts)
