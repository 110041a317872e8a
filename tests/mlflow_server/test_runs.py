"""Two federation runs (two coordinator states) of one federation on one registry: every version
says its run and round, registration is idempotent by (run, round), each run resumes only its own
parent run, and ``champion`` moves to another run's version only for a higher Dice measured on the
same validation cases."""

from __future__ import annotations

import uuid

import pytest
import torch

from neurofed.mlflow_server import registry
from neurofed.mlflow_server.names import CHAMPION, TAG_ROUND, TAG_RUN, TAG_SPLITS
from neurofed.mlflow_server.tracking import FederationTracker
from neurofed.models.checkpoint import save_weights
from neurofed.models.config import ModelConfig
from neurofed.models.unet import build_unet
from neurofed.wire.envelope import new_run_id

pytestmark = pytest.mark.slow  # a real MLflow server

SPLITS_A, SPLITS_B = "a" * 64, "b" * 64


def test_runs_are_kept_apart_in_the_registry_and_champion_compares_like_with_like(mlflow_server, tmp_path):
    cfg = ModelConfig.tiny()
    torch.manual_seed(0)
    weights = save_weights(tmp_path / "w.safetensors", build_unet(cfg).state_dict(), cfg)
    fed = f"runs-{uuid.uuid4().hex[:6]}"
    run1, run2, run3 = new_run_id(1_000), new_run_id(2_000), new_run_id(3_000)

    t1 = FederationTracker(mlflow_server, fed, {"rounds": 1}, fed_run=run1)
    v1 = t1.register_round(1, weights, cfg, sites=["s"], cases=3)
    assert t1.register_round(1, weights, cfg, sites=["s"], cases=3) == v1  # idempotent by (run, round)
    assert t1.record_evaluation(1, 0.60, {"s": 0.60}, splits_digest=SPLITS_A).promoted

    # a second run of the same federation, its parent run never closed: a new parent run
    t2 = FederationTracker(mlflow_server, fed, {"rounds": 1}, fed_run=run2)
    assert t2.run_id != t1.run_id and not t2.resumed
    v2 = t2.register_round(1, weights, cfg, sites=["s"], cases=3)
    assert v2 != v1  # its round 1 is its own version, not the first run's
    client = t2.client
    mv2 = client.get_model_version(registry.model_name(fed), v2)
    assert mv2.tags[TAG_RUN] == run2 and mv2.tags[TAG_ROUND] == "1"
    # a higher Dice on other validation cases does not compare: champion stays on run 1
    ev = t2.record_evaluation(1, 0.90, {"s": 0.90}, splits_digest=SPLITS_B)
    assert not ev.promoted
    assert client.get_model_version_by_alias(registry.model_name(fed), CHAMPION).version == v1
    assert client.get_model_version(registry.model_name(fed), v2).tags[TAG_SPLITS] == SPLITS_B

    # a third run scored on the same cases as the champion: a higher Dice moves it, a lower does not
    t3 = FederationTracker(mlflow_server, fed, {"rounds": 2}, fed_run=run3)
    v3a = t3.register_round(1, weights, cfg, sites=["s"], cases=3)
    assert not t3.record_evaluation(1, 0.55, {"s": 0.55}, splits_digest=SPLITS_A).promoted
    v3b = t3.register_round(2, weights, cfg, sites=["s"], cases=3)
    assert t3.record_evaluation(2, 0.70, {"s": 0.70}, splits_digest=SPLITS_A).promoted
    assert client.get_model_version_by_alias(registry.model_name(fed), CHAMPION).version == v3b
    assert v3a not in (v1, v2)

    # the first run's coordinator, restarted with its state, resumes its own parent run
    again = FederationTracker(mlflow_server, fed, {"rounds": 1}, fed_run=run1)
    assert again.resumed and again.run_id == t1.run_id
    assert again.register_round(1, weights, cfg, sites=["s"], cases=3) == v1
