"""A short federation told to a real MLflow server: 3 rounds of real tiny-UNet weights, then the
registry, aliases, metrics, artifacts and the models a clinic would pull.

Validated Dice per round: 0.50, 0.70, 0.60, so ``champion`` must move to round 1, then round 2,
and stay on round 2; ``latest-round`` ends on round 3.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from neurofed.mlflow_server import registry
from neurofed.mlflow_server.errors import ModelFetchError, ModelIntegrityError, RegistryError
from neurofed.mlflow_server.registry import CHAMPION, LATEST_ALIAS, fetch_model
from neurofed.mlflow_server.tracking import FederationTracker, case_weighted_dice
from neurofed.models.checkpoint import file_sha256, save_weights
from neurofed.models.config import ModelConfig
from neurofed.models.unet import build_unet

pytestmark = pytest.mark.slow  # every test here talks to a real server

DICE = {1: 0.50, 2: 0.70, 3: 0.60}
SITE_CASES = {"site-a": 6, "site-b": 2}


def per_site(r: int) -> dict[str, float]:
    return {"site-a": DICE[r] + 0.05, "site-b": DICE[r] - 0.15}


def round_weights(tmp: Path, cfg: ModelConfig, r: int) -> Path:
    torch.manual_seed(100 + r)
    return save_weights(tmp / f"round-{r}.safetensors", build_unet(cfg).state_dict(), cfg)


def synthetic_scan(side: int = 32) -> np.ndarray:
    """A bright sphere in noise, (1, 1, side^3), z-scored like the training preprocessing."""
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:side, :side, :side]
    vol = ((x - 12) ** 2 + (y - 18) ** 2 + (z - 16) ** 2 < 36).astype(np.float32) * 3 + rng.normal(
        0, 0.5, (side,) * 3
    )
    vol = (vol - vol.mean()) / vol.std()
    return vol[None, None].astype(np.float32)


def stored_path(server, client, name: str, version: str) -> Path:
    """Where the server keeps a version's artifacts on its disk (proxied local store)."""
    uri = client.get_model_version_download_uri(name, version)
    assert uri.startswith("mlflow-artifacts:/"), uri
    return server.state_dir / "artifacts" / uri[len("mlflow-artifacts:/") :].lstrip("/")


class Fed:
    def __init__(
        self, uri: str, name: str, tracker: FederationTracker, cfg: ModelConfig, weights: dict[int, Path]
    ):
        self.uri, self.name, self.tracker, self.cfg, self.weights = uri, name, tracker, cfg, weights
        self.model = registry.model_name(name)
        self.versions: dict[int, str] = {}


