"""FLARE server workflow: FLARE's own FedAvg (``nvflare.app_common.workflows.fedavg.FedAvg``,
weighted by each result's ``NUM_STEPS_CURRENT_ROUND``, which the clients set to their case count).

The subclass changes no arithmetic. It only
* loads the benchmark's initial weights (the safetensors file every framework starts from);
* stamps when each round's model goes out and when the round's new global model is stored
  (``task["marks"]``), the round bounds that ``benchmarks.peers.measure`` uses for everyone;
* keeps the round-1 and final global weights, and the weight each round-1 result arrived with
  (``task["check"]``), for the check that FLARE really averaged what its clients sent.

Runs inside the FLARE environment (``.cache/flare-venv``); the task file comes from
``benchmarks.peers.flare_run``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.fedavg import FedAvg


class NeurofedFedAvg(FedAvg):
    def __init__(self, *, task_file: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.task = json.loads(Path(task_file).read_text())
        self.marks = Path(self.task["marks"])
        self.check = Path(self.task["check"])

    def _mark(self, what: str, rnd: int) -> None:
        with open(self.marks, "a") as fh:
            fh.write(json.dumps({"what": what, "round": int(rnd), "t": time.time()}) + "\n")

    def load_model(self) -> FLModel:
        from safetensors.numpy import load_file

        params = load_file(self.task["init_weights"])
        self.info(f"initial weights: {len(params)} tensors from {self.task['init_weights']}")
        return FLModel(params=params, params_type=ParamsType.FULL)

    def send_model(self, *args, **kwargs) -> None:
        if kwargs.get("task_name", "train") == self.task_name:
            self._mark("start", self.current_round)
            aggregate = kwargs.get("callback")
            if aggregate is not None and self.current_round == self.start_round:
                kwargs["callback"] = self._logging(aggregate)
        super().send_model(*args, **kwargs)

    def _logging(self, aggregate):
        """Round 1: note the FedAvg weight each result arrived with (``NUM_STEPS_CURRENT_ROUND``),
        then hand the result to FedAvg's own aggregation unchanged."""

        def callback(result: FLModel):
            meta = result.meta or {}
            with open(self.check / "server-weights-r1.jsonl", "a") as fh:
                rec = {
                    "client": meta.get("client_name"),
                    "weight": meta.get(FLMetaKey.NUM_STEPS_CURRENT_ROUND),
                }
                fh.write(json.dumps(rec) + "\n")
            return aggregate(result)

        return callback

    def save_model(self, model: FLModel) -> None:
        rnd = int(self.current_round)
        if rnd == int(self.start_round):
            _save(self.check / "global-r1.safetensors", model.params)
        if rnd == int(self.start_round) + int(self.num_rounds) - 1:
            _save(self.check / "global-final.safetensors", model.params)
        self._mark("end", rnd)


def _save(path: Path, params: dict) -> None:
    """The global weights as FLARE holds them (numpy on the server), to safetensors, atomically."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    arrays = {}
    for k, v in params.items():
        if hasattr(v, "detach"):  # a torch tensor, had the server been told to expect PyTorch
            v = v.detach().cpu().numpy()
        arrays[k] = np.ascontiguousarray(v)
    save_file(arrays, str(tmp))
    os.replace(tmp, path)
