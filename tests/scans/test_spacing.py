"""The training spacing is chosen on purpose: in RAS, from all training cases (median per axis),
recorded with its spread; in a federation the coordinator sets it from the sites' medians."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from neurofed.edge_node.centralized import model_config_for
from neurofed.edge_node.data import discover_cases, training_spacing
from neurofed.scans import ras_spacing, summarise
from tests.scans.test_contract import case, lab, save, vol


def axial(x: float, y: float, z: float) -> np.ndarray:
    return np.diag([x, y, z, 1.0])


def coronal(r: float, a: float, s: float) -> np.ndarray:
    """Stored axes (R, S, A): zooms (r, s, a)."""
    return np.array([[r, 0, 0, 0], [0, 0, a, 0], [0, s, 0, 0], [0, 0, 0, 1.0]])


def lps(x: float, y: float, z: float) -> np.ndarray:
    return np.diag([-x, -y, z, 1.0])


def test_ras_spacing_follows_the_axes_not_the_storage_order():
    assert ras_spacing(axial(0.9, 0.9, 5.0)) == pytest.approx((0.9, 0.9, 5.0))
    assert ras_spacing(coronal(0.9, 0.9, 5.0)) == pytest.approx((0.9, 0.9, 5.0))  # zooms say 0.9 x 5 x 0.9
    assert ras_spacing(lps(1.0, 1.2, 3.0)) == pytest.approx((1.0, 1.2, 3.0))


def _site(root: Path, affines: list[np.ndarray]) -> Path:
    for i, aff in enumerate(affines):
        case(root, f"C{i}", names=("flair", "seg"), affine=aff)
    return root


def test_a_coronal_first_case_does_not_set_the_spacing(tmp_path, caplog):
    """The issue's first report: a first case stored coronally among axial 0.9 x 0.9 x 5 mm cases."""
    site = _site(tmp_path / "s", [coronal(0.9, 0.9, 5.0), axial(0.9, 0.9, 5.0), axial(0.9, 0.9, 5.0)])
    cases = discover_cases(site)
    assert cases[0].case_id == "C0"  # the coronal one comes first
    summary = training_spacing(cases)
    assert summary.median == (0.9, 0.9, 5.0) and summary.cases == 3 and not summary.uneven
    with caplog.at_level(logging.INFO, logger="neurofed"):
        cfg = model_config_for(cases, "tiny")
    assert cfg.preprocessing.spacing == (0.9, 0.9, 5.0)
    assert cfg.training_data["spacing"]["median"] == [0.9, 0.9, 5.0]
    assert "median per RAS axis" in caplog.text


def test_median_per_axis_over_all_cases_with_the_spread_and_a_warning(tmp_path, caplog):
    """4 of 6 cases at 4 mm, the first at 5 mm, one coronal, one LPS: the spacing is 4 mm, not the
    first case's 5 mm; a 1 mm case far from it makes the cases 'uneven' (a warning)."""
    affines = [
        axial(0.9, 0.9, 5.0),
        axial(0.9, 0.9, 4.0),
        coronal(0.9, 0.9, 4.0),
        lps(0.9, 0.9, 4.0),
        axial(0.9, 0.9, 4.0),
        axial(0.9, 0.9, 1.0),
    ]
    cases = discover_cases(_site(tmp_path / "s", affines))
    with caplog.at_level(logging.INFO, logger="neurofed"):
        cfg = model_config_for(cases, "tiny", label_ml={"min": 1.0, "median": 2.0, "max": 3.0, "cases": 6})
    assert cfg.preprocessing.spacing == (0.9, 0.9, 4.0)
    rec = cfg.training_data["spacing"]
    assert rec["min"] == [0.9, 0.9, 1.0] and rec["max"] == [0.9, 0.9, 5.0] and rec["cases"] == 6
    assert cfg.training_data["label_ml"]["max"] == 3.0
    assert "differ a lot" in caplog.text  # the warning names the spread
    # the digest (the model's identity) does not depend on what it was trained on
    assert cfg.digest() == type(cfg).from_dict({**cfg.to_dict(), "training_data": None}).digest()


def test_check_data_warns_about_cases_far_from_the_training_spacing(tmp_path):
    from neurofed.scans import check

    site = _site(tmp_path / "s", [axial(1.0, 1.0, 1.0)] * 3 + [axial(1.0, 1.0, 3.0)])
    report = check(site, modalities=("flair",))
    assert report.ok and report.spacing.median == (1.0, 1.0, 1.0)
    spread = [p for p in report.warnings if p.code == "NF-D020"]
    assert len(spread) == 1 and "C3" in spread[0].message and spread[0].site == "s"


def test_federation_spacing_is_the_median_of_the_sites_medians(tmp_path, caplog):
    """No --spacing: each site reports its median in STATUS; the coordinator takes the median per
    axis of the medians before round 1, sends it in every task and warns about a far site."""
    from neurofed.coordinator.registration import Registrar
    from neurofed.coordinator.state import StateStore
    from neurofed.wire.memory import MemoryHub
    from tests.coordinator.helpers import ShiftTrainer, make_coordinator, run_in_thread, start_agent

    sites = {"site-a": [1.0, 1.0, 3.0], "site-b": [1.0, 1.0, 4.0], "site-c": [0.5, 0.5, 1.0]}
    hub = MemoryHub("testfed")
    stop = threading.Event()
    reg = Registrar(StateStore(tmp_path / "coord"), {})
    coord = make_coordinator(hub, tmp_path / "coord", list(sites), rounds=1, registrar=reg)
    coord.spacing_from_sites = True
    trainers = {s: ShiftTrainer(shift=1.0, num_train_cases=2, dice=0.5) for s in sites}
    for s, med in sites.items():
        report = {"spacing": summarise([med]).to_dict()}
        start_agent(hub, s, trainers[s], tmp_path, stop, report=report)
    with caplog.at_level(logging.INFO, logger="neurofed"):
        t, box = run_in_thread(coord)
        t.join(60)
    stop.set()
    reg.close()
    assert "error" not in box, box
    assert coord.model_config["preprocessing"]["spacing"] == [1.0, 1.0, 3.0]
    assert coord._task_meta["model_config"]["preprocessing"]["spacing"] == [1.0, 1.0, 3.0]
    assert coord.model_config["training_data"]["spacing"]["sites"] == sites
    assert reg.model_config["preprocessing"]["spacing"] == [1.0, 1.0, 3.0]
    assert "site site-c" in caplog.text and "far from the federation" in caplog.text


def test_label_volume_helpers_are_consistent(tmp_path):
    f = save(tmp_path / "x" / "x_flair.nii.gz", vol(0), axial(2.0, 2.0, 2.0))
    save(f.parent / "x_seg.nii.gz", lab(), axial(2.0, 2.0, 2.0))
    from neurofed.scans import check

    (c,) = check(tmp_path / "x", modalities=("flair",)).good
    assert c.label_ml == pytest.approx(64 * 8 / 1000)
