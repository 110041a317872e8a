"""The synthetic generator: deterministic, BraTS-shaped, FLAIR-bright tumours, sites that differ."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from neurofed.edge_node.data import discover_cases, load_case
from neurofed.edge_node.synth import site_case_counts, synthesize


def test_case_counts_unequal_and_complete() -> None:
    counts = site_case_counts(165, 10)
    assert sum(counts) == 165 and counts == sorted(counts, reverse=True)
    assert counts[0] >= 5 * counts[-1] / 2 and counts[-1] >= 4  # a few large sites, many small
    assert site_case_counts(12, 3) == [4, 4, 4]


def test_layout_and_geometry(synth_data: Path) -> None:
    cases = discover_cases(synth_data)
    assert len(cases) == 12 and {c.site for c in cases} == {"site-01", "site-02", "site-03"}
    assert (synth_data / "sites.csv").read_text().startswith("case,site\n")
    c = cases[0]
    assert set(c.images) == {"flair", "t1", "t1ce", "t2"} and c.label is not None
    img = nib.load(str(c.images["flair"]))
    assert img.shape == (32, 32, 32) and np.allclose(img.header.get_zooms(), 6.0)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    flair = np.asarray(img.dataobj)
    assert flair[0, 0, 0] == 0 and flair[16, 16, 16] > 0  # skull-stripped: zero background
    labels = set(np.unique(np.asarray(nib.load(str(c.label)).dataobj)).tolist())
    assert labels <= {0, 1, 2, 4} and 2 in labels  # BraTS 2018-21 label values, oedema present


def test_deterministic_by_seed(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", sites=2, cases=3, seed=7, shape=(32, 32, 32))
    b = synthesize(tmp_path / "b", sites=2, cases=3, seed=7, shape=(32, 32, 32))
    c = synthesize(tmp_path / "c", sites=2, cases=3, seed=8, shape=(32, 32, 32))
    assert a.sites == b.sites
    for f in sorted((tmp_path / "a").rglob("*.nii.gz")):
        rel = f.relative_to(tmp_path / "a")
        va, vb = np.asarray(nib.load(str(f)).dataobj), np.asarray(nib.load(str(tmp_path / "b" / rel)).dataobj)
        assert np.array_equal(va, vb), rel
    f = next((tmp_path / "a").rglob("*_flair.nii.gz"))
    vc = np.asarray(nib.load(str(tmp_path / "c" / f.relative_to(tmp_path / "a"))).dataobj)
    assert not np.array_equal(np.asarray(nib.load(str(f)).dataobj), vc)
    assert c.sites == a.sites


def test_tumour_is_flair_bright(synth_data: Path) -> None:
    ratios = []
    for case in discover_cases(synth_data):
        lc = load_case(case, ("flair",))
        flair, lab = lc.image[0], lc.label[0].astype(bool)
        brain = flair > 0
        ratios.append(flair[lab].mean() / flair[brain & ~lab].mean())
    assert np.mean(ratios) > 1.2 and min(ratios) > 1.0, ratios


def test_sites_differ_measurably(synth_data: Path) -> None:
    """Scanner signatures: median brain intensity and noise differ between sites far more than
    between cases of one site."""
    stats: dict[str, list[float]] = {}
    for case in discover_cases(synth_data):
        flair = load_case(case, ("flair",), with_label=False).image[0]
        stats.setdefault(case.site, []).append(float(np.median(flair[flair > 0])))
    site_medians = {s: np.median(v) for s, v in stats.items()}
    spread_between = max(site_medians.values()) / min(site_medians.values())
    spread_within = max(max(v) / min(v) for v in stats.values())
    assert spread_between > 1.3 and spread_between > spread_within, (site_medians, stats)
