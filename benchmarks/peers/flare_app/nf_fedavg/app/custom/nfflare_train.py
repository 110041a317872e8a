"""FLARE client script (Client API, run in-process by ``ClientAPIExecutor``): one site, training and
scoring with the kit's own ``neurofed.edge_node.training.LocalTrainer``.

Per round, as a neurofed site does: score the received global model on the site's validation
cases, train one local epoch from it, send the new weights back with the number of training
cases as ``NUM_STEPS_CURRENT_ROUND`` (FLARE's FedAvg weight). The trainer (and its case cache) is
built once per client: FLARE's simulator keeps each client's worker process for the whole run.

Trap (shared/notes.md): with ``params_exchange_format="pytorch"``, FLARE converts torch tensors to
numpy for the server and *leaves out* anything that is not a torch tensor ("vars excluded as they
were non-tensor type"), then reports success. So the weights go back as torch tensors, and
``benchmarks.peers.flare_run`` checks that the global model has every tensor the clients sent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task-file", required=True)
    args = ap.parse_args()
    task = json.loads(Path(args.task_file).read_text())
    if task["repo"] not in sys.path:
        sys.path.insert(0, task["repo"])  # the kit (edge_node, models) and benchmarks.peers.measure

    import nvflare.client as flare
    import torch
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from safetensors.numpy import save_file

    from benchmarks.peers.measure import record_interval
    from neurofed.edge_node.training import LocalTrainer, TrainConfig
    from neurofed.models.config import ModelConfig

    torch.set_num_threads(1)
    flare.init()
    site = flare.get_site_name()
    trainer = LocalTrainer(
        Path(task["data"]) / site,
        ModelConfig.from_dict(task["model_config"]),
        TrainConfig(),
        device="cpu",
    )
    first = None
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        rnd = int(received.current_round)
        first = rnd if first is None else first
        state = {k: torch.as_tensor(v) for k, v in received.params.items()}
        t0 = time.time()
        ev = trainer.evaluate(state, split="val")
        t1 = time.time()
        record_interval(task["timeline"], site, "evaluate", rnd, t0, t1)
        t0 = time.time()
        res = trainer.train(state, int(task["epochs"]))
        t1 = time.time()
        record_interval(task["timeline"], site, "train", rnd, t0, t1)
        if rnd == first:  # the averaging check: exactly what this client sends
            check = Path(task["check"])
            check.mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.detach().cpu().contiguous().numpy() for k, v in res.state_dict.items()},
                str(check / f"client-r1-{site}.safetensors"),
            )
            (check / f"client-r1-{site}.cases").write_text(str(res.num_cases))
        metrics = {"train_loss": float(res.loss)}
        if ev.num_cases and math.isfinite(float(ev.dice)):
            metrics["dice"] = float(ev.dice)
        flare.send(
            FLModel(
                params={k: v.detach().cpu() for k, v in res.state_dict.items()},  # torch, not numpy
                params_type=ParamsType.FULL,
                metrics=metrics,
                meta={"NUM_STEPS_CURRENT_ROUND": int(res.num_cases)},
            )
        )


if __name__ == "__main__":
    main()
