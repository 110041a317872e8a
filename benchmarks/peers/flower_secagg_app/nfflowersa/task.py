"""The benchmark's task file, the kit on sys.path and the parameter order both apps agree on.

The same task file as ``flower_app`` (written by ``benchmarks.peers.harness.write_task``). Flower's
SecAgg+ runs on its legacy ``NumPyClient``/``Strategy`` API, which sends a list of arrays: both
sides order them as the initial weights file does.
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
    task = json.loads(Path(str(run_config["task-file"])).read_text())
    if task["repo"] not in sys.path:
        sys.path.insert(0, task["repo"])
    import torch

    torch.set_num_threads(1)
    return task


def init_arrays(task: dict[str, Any]) -> dict:
    """The initial weights, in file order (the order of every list of arrays on the wire)."""
    from safetensors.numpy import load_file

    return load_file(task["init_weights"])


def save_arrays(path: str | os.PathLike[str], arrays: dict) -> None:
    """numpy arrays to safetensors (no pickle), atomically."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(dict(arrays), str(tmp))
    os.replace(tmp, path)
