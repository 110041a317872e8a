"""Case discovery for the three layouts, and each bad input's error naming case and file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from neurofed.edge_node.data import Case, discover_cases, load_case, load_datalist
from neurofed.edge_node.errors import CaseError, LayoutError

AFF = np.diag([2.0, 2.0, 2.0, 1.0])
SHAPE = (16, 16, 12)


def _save(path: Path, arr: np.ndarray, affine: np.ndarray = AFF) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def _volume(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(1, 100, SHAPE).astype(np.float32)


def _label() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[4:8, 4:8, 4:8] = 2
    lab[5:7, 5:7, 5:7] = 4
    return lab


def brats2021_case(root: Path, case: str, **override) -> Path:
    folder = root / case
    for i, m in enumerate(("flair", "t1", "t1ce", "t2")):
        if override.get(m, True) is not None:
            _save(
                folder / f"{case}_{m}.nii.gz",
                override.get(m) if isinstance(override.get(m), np.ndarray) else _volume(i),
            )
    _save(folder / f"{case}_seg.nii.gz", override.get("seg", _label()))
    return folder


def test_brats2021_site_folder(tmp_path: Path) -> None:
    site = tmp_path / "hospital-a"
    brats2021_case(site, "BraTS2021_00001")
    brats2021_case(site, "BraTS2021_00002")
    cases = discover_cases(site)
    assert [c.case_id for c in cases] == ["BraTS2021_00001", "BraTS2021_00002"]
    assert {c.site for c in cases} == {"hospital-a"}
    assert cases[0].layout == "brats2021" and set(cases[0].available) == {"flair", "t1", "t1ce", "t2"}
    loaded = load_case(cases[0], ("t1", "flair"))
    assert loaded.image.shape == (2, *SHAPE) and loaded.label.shape == (1, *SHAPE)
    np.testing.assert_allclose(loaded.image[1], _volume(0))  # flair is channel 1 as asked
    assert loaded.label.sum() == 64  # whole tumour = label > 0 (labels 2 and 4)
    assert loaded.spacing == (2.0, 2.0, 2.0)


def test_brats2023_naming_maps_modalities(tmp_path: Path) -> None:
    folder = tmp_path / "site-x" / "BraTS-GLI-00000-000"
    names = {"t2f": 0, "t1n": 1, "t1c": 2, "t2w": 3}
    for key, seed in names.items():
        _save(folder / f"BraTS-GLI-00000-000-{key}.nii.gz", _volume(seed))
    _save(folder / "BraTS-GLI-00000-000-seg.nii.gz", _label())
    (case,) = discover_cases(tmp_path)
    assert case.layout == "brats2023" and case.site == "site-x"
    loaded = load_case(case, ("flair", "t1", "t1ce", "t2"))
    for i in range(4):
        np.testing.assert_allclose(loaded.image[i], _volume(i))


def test_sites_csv_maps_flat_brats_folder(tmp_path: Path) -> None:
    for c in ("A1", "A2", "B1"):
        brats2021_case(tmp_path, c)
    (tmp_path / "sites.csv").write_text("case,site\nA1,site-a\nA2,site-a\nB1,site-b\n")
    cases = discover_cases(tmp_path)
    assert [(c.site, c.case_id) for c in cases] == [("site-a", "A1"), ("site-a", "A2"), ("site-b", "B1")]


def test_decathlon_4d_datalist(tmp_path: Path) -> None:
    vols = np.stack([_volume(i) for i in range(4)], axis=-1)  # FLAIR, T1w, t1gd, T2w
    _save(tmp_path / "imagesTr" / "BRATS_001.nii.gz", vols)
    _save(tmp_path / "labelsTr" / "BRATS_001.nii.gz", _label())
    spec = {
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    (case,) = discover_cases(tmp_path / "dataset.json")
    assert case.layout == "decathlon" and case.case_id == "BRATS_001" and case.site == "dataset"
    loaded = load_case(case, ("t2", "flair", "t1ce"))
    np.testing.assert_allclose(loaded.image[0], _volume(3))
    np.testing.assert_allclose(loaded.image[1], _volume(0))
    np.testing.assert_allclose(loaded.image[2], _volume(2))


def test_monai_datalist_with_file_lists_and_sites(tmp_path: Path) -> None:
    files = [
        str(_save(tmp_path / "c1" / f"c1_{m}.nii.gz", _volume(i)).relative_to(tmp_path))
        for i, m in enumerate("abcd")
    ]
    _save(tmp_path / "c1" / "c1_lab.nii.gz", _label())
    spec = {"training": [{"image": files, "label": "c1/c1_lab.nii.gz", "site": "north"}]}
    (tmp_path / "list.json").write_text(json.dumps(spec))
    (case,) = load_datalist(tmp_path / "list.json")
    assert case.site == "north" and case.images["t2"].name == "c1_d.nii.gz"
    assert load_case(case, ("flair",)).image.shape == (1, *SHAPE)


def test_empty_folder_is_a_layout_error(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="no cases found"):
        discover_cases(tmp_path)


def _problems(case: Case, **kw) -> str:
    with pytest.raises(CaseError) as info:
        load_case(case, ("flair", "t1", "t1ce", "t2"), **kw)
    return str(info.value)


@pytest.mark.parametrize(
    "breakage, expected",
    [
        ("corrupt", r"NF-D004 .*C1_t1\.nii\.gz: not a readable NIfTI image, unreadable or corrupt"),
        ("missing", r"NF-D001 .*missing t1ce"),
        ("shape", r"NF-D006 .*C1_t2\.nii\.gz has shape \(16, 16, 10\)"),
        ("affine", r"NF-D006 .*C1_seg\.nii\.gz has a different affine"),
        ("nonfinite", r"NF-D007 .*C1_flair\.nii\.gz \(flair\) has 3 non-finite voxels"),
        ("2d", r"NF-D005 .*C1_t1\.nii\.gz: a 2-D image"),
        ("empty", r"NF-D008 .*C1_t2\.nii\.gz \(t2\) is all zeros"),
    ],
)
def test_bad_inputs_name_case_and_file(tmp_path: Path, breakage: str, expected: str) -> None:
    folder = brats2021_case(tmp_path / "s", "C1")
    if breakage == "corrupt":
        data = gzip.compress(b"not a nifti at all" * 10)
        (folder / "C1_t1.nii.gz").write_bytes(data[: len(data) // 2])
    elif breakage == "missing":
        (folder / "C1_t1ce.nii.gz").unlink()
    elif breakage == "shape":
        _save(folder / "C1_t2.nii.gz", np.ones((16, 16, 10), np.float32))
    elif breakage == "affine":
        shifted = AFF.copy()
        shifted[0, 3] = 5.0
        _save(folder / "C1_seg.nii.gz", _label(), shifted)
    elif breakage == "nonfinite":
        v = _volume(0)
        v[0, 0, :3] = [np.nan, np.inf, -np.inf]
        _save(folder / "C1_flair.nii.gz", v)
    elif breakage == "2d":
        _save(folder / "C1_t1.nii.gz", np.ones((16, 16), np.float32))
    elif breakage == "empty":  # an all-zero image (an empty label is a warning, not an error)
        _save(folder / "C1_t2.nii.gz", np.zeros(SHAPE, np.float32))
    (case,) = discover_cases(tmp_path / "s")
    msg = _problems(case)
    assert "case C1 (site s)" in msg
    assert __import__("re").search(expected, msg), msg


def test_case_error_lists_all_problems_of_a_case(tmp_path: Path) -> None:
    folder = brats2021_case(tmp_path / "s", "C1")
    (folder / "C1_t1ce.nii.gz").unlink()
    _save(folder / "C1_t2.nii.gz", np.ones((16, 16, 10), np.float32))
    (case,) = discover_cases(tmp_path / "s")
    with pytest.raises(CaseError) as info:
        load_case(case, ("flair", "t1", "t1ce", "t2"))
    assert len(info.value.problems) == 2


def _federation_folders(root: Path) -> Path:
    """DATA/sites.csv with site-a's and site-b's case folders (empty: only names are read)."""
    (root / "site-a" / "case-001").mkdir(parents=True)
    (root / "site-b" / "case-002").mkdir(parents=True)
    (root / "sites.csv").write_text("case,site\ncase-001,site-a\ncase-002,site-b\n")
    return root


def test_a_data_folder_says_which_site_it_belongs_to(tmp_path):
    from neurofed.edge_node.data import data_site_mismatch, sites_claimed_by

    data = _federation_folders(tmp_path / "data")
    known = ["coordinator", "site-a", "site-b"]
    assert set(sites_claimed_by(data / "site-a", known)) == {"site-a"}
    assert data_site_mismatch(data / "site-b", "site-b", known) is None
    why = data_site_mismatch(data / "site-a", "site-b", known)
    assert why is not None and "site-a" in why and "not to site-b" in why and "case-001" in why
    # the root: its own sites.csv names both sites
    assert "site-a" in data_site_mismatch(data, "site-b", known)
    # renamed folder, but the parent's sites.csv lists its case under site-a
    (data / "site-a").rename(data / "export-2024")
    assert "export-2024" in data_site_mismatch(data / "export-2024", "site-b", known)
    # no sites.csv anywhere: the folder's name is the only evidence, and only a participant's counts
    lone = tmp_path / "lone"
    (lone / "site-a" / "c1").mkdir(parents=True)
    (lone / "brats" / "c2").mkdir(parents=True)
    assert "the folder is named site-a" in data_site_mismatch(lone / "site-a", "site-b", known)
    assert data_site_mismatch(lone / "site-a", "site-b", []) is None
    assert data_site_mismatch(lone / "brats", "site-b", known) is None
