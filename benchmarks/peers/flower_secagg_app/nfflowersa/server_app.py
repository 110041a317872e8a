"""Flower ServerApp under SecAgg+: FedAvg over every site, every round, through Flower's own
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` on a ``LegacyContext`` (the way Flower's
secure-aggregation example runs it).

The strategy subclass only stamps when each round starts and ends and keeps the round-1 global
weights for the check that the unmasked aggregate is the case-weighted mean the clients sent
(within SecAgg+'s quantization bound).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import Context
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from nfflowersa.task import init_arrays, load_task, save_arrays

app = ServerApp()


class TimedFedAvg(FedAvg):
    def __init__(self, task: dict, keys: list[str], **kw) -> None:
        super().__init__(**kw)
        self.task = task
        self.keys = keys
        self.marks = Path(task["marks"])

    def _mark(self, what: str, rnd: int) -> None:
        with open(self.marks, "a") as fh:
            fh.write(json.dumps({"what": what, "round": rnd, "t": time.time()}) + "\n")

    def _save(self, name: str, parameters) -> None:
        arrays = dict(zip(self.keys, parameters_to_ndarrays(parameters), strict=True))
        save_arrays(Path(self.task["check"]) / name, {k: v.astype("float32") for k, v in arrays.items()})

    def configure_fit(self, server_round, parameters, client_manager):
        self._mark("start", server_round)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if server_round == 1 and parameters is not None:
            self._save("global-r1.safetensors", parameters)
        if parameters is not None:
            self.latest = parameters
        return parameters, metrics

    def aggregate_evaluate(self, server_round, results, failures):
        out = super().aggregate_evaluate(server_round, results, failures)
        self._mark("end", server_round)
        if server_round == int(self.task["rounds"]) and getattr(self, "latest", None) is not None:
            self._save("global-final.safetensors", self.latest)
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    task = load_task(context.run_config)
    init = init_arrays(task)
    keys = list(init)
    n = int(task["sites"])
    strategy = TimedFedAvg(
        task,
        keys,
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=n,
        min_evaluate_clients=n,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters([init[k] for k in keys]),
        on_fit_config_fn=lambda r: {"server-round": r},
        on_evaluate_config_fn=lambda r: {"server-round": r},
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=int(task["rounds"])), strategy=strategy
    )
    cfg = context.run_config
    secagg = SecAggPlusWorkflow(
        num_shares=int(cfg["num-shares"]),
        reconstruction_threshold=int(cfg["reconstruction-threshold"]),
        max_weight=float(cfg["max-weight"]),
    )
    DefaultWorkflow(fit_workflow=secagg)(grid, legacy)
