"""The data contract, as a table: every accepted layout and naming and every problem, built here,
each row with its expected outcome written by hand, and each of check-data, train's pre-flight
(``--check-only``) and infer checked against the table (not only against each other).

A row's outcome is a pair: what training refuses (labels needed) and what infer refuses (no
labels needed), each ``None`` (accepted) or the problem code; ``warn`` lists the warnings
check-data must also report. Every command here reads FLAIR and T1 (``MODS``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from neurofed.cli import main
from neurofed.models.config import ModelConfig
from tests.models.conftest import threshold_onnx

MODS = ("flair", "t1")
SHAPE = (16, 16, 16)
AFF = np.diag([2.0, 2.0, 2.0, 1.0])
CORONAL = np.array([[2.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])  # stored R, S, A


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFF) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def vol(seed: int = 0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).uniform(1, 100, shape).astype(np.float32)


def lab(shape=SHAPE) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    out[4:8, 4:8, 4:8] = 1
    return out


def case(
    folder: Path, cid: str, names=("flair", "t1", "t1ce", "t2", "seg"), sep="_", ext=".nii.gz", **over
) -> Path:
    """A case folder ``folder/cid`` with one file per name (``over`` replaces a file's data)."""
    for i, n in enumerate(names):
        data = over.get(n, lab() if n in ("seg",) else vol(i))
        save(folder / cid / f"{cid}{sep}{n}{ext}", data, over.get("affine", AFF))
    return folder / cid


def site(root: Path, n: int = 2, **kw) -> Path:
    for i in range(n):
        case(root, f"{root.name}-c{i}", **kw)
    return root


# ---------------------------------------------------------------------------------- the rows


def r_brats2021(p: Path) -> Path:
    return site(p / "hospital")


def r_brats2023(p: Path) -> Path:
    return site(p / "hospital", names=("t2f", "t1n", "t1c", "t2w", "seg"), sep="-")


def r_variants(p: Path) -> Path:  # upper case, .nii, _t1w, -t1c, _LABEL
    case(p / "s", "A1", names=("FLAIR", "T1W", "label"), ext=".NII")
    case(p / "s", "A2", names=("flair", "t1w", "seg"), ext=".nii")
    return p / "s"


def r_case_folder(p: Path) -> Path:
    return case(p / "s", "ONE")


def r_federation_csv(p: Path) -> Path:  # real BraTS folders under the root plus a mapping
    for cid in ("B1", "B2", "B3"):
        case(p / "fed", cid)
    (p / "fed" / "sites.csv").write_text("case,site\nB1,north\nB2,north\nB3,south\n")
    return p / "fed"


def r_site_folders(p: Path) -> Path:
    site(p / "fed" / "north")
    site(p / "fed" / "south")
    return p / "fed"


def r_datalist_4d(p: Path) -> Path:
    entries = []
    for i in range(2):
        img = np.stack([vol(i), vol(i + 1), vol(i + 2), vol(i + 3)], axis=-1)
        save(p / "imagesTr" / f"BRATS_00{i}.nii.gz", img)
        save(p / "labelsTr" / f"BRATS_00{i}.nii.gz", lab())
        entries.append({"image": f"imagesTr/BRATS_00{i}.nii.gz", "label": f"labelsTr/BRATS_00{i}.nii.gz"})
    spec = {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}, "training": entries}
    (p / "dataset.json").write_text(json.dumps(spec))
    return p / "dataset.json"


def r_datalist_3d(p: Path) -> Path:
    f = case(p, "D1", names=("a", "b", "seg"))
    spec = {
        "modality": {"0": "t1", "1": "flair"},
        "training": [
            {"image": [str(f / "D1_a.nii.gz"), str(f / "D1_b.nii.gz")], "label": str(f / "D1_seg.nii.gz")}
        ],
    }
    (p / "list.json").write_text(json.dumps(spec))
    return p / "list.json"


def r_4d_file(p: Path) -> Path:  # a lone 4-D image (Decathlon order): infer reads it, train needs a label
    return save(p / "BRATS_123.nii.gz", np.stack([vol(0), vol(1), vol(2), vol(3)], axis=-1))


