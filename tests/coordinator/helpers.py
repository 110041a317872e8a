"""Shared pieces for round-logic tests over the in-memory hub: a numpy trainer stand-in (the
round logic, not training, is under test here; real training runs in tests/test_federation*.py)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from neurofed.coordinator.rounds import Coordinator, RoundConfig
from neurofed.coordinator.state import StateStore
from neurofed.coordinator.strategies import make_strategy
from neurofed.edge_node.agent import SiteAgent
from neurofed.wire.api import COORDINATOR
from neurofed.wire.memory import MemoryHub

MODEL_CONFIG = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}


def initial_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.normal(size=(4, 3)).astype(np.float32),
        "b": np.zeros(4, dtype=np.float32),
        "n": np.array([0], dtype=np.int64),  # 1-d: wire.payload turns 0-d into 1-d (reported)
    }


@dataclass
class ShiftTrainer:
    """'Training' adds ``shift`` to every float tensor; evaluation reports a fixed Dice."""

    shift: float
    num_train_cases: int
    dice: float = 0.5
    val_cases: int = 2  # 0: a site whose split has no validation case (its Dice is NaN)
    trained: int = 0
    evaluated: int = 0

    def train(
        self,
        state_dict,
        epochs,
        *,
        prox_mu=0.0,
        progress=None,
        keep_optimizer=False,
        lr_scale=1.0,
        optimizer_state=None,
        export_optimizer=False,
        dp=None,
    ):
        self.trained += 1
        self.dp_steps = [*getattr(self, "dp_steps", []), dp]
        self.lr_scales = [*getattr(self, "lr_scales", []), lr_scale]
        self.last_mu = prox_mu
        self.last_keep_optimizer = keep_optimizer
        self.last_epochs = epochs
        self.optimizer_states_in = [*getattr(self, "optimizer_states_in", []), optimizer_state]
        out = {k: (v + self.shift if v.is_floating_point() else v.clone()) for k, v in state_dict.items()}
        opt = None
        if export_optimizer:  # 'Adam state': moments of the shift, step = 10 more than given
            import torch

            from neurofed.wire.payload import OPTIMIZER_STEP, optimizer_names

            step = float(optimizer_state[OPTIMIZER_STEP][0]) if optimizer_state else 0.0
            opt = {
                n: torch.tensor([step + 10.0])
                if n == OPTIMIZER_STEP
                else torch.full_like(state_dict[n.split("/", 2)[2]], self.shift)
                for n in optimizer_names(state_dict)
            }
        return SimpleNamespace(
            state_dict=out, num_cases=self.num_train_cases, loss=0.1, seconds=0.0, optimizer_state=opt
        )

    def evaluate(self, state_dict, split="val"):
        self.evaluated += 1
        dice = self.dice if self.val_cases else float("nan")
        return SimpleNamespace(dice=dice, hd95=3.0, num_cases=self.val_cases, per_case={}, seconds=0.0)


def make_coordinator(
    hub: MemoryHub,
    state: Path,
    sites,
    *,
    rounds=2,
    min_sites=None,
    timeout=10.0,
    strategy="fedavg",
    registrar=None,
    **kw,
) -> Coordinator:
    ep = hub.endpoint(COORDINATOR)
    ep.start()
    cfg = RoundConfig(
        rounds=rounds,
        expected_sites=tuple(sites),
        min_sites=min_sites or len(sites),
        round_timeout=timeout,
        receipt_interval=kw.pop("receipt_interval", 0.5),
        **kw,
    )
    return Coordinator(
        ep,
        make_strategy(strategy),
        StateStore(state),
        cfg,
        model_config=MODEL_CONFIG,
        initial_weights=initial_weights,
        registrar=registrar,
    )


def start_agent(
    hub: MemoryHub, site: str, trainer, state: Path, stop: threading.Event, **kw
) -> tuple[SiteAgent, threading.Thread]:
    ep = hub.endpoint(site)
    ep.start()
    agent = SiteAgent(ep, trainer, state / site, **kw)
    t = threading.Thread(target=agent.run, kwargs={"stop": stop}, daemon=True, name=site)
    t.start()
    return agent, t


def run_in_thread(coord: Coordinator) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target():
        try:
            box["results"] = coord.run()
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True, name="coordinator")
    t.start()
    return t, box


def finish(t: threading.Thread, box: dict, stop: threading.Event, timeout: float = 60):
    """Wait for the coordinator thread, stop the agents, surface its error or return its results."""
    t.join(timeout)
    stop.set()
    assert not t.is_alive(), "coordinator did not finish in time"
    if "error" in box:
        raise box["error"]
    return box["results"]
