"""Sample-level DP-SGD at a site: the accountant that persists with the site's round state, the
noise a site solves for its own sampling rate, and one private optimiser step (Opacus).

The privacy unit is the patient: each step Poisson-samples the site's training cases (each case
independently with probability q) and takes one crop of every sampled case, so a patient's whole
influence on a step is one per-sample gradient, clipped to ``max_grad_norm``; Gaussian noise of
std ``noise_multiplier * max_grad_norm`` goes on the sum (Opacus's ``DPOptimizer``).

Randomness that the guarantee rests on is secret: which cases a step samples and the noise are
drawn from generators seeded from ``os.urandom`` (the training seed, which makes crops and
augmentation repeatable, is known to the operator and must not decide them). The noise is
floating-point Gaussian from torch's Mersenne Twister, not Opacus's ``secure_mode`` (which needs
torchcsprng, unavailable for this torch): see docs/privacy.md for what that means.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from neurofed.edge_node.errors import TrainingError
from neurofed.models.privacy import DPConfig, PrivacyConfigError, sampling_plan

log = logging.getLogger(__name__)

History = list[tuple[float, float, int]]
"""(noise multiplier, sample rate, steps) per stretch of steps: Opacus's RDP accountant history."""


class BudgetSpent(TrainingError):
    """One more round would spend more than the site's privacy budget (target epsilon)."""


