"""The study, as a command: federated vs centralized vs single-site on the same held-out cases.

Sheller et al. (2019) compared centralized data sharing (CDS), federated averaging (FL) and
single-institution models; this module runs those arms (plus the FLAIR-threshold baseline and,
optionally, cyclic institutional incremental learning) on one ``splits.json``, with one model,
one seed and one budget (centralized epochs = rounds x local epochs; each single site trains for
the same number of epochs on its own cases). FL runs through the real stack: provisioning, a
private Mosquitto, the coordinator and one edge process per site, encrypted end to end.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from neurofed.children import die_with_parent

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Profile:
    """What an experiment trades for time. ``full`` is the study's size (10 sites, 165 cases)."""

    name: str
    sites: int
    cases: int
    shape: tuple[int, int, int]
    model_size: str
    rounds: int
    local_epochs: float  # a fraction (0.5): that share of an epoch per round
    seed: int = 0  # the data (when synthesised) and the train/val/test split
    # initial weights, patch sampling and augmentation in every arm (None: ``seed``); another
    # value repeats the study on the same data and split, to size its run-to-run spread
    train_seed: int | None = None
    ciil: bool = False
    # the FL arm's aggregation: FedAvg is the study's; the kit's others can be compared on the
    # same arms (None below: the coordinator's default)
    fl_strategy: str = "fedavg"
    # what the FL arm's sites do with Adam's state between rounds (reset | continue-local)
    site_optimizer: str = "reset"
    # FedAvgM / FedAdam / FedYogi's server learning rate (None: the coordinator's default)
    fl_server_lr: float | None = None
    # the learning rate over the rounds (constant | cosine), the same for every arm by epoch
    lr_schedule: str = "constant"
    # FedAvgM's server momentum (None: the coordinator's default)
    fl_server_momentum: float | None = None
    # FedProx's proximal weight (None: the coordinator's default)
    fl_mu: float | None = None
    # processes for the arms trained in one process each (CDS, single sites, CIIL), run side by
    # side before FL; None: one per CPU core, at most 2. Two one-thread processes train 18 %
    # (channels-last; 25 % in NCDHW) more per second than one two-thread process on this 2-core
    # machine (measured); 1 runs them one after another in this process.
    workers: int | None = None
    # differential privacy: for each target epsilon, an FL arm with sample-level DP-SGD at every
    # site and a CDS arm with DP-SGD on the pooled cases, both at (epsilon, dp_delta) over the
    # same rounds and steps (docs/privacy.md); empty: no DP arms
    dp_target_epsilons: tuple[float, ...] = ()
    dp_delta: float = 1e-5
    dp_max_grad_norm: float = 1.0
    # the DP arms' expected cases per DP-SGD step (sampling rate = this / training cases, at every
    # site and pooled); None: the trainer's batch (2). Noise is added once per step, so larger
    # batches carry less noise per case (docs/study/privacy-utility.md)
    dp_batch_size: int | None = None

    @property
    def training_seed(self) -> int:
        return self.seed if self.train_seed is None else self.train_seed

    @property
    def epochs(self) -> int:
        """Centralized budget: rounds x local epochs (the study's equal-budget rule)."""
        epochs = self.rounds * self.local_epochs
        if not float(epochs).is_integer():
            raise ValueError(
                f"rounds x local epochs must be whole epochs for the centralized arm, got "
                f"{self.rounds} x {self.local_epochs} = {epochs}"
            )
        return int(epochs)


PROFILES: dict[str, Profile] = {
    # Minutes on a 2-core CPU: proves every arm runs end to end, not the study's numbers.
    "quick": Profile(
        name="quick", sites=3, cases=48, shape=(32, 32, 32), model_size="tiny", rounds=4, local_epochs=5
    ),
    # The study's shape: 10 unequal sites, 165 cases, 64^3 volumes, the 1.2 M-parameter UNet;
    # 200 rounds x half an epoch = 100 centralized epochs, FL by FedProx (FedAvg's weighted mean,
    # mu 0.01 on the sites): at half this budget no federated variant reached CDS (FedProx 0.94 of
    # it over four seeds), at this one FedProx did. The non-federated arms train side by side
    # in two processes to fit 60 minutes on this 2-core CPU; it trades the 240x240x155 volumes
    # and the study's training to convergence for a run that fits.
    "full": Profile(
        name="full",
        sites=10,
        cases=165,
        shape=(64, 64, 64),
        model_size="small",
        rounds=200,
        local_epochs=0.5,
        fl_strategy="fedprox",
    ),
}


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))
    return {"mean": m, "std": sd, "n": len(vals)}


