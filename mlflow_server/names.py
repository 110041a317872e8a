"""Names the registry shares: the registered model's name, its aliases, its artifact files and
version tags (one place, so registration, retention and fetching agree)."""

from __future__ import annotations

import datetime as _dt

MODEL_SUFFIX = "-unet"
CHAMPION = "champion"
LATEST_ALIAS = "latest-round"  # "latest" is reserved by MLflow 3
ONNX_FILE = "model.onnx"
WEIGHTS_DIR = "weights"
WEIGHTS_FILE = "model.safetensors"

TAG_ROUND = "round"
TAG_FED_RUN = "federation_run_id"  # the MLflow parent run
TAG_RUN = "run"  # the federation run (one coordinator state): versions are unique by (run, round)
TAG_SPLITS = "splits_digest"  # the validation cases the Dice was measured on
TAG_SITES = "sites"
TAG_NUM_SITES = "num_sites"
TAG_CASES = "cases"
TAG_CONFIG = "config_digest"
TAG_WEIGHTS_SHA = "weights_sha256"
TAG_ONNX_SHA = "onnx_sha256"
TAG_VAL_DICE = "val_dice"
TAG_WAS_CHAMPION = "was_champion"
TAG_ARTIFACTS = "artifacts"


def model_name(federation: str) -> str:
    return f"{federation}{MODEL_SUFFIX}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
