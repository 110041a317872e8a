"""Flower ClientApp under SecAgg+: one site, the kit's LocalTrainer, Flower's ``secaggplus_mod``.

``secaggplus_mod`` wraps the client's ``fit``: it takes part in the key, share, masked-input and
unmask stages and sends the masked, quantized ``num_examples``-weighted parameters instead of the
plain ones. Training and scoring are the same as ``flower_app``'s.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod

from nfflowersa.task import init_arrays, load_task, save_arrays

_TRAINER: dict = {}


class SiteClient(NumPyClient):
    def __init__(self, context: Context) -> None:
        self.task = load_task(context.run_config)
        self.site = str(context.node_config["site"])
        self.keys = list(init_arrays(self.task))
        key = (self.task["data"], self.site)
        if key not in _TRAINER:
            from neurofed.edge_node.training import LocalTrainer, TrainConfig
            from neurofed.models.config import ModelConfig

            _TRAINER[key] = LocalTrainer(
                Path(self.task["data"]) / self.site,
                ModelConfig.from_dict(self.task["model_config"]),
                TrainConfig(),
                device="cpu",
            )
        self.trainer = _TRAINER[key]

    def _state(self, parameters):
        import torch

        return {k: torch.from_numpy(v.copy()) for k, v in zip(self.keys, parameters, strict=True)}

    def fit(self, parameters, config):
        from benchmarks.peers.measure import record_interval

        rnd = int(config["server-round"])
        t0 = time.time()
        res = self.trainer.train(self._state(parameters), int(self.task["epochs"]))
        t1 = time.time()
        record_interval(self.task["timeline"], self.site, "train", rnd, t0, t1)
        out = {k: res.state_dict[k].detach().cpu().numpy() for k in self.keys}
        if rnd == 1:  # the averaging check: what this client sent (before SecAgg+ quantized it)
            save_arrays(Path(self.task["check"]) / f"client-r1-{self.site}.safetensors", out)
            Path(self.task["check"], f"client-r1-{self.site}.cases").write_text(str(res.num_cases))
        return [out[k] for k in self.keys], int(res.num_cases), {"train_loss": float(res.loss)}

    def evaluate(self, parameters, config):
        from benchmarks.peers.measure import record_interval

        rnd = int(config["server-round"])
        t0 = time.time()
        ev = self.trainer.evaluate(self._state(parameters), split="val")
        t1 = time.time()
        record_interval(self.task["timeline"], self.site, "evaluate", rnd, t0, t1)
        return 1.0 - float(ev.dice), max(1, int(ev.num_cases)), {"dice": float(ev.dice)}


def client_fn(context: Context):
    return SiteClient(context).to_client()


app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
