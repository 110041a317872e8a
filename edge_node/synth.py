"""Synthetic multi-institution BraTS-like data: what BraTS ships, made up on the spot.

Real BraTS cannot be downloaded here, so the kit generates skull-stripped brains (zero background)
on one grid with GM/WM texture, sulcal CSF and ventricles, a tumour (necrosis, enhancing rim,
FLAIR-bright oedema) and four modalities with plausible contrasts, written in the BraTS 2018-21
layout ``DIR/<site>/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` plus ``DIR/sites.csv``.

The data is built to be hard in the ways real data is, so that the benchmark means something:

* oedema FLAIR contrast varies per case from subtle (close to grey matter) to strong, and fades
  towards the labelled margin (infiltrative edge), so no single threshold fits every case;
* FLAIR-bright look-alikes that are not tumour: periventricular caps/rims and small white-matter
  lesions (their load grows with a per-site cohort "age"), plus grey matter brighter than white;
* per-site scanner signature: intensity scale and offset, gamma contrast, multiplicative bias
  field, Rician noise, blur, and lesion contrast gain; per-site cohort (lesion load, tumour size);
* unequal case counts (a Zipf-like spread: a few large sites, many small), so small sites
  generalise poorly on their own.

Everything is deterministic in ``seed``: the same arguments give the same voxels.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from neurofed.edge_node.data import SITES_CSV

DEFAULT_SHAPE: tuple[int, int, int] = (64, 64, 64)
FIELD_OF_VIEW_MM = 192.0  # the grid covers 192 mm: 3 mm voxels at 64^3, 6 mm at 32^3
MODS = ("flair", "t1", "t1ce", "t2")


@dataclass(frozen=True)
class SiteSignature:
    """A scanner and a cohort: how one hospital's images differ from another's."""

    site: str
    scale: float  # intensity units of white matter
    offset: float  # added inside the brain
    gamma: float  # contrast curve
    bias: float  # amplitude of the multiplicative bias field (log scale)
    noise: float  # Rician noise sigma relative to white matter
    blur: float  # Gaussian blur sigma in voxels (through-plane-ish softness)
    lesion_gain: float  # how bright FLAIR lesions come out on this scanner
    age: float  # cohort: load of periventricular and white-matter hyperintensities
    tumour_size: float  # cohort: typical oedema extent


def site_case_counts(n_cases: int, n_sites: int, *, exponent: float = 1.3, floor: int = 4) -> list[int]:
    """Unequal case counts: each site gets ``floor`` cases (fewer if impossible), the rest are shared
    by a Zipf law (rank^-exponent). 165 over 10 sites gives 59, 26, 17, 13, 11, 9, 8, 8, 7, 7."""
    if n_sites < 1 or n_cases < n_sites:
        raise ValueError(f"need at least one case per site, got {n_cases} cases for {n_sites} sites")
    base = min(floor, n_cases // n_sites)
    rest = n_cases - base * n_sites
    w = np.array([(r + 1) ** -exponent for r in range(n_sites)])
    share = rest * w / w.sum()
    counts = np.floor(share).astype(int)
    for i in np.argsort(-(share - counts), kind="stable")[: rest - counts.sum()]:
        counts[i] += 1
    return [int(base + c) for c in counts]


def site_signature(site: str, index: int, seed: int, n_sites: int = 10) -> SiteSignature:
    """Scanner and cohort of site ``index``. Intensity scales are stratified over 300-1500 (a
    seeded permutation of strata) so that even a few sites differ clearly."""
    rng = np.random.default_rng([seed, 1, index])
    stratum = int(np.random.default_rng([seed, 3]).permutation(n_sites)[index])
    frac = (stratum + 0.5 + rng.uniform(-0.3, 0.3)) / n_sites
    return SiteSignature(
        site=site,
        scale=float(300 * 5.0**frac),
        offset=float(rng.uniform(0, 80)),
        gamma=float(rng.uniform(0.75, 1.3)),
        bias=float(rng.uniform(0.04, 0.2)),
        noise=float(rng.uniform(0.02, 0.09)),
        blur=float(rng.uniform(0.0, 1.0)),
        lesion_gain=float(rng.uniform(0.65, 1.2)),
        age=float(rng.uniform(0.1, 0.95)),
        tumour_size=float(rng.uniform(0.75, 1.25)),
    )


def affine_for(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS affine with the grid centred on the origin (mm)."""
    a = np.diag([float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])
    a[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape, spacing, strict=True)]
    return a


