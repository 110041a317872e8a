"""Write a fresh, seeded UNet's weights for round 0, in a child process.

The coordinator itself never imports torch or MONAI (its memory stays near the model's size): it
runs ``python -m neurofed.coordinator.init_weights CONFIG_JSON OUT SEED`` once, on a fresh federation, and
reads the safetensors file back as numpy arrays.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from neurofed.coordinator.errors import CoordinatorError


def initial_weights(
    model_config: Mapping[str, Any], seed: int = 0, timeout: float = 300.0
) -> dict[str, np.ndarray]:
    """Build the UNet described by ``model_config`` (seeded) in a child process; return its weights."""
    from safetensors.numpy import load_file

    with tempfile.TemporaryDirectory(prefix="nf-init-") as tmp:
        out = Path(tmp) / "init.safetensors"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "neurofed.coordinator.init_weights",
                json.dumps(dict(model_config)),
                str(out),
                str(seed),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if proc.returncode != 0 or not out.is_file():
            raise CoordinatorError(f"could not build the initial UNet: {proc.stderr.strip()[-800:]}")
        return load_file(str(out))


def _main(argv: list[str]) -> int:
    import torch

    from neurofed.models.checkpoint import save_weights
    from neurofed.models.config import ModelConfig
    from neurofed.models.unet import build_unet

    torch.set_num_threads(1)
    cfg = ModelConfig.from_dict(json.loads(argv[0]))
    torch.manual_seed(int(argv[2]))
    model = build_unet(cfg)
    save_weights(argv[1], model.state_dict(), cfg)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