@dataclass(frozen=True)
class DPStep:
    """What a round of DP-SGD uses at this site (the trainer's side of ``DPConfig``)."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int


def merged_history(history: Iterable[Sequence[float]]) -> History:
    """``history`` with the stretches of equal noise and sampling rate added up, in order of
    first appearance (steps of none dropped). A site's ledger grows by one stretch a round, all
    alike under a target epsilon; the accountants compute each stretch on its own (Opacus's RDP
    evaluates its series per stretch, about 0.25 s at a small site's rate 0.33 and noise 4.35),
    so over 200 rounds an unmerged ledger costs about a minute per epsilon. Composition is
    additive in RDP, so the merge gives the same epsilon; the PRV accountant composes the same
    distributions the same number of times."""
    steps: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        if int(n) > 0:
            key = (float(s), float(q))
            steps[key] = steps.get(key, 0) + int(n)
    return [(s, q, n) for (s, q), n in steps.items()]


def epsilon(history: Iterable[Sequence[float]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` spent by ``history`` (0 for no steps): Opacus's RDP accountant, or its
    PRV accountant (Gopi et al. 2021: the privacy loss distribution composed numerically; tighter
    than RDP's conversion, to within its error bound of 0.01 in epsilon)."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = merged_history(history)
    if not acc.history:
        return 0.0
    with warnings.catch_warnings():  # PRV at sampling rate 1: log(0) in a branch it does not take
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(acc.get_epsilon(delta=delta))


def solve_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier (to Opacus's 0.01 tolerance in epsilon) at which ``steps``
    Poisson-sampled steps at ``sample_rate`` spend at most ``target_epsilon`` at ``delta``."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=int(steps),
                accountant=accountant,
                epsilon_tolerance=0.01,
            )
        )
    except ValueError as exc:
        raise PrivacyConfigError(
            f"no noise multiplier reaches epsilon {target_epsilon:g} at delta {delta:g} over {steps} steps "
            f"at sampling rate {sample_rate:.3g} ({exc}); raise --dp-target-epsilon or plan fewer rounds"
        ) from None


class SiteAccountant:
    """A site's privacy ledger across rounds: every DP-SGD step it took (retrained rounds and
    restarts included), the noise it solved, and whether its budget is spent. It is a plain dict
    kept in the site agent's ``agent.json`` (``state``), saved before the steps it charges run."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        state.setdefault("history", [])

    @property
    def history(self) -> History:
        return [(float(s), float(q), int(n)) for s, q, n in self.state["history"]]

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float, accountant: str | None = None) -> float:
        return epsilon(self.history, delta, accountant or self.state.get("accountant", "rdp"))

    def plan(self, cfg: DPConfig, num_cases: int, batch_size: int, epochs: float) -> DPStep:
        """This round's DP-SGD step settings. With a target epsilon the noise is solved once for
        the planned rounds at this site's own sampling rate and kept; a round that would take the
        site past its budget raises ``BudgetSpent`` (nothing is charged then)."""
        q, steps = sampling_plan(num_cases, batch_size, epochs)
        self.state["accountant"] = cfg.accountant
        sigma = cfg.noise_multiplier
        if sigma is None:
            key = [cfg.target_epsilon, cfg.delta, cfg.rounds, q, steps, cfg.accountant]
            solved = self.state.get("solved")
            if not solved or solved.get("for") != key:
                sigma = solve_noise(
                    float(cfg.target_epsilon), cfg.delta, q, steps * cfg.rounds, cfg.accountant
                )
                self.state["solved"] = {"for": key, "noise_multiplier": sigma}
                log.info(
                    "DP: noise multiplier %.4f for epsilon %g at delta %g over %d rounds x %d steps "
                    "(sampling rate %.4f)",
                    sigma,
                    cfg.target_epsilon,
                    cfg.delta,
                    cfg.rounds,
                    steps,
                    q,
                )
            sigma = float(self.state["solved"]["noise_multiplier"])
        step = DPStep(float(sigma), cfg.max_grad_norm, q, steps)
        if cfg.target_epsilon is not None:
            after = epsilon([*self.history, (step.noise_multiplier, q, steps)], cfg.delta, cfg.accountant)
            if after > cfg.target_epsilon * (1 + 1e-9):
                self.state["spent"] = True
                raise BudgetSpent(
                    f"privacy budget spent: {self.steps} DP-SGD steps have spent epsilon "
                    f"{self.epsilon(cfg.delta):.3f} of {cfg.target_epsilon:g} (delta {cfg.delta:g}); another "
                    f"round of {steps} steps would reach {after:.3f}"
                )
        return step

    def charge(self, step: DPStep) -> None:
        """Count ``step.steps`` steps (before they run: a round cut short still counts whole)."""
        self.state["history"].append([step.noise_multiplier, step.sample_rate, step.steps])

    def report(self, cfg: DPConfig, step: DPStep | None = None) -> dict[str, Any]:
        """What the site tells the coordinator (UPDATE and METRICS ``dp``; wire/PROTOCOL.md)."""
        hist = self.history
        last = step or (DPStep(hist[-1][0], cfg.max_grad_norm, hist[-1][1], hist[-1][2]) if hist else None)
        out: dict[str, Any] = {
            "epsilon": self.epsilon(cfg.delta, cfg.accountant),
            "delta": cfg.delta,
            "accountant": cfg.accountant,
            "max_grad_norm": cfg.max_grad_norm,
            "steps": self.steps,
        }
        if cfg.target_epsilon is not None:
            out["target_epsilon"] = cfg.target_epsilon
        if last is not None:
            out.update(noise_multiplier=last.noise_multiplier, sample_rate=last.sample_rate)
        return out


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from the operating system's entropy (never from the training seed)."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


def secret_rng() -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(os.urandom(16), "little"))