class _Grid:
    """Coordinates in mm, shared by every case (one grid for the whole federation)."""

    def __init__(self, shape: Sequence[int], spacing: Sequence[float]) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.spacing = tuple(float(s) for s in spacing)
        axes = [
            (np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * s
            for n, s in zip(self.shape, self.spacing, strict=True)
        ]
        self.x, self.y, self.z = np.meshgrid(*axes, indexing="ij", sparse=True)
        self._wcache: dict[tuple[int, int], np.ndarray] = {}

    def smooth_field(self, rng: np.random.Generator, coarse: int) -> np.ndarray:
        """A smooth random field with unit standard deviation: coarse noise spread to the grid by
        separable Gaussian interpolation weights (three small matrix products, not a spline zoom)."""
        small = rng.standard_normal((coarse, coarse, coarse)).astype(np.float32)
        f = small
        for axis, n in enumerate(self.shape):
            w = self._weights(n, coarse)
            f = np.moveaxis(np.tensordot(w, f, axes=([1], [axis])), 0, axis)
        return (f - f.mean()) / (f.std() + 1e-6)

    def _weights(self, n: int, coarse: int) -> np.ndarray:
        key = (n, coarse)
        if key not in self._wcache:
            pos = (np.arange(n) + 0.5) / n * coarse - 0.5
            w = np.exp(-0.5 * ((pos[:, None] - np.arange(coarse)[None, :]) / 0.6) ** 2)
            self._wcache[key] = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
        return self._wcache[key]

    def texture(self, rng: np.random.Generator, sigma_mm: float) -> np.ndarray:
        noise = rng.standard_normal(self.shape, dtype=np.float32)
        f = ndimage.gaussian_filter(noise, [sigma_mm / s for s in self.spacing])
        return f / (f.std() + 1e-6)

    def stamp_ball(self, mask: np.ndarray, centre_idx: np.ndarray, axes_mm: np.ndarray) -> None:
        """Set an ellipsoid (semi-axes in mm) around a voxel, touching only its bounding box."""
        lo, hi, ax = [], [], []
        for c, a, s, n in zip(centre_idx, axes_mm, self.spacing, self.shape, strict=True):
            r = int(np.ceil(a / s))
            lo.append(max(0, int(c) - r))
            hi.append(min(n, int(c) + r + 1))
            ax.append((np.arange(lo[-1], hi[-1]) - int(c)) * s / a)
        i, j, k = np.meshgrid(*ax, indexing="ij", sparse=True)
        mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] |= (i**2 + j**2 + k**2) < 1.0

    def ellipsoid_r(self, centre: Sequence[float], axes: Sequence[float]) -> np.ndarray:
        (cx, cy, cz), (ax, ay, az) = [float(v) for v in centre], [float(v) for v in axes]
        return np.sqrt(((self.x - cx) / ax) ** 2 + ((self.y - cy) / ay) ** 2 + ((self.z - cz) / az) ** 2)


