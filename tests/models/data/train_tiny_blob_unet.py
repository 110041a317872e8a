"""Regenerate ``tiny_blob_unet.safetensors``: the tiny UNet (channels 4, 8, 16) trained to segment
the bright blob of ``conftest.blob_scan`` volumes, so tests have a model whose masks mean
something without training one on every run (training takes minutes on a shared CPU).

    .venv/bin/python tests/models/data/train_tiny_blob_unet.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "tiny_blob_unet.safetensors"


def batch(rng: np.random.Generator, n: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    sys.path.insert(0, str(HERE.parent))
    from conftest import blob_scan

    xs, ys = [], []
    for _ in range(n):
        mid = (size - 1) / 2
        brain = rng.uniform(10, 16)
        centre = mid + rng.uniform(-0.5, 0.5, size=3) * brain
        img, truth = blob_scan(
            (size,) * 3,
            np.eye(4),
            centre=centre,
            radius=rng.uniform(2.5, 7.0),
            brain_radius=brain,
            seed=int(rng.integers(1 << 30)),
        )
        img = img * rng.uniform(0.5, 2.0)
        inside = img > 0
        z = np.where(inside, (img - img[inside].mean()) / (img[inside].std() + 1e-8), 0.0)
        xs.append(z[None])
        ys.append((truth & inside)[None])
    return torch.tensor(np.stack(xs), dtype=torch.float32), torch.tensor(np.stack(ys), dtype=torch.float32)


def main(steps: int = 300) -> None:
    from neurofed.models.checkpoint import save_weights
    from neurofed.models.config import ModelConfig
    from neurofed.models.unet import build_unet

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = ModelConfig.tiny(patch_size=(32, 32, 32))
    model = build_unet(config)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for step in range(steps):
        x, y = batch(rng, 2)
        opt.zero_grad()
        out = model(x)
        p = torch.sigmoid(out)
        dice = (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out, y) + 1 - dice
        loss.backward()
        opt.step()
        if step % 25 == 24:
            print(step + 1, round(loss.item(), 4), flush=True)
    model.eval()
    x, y = batch(np.random.default_rng(1), 8)
    with torch.no_grad():
        m = (model(x) > 0).float()
    print("held-out Dice", float(2 * (m * y).sum() / (m.sum() + y.sum())))
    save_weights(OUT, model.state_dict(), config)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