def check_dp_model(model: torch.nn.Module) -> None:
    """Refuse a network that per-sample clipping cannot train (e.g. BatchNorm mixes samples)."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise TrainingError(
            "the model cannot be trained with DP-SGD: "
            + "; ".join(str(e) for e in errors)
            + " (use the default instance normalisation)"
        )


class PrivateStep:
    """Opacus DP-SGD around ``model`` and ``optimizer`` for one round: per-sample gradients
    (``GradSampleModule``; Opacus's functorch path for PReLU and ConvTranspose3d), clipping to
    ``max_grad_norm``, Gaussian noise, division by the expected batch size (``DPOptimizer``).

    ``step(chunks, loss_fn)`` is one optimiser step over the crops of the cases a step sampled,
    given in chunks (physical batches) so that a large Poisson draw does not need more memory;
    an empty draw still steps, with noise alone. ``close()`` removes Opacus's hooks."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        dp: DPStep,
        *,
        expected_batch_size: float,
        generator: torch.Generator | None = None,
    ) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        check_dp_model(model)
        self.model = model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=max(1, round(expected_batch_size)),
            loss_reduction="mean",
            generator=generator if generator is not None else secret_generator(),
        )
        self.dp = dp

    def step(
        self,
        chunks: Sequence[tuple[torch.Tensor, torch.Tensor]],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> float:
        """One DP-SGD step; returns the mean loss over the sampled crops (nan for none)."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        losses: list[float] = []
        for i, (x, y) in enumerate(chunks):
            loss = loss_fn(self.gsm(x), y)
            with warnings.catch_warnings():  # "full backward hook ... no inputs require gradients"
                warnings.simplefilter("ignore", UserWarning)
                loss.backward()
            losses.extend([float(loss.detach())] * len(x))
            if i < len(chunks) - 1:  # accumulate this chunk's clipped gradients; no step yet
                opt.signal_skip_step(do_skip=True)
                opt.step()
                opt.zero_grad(set_to_none=True)
        if not chunks:  # nobody sampled: the step is noise alone
            for p in opt.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        opt.step()
        return float(np.mean(losses)) if losses else math.nan

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.gsm._close()


def clip_site_update(
    trained: dict[str, Any], start: dict[str, Any], clip: float
) -> tuple[dict[str, Any], bool]:
    """Client-level DP at a site: the trained weights with their change from ``start`` scaled down
    to L2 norm at most ``clip`` (floating tensors, norm over all of them, in float64), and the bit
    the adaptive clip counts, ``norm <= clip``. Only the bit leaves the site, never the norm."""

    def t(v: Any) -> torch.Tensor:
        return v.detach() if torch.is_tensor(v) else torch.as_tensor(np.asarray(v))

    names = [k for k, v in trained.items() if t(v).is_floating_point()]
    deltas = {k: t(trained[k]).double() - t(start[k]).double() for k in names}
    norm = math.sqrt(sum(float((d * d).sum()) for d in deltas.values()))
    if not math.isfinite(norm):
        raise TrainingError("the trained update has non-finite values")
    within = norm <= clip
    if within:
        return dict(trained), True
    scale = clip / norm
    out = dict(trained)
    for k in names:
        clipped = (t(start[k]).double() + deltas[k] * scale).to(t(trained[k]).dtype)
        out[k] = clipped if torch.is_tensor(trained[k]) else clipped.numpy()
    return out, False


def skellam_noise(segments: Sequence[tuple[int, float]], seed: int) -> np.ndarray:
    """Integer Skellam noise (Poisson(v/2) - Poisson(v/2): symmetric, variance v) for each
    ``(count, variance)`` segment in turn, as int64: a site's share of the distributed noise
    under secure aggregation.

    Why Skellam: it is integer, so it lives in the secure sum's ring exactly (no rounding, no
    floating-point trace of the value it hides), and sums of Skellam noises are Skellam, so the
    survivors' shares add up to the variance the accountant assumes (Agarwal et al. 2021).
    Drawn by torch's Poisson sampler from a generator seeded with ``seed``: a secret from
    ``os.urandom`` kept in the site's secure-aggregation state (0600), so that a restarted site
    adds the same noise. torch's generator is a Mersenne Twister, not a cryptographic generator
    (docs/privacy.md); rates are kept at most 2^40, where float64 counts are exact."""
    g = torch.Generator().manual_seed(int(seed) & (2**63 - 1))
    parts = []
    for count, variance in segments:
        if count <= 0:
            continue
        if variance <= 0:
            parts.append(np.zeros(count, dtype=np.int64))
            continue
        rate = torch.full((int(count),), float(variance) / 2.0, dtype=torch.float64)
        x = torch.poisson(rate, generator=g) - torch.poisson(rate, generator=g)
        parts.append(x.numpy().astype(np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
