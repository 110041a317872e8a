"""`neurofed infer` on real NIfTI files with real onnxruntime sessions."""

from __future__ import annotations

import gzip
import re

import nibabel as nib
import numpy as np
import pytest

from neurofed.mlflow_server.resolve import resolve_model
from neurofed.models.config import ModelConfig
from neurofed.models.inference import (
    ImageShapeError,
    InferenceInputError,
    InferenceSettings,
    ModalityError,
    ModelUriError,
    NotNiftiError,
    Segmenter,
    SpacingError,
    discover_cases,
    load_case,
    modality_of,
    run_inference,
)
from neurofed.models.onnx_session import create_session, cuda_available
from tests.models.conftest import blob_scan, lps_affine, save_nifti, threshold_onnx, world_grid

FOUR = ("t1", "t1ce", "t2", "flair")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def centroid_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return world_grid(mask.shape, affine)[mask.astype(bool)].mean(axis=0)


# ---------------------------------------------------------------------------- world alignment


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 1.5, 1.5)])
def test_non_ras_anisotropic_scan_gives_a_mask_aligned_in_world_coordinates(tmp_path, spacing):
    cfg = ModelConfig.tiny(patch_size=(32, 32, 32), spacing=spacing)
    model = threshold_onnx(tmp_path / "thr.onnx", cfg)
    affine = lps_affine(spacing=(1.0, 1.5, 3.0))
    shape = (56, 40, 20)
    mid = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
    centre = mid + np.array([8.0, -10.0, 9.0])  # off centre on every axis: a flip would move it
    img, truth = blob_scan(shape, affine, centre=centre, radius=10.0, brain_radius=28.0)
    scan = save_nifti(tmp_path / "in" / "pt01_flair.nii.gz", img, affine)
    out = tmp_path / "mask.nii.gz"
    (res,) = run_inference([scan], model, out, settings=InferenceSettings(probabilities=True), threads=1)

    got = nib.load(str(out))
    assert got.shape == shape
    np.testing.assert_allclose(got.affine, affine, atol=1e-5)
    assert nib.aff2axcodes(got.affine) == nib.aff2axcodes(affine) == ("P", "L", "S")
    mask = np.asarray(got.dataobj).astype(bool)
    assert got.get_data_dtype() == np.uint8
    assert dice(mask, truth) > 0.85, dice(mask, truth)
    assert np.linalg.norm(centroid_mm(mask, affine) - centre) < 1.5
    expected_ml = truth.sum() * 1.0 * 1.5 * 3.0 / 1000
    assert res.volume_ml == pytest.approx(mask.sum() * 4.5 / 1000)
    assert res.volume_ml == pytest.approx(expected_ml, rel=0.15)
    prob = nib.load(str(tmp_path / "mask_prob.nii.gz"))
    assert prob.shape == shape and prob.get_data_dtype() == np.float32
    p = np.asarray(prob.dataobj)
    assert 0 <= p.min() and p.max() <= 1 and np.array_equal(p > 0.5, mask)


def test_the_same_patient_stored_two_ways_gets_the_same_world_mask(tmp_path):
    """One world blob written on a RAS 1 mm grid and on a permuted, anisotropic LPS grid: the two
    masks, compared in world coordinates, must overlap."""
    cfg = ModelConfig.tiny(patch_size=(32, 32, 32))
    model = threshold_onnx(tmp_path / "thr.onnx", cfg)
    centre = np.array([30.0, 45.0, -5.0])
    ras = np.diag([1.0, 1.0, 1.0, 1.0])
    ras[:3, 3] = centre - np.array([27.5, 27.5, 23.5]) + np.array([-6.0, 5.0, -4.0])
    lps = lps_affine(spacing=(1.2, 0.9, 2.5), origin=(60.0, 75.0, -35.0))
    masks = {}
    for name, affine, shape in (("ras", ras, (56, 56, 48)), ("lps", lps, (50, 64, 24))):
        img, _ = blob_scan(shape, affine, centre=centre, radius=9.0, brain_radius=25.0)
        scan = save_nifti(tmp_path / name / "flair.nii.gz", img, affine)
        run_inference([scan], model, tmp_path / f"{name}.nii.gz", threads=1)
        masks[name] = nib.load(str(tmp_path / f"{name}.nii.gz"))
    c_ras = centroid_mm(np.asarray(masks["ras"].dataobj), masks["ras"].affine)
    c_lps = centroid_mm(np.asarray(masks["lps"].dataobj), masks["lps"].affine)
    assert np.linalg.norm(c_ras - centre) < 1.0
    assert np.linalg.norm(c_lps - c_ras) < 1.5


