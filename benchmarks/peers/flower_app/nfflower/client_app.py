"""Flower ClientApp: one site, training and scoring with the kit's LocalTrainer.

Flower's deployment starts a fresh ClientApp process for each message, so the trainer (and its
case cache) is rebuilt every time; that cost is Flower's, and falls outside the timed intervals
exactly as neurofed's trainer construction does.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from nfflower.task import load_task, save_arrays

app = ClientApp()
_TRAINER: dict = {}


def _trainer(context: Context):
    task = load_task(context.run_config)
    site = str(context.node_config["site"])
    key = (task["data"], site)
    if key not in _TRAINER:
        from neurofed.edge_node.training import LocalTrainer, TrainConfig
        from neurofed.models.config import ModelConfig

        _TRAINER[key] = LocalTrainer(
            Path(task["data"]) / site,
            ModelConfig.from_dict(task["model_config"]),
            TrainConfig(),
            device="cpu",
        )
    return task, site, _TRAINER[key]


@app.train()
def train(msg: Message, context: Context) -> Message:
    from benchmarks.peers.measure import record_interval

    task, site, trainer = _trainer(context)
    rnd = int(msg.content["config"]["server-round"])
    state = msg.content["arrays"].to_torch_state_dict()
    t0 = time.time()
    res = trainer.train(state, int(task["epochs"]))
    t1 = time.time()
    record_interval(task["timeline"], site, "train", rnd, t0, t1)
    if rnd == 1:  # the averaging check: what this client sent
        save_arrays(
            Path(task["check"]) / f"client-r1-{site}.safetensors",
            {k: v.numpy() for k, v in res.state_dict.items()},
        )
        Path(task["check"], f"client-r1-{site}.cases").write_text(str(res.num_cases))
    metrics = MetricRecord({"train_loss": float(res.loss), "num-examples": int(res.num_cases)})
    return Message(RecordDict({"arrays": ArrayRecord(res.state_dict), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from benchmarks.peers.measure import record_interval

    task, site, trainer = _trainer(context)
    rnd = int(msg.content["config"]["server-round"])
    state = msg.content["arrays"].to_torch_state_dict()
    t0 = time.time()
    ev = trainer.evaluate(state, split="val")
    t1 = time.time()
    record_interval(task["timeline"], site, "evaluate", rnd, t0, t1)
    metrics = MetricRecord({"dice": float(ev.dice), "num-examples": max(1, int(ev.num_cases))})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