def summarise(per_case: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation of Dice and HD95 over cases, overall and per site."""
    from neurofed.edge_node.evaluation import summarise_by_site

    return {
        "dice": _mean_std([c["dice"] for c in per_case.values()]),
        "hd95": _mean_std([c.get("hd95", float("nan")) for c in per_case.values()]),
        "per_site": summarise_by_site(per_case),
        "cases": len(per_case),
    }


class Arms:
    """The non-federated arms, sharing one case list, one splits.json and one model config."""

    def __init__(self, data: Path, profile: Profile, device: str = "auto") -> None:
        from neurofed.edge_node.centralized import model_config_for, resolve_cases
        from neurofed.edge_node.splits import select
        from neurofed.edge_node.training import TrainConfig

        self.data = data
        self.profile = profile
        self.device = device
        self.cases, self.splits, self.split_file = resolve_cases(data, split_seed=profile.seed)
        self.sites = sorted({c.site for c in self.cases})
        self.select = lambda split, sites=None: select(self.cases, self.splits, split, sites)
        self.model_config = model_config_for(self.cases, profile.model_size)
        self.train_config = TrainConfig(seed=profile.training_seed, split_seed=profile.seed)

    def _trainer(self, sites: Sequence[str] | None, batch_size: int | None = None):
        from neurofed.edge_node.training import CaseTrainer

        by_split = {
            "train": self.select("train", sites),
            "val": self.select("val", sites),
            "test": self.select("test"),
        }
        tc = self.train_config if batch_size is None else replace(self.train_config, batch_size=batch_size)
        return CaseTrainer(by_split, self.model_config, tc, self.device)

    def train(
        self,
        sites: Sequence[str] | None,
        epochs: int,
        *,
        curve_every: int = 0,
        init_state: dict | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> tuple[dict[str, Any], list[dict[str, float]], dict]:
        """Train on ``sites`` (None: pooled) for ``epochs``; evaluate on every site's test cases.

        With ``curve_every`` the validation Dice over every site's validation cases is recorded
        every that many epochs (the CDS curve set beside FL's rounds).
        """
        import torch

        trainer = self._trainer(sites)
        if not trainer.num_train_cases:
            raise ValueError(f"no training cases for sites {sites}")
        torch.manual_seed(self.profile.training_seed)
        model = trainer.model()
        if init_state is not None:
            model.load_state_dict(init_state)
        optimizer = trainer.make_optimizer(model)
        curve: list[dict[str, float]] = []
        done = 0
        step = curve_every or epochs
        pooled_val = self._trainer(None)
        while done < epochs:
            n = min(step, epochs - done)
            for e in range(done, done + n):  # one epoch at a time: the schedule's factor by epoch
                self._set_epoch_lr(optimizer, e)
                trainer.run_epochs(model, optimizer, 1, start_epoch=e)
            done += n
            if curve_every:
                val = pooled_val.evaluate_module(model, "val", hd95=False)  # the curve plots Dice
                curve.append(
                    {"epoch": done, "round": round(done / self.profile.local_epochs), "dice": val.dice}
                )
                if progress:
                    progress(f"epoch {done}/{epochs}: val Dice {val.dice:.3f}")
        test = trainer.evaluate_module(model, "test")
        return summarise(test.per_case) | {"per_case": test.per_case}, curve, model.state_dict()

    def train_dp(
        self,
        sites: Sequence[str] | None,
        target_epsilon: float,
        *,
        progress: Callable[[str], None] | None = None,
    ) -> tuple[dict[str, Any], list[dict[str, float]], dict[str, Any]]:
        """Train on ``sites`` (None: pooled) with DP-SGD at ``target_epsilon``, through the sites'
        own DP path: the kit's accountant plans each of the profile's rounds of ``local_epochs``
        over these cases (Poisson sampling rate batch / cases, round(epochs x cases / batch)
        steps), solves the noise for all rounds at once and charges each round before it runs,
        exactly as a site does; one Adam runs across the rounds, as in the CDS arm. Returns the
        test result, the validation curve per round and the accountant's report."""
        import torch

        from neurofed.edge_node.privacy import SiteAccountant
        from neurofed.models.privacy import DPConfig

        p = self.profile
        trainer = self._trainer(sites, p.dp_batch_size)
        if not trainer.num_train_cases:
            raise ValueError(f"no training cases for sites {sites}")
        cfg = DPConfig(
            max_grad_norm=p.dp_max_grad_norm, target_epsilon=target_epsilon, delta=p.dp_delta, rounds=p.rounds
        )
        acc = SiteAccountant({})
        torch.manual_seed(p.training_seed)
        model = trainer.model()
        optimizer = trainer.make_optimizer(model)
        pooled_val = self._trainer(None)
        every = max(1, round(1 / p.local_epochs))  # the CDS curve's grid: whole epochs
        curve: list[dict[str, float]] = []
        step = None
        for r in range(1, p.rounds + 1):
            step = acc.plan(cfg, trainer.num_train_cases, trainer.train_config.batch_size, p.local_epochs)
            acc.charge(step)
            self._set_epoch_lr(optimizer, math.floor((r - 1) * p.local_epochs))
            trainer.run_dp_steps(model, optimizer, step)
            if r % every == 0 or r == p.rounds:
                val = pooled_val.evaluate_module(model, "val", hd95=False)
                curve.append({"round": r, "epoch": r * p.local_epochs, "dice": val.dice})
                if progress:
                    eps = acc.epsilon(cfg.delta)
                    progress(f"round {r}/{p.rounds}: val Dice {val.dice:.3f}, epsilon {eps:.3f}")
        test = trainer.evaluate_module(model, "test")
        report = acc.report(cfg, step) | {"level": "sample", "unit": "patient"}
        return summarise(test.per_case) | {"per_case": test.per_case}, curve, report

    def epoch_lr_scale(self, epoch: int) -> float:
        """The learning-rate factor of 0-based ``epoch``: that of the federated round it falls in
        (epochs 0..E-1 are round 1 with E local epochs), so every arm follows one schedule."""
        from neurofed.coordinator.rounds import lr_scale

        p = self.profile
        return lr_scale(p.lr_schedule, min(p.rounds, int(epoch // p.local_epochs) + 1), p.rounds)

    def _set_epoch_lr(self, optimizer: Any, epoch: int) -> None:
        from neurofed.edge_node.training import set_lr

        set_lr(optimizer, self.train_config.lr * self.epoch_lr_scale(epoch))

    def evaluate_state(self, state: dict) -> dict[str, Any]:
        trainer = self._trainer(None)
        model = trainer.model()
        model.load_state_dict(state)
        test = trainer.evaluate_module(model, "test")
        return summarise(test.per_case) | {"per_case": test.per_case}

    def threshold(self) -> dict[str, Any]:
        from neurofed.edge_node.evaluation import flair_threshold_baseline

        res = flair_threshold_baseline(self.select("train"), self.select("test"))
        return summarise(res.test.per_case) | {"threshold": res.threshold, "per_case": res.test.per_case}

    def ciil(self, epochs: int) -> dict[str, Any]:
        """Cyclic institutional incremental learning: the model visits each site in turn, one
        local epoch at a time, until the budget is spent (the later papers' CIIL arm)."""
        import torch

        from neurofed.edge_node.training import CaseTrainer

        trainers = {s: self._trainer([s]) for s in self.sites}
        torch.manual_seed(self.profile.training_seed)
        model = trainers[self.sites[0]].model()
        state = model.state_dict()
        spent = 0
        while spent < epochs:
            for s in self.sites:
                if spent >= epochs:
                    break
                t: CaseTrainer = trainers[s]
                if not t.num_train_cases:
                    continue
                m = t.model()
                m.load_state_dict(state)
                opt = t.make_optimizer(m)
                self._set_epoch_lr(opt, spent)
                t.run_epochs(m, opt, 1, start_epoch=spent)
                state = m.state_dict()
                spent += 1
        return self.evaluate_state(state)


def run_federated_arm(
    data: Path,
    out: Path,
    profile: Profile,
    model_config,
    tracking_uri: str | None,
    timeout: float = 3600.0,  # each round's deadline
    coordinator_args: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
    site_args: Sequence[str] = (),
) -> dict[str, Any]:
    """FL through the real stack: provisioning, a private Mosquitto (mTLS + ACL), one ``neurofed
    edge`` process per site and ``neurofed coordinator``, exactly as a deployment runs them.

    The coordinator starts from the same initial weights as the other arms (same seed), and the
    returned ``state`` is the final global model; ``curve`` is the sites' case-weighted
    validation Dice of each round's global model.
    """
    import torch

    from neurofed.coordinator.state import StateStore
    from neurofed.launch.local import (
        Broker,
        child_env,
        free_port,
        provision_sites,
        read_events,
        spawn,
        spawn_site,
        wait_for,
    )
    from neurofed.models.checkpoint import load_weights, save_weights
    from neurofed.models.unet import build_unet

    out.mkdir(parents=True, exist_ok=True)
    sites = sorted(p.name for p in data.iterdir() if p.is_dir() and any(p.iterdir()))
    torch.manual_seed(profile.training_seed)
    init = save_weights(out / "init.safetensors", build_unet(model_config).state_dict(), model_config)
    port = free_port()
    bundles = provision_sites(out / "bundles", "study", sites, port)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    broker = Broker(bundles, port, logs / "mosquitto.log")
    broker.start()
    pre = model_config.preprocessing
    procs = []
    try:
        for site in sites:
            procs.append(
                spawn_site(
                    site, bundles, data, out, logs, extra=["--seed", str(profile.training_seed), *site_args]
                )
            )
        wait_for(
            lambda: all((out / f"{x}-state" / "status.json").is_file() for x in sites),
            600,
            "site agents",
            procs,
        )
        args = [
            "coordinator", "--bundle", str(bundles / "coordinator"), "--rounds", str(profile.rounds),
            "--min-sites", str(len(sites)), "--round-timeout", str(timeout), "--strategy", profile.fl_strategy,
            "--local-epochs", str(profile.local_epochs), "--model-size", profile.model_size,
            "--patch-size", str(int(pre.patch_size[0])),
            "--spacing", ",".join(str(float(x)) for x in pre.spacing),
            "--init-weights", str(init), "--state", str(out / "coordinator-state"),
            "--site-optimizer", profile.site_optimizer, "--lr-schedule", profile.lr_schedule,
        ]  # fmt: skip
        if profile.fl_server_lr is not None:
            args += ["--server-lr", str(profile.fl_server_lr)]
        if profile.fl_mu is not None:
            args += ["--mu", str(profile.fl_mu)]
        if profile.fl_server_momentum is not None:
            args += ["--server-momentum", str(profile.fl_server_momentum)]
        if tracking_uri:
            args += ["--mlflow", tracking_uri]
        args += list(coordinator_args)  # e.g. --fp16 (benchmarks/fp16_updates.py)
        coord = spawn("coordinator", args, logs, child_env())
        procs.append(coord)
        # each round may take up to its deadline (a long DP run takes hours in all)
        code = watch_federation(
            coord,
            out / "coordinator-state",
            profile.rounds,
            timeout * (profile.rounds + 1),
            progress,
            sites=procs[:-1],
        )
        if code != 0:
            raise RuntimeError(f"coordinator exited with {code}; see {logs}\n{coord.tail()}")
    finally:
        for p in procs:
            p.stop(timeout=10)
        broker.stop()
    store = StateStore(out / "coordinator-state")
    state, _, _ = load_weights(store.round_weights_path(profile.rounds))
    events = read_events(out / "coordinator-state")
    # by evaluated round (a round's scores may be forwarded after the next round's events;
    # after a coordinator restart, the last forwarding wins)
    scored = {int(e["round"]): float(e["dice"]) for e in events if e.get("event") == "evaluation"}
    curve = [{"round": r, "dice": d} for r, d in sorted(scored.items())]
    rounds = [e for e in events if e.get("event") == "round" and e.get("train")]
    return {
        "privacy": federation_privacy(events),
        "state": state,
        "curve": curve,
        "sites": sites,
        "round_seconds": [e.get("seconds") for e in rounds],
        "update_bytes": [int(e["bytes"]) for e in events if e.get("event") == "update"],
    }


def federation_privacy(events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What a DP federation's sites spent, from the coordinator's events: each site's largest
    epsilon and its noise multiplier and sampling rate, and the federation's figure (the largest
    epsilon of any site, the one that bounds every patient). Empty for a federation without DP."""
    per_site: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("event") != "round":
            continue
        for site, d in (e.get("dp") or {}).items():
            if isinstance(d, dict) and isinstance(d.get("epsilon"), (int, float)):
                prev = per_site.get(site, {})
                if float(d["epsilon"]) >= float(prev.get("epsilon", -1.0)):
                    per_site[site] = dict(d)
    if not per_site:
        return {}
    worst = max(per_site.values(), key=lambda d: float(d["epsilon"]))
    out = {k: worst[k] for k in ("delta", "accountant", "max_grad_norm", "target_epsilon") if k in worst}
    out |= {
        "level": "sample",
        "unit": "patient",
        "epsilon": max(float(d["epsilon"]) for d in per_site.values()),
        "noise_multiplier": min(float(d.get("noise_multiplier", math.inf)) for d in per_site.values()),
        "per_site": per_site,
    }
    return out


def round_line(events: Sequence[Mapping[str, Any]], index: int, rounds: int, elapsed: float) -> str:
    """One progress line for the ``index``-th closed round (0-based): its sites, the latest
    validation Dice known by then, and the time left at the pace so far."""
    closed = [e for e in events if e.get("event") == "round"]
    last = closed[index]
    r = int(last["round"])
    upto = events.index(last)
    scored = [e for e in events[:upto] if e.get("event") == "evaluation"]
    dice = f", val Dice {float(scored[-1]['dice']):.3f} (model r{scored[-1]['round']})" if scored else ""
    if not last.get("train"):
        n = len(last.get("metrics") or {})
        return f"final evaluation of round {r - 1}'s model: {n} sites{dice}"
    left = elapsed / r * max(0, rounds + 1 - r)  # the evaluation-only round closes the federation
    return (
        f"round {r}/{rounds}: {len(last.get('sites', []))} sites{dice}, "
        f"{elapsed / r:.1f} s/round, about {left / 60:.1f} min left"
    )


def watch_federation(
    coord: Any,
    state: Path,
    rounds: int,
    timeout: float,
    progress: Callable[[str], None] | None,
    *,
    sites: Sequence[Any] = (),
) -> int:
    """Wait for the coordinator to exit, saying each closed round as it happens. A site process
    that exits first ends the wait with its log's tail: the study needs every site, and the
    coordinator would otherwise wait out its deadlines for it (a site ends with 0 only when
    the coordinator announced the end)."""
    from neurofed.launch.local import read_events

    t0 = time.perf_counter()
    end = t0 + timeout
    said = 0

    def say_new() -> None:
        nonlocal said
        events = read_events(state)
        closed = sum(1 for e in events if e.get("event") == "round")
        for i in range(said, closed):
            progress(round_line(events, i, rounds, time.perf_counter() - t0))
        said = closed

    while coord.alive() and time.perf_counter() < end:
        time.sleep(1.0)
        if progress is not None:
            say_new()
        for site in sites:
            if not site.alive() and site.popen.returncode != 0:  # 0: the federation's end
                raise RuntimeError(
                    f"{site.name} exited with {site.popen.returncode} during the federation; "
                    f"see {site.log}\n{site.tail()}"
                )
    code = coord.wait(max(1.0, end - time.perf_counter()))
    if progress is not None:
        say_new()
    return code


def curve_series(results: dict[str, Any]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """The validation curves to draw per round, as (label, line style, points): FL and CDS, then
    each DP arm (a run of DP arms alone still gets its curves)."""
    curves = results.get("curves", {})
    out = [
        (arm.upper(), style, curves[arm]) for arm, style in (("fl", "o-"), ("cds", "s--")) if curves.get(arm)
    ]
    for arm in sorted(a for a in curves if "_dp_eps" in a and curves[a]):
        kind, eps = arm.split("_dp_eps")
        out.append((f"{kind.upper()}, DP-SGD, epsilon {eps}", "^-" if kind == "fl" else "v--", curves[arm]))
    return out


def plot_results(results: dict[str, Any], out: Path) -> list[Path]:
    """Dice per round (FL against CDS, and any DP arms) and a bar chart of the arms, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, style, curve in curve_series(results):
        ax.plot([p["round"] for p in curve], [p["dice"] for p in curve], style, label=label, markersize=3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (CDS: epochs / local epochs)")
    ax.set_ylabel("validation Dice (whole tumour)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.set_title("Federated vs centralized, per round")
    fig.tight_layout()
    p = out / "dice_per_round.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    arms = results["arms"]
    names = [n for n in ("cds", "fl", "ciil", "best_single_site", "threshold") if n in arms]
    names += sorted(n for n in arms if "_dp_eps" in n)
    means = [arms[n]["dice"]["mean"] for n in names]
    stds = [arms[n]["dice"]["std"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([n.replace("_", " ") for n in names], means, yerr=stds, capsize=4, color="#4477aa")
    for i, m in enumerate(means):
        ax.text(i, m + 0.02, f"{m:.3f}", ha="center", fontsize=9)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test Dice (mean +- sd over cases)")
    ax.set_title(f"Arms on {results['test_cases']} held-out cases from {len(results['sites'])} sites")
    fig.tight_layout()
    p = out / "arms.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def dp_arm(kind: str, target_epsilon: float) -> str:
    """The name of the DP arm of ``kind`` (fl, cds) at ``target_epsilon``: ``fl_dp_eps8``."""
    return f"{kind}_dp_eps{target_epsilon:g}"


def privacy_utility(results: Mapping[str, Any], within: float = 0.03) -> dict[str, Any]:
    """The privacy-utility table: test Dice of FL and CDS at each target epsilon (with what the
    accountant says each spent) and without DP (epsilon infinite, ``target_epsilon`` None), and
    the smallest target epsilon at which DP-FL comes within ``within`` Dice of FL without DP."""
    arms = results["arms"]
    prof = results["profile"]
    points: list[dict[str, Any]] = []
    for eps in [*sorted(prof["dp_target_epsilons"]), None]:
        point: dict[str, Any] = {"target_epsilon": eps, "label": "inf" if eps is None else f"{eps:g}"}
        for kind in ("fl", "cds"):
            arm = arms.get(kind if eps is None else dp_arm(kind, eps))
            if not arm:
                continue
            point[kind] = {"dice": arm["dice"]["mean"], "dice_sd": arm["dice"]["std"]}
            dp = arm.get("dp") or {}
            for k in ("epsilon", "noise_multiplier", "sample_rate", "steps"):
                if dp.get(k) is not None:
                    point[kind][k] = dp[k]
        points.append(point)
    out: dict[str, Any] = {
        "delta": prof["dp_delta"],
        "max_grad_norm": prof["dp_max_grad_norm"],
        "points": points,
        "within": within,
    }
    if "fl" in arms:
        base = arms["fl"]["dice"]["mean"]
        close = [
            pt["target_epsilon"]
            for pt in points
            if pt["target_epsilon"] is not None and "fl" in pt and pt["fl"]["dice"] >= base - within
        ]
        out["fl_smallest_epsilon_within"] = min(close) if close else None
    return out


def plot_privacy_utility(table: Mapping[str, Any], out: Path) -> Path:
    """Test Dice against epsilon (log axis; no DP drawn at the right as infinity), FL and CDS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [pt["target_epsilon"] for pt in table["points"] if pt["target_epsilon"] is not None]
    inf_x = 2 * max(finite) if finite else 1.0
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style in (("fl", "o-"), ("cds", "s--")):
        pts = [pt for pt in table["points"] if kind in pt]
        if not pts:
            continue
        dp = [pt for pt in pts if pt["target_epsilon"] is not None]
        label = {"fl": "FL, DP-SGD at every site", "cds": "CDS (pooled), DP-SGD"}[kind]
        line = ax.plot(
            [pt["target_epsilon"] for pt in dp], [pt[kind]["dice"] for pt in dp], style, label=label
        )
        color = line[0].get_color()
        for pt in pts:
            if pt["target_epsilon"] is None:  # no DP: a point apart, not on the curve
                ax.plot([inf_x], [pt[kind]["dice"]], style[0], color=color, mfc="none", ms=9)
    ax.set_xscale("log", base=2)
    ticks = [*finite, inf_x]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in finite] + ["inf\n(no DP)"])
    ax.minorticks_off()
    ax.set_xlabel(f"epsilon (delta {table['delta']:g}; clip {table['max_grad_norm']:g})")
    ax.set_ylabel("test Dice (whole tumour)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left")
    ax.set_title("Privacy against utility: sample-level DP-SGD, unit the patient")
    fig.tight_layout()
    p = out / "privacy_utility.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return p


def arm_jobs(a: Arms, arms: Sequence[str]) -> list[str]:
    """The non-federated arms to run, longest first (so two processes finish close together):
    CDS with DP-SGD at each target epsilon (a DP-SGD step costs 3-4 plain ones), CDS, CIIL, each
    single site by its training cases, then the threshold baseline."""
    with_dp = "cds" in arms or "cds_dp" in arms  # cds_dp: the DP arms without CDS itself
    jobs = [f"cds_dp:{e:g}" for e in a.profile.dp_target_epsilons] if with_dp else []
    jobs += ["cds"] if "cds" in arms else []
    if "ciil" in arms or a.profile.ciil:
        jobs.append("ciil")
    if "single" in arms:
        by_size = sorted(a.sites, key=lambda x: (-len(a.select("train", [x])), x))
        jobs += [f"single:{x}" for x in by_size]
    if "threshold" in arms:
        jobs.append("threshold")
    return jobs


def run_arm(a: Arms, job: str, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One non-federated arm (a name from :func:`arm_jobs`): its test result, and CDS's curve."""
    p = a.profile
    if job == "threshold":
        return {"result": a.threshold()}
    if job == "cds":
        res, curve, _ = a.train(None, p.epochs, curve_every=max(1, round(p.local_epochs)), progress=progress)
        return {"result": res, "curve": curve}
    if job == "ciil":
        return {"result": a.ciil(p.epochs)}
    if job.startswith("cds_dp:"):
        res, curve, dp = a.train_dp(None, float(job.split(":", 1)[1]), progress=progress)
        return {"result": res | {"dp": dp}, "curve": curve}
    if job.startswith("single:"):
        return {"result": a.train([job.split(":", 1)[1]], p.epochs)[0]}
    raise ValueError(f"unknown arm {job!r}")


def _run_timed(a: Arms, job: str, progress: Callable[[str], None] | None) -> dict[str, Any]:
    """:func:`run_arm` with its wall seconds, the same in this process and in a worker."""
    s = time.perf_counter()
    return run_arm(a, job, progress) | {"seconds": round(time.perf_counter() - s, 1)}


def default_workers() -> int:
    """One process per core, at most two: the arms are many small single-thread jobs."""
    import os

    return max(1, min(2, os.cpu_count() or 1))


_worker_arms: Arms | None = None


def _worker_init(data: str, profile: Profile, device: str, threads: int) -> None:
    import torch

    global _worker_arms
    # the kernel sends each worker SIGTERM when the experiment dies, however it dies (a pool's
    # own clean-up needs the parent alive to run): no worker trains on for nobody
    die_with_parent()
    torch.set_num_threads(threads)
    _worker_arms = Arms(Path(data), profile, device)


def _worker_run(task: tuple[str, bool]) -> tuple[str, dict[str, Any]]:
    job, verbose = task
    assert _worker_arms is not None
    say = (lambda m: print(f"[{job}] {m}", flush=True)) if verbose else None
    try:
        return job, _run_timed(_worker_arms, job, say)
    except Exception as exc:  # the traceback's objects may not travel: say what and where
        raise RuntimeError(f"arm {job} failed: {type(exc).__name__}: {exc}") from None


def run_arms(a: Arms, jobs: Sequence[str], progress: Callable[[str], None] = print) -> dict[str, dict]:
    """Run the non-federated arms, side by side in ``profile.workers`` processes (each with its
    share of the cores as torch threads), or one after another in this process.

    Every arm is seeded on its own, so the order and the sharing do not change what it learns
    beyond float rounding of the thread count. The first arm to fail stops the others."""
    workers = a.profile.workers or default_workers()
    workers = min(workers, len(jobs))
    done: dict[str, dict] = {}
    if workers <= 1:
        for job in jobs:
            progress(f"[{job}] start")
            done[job] = _run_timed(a, job, progress)
            progress(f"[{job}] done in {done[job]['seconds']} s")
        return done
    import multiprocessing
    import os

    threads = max(1, (os.cpu_count() or 1) // workers)
    progress(f"[arms] {', '.join(jobs)}: {workers} processes side by side, {threads} torch thread(s) each")
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    init = (str(a.data), a.profile, a.device, threads)
    with ctx.Pool(workers, initializer=_worker_init, initargs=init) as pool:  # exit: terminate
        verbose = progress is print
        for job, value in pool.imap_unordered(_worker_run, [(j, verbose) for j in jobs], chunksize=1):
            done[job] = value
            progress(f"[{job}] done in {value['seconds']} s ({len(done)}/{len(jobs)})")
    return done


def run_experiment(
    data: Path,
    out: Path,
    profile: Profile,
    *,
    arms: Sequence[str] = ("threshold", "cds", "single", "fl"),
    tracking_uri: str | None = None,
    device: str = "auto",
    progress: Callable[[str], None] = print,
    coordinator_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the arms, write results.json and the plots under ``out``, return the results.
    ``coordinator_args``: more ``neurofed coordinator`` options for the FL arm (e.g.
    ``--secure-aggregation``)."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    a = Arms(data, profile, device)
    results: dict[str, Any] = {
        "profile": asdict(profile),
        "data": str(data),
        "splits": str(a.split_file),
        "sites": a.sites,
        "test_cases": len(a.select("test")),
        "model_config": a.model_config.to_dict(),
        "budget": {
            "rounds": profile.rounds,
            "local_epochs": profile.local_epochs,
            "centralized_epochs": profile.epochs,
        },
        "fl_coordinator_args": list(coordinator_args),
        "arms": {},
        "curves": {},
        "seconds": {},
    }

    def timed(name: str, fn):
        s = time.perf_counter()
        progress(f"[{name}] start")
        value = fn()
        results["seconds"][name] = round(time.perf_counter() - s, 1)
        progress(f"[{name}] done in {results['seconds'][name]} s")
        return value

    jobs = arm_jobs(a, arms)
    s = time.perf_counter()
    done = run_arms(a, jobs, progress)
    if jobs:
        results["seconds"]["non_federated_arms"] = round(time.perf_counter() - s, 1)
    for job, value in done.items():
        results["seconds"][job] = value["seconds"]
    if "threshold" in done:
        results["arms"]["threshold"] = done["threshold"]["result"]
    if "cds" in done:
        results["arms"]["cds"] = done["cds"]["result"]
        results["curves"]["cds"] = done["cds"]["curve"]
    singles = {x: done[f"single:{x}"]["result"] for x in a.sites if f"single:{x}" in done}
    if singles:
        results["arms"]["single_site"] = {
            x: {k: v for k, v in r.items() if k != "per_case"} for x, r in singles.items()
        }
        best = max(singles, key=lambda x: singles[x]["dice"]["mean"])
        results["arms"]["best_single_site"] = singles[best] | {"site": best}
    if "ciil" in done:
        results["arms"]["ciil"] = done["ciil"]["result"]
    collect_dp_arms(results, done, profile)
    if "fl" in arms:
        fl = timed(
            "fl",
            lambda: run_federated_arm(
                data,
                out / "federation",
                profile,
                a.model_config,
                tracking_uri,
                coordinator_args=coordinator_args,
                progress=lambda m: progress(f"[fl] {m}"),
            ),
        )
        results["arms"]["fl"] = a.evaluate_state(fl["state"])
        results["curves"]["fl"] = fl.get("curve", [])
        results["federation"] = {k: v for k, v in fl.items() if k not in ("state", "curve", "privacy")}
    if "fl" in arms or "fl_dp" in arms:  # fl_dp: the DP arms without FL itself
        run_dp_federated_arms(results, a, data, out, tracking_uri, coordinator_args, timed, progress)
    arms_ = results["arms"]
    if "fl" in arms_ and "cds" in arms_:
        results["fl_over_cds"] = arms_["fl"]["dice"]["mean"] / arms_["cds"]["dice"]["mean"]
        results["fl_minus_cds"] = paired_difference(arms_["fl"], arms_["cds"])
    if profile.dp_target_epsilons:
        results["privacy_utility"] = privacy_utility(results)
    results["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    slim = json.loads(json.dumps(results, default=float))
    (out / "results.json").write_text(json.dumps(slim, indent=2, sort_keys=True, allow_nan=True) + "\n")
    results["plots"] = [str(p) for p in plot_results(results, out)]
    if profile.dp_target_epsilons:
        results["plots"].append(str(plot_privacy_utility(results["privacy_utility"], out)))
    if tracking_uri:
        log_to_mlflow(results, out, tracking_uri)
    return results


def collect_dp_arms(results: dict[str, Any], done: Mapping[str, Any], profile: Profile) -> None:
    """The CDS arms with DP-SGD from the workers' results into ``results``, by their arm names."""
    for eps in profile.dp_target_epsilons:
        job = done.get(f"cds_dp:{eps:g}")
        if job is not None:
            results["arms"][dp_arm("cds", eps)] = job["result"]
            results["curves"][dp_arm("cds", eps)] = job["curve"]


def run_dp_federated_arms(
    results: dict[str, Any],
    a: Arms,
    data: Path,
    out: Path,
    tracking_uri: str | None,
    coordinator_args: Sequence[str],
    timed: Callable[[str, Callable[[], Any]], Any],
    progress: Callable[[str], None],
) -> None:
    """One DP-FL arm per target epsilon, through the real stack like the FL arm (the coordinator
    sets DP-SGD in the task; each site solves its noise and keeps its ledger), scored on the
    shared test cases, with what the sites spent, into ``results``."""
    profile = a.profile
    fed = dp_federation_profile(profile)
    for eps in profile.dp_target_epsilons:
        name = dp_arm("fl", eps)
        say = lambda m, name=name: progress(f"[{name}] {m}")  # noqa: E731
        run = timed(
            name,
            lambda eps=eps, say=say: run_federated_arm(
                data,
                out / f"federation-dp-eps{eps:g}",
                fed,
                a.model_config,
                tracking_uri,
                coordinator_args=[*coordinator_args, *dp_coordinator_args(profile, eps)],
                progress=say,
                site_args=["--batch-size", str(profile.dp_batch_size)] if profile.dp_batch_size else [],
            ),
        )
        results["arms"][name] = a.evaluate_state(run["state"]) | {
            "dp": run["privacy"] | {"fl_strategy": fed.fl_strategy}
        }
        results["curves"][name] = run.get("curve", [])


def dp_federation_profile(profile: Profile) -> Profile:
    """The profile the DP-FL arms federate with: FedProx's proximal term has no DP analysis (the
    coordinator refuses it with DP-SGD), so a FedProx profile's DP arms use FedAvg, its mean."""
    if profile.fl_strategy == "fedprox":
        return replace(profile, fl_strategy="fedavg", fl_mu=None)
    return profile


def dp_coordinator_args(profile: Profile, target_epsilon: float) -> list[str]:
    """``neurofed coordinator``'s DP-SGD flags for one DP-FL arm."""
    return [
        "--dp-target-epsilon", repr(float(target_epsilon)),
        "--dp-delta", repr(float(profile.dp_delta)),
        "--dp-max-grad-norm", repr(float(profile.dp_max_grad_norm)),
    ]  # fmt: skip


def paired_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Dice of arm ``a`` minus arm ``b``, case by case over the test cases both scored.

    Both arms are scored on one test split, so pairing by case removes the spread between cases
    (most of each arm's standard deviation) and leaves what differs between the arms: the
    standard error says whether a gap of a few points is more than the test split's noise.
    ``ci95`` is mean +- 1.96 standard errors (a normal approximation)."""
    pa, pb = a.get("per_case", {}), b.get("per_case", {})
    common = sorted(set(pa) & set(pb))
    d = np.array([float(pa[k]["dice"]) - float(pb[k]["dice"]) for k in common], dtype=np.float64)
    d = d[np.isfinite(d)]
    n = int(d.size)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "se": float("nan"), "ci95": [float("nan")] * 2}
    mean = float(d.mean())
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "se": se, "ci95": [mean - 1.96 * se, mean + 1.96 * se]}


def log_to_mlflow(results: dict[str, Any], out: Path, tracking_uri: str) -> None:
    """One run per experiment: each arm's Dice/HD95, the ratio, results.json and the plots."""
    import mlflow

    client_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        mlflow.set_experiment("neurofed-experiment")
        with mlflow.start_run(run_name=f"study-{results['profile']['name']}"):
            mlflow.log_params({f"profile.{k}": v for k, v in results["profile"].items()})
            for arm, r in results["arms"].items():
                if isinstance(r, dict) and "dice" in r:
                    mlflow.log_metric(f"{arm}.dice_mean", r["dice"]["mean"])
                    mlflow.log_metric(f"{arm}.dice_std", r["dice"]["std"])
                    if math.isfinite(r["hd95"]["mean"]):
                        mlflow.log_metric(f"{arm}.hd95_mean", r["hd95"]["mean"])
                for k, v in ((r.get("dp") or {}) if isinstance(r, dict) else {}).items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                        mlflow.log_metric(f"{arm}.dp_{k}", float(v))
            pu = results.get("privacy_utility", {})
            if pu.get("fl_smallest_epsilon_within") is not None:
                mlflow.log_metric("dp.fl_smallest_epsilon_within", pu["fl_smallest_epsilon_within"])
            if "fl_over_cds" in results:
                mlflow.log_metric("fl_over_cds", results["fl_over_cds"])
            diff = results.get("fl_minus_cds", {})
            if diff.get("n", 0) > 1 and math.isfinite(diff["se"]):
                mlflow.log_metric("fl_minus_cds.dice_mean", diff["mean"])
                mlflow.log_metric("fl_minus_cds.dice_se", diff["se"])
            for arm, curve in results["curves"].items():
                for p in curve:
                    mlflow.log_metric(f"{arm}.val_dice", p["dice"], step=int(p["round"]))
            mlflow.log_artifact(str(out / "results.json"))
            for p in results.get("plots", []):
                mlflow.log_artifact(p)
    finally:
        mlflow.set_tracking_uri(client_uri)


def with_overrides(profile: Profile, **kw: Any) -> Profile:
    return replace(profile, **{k: v for k, v in kw.items() if v is not None})
