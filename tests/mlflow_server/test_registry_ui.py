"""The registry as the ML lead sees it: the champion's version page in headless Chromium shows the
``champion`` alias, the ``round`` tag and the description. MLflow's UI is a JS app, so the DOM is
dumped after a virtual-time budget. A screenshot is kept in test-artifacts/ (gitignored)."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from neurofed.mlflow_server.tracking import FederationTracker
from neurofed.models.checkpoint import save_weights
from neurofed.models.config import ModelConfig
from neurofed.models.unet import build_unet

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _chromium(binary: str, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--virtual-time-budget=15000", "--window-size=1400,1100", *extra, url],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def test_champion_page_shows_alias_and_round_tag(chromium: str, mlflow_server: str, tmp_path: Path) -> None:
    cfg = ModelConfig.tiny()
    name = f"ui-{uuid.uuid4().hex[:6]}"
    tr = FederationTracker(mlflow_server, name, {"rounds": 2})
    for r, dice in ((1, 0.61), (2, 0.74)):
        torch.manual_seed(r)
        w = save_weights(tmp_path / f"{r}.safetensors", build_unet(cfg).state_dict(), cfg)
        tr.register_round(r, w, cfg, sites={"site-a": 3, "site-b": 2}, cases={"site-a": 3, "site-b": 2})
        tr.record_evaluation(r, dice, {"site-a": dice + 0.01, "site-b": dice - 0.02})
    url = f"{mlflow_server}/#/models/{name}-unet/versions/2"
    dom = _chromium(chromium, url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert f"{name}-unet" in html, "the registry page did not render (JS app not loaded?)"
    assert "champion" in html, "alias champion not shown on the champion's version page"
    assert 'data-row-key="round"' in html, "round tag not shown in the version's tag table"
    assert "Round 2" in html and "Promoted to" in html, "description not rendered"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "mlflow_registry_champion.png"
    shot.unlink(missing_ok=True)
    res = _chromium(chromium, url, f"--screenshot={shot}")
    assert res.returncode == 0 and shot.is_file() and shot.stat().st_size > 10_000, res.stderr[-2000:]