def test_unet_pipeline_onnx_matches_torch(tmp_path, tiny_model, tiny_config, tiny_onnx):
    """The whole pipeline (preprocess, sliding window, invert) with onnxruntime and with the torch
    model: masks equal except voxels whose probability is within 1e-3 of the threshold."""
    affine = lps_affine(spacing=(1.0, 1.25, 2.0))
    shape = (40, 36, 22)
    img, _ = blob_scan(
        shape, affine, centre=affine[:3, 3] + np.array([-15.0, -20.0, 20.0]), brain_radius=22.0
    )
    case = discover_cases([save_nifti(tmp_path / "c" / "x_flair.nii.gz", img, affine)], ("flair",))[0]
    loaded = load_case(case)
    settings = InferenceSettings(sw_batch_size=2)
    ort_seg = Segmenter(create_session(tiny_onnx, threads=1), tiny_config, settings).segment(loaded)
    torch_seg = Segmenter(tiny_model, tiny_config, settings).segment(loaded)
    assert np.abs(ort_seg.probability - torch_seg.probability).max() < 1e-3
    differ = ort_seg.mask != torch_seg.mask
    assert not (differ & (np.abs(torch_seg.probability - 0.5) > 1e-3)).any()
    assert ort_seg.mask.shape == shape


# ------------------------------------------------------------------------------ inputs and batch


def test_modality_names_brats_2021_and_2023():
    from pathlib import Path

    assert modality_of(Path("BraTS2021_00000_flair.nii.gz")) == "flair"
    assert modality_of(Path("BraTS2021_00000_t1ce.nii.gz")) == "t1ce"
    assert modality_of(Path("BraTS2021_00000_t1.nii.gz")) == "t1"
    assert modality_of(Path("BraTS-GLI-00000-000-t2f.nii.gz")) == "flair"
    assert modality_of(Path("BraTS-GLI-00000-000-t1c.nii.gz")) == "t1ce"
    assert modality_of(Path("BraTS-GLI-00000-000-t1n.nii")) == "t1"
    assert modality_of(Path("BraTS-GLI-00000-000-t2w.nii.gz")) == "t2"
    assert modality_of(Path("scan.nii.gz")) is None


def _case_folder(root, case, names, shape=(24, 24, 16), affine=None):
    affine = np.eye(4) if affine is None else affine
    rng = np.random.default_rng(abs(hash(case)) % 1000)
    for n in names:
        save_nifti(root / case / n, (rng.random(shape) + 1).astype(np.float32), affine)
    return root / case


def test_case_folders_are_read_in_the_model_order(tmp_path):
    old = _case_folder(tmp_path, "BraTS2021_00001", [f"BraTS2021_00001_{m}.nii.gz" for m in (*FOUR, "seg")])
    new = _case_folder(
        tmp_path,
        "BraTS-GLI-00002-000",
        [f"BraTS-GLI-00002-000-{m}.nii.gz" for m in ("t1n", "t1c", "t2w", "t2f", "seg")],
    )
    for folder in (old, new):
        (case,) = discover_cases([folder], FOUR)
        assert [modality_of(case.images[m]) for m in FOUR] == list(FOUR)
        assert case.case_id == folder.name
    (flair_only,) = discover_cases([new], ("flair",))
    assert flair_only.images["flair"].name.endswith("-t2f.nii.gz")
    both = discover_cases([tmp_path], ("t1ce", "flair"))  # a folder of case folders
    assert [c.case_id for c in both] == ["BraTS-GLI-00002-000", "BraTS2021_00001"]


