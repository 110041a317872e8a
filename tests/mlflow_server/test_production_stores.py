"""The production configuration: PostgreSQL backend store and S3-compatible artifact store (moto's
server mode), started through the same ``MlflowServer`` flags and environment a deployment uses."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from neurofed.mlflow_server.registry import CHAMPION, fetch_model
from neurofed.mlflow_server.server import MlflowServer
from neurofed.mlflow_server.tracking import FederationTracker
from neurofed.models.checkpoint import save_weights
from neurofed.models.config import ModelConfig
from neurofed.models.unet import build_unet
from tests.fixtures.mlflow import free_port

pytestmark = pytest.mark.slow


def test_postgres_backend_and_s3_artifacts(postgres_database: str, s3_store, tmp_path: Path) -> None:
    import psycopg2

    srv = MlflowServer(
        port=free_port(),
        state_dir=tmp_path / "state",
        backend_store_uri=postgres_database,  # plain postgresql://, as an operator writes it
        artifacts_destination=f"s3://{s3_store.bucket}",
        env=s3_store.env,
        startup_timeout=180,
    )
    assert srv.backend_store_uri.startswith("postgresql+psycopg2://")
    cfg = ModelConfig.tiny()
    torch.manual_seed(0)
    weights = save_weights(tmp_path / "w.safetensors", build_unet(cfg).state_dict(), cfg)
    name = f"prod-{uuid.uuid4().hex[:6]}"
    with srv:
        tr = FederationTracker(srv.url, name, {"rounds": 1})
        tr.log_round(1, {"dice/site-a": 0.4, "dice_mean": 0.4, "sites": 1})
        version = tr.register_round(1, weights, cfg, sites=["site-a"], cases=5)
        tr.record_evaluation(1, 0.4, {"site-a": 0.4})
        got = fetch_model(f"models:/{name}-unet@{CHAMPION}", tmp_path / "dl", tracking_uri=srv.url)
        assert got.version == version and got.weights_path is not None
        assert not (tmp_path / "state" / "artifacts").exists(), "artifacts must not land on the server's disk"
    keys = [o["Key"] for o in s3_store.client().list_objects_v2(Bucket=s3_store.bucket).get("Contents", [])]
    assert any(k.endswith("/model.onnx") for k in keys), keys
    assert any(k.endswith("weights/model.safetensors") for k in keys), keys
    assert any(k.endswith("plots/dice_per_round.png") for k in keys), keys
    dbname = postgres_database.rsplit("/", 1)[1]
    with psycopg2.connect(host="127.0.0.1", user="postgres", dbname=dbname, connect_timeout=3) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT name FROM registered_models")
            assert (f"{name}-unet",) in cur.fetchall()
            cur.execute(
                "SELECT key, value FROM model_version_tags WHERE name = %s AND key = 'round'",
                (f"{name}-unet",),
            )
            assert cur.fetchall() == [("round", "1")]
