"""Shared by the ServerApp and the ClientApp: the benchmark's task file and the kit on sys.path.

``benchmarks.peer_compare`` writes ``task.json`` (data folder, model config, initial weights, where
to record timelines and the round-1 check files) and passes its path as the run config key
``task-file``. The clients train with the kit's own ``neurofed.edge_node.training.LocalTrainer``, so Flower
runs exactly the training neurofed runs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def load_task(run_config: dict[str, Any]) -> dict[str, Any]:
    path = Path(str(run_config["task-file"]))
    task = json.loads(path.read_text())
    if task["repo"] not in sys.path:
        sys.path.insert(0, task["repo"])  # the kit (edge_node, models) and benchmarks.peers.measure
    import torch

    torch.set_num_threads(1)
    return task


def save_arrays(path: str | os.PathLike[str], arrays: dict) -> None:
    """numpy arrays to safetensors (no pickle), atomically."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v for k, v in arrays.items()}, str(tmp))
    os.replace(tmp, path)