def test_wrong_number_or_names_of_modalities(tmp_path):
    folder = _case_folder(tmp_path, "c1", ["c1_flair.nii.gz", "c1_t2.nii.gz"])
    with pytest.raises(ModalityError, match=r"needs 4 modalities .*t1, t1ce is missing"):
        discover_cases([folder], FOUR)
    with pytest.raises(ModalityError, match="needs 4 modalities"):
        discover_cases([folder / "c1_flair.nii.gz"], FOUR)
    with pytest.raises(ModalityError, match="says t2, but the model was trained on flair"):
        discover_cases([folder / "c1_t2.nii.gz"], ("flair",))
    dup = _case_folder(tmp_path, "c2", ["c2_flair.nii.gz", "c2-t2f.nii.gz"])
    with pytest.raises(ModalityError, match="more than one flair"):
        discover_cases([dup], ("flair",))
    with pytest.raises(InferenceInputError, match="no such file"):
        discover_cases([tmp_path / "nope"], ("flair",))


def test_modalities_must_share_one_grid(tmp_path):
    folder = _case_folder(tmp_path, "c1", ["c1_flair.nii.gz"])
    save_nifti(folder / "c1_t1ce.nii.gz", np.ones((24, 24, 15), np.float32), np.eye(4))
    (case,) = discover_cases([folder], ("t1ce", "flair"))
    with pytest.raises(ModalityError, match="co-registered"):
        load_case(case)


def test_channel_order_reaches_the_model(tmp_path):
    """A two-modality model that thresholds its second channel (flair): the blob is only in the
    FLAIR file, so a swapped channel order would give an empty mask."""
    cfg = ModelConfig.tiny(patch_size=(32, 32, 32), modalities=("t1ce", "flair"))
    model = threshold_onnx(tmp_path / "thr2.onnx", cfg, channel=1)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    shape = (40, 40, 32)
    img, truth = blob_scan(shape, affine, centre=(14.0, 25.0, 15.0), radius=7.0, brain_radius=18.0)
    flat = np.where(img > 0, 100.0, 0.0).astype(np.float32)
    save_nifti(tmp_path / "cases" / "p1" / "p1-t2f.nii.gz", img, affine)
    save_nifti(tmp_path / "cases" / "p1" / "p1-t1c.nii.gz", flat, affine)
    run_inference([tmp_path / "cases" / "p1"], model, tmp_path / "o.nii.gz", threads=1)
    mask = np.asarray(nib.load(str(tmp_path / "o.nii.gz")).dataobj).astype(bool)
    assert dice(mask, truth) > 0.9


def test_batch_mode_over_a_folder_of_cases(tmp_path, capsys):
    from neurofed.cli import main

    cfg = ModelConfig.tiny(patch_size=(32, 32, 32))
    model = threshold_onnx(tmp_path / "thr.onnx", cfg)
    truths = {}
    for i, radius in enumerate((6.0, 8.0, 10.0)):
        affine = np.diag([1.0, 1.2, 1.5, 1.0])
        shape = (40, 36, 28)
        img, truth = blob_scan(
            shape, affine, centre=(20.0, 20.0, 20.0), radius=radius, brain_radius=19.0, seed=i
        )
        save_nifti(tmp_path / "cases" / f"case{i}" / f"case{i}_flair.nii.gz", img, affine)
        truths[f"case{i}"] = truth
    bad = tmp_path / "cases" / "case9" / "case9_flair.nii.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"\x1f\x8b" + b"\x00" * 40)  # corrupt: the batch goes on and reports it
    out = tmp_path / "masks"
    rc = main(
        [
            "infer",
            str(tmp_path / "cases"),
            "--model",
            str(model),
            "-o",
            str(out),
            "--threads",
            "1",
            "--sw-batch",
            "3",
        ]
    )
    assert rc == 1  # one case failed
    captured = capsys.readouterr()
    text = captured.out
    assert "CPUExecutionProvider" in text and "3 cases segmented" in text
    assert re.search(r"case9: skipped: .*case9_flair.nii.gz", text)
    assert "1 of 4 cases failed: case9" in captured.err
    assert not (out / "case9_mask.nii.gz").exists()
    for case, truth in truths.items():
        mask = np.asarray(nib.load(str(out / f"{case}_mask.nii.gz")).dataobj).astype(bool)
        assert dice(mask, truth) > 0.85
        ml = float(re.search(rf"{case}: tumour volume ([0-9.]+) ml", text).group(1))
        assert ml == pytest.approx(mask.sum() * 1.8 / 1000, abs=0.01)
    vols = [float(v) for v in re.findall(r"tumour volume ([0-9.]+) ml", text)]
    assert vols == sorted(vols) and vols[0] > 0  # bigger blob, bigger volume


