"""Registering into a database store used directly (no server), as the demo falls back to when
its embedded server cannot start and as a coordinator given ``--mlflow sqlite:///...`` does.

MLflow 3's SQL registry store resolves a ``models:/<id>`` source through the process-global
tracking URI; here that URI points somewhere else on purpose, so the registration only succeeds if
neurofed points MLflow at the tracker's own store for the call (and puts the global back)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import mlflow
import torch

from neurofed.mlflow_server.registry import CHAMPION, fetch_model
from neurofed.mlflow_server.tracking import FederationTracker
from neurofed.models.checkpoint import file_sha256, save_weights
from neurofed.models.config import ModelConfig
from neurofed.models.unet import build_unet


def test_register_evaluate_and_fetch_with_a_direct_sqlite_store(tmp_path: Path, monkeypatch) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    other = f"sqlite:///{elsewhere / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(other)
    try:
        store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
        (tmp_path / "store").mkdir()
        cfg = ModelConfig.tiny()
        torch.manual_seed(0)
        weights = save_weights(tmp_path / "r1.safetensors", build_unet(cfg).state_dict(), cfg)
        name = f"direct-{uuid.uuid4().hex[:6]}"
        tracker = FederationTracker(store, name, {"rounds": 1})
        version = tracker.register_round(1, weights, cfg, sites={"site-a": 3}, cases={"site-a": 3})
        evaluation = tracker.record_evaluation(1, 0.4, {"site-a": 0.4})
        assert evaluation.promoted, evaluation
        got = fetch_model(f"models:/{name}-unet@{CHAMPION}", tmp_path / "dl", tracking_uri=store)
        assert got.version == version and got.onnx_path.stat().st_size > 10_000
        assert file_sha256(got.weights_path) == file_sha256(weights)
        # the global URI and the environment are what they were; nothing went to ./mlflow.db
        assert mlflow.get_tracking_uri() == other and os.environ["MLFLOW_TRACKING_URI"] == other
        assert not (elsewhere / "mlflow.db").exists()
        tracker.close()
    finally:
        mlflow.set_tracking_uri(before)