def generate_case(  # noqa: PLR0915 - one anatomy, drawn step by step
    grid: _Grid, sig: SiteSignature, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One synthetic subject seen by one site's scanner: ({modality: float32}, BraTS label uint8)."""
    g = grid
    # ---- anatomy
    s = rng.uniform(0.92, 1.06)
    brain_r = g.ellipsoid_r((0, rng.uniform(-4, 4), rng.uniform(-3, 3)), (66 * s, 80 * s, 58 * s))
    brain_r = brain_r + 0.035 * g.smooth_field(rng, 5)
    brain = brain_r < 1.0
    fold = g.smooth_field(rng, 14)
    gm = brain & (brain_r > 0.80 + 0.05 * fold)
    csf = brain & (brain_r > 0.90) & (fold > 0.9)
    for sx in (-1, 1):  # deep grey nuclei
        gm |= g.ellipsoid_r((sx * 17 * s, -2, 0), (9, 13, 9)) < 1.0
    vs = rng.uniform(0.7, 1.2) + 0.6 * sig.age * rng.uniform(0.5, 1.0)  # ventricles widen with age
    vent_r = np.minimum(
        g.ellipsoid_r((-7 * vs, 4, 9), (4.5 * vs, 22 * vs, 8 * vs)),
        g.ellipsoid_r((7 * vs, 4, 9), (4.5 * vs, 22 * vs, 8 * vs)),
    )
    vent = vent_r < 1.0
    csf |= vent
    # periventricular hyperintensity: a rim, thicker at the frontal and occipital caps
    yv = np.abs(g.y - 4) / (22 * vs)
    age = float(np.clip(sig.age + rng.normal(0, 0.15), 0.0, 1.0))
    rim = 0.12 + 0.55 * age * (0.3 + 0.7 * np.clip(yv, 0, 1) ** 2)
    pvh = brain & ~vent & (vent_r < 1.0 + rim * (1 + 0.3 * g.smooth_field(rng, 6)))
    # small white-matter hyperintensities
    wmh = np.zeros(g.shape, dtype=bool)
    wm_candidates = np.argwhere(brain & ~gm & ~csf & (brain_r < 0.75))
    for _ in range(int(rng.poisson(1 + 9 * age))):
        g.stamp_ball(wmh, wm_candidates[rng.integers(len(wm_candidates))], rng.uniform(2.5, 6.0, size=3))
    wmh &= brain & ~csf
    # ---- tumour: oedema around a core of enhancing rim and necrosis
    while True:
        c = rng.uniform(-1, 1, size=3) * np.array([40, 50, 32])
        if (c[0] / 66) ** 2 + (c[1] / 80) ** 2 + (c[2] / 58) ** 2 < 0.45 and abs(c[0]) > 10:
            break
    big = rng.uniform(15, 35) * sig.tumour_size  # oedema radius: roughly 10-200 ml whole tumour
    axes = big * rng.uniform(0.75, 1.25, size=3)
    tum_r = g.ellipsoid_r(c, axes) + 0.22 * g.smooth_field(rng, 7)
    wt = brain & ~vent & (tum_r < 1.0)
    core_c = c + rng.uniform(-0.25, 0.25, size=3) * axes
    core_r = g.ellipsoid_r(core_c, axes * rng.uniform(0.3, 0.6)) + 0.12 * g.smooth_field(rng, 9)
    core = wt & (core_r < 1.0)
    necrosis = core & (core_r < rng.uniform(0.5, 0.8)) if rng.random() < 0.75 else np.zeros_like(core)
    enhancing = core & ~necrosis
    oedema = wt & ~core
    label = np.zeros(g.shape, dtype=np.uint8)
    label[oedema] = 2
    label[enhancing] = 4
    label[necrosis] = 1
    # oedema contrast: per case from subtle to strong, fading towards the labelled margin
    contrast = rng.uniform(0.2, 0.8) * sig.lesion_gain
    margin = rng.uniform(0.25, 0.7)
    profile = np.clip((1.0 - tum_r) / np.float32(margin), 0.0, 1.0) ** np.float32(0.8) * wt
    profile = profile * (1 + 0.25 * g.texture(rng, 4.0))
    distract = rng.uniform(0.3, 0.75) * sig.lesion_gain
    # ---- tissue intensities per modality (white matter = 1)
    tex = 0.05 * g.texture(rng, 3.0)
    wmgm = gm.astype(np.float32)
    pvh_f, wmh_f, hyper_f = pvh.astype(np.float32), wmh.astype(np.float32), (pvh | wmh).astype(np.float32)
    base = {  # (WM, GM, CSF)
        "t1": (1.0, 0.74, 0.28),
        "t1ce": (1.0, 0.74, 0.28),
        "t2": (0.55, 0.80, 1.70),
        "flair": (0.60, 0.80, 0.12),
    }
    vols: dict[str, np.ndarray] = {}
    for m in MODS:
        w_, g_, c_ = base[m]
        v = (w_ + (g_ - w_) * wmgm) * (1 + tex)
        v = np.where(csf, c_ * (1 + 0.5 * tex), v)
        if m == "flair":
            v = v + np.float32(distract) * (pvh_f + wmh_f * np.float32(rng.uniform(0.6, 1.1)))
            v = v + np.float32(contrast) * profile
            v = np.where(necrosis, 0.55 + 0.2 * tex, v)
            v = np.where(enhancing, 0.85 + 0.1 * tex, v)
        elif m == "t2":
            v = v + np.float32(0.45) * hyper_f + np.float32(0.7) * profile
            v = np.where(necrosis, 1.5 + 0.3 * tex, v)
            v = np.where(enhancing, 0.95, v)
        else:
            v = v - np.float32(0.12) * hyper_f - np.float32(0.3) * profile
            v = np.where(necrosis, 0.35 + 0.1 * tex, v)
            v = np.where(enhancing, 1.5 if m == "t1ce" else 0.72, v)
        vols[m] = v.astype(np.float32)
    # ---- scanner: gamma, bias, blur, Rician noise, scale + offset; then skull-strip
    bias = np.exp(sig.bias * g.smooth_field(rng, 3)).astype(np.float32)
    out: dict[str, np.ndarray] = {}
    for m in MODS:
        v = np.clip(vols[m], 0.0, None) ** np.float32(sig.gamma) * bias
        if sig.blur > 0.05:
            v = ndimage.gaussian_filter(v, sig.blur)
        n1 = rng.standard_normal(g.shape, dtype=np.float32) * np.float32(sig.noise)
        n2 = rng.standard_normal(g.shape, dtype=np.float32) * np.float32(sig.noise)
        v = np.sqrt((v + n1) ** 2 + n2**2)
        v = (v * np.float32(sig.scale) + np.float32(sig.offset)) * brain
        out[m] = v.astype(np.float32)
    return out, label


@dataclass
class SynthSummary:
    out: str
    sites: dict[str, int]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    seed: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def synthesize(
    out: str | os.PathLike[str],
    *,
    sites: int = 10,
    cases: int = 165,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SynthSummary:
    """Write a synthetic federation to ``out`` (see module docstring); returns what was written.

    ``spacing`` defaults to a 192 mm field of view over ``shape``. Sizes that are multiples of 16
    fit the default UNet without padding.
    """
    import time

    import nibabel as nib

    t0 = time.perf_counter()
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be three sizes of at least 16 voxels, got {shape}")
    spacing = tuple(float(s) for s in (spacing or [FIELD_OF_VIEW_MM / n for n in shape]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = site_case_counts(cases, sites)
    grid = _Grid(shape, spacing)
    affine = affine_for(shape, spacing)
    rows = []
    done = 0
    width = max(2, len(str(sites)))
    for si, n in enumerate(counts):
        site = f"site-{si + 1:0{width}d}"
        sig = site_signature(site, si, seed, len(counts))
        for k in range(n):
            case_id = f"SYN{si + 1:0{width}d}_{k + 1:03d}"
            rng = np.random.default_rng([seed, 2, si, k])
            vols, label = generate_case(grid, sig, rng)
            folder = out / site / case_id
            folder.mkdir(parents=True, exist_ok=True)
            for m, v in vols.items():
                img = nib.Nifti1Image(np.round(v).clip(0, 32767).astype(np.int16), affine)
                img.header.set_xyzt_units("mm", "sec")
                nib.save(img, str(folder / f"{case_id}_{m}.nii.gz"))
            seg = nib.Nifti1Image(label, affine)
            seg.header.set_xyzt_units("mm", "sec")
            nib.save(seg, str(folder / f"{case_id}_seg.nii.gz"))
            rows.append((case_id, site))
            done += 1
            if progress is not None:
                progress(done, cases)
    with (out / SITES_CSV).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case", "site"])
        w.writerows(rows)
    per_site = {f"site-{i + 1:0{width}d}": n for i, n in enumerate(counts)}
    return SynthSummary(
        out=str(out),
        sites=per_site,
        shape=shape,  # type: ignore[arg-type]
        spacing=spacing,  # type: ignore[arg-type]
        seed=seed,
        seconds=round(time.perf_counter() - t0, 2),
    )


def describe_signatures(n_sites: int, seed: int) -> list[dict]:
    """The scanner/cohort parameters each site gets (for reports and tests)."""
    width = max(2, len(str(n_sites)))
    return [asdict(site_signature(f"site-{i + 1:0{width}d}", i, seed, n_sites)) for i in range(n_sites)]