def test_infer_cli_single_file_with_a_unet_and_a_weights_file(tmp_path, tiny_model, tiny_config, capsys):
    from neurofed.cli import main
    from neurofed.models.checkpoint import save_weights

    weights = save_weights(tmp_path / "w.safetensors", tiny_model.state_dict(), tiny_config)
    affine = np.diag([-0.9, 0.9, 1.3, 1.0])
    img, _ = blob_scan((36, 40, 24), affine, centre=(-15.0, 18.0, 15.0), brain_radius=15.0)
    scan = save_nifti(tmp_path / "x_flair.nii", img, affine)
    rc = main(
        [
            "infer",
            str(scan),
            "--model",
            str(weights),
            "-o",
            str(tmp_path / "m.nii.gz"),
            "--threads",
            "1",
            "--probabilities",
        ]
    )
    assert rc == 0
    assert "tumour volume" in capsys.readouterr().out
    out = nib.load(str(tmp_path / "m.nii.gz"))
    assert out.shape == (36, 40, 24) and np.allclose(out.affine, affine)
    assert (tmp_path / "m_prob.nii.gz").is_file()


def test_several_cases_need_an_output_folder(tmp_path, tiny_onnx):
    for c in ("a", "b"):
        _case_folder(tmp_path / "cases", c, [f"{c}_flair.nii.gz"])
    with pytest.raises(InferenceInputError, match="must be a folder"):
        run_inference([tmp_path / "cases"], tiny_onnx, tmp_path / "x.nii.gz")


# ---------------------------------------------------------------------------------------- errors


def _run(tmp_path, scan, model):
    return run_inference([scan], model, tmp_path / "out.nii.gz", threads=1)


def test_not_nifti_or_corrupt_files(tmp_path, tiny_onnx):
    text = tmp_path / "notes_flair.nii.gz"
    text.write_text("not an image")
    with pytest.raises(NotNiftiError, match=r"notes_flair.nii.gz: not a readable NIfTI"):
        _run(tmp_path, text, tiny_onnx)
    png = tmp_path / "scan.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    with pytest.raises(NotNiftiError, match="scan.png"):
        _run(tmp_path, png, tiny_onnx)
    good = save_nifti(tmp_path / "good_flair.nii.gz", np.ones((32, 32, 32), np.float32), np.eye(4))
    raw = gzip.decompress(good.read_bytes())
    truncated = tmp_path / "cut_flair.nii.gz"
    truncated.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(NotNiftiError, match=r"cut_flair.nii.gz: corrupt or truncated"):
        _run(tmp_path, truncated, tiny_onnx)
    broken_gz = tmp_path / "broken_flair.nii.gz"
    broken_gz.write_bytes(good.read_bytes()[:200])
    with pytest.raises(NotNiftiError, match="broken_flair.nii.gz"):
        _run(tmp_path, broken_gz, tiny_onnx)


