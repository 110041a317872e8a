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


FOUR = ("flair", "t1", "t1ce", "t2")


def test_check_folder_lists_every_problem(tmp_path: Path) -> None:
    report = check_folder(_broken_federation(tmp_path), modalities=FOUR)
    text = "\n".join(p.line() for p in report.problems)
    assert [p.code for p in report.errors] == ["NF-D001", "NF-D007", "NF-D004"], text
    for needle in ("A2", "missing t1ce", "B1_flair.nii.gz", "non-finite", "B2_t2.nii.gz", "corrupt"):
        assert needle in text
    # an empty label is accepted by train (a case without tumour), so it is a warning
    assert [(p.code, p.case) for p in report.warnings] == [("NF-D017", "B3")]
    assert report.sites() == {"site-a": {"good": 1, "bad": 1}, "site-b": {"good": 1, "bad": 2}}
    assert report.grids() == {"16x16x12 RAS @ 2x2x2": 2}


def test_cli_check_data_reports_and_exits_nonzero(tmp_path: Path, capsys) -> None:
    root = _broken_federation(tmp_path / "data")
    before = _digest(root)
    rc = main(
        ["check-data", str(root), "--modalities", ",".join(FOUR), "--json", str(tmp_path / "report.json")]
    )
    out = capsys.readouterr().out
    assert rc == 1
    assert "3 error(s), 1 warning(s)" in out and "site-a: 1 good, 1 bad" in out, out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is False and report["cases"] == {"good": 2, "bad": 3, "total": 5}
    rec = report["problems"][0]
    assert set(rec) >= {"code", "severity", "site", "case", "file", "message"}
    assert (rec["code"], rec["severity"], rec["site"], rec["case"]) == ("NF-D001", "error", "site-a", "A2")
    assert _digest(root) == before  # nothing modified


def test_cli_check_data_clean_synthetic(synth_data: Path, capsys) -> None:
    rc = main(["check-data", str(synth_data)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "no problems" in out and "12 good case(s), 0 bad, at 3 site(s)" in out and "32x32x32" in out, out
    assert "6x6x6" in out