def r_mixed_grids(p: Path) -> Path:  # a coronal case among axial ones: accepted, a warning
    site(p / "s")
    case(p / "s", "COR", affine=CORONAL)
    return p / "s"


def r_empty_case_folder(p: Path) -> Path:
    site(p / "s")
    (p / "s" / "EMPTY").mkdir()
    return p / "s"


def r_empty_label(p: Path) -> Path:
    site(p / "s", seg=np.zeros(SHAPE, np.uint8))
    return p / "s"


def r_anisotropic(p: Path) -> Path:
    site(p / "s", affine=np.diag([1.0, 1.0, 5.0, 1.0]))
    return p / "s"


def r_flair_only(p: Path) -> Path:
    return site(p / "s", names=("flair", "seg"))


def r_dup_ext(p: Path) -> Path:
    f = case(p / "s", "X1")
    save(f / "X1_flair.nii", vol(9))
    return p / "s"


def r_dup_naming(p: Path) -> Path:
    f = case(p / "s", "X1")
    save(f / "X1-t2f.nii.gz", vol(9))
    return p / "s"


def r_no_label(p: Path) -> Path:
    return site(p / "s", names=("flair", "t1"))


def r_corrupt(p: Path) -> Path:
    f = case(p / "s", "X1")
    (f / "X1_flair.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    return p / "s"


def r_2d(p: Path) -> Path:
    return site(p / "s", n=1, t1=np.ones((16, 16), np.float32))


def r_grid_mismatch(p: Path) -> Path:
    return site(p / "s", n=1, t1=vol(3, (16, 16, 12)))


def r_nan(p: Path) -> Path:
    v = vol(0)
    v[2, 2, 2] = np.nan
    return site(p / "s", n=1, flair=v)


def r_zero_flair(p: Path) -> Path:
    return site(p / "s", n=1, flair=np.zeros(SHAPE, np.float32))


def r_bad_spacing(p: Path) -> Path:
    return site(p / "s", n=1, affine=np.diag([2.0, 2.0, 20.0, 1.0]))


def r_unknown_naming(p: Path) -> Path:
    site(p / "s")
    save(p / "s" / "mystery" / "scan1.nii.gz", vol(0))
    return p / "s"


def r_csv_missing_case(p: Path) -> Path:
    case(p / "fed", "B1")
    (p / "fed" / "sites.csv").write_text("case,site\nB1,north\nGONE,north\n")
    return p / "fed"


def r_dup_case_id(p: Path) -> Path:
    case(p / "fed" / "north", "SAME")
    case(p / "fed" / "south", "SAME")
    return p / "fed"


@dataclass(frozen=True)
class Row:
    build: Callable[[Path], Path]
    train: str | None  # None: accepted; else the code train (and check-data) refuse it with
    infer: str | None  # the same for infer (and check-data --no-labels)
    warn: tuple[str, ...] = ()


TABLE: dict[str, Row] = {
    "brats2018-21 site folder": Row(r_brats2021, None, None),
    "brats2023+ site folder": Row(r_brats2023, None, None),
    "case, extension and _t1w variants": Row(r_variants, None, None),
    "one case folder": Row(r_case_folder, None, None),
    "federation root with sites.csv": Row(r_federation_csv, None, None),
    "root of site folders": Row(r_site_folders, None, None),
    "decathlon datalist, 4-D images": Row(r_datalist_4d, None, None),
    "datalist, 3-D files in table order": Row(r_datalist_3d, None, None),
    "a lone 4-D image": Row(r_4d_file, "NF-D003", None),
    "mixed orientations and grids": Row(r_mixed_grids, None, None, ("NF-D018",)),
    "empty case folder": Row(r_empty_case_folder, None, None, ("NF-D015",)),
    "empty labels": Row(r_empty_label, None, None, ("NF-D017",)),
    "very anisotropic voxels": Row(r_anisotropic, None, None, ("NF-D019",)),
    "FLAIR only, model needs T1": Row(r_flair_only, "NF-D001", "NF-D001"),
    "_flair.nii beside _flair.nii.gz": Row(r_dup_ext, "NF-D002", "NF-D002"),
    "-t2f beside _flair": Row(r_dup_naming, "NF-D002", "NF-D002"),
    "no label files": Row(r_no_label, "NF-D003", None),
    "corrupt FLAIR": Row(r_corrupt, "NF-D004", "NF-D004"),
    "2-D T1": Row(r_2d, "NF-D005", "NF-D005"),
    "T1 on another grid": Row(r_grid_mismatch, "NF-D006", "NF-D006"),
    "NaN in FLAIR": Row(r_nan, "NF-D007", "NF-D007"),
    "all-zero FLAIR": Row(r_zero_flair, "NF-D008", "NF-D008"),
    "20 mm slices": Row(r_bad_spacing, "NF-D009", "NF-D009"),
    "folder of unknown names": Row(r_unknown_naming, "NF-D010", "NF-D010"),
    "sites.csv names a missing case": Row(r_csv_missing_case, "NF-D011", "NF-D011"),
    "one case id at two sites": Row(r_dup_case_id, "NF-D012", "NF-D012"),
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("contract")
    out = {}
    for i, (name, row) in enumerate(TABLE.items()):
        folder = base / f"row{i:02d}"
        folder.mkdir()
        out[name] = row.build(folder)
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    cfg = ModelConfig.tiny(modalities=MODS, spacing=(2.0, 2.0, 2.0), patch_size=(16, 16, 16))
    return threshold_onnx(tmp_path_factory.mktemp("model") / "thr.onnx", cfg, level=5.0)


def _codes(text: str) -> set[str]:
    return set(re.findall(r"NF-D\d{3}", text))


def _errors_of(report: dict) -> set[str]:
    return {p["code"] for p in report["problems"] if p["severity"] == "error"}


@pytest.mark.parametrize("name", list(TABLE))
def test_check_data_matches_the_table(name, rows, tmp_path, capsys):
    row = TABLE[name]
    for labels, expected in ((True, row.train), (False, row.infer)):
        out = tmp_path / f"report-{labels}.json"
        args = ["check-data", str(rows[name]), "--modalities", ",".join(MODS), "--json", str(out)]
        rc = main(args if labels else [*args, "--no-labels"])
        report = json.loads(out.read_text())
        assert _errors_of(report) == ({expected} if expected else set()), (name, labels, report["problems"])
        assert rc == (1 if expected else 0)
        warned = {p["code"] for p in report["problems"] if p["severity"] == "warning"}
        if labels:  # (an empty label is only read when labels are)
            assert set(row.warn) <= warned, (name, report["problems"])
        if expected is None:
            assert report["cases"]["bad"] == 0 and report["cases"]["good"] >= 1
        for p in report["problems"]:
            assert set(p) >= {"code", "severity", "site", "case", "file", "message"}
    capsys.readouterr()


@pytest.mark.parametrize("name", list(TABLE))
def test_train_preflight_matches_the_table(name, rows, capsys):
    expected = TABLE[name].train
    rc = main(["train", "--data", str(rows[name]), "--modalities", ",".join(MODS), "--check-only"])
    text = capsys.readouterr().out
    assert rc == (1 if expected else 0), text
    refused = {c for line in text.splitlines() if "[error]" in line for c in _codes(line)}
    assert refused == ({expected} if expected else set()), text


@pytest.mark.parametrize("name", list(TABLE))
def test_infer_matches_the_table(name, rows, model, tmp_path, capsys):
    expected = TABLE[name].infer
    out = tmp_path / "masks"
    rc = main(["infer", str(rows[name]), "--model", str(model), "-o", str(out), "--threads", "1"])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    if expected is None:
        assert rc == 0, text
        masks = sorted(out.glob("*_mask.nii.gz")) if out.is_dir() else []
        assert masks, text
        assert all(m.with_name(m.name.replace(".nii.gz", ".json")).is_file() for m in masks)
    else:
        assert rc != 0, text
        refused = {c for line in text.splitlines() if "warning" not in line for c in _codes(line)}
        assert expected in refused, text
        assert refused <= {expected}, text
