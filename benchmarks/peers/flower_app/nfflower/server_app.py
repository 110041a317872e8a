"""Flower ServerApp: FedAvg over every site, every round, from the benchmark's initial weights.

Uses Flower's own ``flwr.serverapp.strategy.FedAvg`` (weighted by ``num-examples``); the subclass
only stamps when each round starts and ends and keeps the round-1 global weights for the check
that Flower really averaged what the clients sent.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from nfflower.task import load_task, save_arrays

app = ServerApp()


class TimedFedAvg(FedAvg):
    def __init__(self, task: dict, **kw) -> None:
        super().__init__(**kw)
        self.task = task
        self.marks = Path(task["marks"])

    def _mark(self, what: str, rnd: int) -> None:
        with open(self.marks, "a") as fh:
            fh.write(json.dumps({"what": what, "round": rnd, "t": time.time()}) + "\n")

    def configure_train(self, server_round, arrays, config, grid):
        self._mark("start", server_round)
        config["server-round"] = server_round
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round, arrays, config, grid):
        config["server-round"] = server_round
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if server_round == 1 and arrays is not None:
            save_arrays(
                Path(self.task["check"]) / "global-r1.safetensors",
                {k: v.numpy() for k, v in arrays.to_torch_state_dict().items()},
            )
        return arrays, metrics

    def aggregate_evaluate(self, server_round, replies):
        out = super().aggregate_evaluate(server_round, replies)
        self._mark("end", server_round)
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    task = load_task(context.run_config)
    import torch
    from safetensors.numpy import load_file

    init = {k: torch.from_numpy(v) for k, v in load_file(task["init_weights"]).items()}
    n = int(task["sites"])
    strategy = TimedFedAvg(
        task,
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=n,
        min_evaluate_nodes=n,
        min_available_nodes=n,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(init),
        train_config=ConfigRecord({}),
        evaluate_config=ConfigRecord({}),
        num_rounds=int(task["rounds"]),
    )
    final = {k: v.numpy() for k, v in result.arrays.to_torch_state_dict().items()}
    save_arrays(Path(task["check"]) / "global-final.safetensors", final)