def test_two_d_images_are_refused(tmp_path, tiny_onnx):
    for name, shape in (("slice_flair.nii.gz", (64, 64)), ("thin_flair.nii.gz", (64, 64, 1))):
        scan = save_nifti(tmp_path / name, np.ones(shape, np.float32), np.eye(4))
        with pytest.raises(ImageShapeError, match=rf"{name}: a 2-D image"):
            _run(tmp_path, scan, tiny_onnx)
    four = save_nifti(tmp_path / "four_flair.nii.gz", np.ones((8, 8, 8, 4), np.float32), np.eye(4))
    with pytest.raises(ImageShapeError, match="one 3-D file per modality"):
        _run(tmp_path, four, tiny_onnx)


@pytest.mark.parametrize("spacing", [0.01, 25.0])
def test_absurd_spacing_is_refused(tmp_path, tiny_onnx, spacing):
    scan = save_nifti(
        tmp_path / "s_flair.nii.gz", np.ones((16, 16, 16), np.float32), np.diag([1.0, 1.0, spacing, 1.0])
    )
    with pytest.raises(SpacingError, match=r"s_flair.nii.gz: voxel spacing .* is outside \[0.1, 10.0\] mm"):
        _run(tmp_path, scan, tiny_onnx)


def test_empty_or_nan_images_are_refused(tmp_path, tiny_onnx):
    zero = save_nifti(tmp_path / "z_flair.nii.gz", np.zeros((16, 16, 16), np.float32), np.eye(4))
    with pytest.raises(InferenceInputError, match="all zeros"):
        _run(tmp_path, zero, tiny_onnx)
    bad = np.ones((16, 16, 16), np.float32)
    bad[3, 3, 3] = np.nan
    nan = save_nifti(tmp_path / "n_flair.nii.gz", bad, np.eye(4))
    with pytest.raises(InferenceInputError, match="NaN"):
        _run(tmp_path, nan, tiny_onnx)


def test_model_uri_that_does_not_resolve(tmp_path, capsys):
    from neurofed.cli import main

    with pytest.raises(ModelUriError, match="no such model file"):
        resolve_model(str(tmp_path / "missing.onnx"), tmp_path)
    scan = save_nifti(tmp_path / "a_flair.nii.gz", np.ones((16, 16, 16), np.float32), np.eye(4))
    rc = main(
        ["infer", str(scan), "--model", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o.nii.gz")]
    )
    assert rc == 1
    assert "missing.onnx: no such model file" in capsys.readouterr().err
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 20)
    assert main(["infer", str(scan), "--model", str(junk), "-o", str(tmp_path / "o.nii.gz")]) == 1
    assert "not a readable ONNX model" in capsys.readouterr().err


@pytest.mark.slow  # MLflow creates and migrates the SQLite store: 10-60 s here
def test_registry_uri_that_does_not_resolve(tmp_path, monkeypatch):
    """With no server at the tracking URI, models:/ fails with a ModelUriError (or the registry
    room's own NeurofedError), never a traceback."""
    from neurofed.errors import NeurofedError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(NeurofedError) as info:
        resolve_model("models:/no-such-model@champion", tmp_path)
    assert "no-such-model" in str(info.value)


@pytest.mark.skipif(
    not cuda_available(), reason="onnxruntime has no CUDAExecutionProvider here (CPU build, no GPU)"
)
def test_cuda_provider_runs_the_same_model(tmp_path, tiny_model, tiny_config, tiny_onnx):
    session = create_session(tiny_onnx, device="cuda")
    assert session.on_cuda and "CUDA" in session.describe()
    x = np.random.default_rng(0).standard_normal((2, 1, 32, 48, 32)).astype(np.float32)
    cpu = create_session(tiny_onnx, device="cpu").run_numpy(x)
    assert np.abs(session.run_numpy(x) - cpu).max() < 1e-3


def test_cuda_request_without_cuda_is_a_clear_error(tiny_onnx):
    from neurofed.models.onnx_session import ProviderError

    if cuda_available():
        pytest.skip("CUDA is available here; the error path cannot be triggered")
    with pytest.raises(ProviderError, match="onnxruntime-gpu"):
        create_session(tiny_onnx, device="cuda")