@pytest.fixture(scope="module")
def fed(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Fed:
    tmp = tmp_path_factory.mktemp("fed")
    cfg = ModelConfig.tiny()
    name = f"fed-{uuid.uuid4().hex[:6]}"
    params = {
        "rounds": 3,
        "local_epochs": 1,
        "strategy": {"name": "fedavg", "min_sites": 2},
        "model": cfg.to_dict(),
    }
    tracker = FederationTracker(mlflow_server, name, params)
    f = Fed(mlflow_server, name, tracker, cfg, {r: round_weights(tmp, cfg, r) for r in DICE})
    for r in DICE:
        # Round r: sites report the Dice of the round r-1 model (logged as round r), then aggregate.
        metrics = {f"dice/{s}": d for s, d in per_site(r).items()}
        metrics.update(sites=2, bytes_received=1234.0 * r, round_seconds=2.5)
        tracker.log_round(r, metrics, site_cases=SITE_CASES, round_config={"lr": 1e-3, "deadline_s": 60})
        f.versions[r] = tracker.register_round(r, f.weights[r], cfg, sites=SITE_CASES, cases=SITE_CASES)
        tracker.record_evaluation(r, DICE[r], per_site(r))
    return f


def test_one_version_per_round_with_its_tags(fed: Fed) -> None:
    versions = fed.tracker.client.search_model_versions(f"name = '{fed.model}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]
    for v in versions:
        r = int(v.tags["round"])
        assert fed.versions[r] == v.version
        assert v.tags["sites"] == "site-a,site-b" and v.tags["num_sites"] == "2" and v.tags["cases"] == "8"
        assert v.tags["config_digest"] == fed.cfg.digest()
        assert v.tags["weights_sha256"] == file_sha256(fed.weights[r])
        assert len(v.tags["onnx_sha256"]) == 64
        assert float(v.tags["val_dice"]) == pytest.approx(DICE[r])
        assert float(v.tags["val_dice/site-b"]) == pytest.approx(per_site(r)["site-b"])
        assert v.run_id == fed.tracker.run_id


def test_latest_and_champion_aliases(fed: Fed) -> None:
    client = fed.tracker.client
    assert client.get_model_version_by_alias(fed.model, LATEST_ALIAS).tags["round"] == "3"
    champ = client.get_model_version_by_alias(fed.model, CHAMPION)
    assert champ.tags["round"] == "2", "champion must be the best Dice (round 2), not the newest"
    assert champ.tags["promoted_over"].startswith("v1 (Dice 0.5000")
    v1 = client.get_model_version(fed.model, fed.versions[1])
    v3 = client.get_model_version(fed.model, fed.versions[3])
    assert v1.tags.get("was_champion") == "true" and "was_champion" not in v3.tags
    # A worse evaluation never takes the alias; an equal one neither (ties keep the older champion).
    res = fed.tracker.record_evaluation(3, DICE[2], per_site(3))
    assert not res.promoted and client.get_model_version_by_alias(fed.model, CHAMPION).tags["round"] == "2"
    fed.tracker.record_evaluation(3, DICE[3], per_site(3))  # restore round 3's own Dice


def test_descriptions_read_like_a_report(fed: Fed) -> None:
    client = fed.tracker.client
    d3 = client.get_model_version(fed.model, fed.versions[3]).description
    assert "**Round 3**" in d3 and "2 site(s), 8 training case(s)" in d3
    assert "| site-a | 6 | 0.6500 |" in d3 and "| site-b | 2 | 0.4500 |" in d3
    assert "Not promoted" in d3 and "champion v2" in d3
    d2 = client.get_model_version(fed.model, fed.versions[2]).description
    assert "Promoted to `@champion` over v1" in d2


def test_metrics_params_plot_and_round_config(fed: Fed, tmp_path: Path) -> None:
    client = fed.tracker.client
    run = client.get_run(fed.tracker.run_id)
    assert run.data.params["strategy.name"] == "fedavg" and run.data.params["rounds"] == "3"
    hist = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "dice_mean")}
    assert sorted(hist) == [1, 2, 3]
    for r in DICE:
        assert hist[r] == pytest.approx(case_weighted_dice(per_site(r), SITE_CASES))
        assert hist[r] == pytest.approx((6 * per_site(r)["site-a"] + 2 * per_site(r)["site-b"]) / 8)
    for key in ("dice/site-a", "sites", "bytes_received", "round_seconds"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 3, key
    png = Path(client.download_artifacts(run.info.run_id, "plots/dice_per_round.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    cfg = json.loads(
        Path(
            client.download_artifacts(run.info.run_id, "rounds/round-0002/config.json", str(tmp_path))
        ).read_text()
    )
    assert cfg["round"] == 2 and cfg["config"]["deadline_s"] == 60 and "dice_mean" in cfg["metrics"]


def test_registered_flavor_has_dynamic_signature_cpu_provider_and_pinned_requirements(
    fed: Fed, tmp_path: Path
) -> None:
    import yaml

    got = fetch_model(f"models:/{fed.model}/{fed.versions[1]}", tmp_path, tracking_uri=fed.uri)
    mlmodel = yaml.safe_load((got.onnx_path.parent / "MLmodel").read_text())
    assert mlmodel["flavors"]["onnx"]["providers"] == ["CPUExecutionProvider"]
    sig_in = json.loads(mlmodel["signature"]["inputs"])[0]
    assert sig_in["tensor-spec"]["shape"] == [-1, 1, -1, -1, -1] and sig_in["name"] == "image"
    reqs = (got.onnx_path.parent / "requirements.txt").read_text()
    assert "onnxruntime==" in reqs and "onnx==" in reqs
    assert (got.onnx_path.parent / "input_example.json").is_file()
    assert got.weights_path is not None and file_sha256(got.weights_path) == file_sha256(fed.weights[1])


def test_champion_same_mask_via_pyfunc_and_onnxruntime(fed: Fed, tmp_path: Path) -> None:
    import mlflow
    import onnxruntime as ort

    uri = f"models:/{fed.model}@{CHAMPION}"
    scan = synthetic_scan(32)  # not the example's size: the signature must not fix it
    mlflow.set_tracking_uri(fed.uri)
    out = mlflow.pyfunc.load_model(uri).predict(scan)
    logits_pyfunc = np.asarray(out["logits"] if isinstance(out, dict) else out)

    got = fetch_model(uri, tmp_path / "dl", tracking_uri=fed.uri)
    assert got.version == fed.versions[2] and got.sha256_expected == file_sha256(got.onnx_path)
    sess = ort.InferenceSession(str(got.onnx_path), providers=["CPUExecutionProvider"])
    (logits_ort,) = sess.run(["logits"], {"image": scan})

    model = build_unet(fed.cfg)
    from neurofed.models.checkpoint import load_weights

    model.load_state_dict(load_weights(fed.weights[2])[0])
    with torch.no_grad():
        logits_torch = model.eval()(torch.from_numpy(scan)).numpy()
    assert logits_ort.shape == (1, 1, 32, 32, 32)
    np.testing.assert_array_equal(logits_pyfunc > 0, logits_ort > 0)
    assert np.abs(logits_ort - logits_torch).max() < 1e-3, "registered ONNX is not round 2's weights"


def test_restart_between_aggregate_and_register_leaves_one_version(fed: Fed) -> None:
    """A new tracker (as after a coordinator restart) resumes the parent run and registering the
    same round again returns the existing version."""
    again = FederationTracker(fed.uri, fed.name, {"rounds": 3})
    assert again.resumed and again.run_id == fed.tracker.run_id
    assert (
        again.register_round(3, fed.weights[3], fed.cfg, sites=SITE_CASES, cases=SITE_CASES)
        == fed.versions[3]
    )
    found = again.client.search_model_versions(f"name = '{fed.model}' and tags.round = '3'")
    assert [v.version for v in found] == [fed.versions[3]]
    assert len(again.client.search_model_versions(f"name = '{fed.model}'")) == 3
    assert set(again.history["dice_mean"]) == {1, 2, 3}, "the plot history must survive a restart"


def test_crash_after_logging_before_version_then_resume(
    mlflow_server: str, tmp_path: Path, monkeypatch
) -> None:
    """The coordinator dies inside registration (model logged, version not created): after resume
    exactly one version exists for the round."""
    cfg = ModelConfig.tiny()
    name = f"crash-{uuid.uuid4().hex[:6]}"
    w = round_weights(tmp_path, cfg, 1)
    first = FederationTracker(mlflow_server, name, {"rounds": 1})

    def die(*a, **k):
        raise SystemExit("coordinator killed")

    monkeypatch.setattr(first.client, "create_model_version", die)
    with pytest.raises(SystemExit):
        first.register_round(1, w, cfg, sites=["site-a"], cases=4)
    assert not first.client.search_model_versions(f"name = '{name}-unet'")
    resumed = FederationTracker(mlflow_server, name, {"rounds": 1})
    assert resumed.run_id == first.run_id
    v = resumed.register_round(1, w, cfg, sites=["site-a"], cases=4)
    assert resumed.register_round(1, w, cfg, sites=["site-a"], cases=4) == v
    assert [x.version for x in resumed.client.search_model_versions(f"name = '{name}-unet'")] == [v]
    # A finished federation does not capture the next one with the same name.
    resumed.close()
    nxt = FederationTracker(mlflow_server, name, {"rounds": 1})
    assert nxt.run_id != first.run_id and not nxt.resumed
    assert nxt.register_round(1, w, cfg, sites=["site-a"], cases=4) != v


def test_fetch_refuses_tampered_file(mlflow_server_handle, tmp_path: Path) -> None:
    cfg = ModelConfig.tiny()
    name = f"tamper-{uuid.uuid4().hex[:6]}"
    tr = FederationTracker(mlflow_server_handle.url, name, {})
    tr.register_round(1, round_weights(tmp_path, cfg, 1), cfg, sites=["site-a"], cases=3)
    mv = tr.client.get_model_version(f"{name}-unet", "1")
    # Flip bytes in the artifact store on the server's disk, as a compromised store would.
    stored = stored_path(mlflow_server_handle, tr.client, f"{name}-unet", mv.version) / "model.onnx"
    data = bytearray(stored.read_bytes())
    data[-100] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256.*registered with"):
        fetch_model(f"models:/{name}-unet/1", tmp_path / "dl", tracking_uri=mlflow_server_handle.url)


def test_fetch_errors_and_plain_paths(fed: Fed, tmp_path: Path) -> None:
    with pytest.raises(ModelFetchError, match="cannot resolve"):
        fetch_model(f"models:/{fed.model}@no-such-alias", tmp_path, tracking_uri=fed.uri)
    with pytest.raises(ModelFetchError, match="cannot resolve"):
        fetch_model("models:/no-such-model@champion", tmp_path, tracking_uri=fed.uri)
    with pytest.raises(ModelFetchError, match="stages are not used"):
        fetch_model(f"models:/{fed.model}/Production", tmp_path, tracking_uri=fed.uri)
    with pytest.raises(ModelFetchError, match="no such ONNX file"):
        fetch_model(tmp_path / "missing.onnx", tmp_path)
    latest = fetch_model(f"models:/{fed.model}@latest", tmp_path / "l", tracking_uri=fed.uri)
    assert latest.version == fed.versions[3]
    plain = fetch_model(latest.onnx_path, tmp_path)
    assert plain.onnx_path == latest.onnx_path and plain.sha256_expected is None
    folder = fetch_model(latest.onnx_path.parent, tmp_path)
    assert folder.weights_path is not None
    with pytest.raises(RegistryError, match="no registered version"):
        fed.tracker.record_evaluation(99, 0.9, {})
    with pytest.raises(RegistryError, match="not a finite number"):
        fed.tracker.record_evaluation(1, float("nan"), {})


def test_retention_keeps_last_k_and_every_champion(mlflow_server_handle, tmp_path: Path) -> None:
    cfg = ModelConfig.tiny()
    name = f"ret-{uuid.uuid4().hex[:6]}"
    tr = FederationTracker(mlflow_server_handle.url, name, {}, keep_last=2)
    dice = {1: 0.8, 2: 0.5, 3: 0.6, 4: 0.7}  # round 1 stays champion
    for r, d in dice.items():
        tr.register_round(r, round_weights(tmp_path, cfg, r), cfg, sites=["site-a"], cases=3)
        tr.record_evaluation(r, d, {"site-a": d})
    tags = {v.version: v.tags for v in tr.client.search_model_versions(f"name = '{name}-unet'")}
    assert tags["2"].get("artifacts") == "deleted"
    assert all(tags[v].get("artifacts") != "deleted" for v in ("1", "3", "4"))
    with pytest.raises(ModelFetchError, match="deleted by the retention policy"):
        fetch_model(f"models:/{name}-unet/2", tmp_path / "a", tracking_uri=mlflow_server_handle.url)
    assert (
        fetch_model(
            f"models:/{name}-unet@champion", tmp_path / "b", tracking_uri=mlflow_server_handle.url
        ).version
        == "1"
    )
    assert not (stored_path(mlflow_server_handle, tr.client, f"{name}-unet", "2") / "model.onnx").exists()
    assert (stored_path(mlflow_server_handle, tr.client, f"{name}-unet", "1") / "model.onnx").is_file()
