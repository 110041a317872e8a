"""check-data reports every problem of a folder at once, modifies nothing, exits non-zero."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from neurofed.cli import main
from neurofed.edge_node.checks import check_folder
from tests.edge_node.test_data import SHAPE, _save, brats2021_case


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _broken_federation(root: Path) -> Path:
    brats2021_case(root / "site-a", "A1")
    f = brats2021_case(root / "site-a", "A2")
    (f / "A2_t1ce.nii.gz").unlink()  # missing modality
    f = brats2021_case(root / "site-b", "B1")
    v = np.ones(SHAPE, np.float32)
    v[1, 1, 1] = np.nan
    _save(f / "B1_flair.nii.gz", v)  # non-finite
    f = brats2021_case(root / "site-b", "B2")
    (f / "B2_t2.nii.gz").write_bytes(b"\x1f\x8b garbage")  # corrupt
    f = brats2021_case(root / "site-b", "B3")
    _save(f / "B3_seg.nii.gz", np.zeros(SHAPE, np.uint8))  # empty label
    return root


def test_check_folder_lists_every_problem(tmp_path: Path) -> None:
    report = check_folder(_broken_federation(tmp_path))
    text = "\n".join(report.problems)
    assert len(report.problems) == 4, text
    for needle in (
        "A2",
        "missing modality t1ce",
        "B1_flair.nii.gz",
        "non-finite",
        "B2_t2.nii.gz",
        "corrupt",
        "B3_seg.nii.gz",
        "empty",
    ):
        assert needle in text
    assert report.sites == {"site-a": 2, "site-b": 3}
    assert report.shapes == {"16x16x12": 1}  # only A1 is free of problems


def test_cli_check_data_reports_and_exits_nonzero(tmp_path: Path, capsys) -> None:
    root = _broken_federation(tmp_path / "data")
    before = _digest(root)
    rc = main(["check-data", str(root), "--json", str(tmp_path / "report.json")])
    out = capsys.readouterr().out
    assert rc == 1
    assert "4 problem(s)" in out and "site-a: 2 case(s)" in out and "spacings (mm): 2x2x2 x1" in out
    assert json.loads((tmp_path / "report.json").read_text())["ok"] is False
    assert _digest(root) == before  # nothing modified


def test_cli_check_data_clean_synthetic(synth_data: Path, capsys) -> None:
    rc = main(["check-data", str(synth_data)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "no problems" in out and "12 case(s) at 3 site(s)" in out and "32x32x32" in out and "6x6x6" in out
