"""Scoring as the study does it: Dice (MONAI ``DiceMetric``) on sigmoid > 0.5 per case, then the
mean over cases; a case with empty truth and empty prediction scores 1. HD95 (MONAI) beside it,
in mm. Whole volumes go through MONAI's sliding-window inferer with the training patch size.

Also the FLAIR-threshold baseline: the best single threshold on z-scored FLAIR, chosen on training
cases. A synthetic benchmark that this baseline solves is too easy to say anything.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from neurofed.edge_node.data import Case, load_case
from neurofed.models.config import Preprocessing
from neurofed.models.preprocess import IMAGE, LABEL


@dataclass
class EvalResult:
    """Mean Dice and HD95 over ``num_cases``; ``per_case`` maps case id -> {site, dice, hd95, ...}.

    HD95 is the mean over cases where it is defined (both masks non-empty); NaN if none is.
    """

    dice: float
    hd95: float
    per_case: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_cases: int = 0
    seconds: float = 0.0

    def per_site(self) -> dict[str, dict[str, float]]:
        return summarise_by_site(self.per_case)


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def summarise_by_site(per_case: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    sites: dict[str, list[dict[str, Any]]] = {}
    for rec in per_case.values():
        sites.setdefault(str(rec.get("site", "")), []).append(rec)
    return {
        s: {
            "dice": _nanmean([r["dice"] for r in recs]),
            "hd95": _nanmean([r["hd95"] for r in recs]),
            "num_cases": len(recs),
        }
        for s, recs in sorted(sites.items())
    }


def dice_hd95(
    pred: torch.Tensor,
    truth: torch.Tensor,
    spacing: Sequence[float] | None = None,
    *,
    hd95: bool = True,
) -> tuple[float, float]:
    """Dice and HD95 of two binary masks shaped (1, X, Y, Z) or (X, Y, Z).

    Dice uses ``DiceMetric(ignore_empty=False)``: both empty -> 1, one empty -> 0. HD95 is NaN
    when either mask is empty (undefined), never inf, and when ``hd95`` is False: a curve that
    plots only Dice need not pay for it (an untrained model's scattered voxels make HD95's
    surface search cost several times the forward pass).
    """
    from monai.metrics import DiceMetric, compute_hausdorff_distance

    p = pred.reshape((1, 1) + tuple(pred.shape[-3:])).float()
    t = truth.reshape((1, 1) + tuple(truth.shape[-3:])).float()
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    dice = float(metric(p, t).reshape(-1)[0])
    if not hd95 or p.sum() == 0 or t.sum() == 0:
        return dice, float("nan")
    sp = [float(s) for s in spacing] if spacing is not None else None
    with warnings.catch_warnings():
        # MONAI 1.5 passes its own deprecated ``always_return_as_numpy`` to ``get_mask_edges``
        # inside ``compute_hausdorff_distance``: nothing a caller can change, so not shown to users
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        hd95 = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=sp)
    hd = float(hd95.reshape(-1)[0])
    return dice, hd if math.isfinite(hd) else float("nan")


def spacing_of(tensor: torch.Tensor) -> tuple[float, float, float] | None:
    affine = getattr(tensor, "affine", None)
    if affine is None:
        return None
    a = torch.as_tensor(affine, dtype=torch.float64)[:3, :3]
    return tuple(float(v) for v in torch.sqrt((a**2).sum(dim=0)))  # type: ignore[return-value]


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int],
    *,
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    amp: bool = False,
) -> torch.Tensor:
    """Sliding-window logits for one (C, X, Y, Z) or (B, C, X, Y, Z) image, same spatial size out.

    MONAI's inferer pads to the window, so any volume size works with a patch that fits the UNet.
    """
    from monai.inferers import sliding_window_inference

    x = image if image.dim() == 5 else image.unsqueeze(0)
    x = x.as_tensor() if hasattr(x, "as_tensor") else x
    device = next(model.parameters()).device
    with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
        out = sliding_window_inference(
            x.to(device), tuple(roi_size), sw_batch_size, model, overlap=overlap, mode="gaussian"
        )
    out = out.as_tensor() if hasattr(out, "as_tensor") else out
    return out.float().cpu()


def evaluate_model(
    model: torch.nn.Module,
    items: Sequence[dict],
    roi_size: Sequence[int],
    *,
    threshold: float = 0.5,
    amp: bool = False,
    overlap: float = 0.25,
    hd95: bool = True,
) -> EvalResult:
    """Score ``model`` on preprocessed items ({image, label, case_id, site}) at sigmoid > threshold.

    ``hd95=False`` scores Dice only (HD95 NaN): for validation curves, which plot Dice."""
    import time

    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    per_case: dict[str, dict[str, Any]] = {}
    try:
        for item in items:
            logits = predict_logits(model, item[IMAGE], roi_size, amp=amp, overlap=overlap)[0]
            pred = (torch.sigmoid(logits) > threshold).float()
            truth = torch.as_tensor(item[LABEL]).float()
            sp = spacing_of(item[IMAGE])
            dice, hd = dice_hd95(pred, truth, sp, hd95=hd95)
            vox = float(np.prod(sp)) if sp else 1.0
            per_case[item["case_id"]] = {
                "site": item["site"],
                "dice": dice,
                "hd95": hd,
                "truth_ml": float(truth.sum()) * vox / 1000.0,
                "pred_ml": float(pred.sum()) * vox / 1000.0,
            }
    finally:
        model.train(was_training)
    return EvalResult(
        dice=_nanmean([r["dice"] for r in per_case.values()]),
        hd95=_nanmean([r["hd95"] for r in per_case.values()]),
        per_case=per_case,
        num_cases=len(per_case),
        seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- FLAIR threshold baseline


@dataclass
class BaselineResult:
    """The best single FLAIR threshold (z-score units) on training cases, scored on test cases."""

    threshold: float
    train_dice: float
    test: EvalResult


def _flair_items(cases: Sequence[Case], pre: Preprocessing) -> list[tuple[Case, torch.Tensor, torch.Tensor]]:
    from neurofed.edge_node.transforms import eval_transforms, to_monai

    flair_pre = Preprocessing(**{**pre.to_dict(), "modalities": ("flair",)})
    tf = eval_transforms(flair_pre)
    out = []
    for c in cases:
        d = tf(to_monai(load_case(c, ("flair",))))
        out.append((c, d[IMAGE][0], d[LABEL][0]))
    return out


def _dice_curve(flair: np.ndarray, truth: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Dice at every threshold at once, from two histograms (tumour and non-tumour voxels)."""
    edges = np.concatenate([[-np.inf], thresholds, [np.inf]])
    brain = flair != 0
    t = truth.astype(bool)
    pos = np.histogram(flair[t], bins=edges)[0]
    neg = np.histogram(flair[brain & ~t], bins=edges)[0]
    # voxels predicted positive at threshold k: those in bins above edge k+1 (value > thresholds[k])
    tp = np.cumsum(pos[::-1])[::-1][1:]
    fp = np.cumsum(neg[::-1])[::-1][1:]
    n_true = t.sum()
    denom = tp + fp + n_true
    return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 1.0)


def flair_threshold_baseline(
    train_cases: Sequence[Case],
    test_cases: Sequence[Case],
    pre: Preprocessing | None = None,
    thresholds: np.ndarray | None = None,
) -> BaselineResult:
    """Choose the z-scored FLAIR threshold with the best mean training Dice; score it on test cases
    with the same Dice/HD95 as the network. Brain voxels only (background is 0)."""
    if pre is None:  # the data's own grid: resampling 6 mm synthetic data to 1 mm helps nobody
        from neurofed.edge_node.data import native_spacing

        pre = Preprocessing(spacing=native_spacing(train_cases))
    grid = thresholds if thresholds is not None else np.round(np.arange(-1.0, 6.0001, 0.05), 3)
    train = _flair_items(train_cases, pre)
    curves = np.stack([_dice_curve(f.numpy(), lab.numpy(), grid) for _, f, lab in train])
    mean_curve = curves.mean(axis=0)
    k = int(np.argmax(mean_curve))
    thr = float(grid[k])
    per_case: dict[str, dict[str, Any]] = {}
    for case, f, lab in _flair_items(test_cases, pre):
        pred = ((f > thr) & (f != 0)).float()
        sp = spacing_of(f) or tuple(pre.spacing)
        dice, hd = dice_hd95(pred, lab, sp)
        per_case[case.case_id] = {"site": case.site, "dice": dice, "hd95": hd}
    test = EvalResult(
        dice=_nanmean([r["dice"] for r in per_case.values()]),
        hd95=_nanmean([r["hd95"] for r in per_case.values()]),
        per_case=per_case,
        num_cases=len(per_case),
    )
    return BaselineResult(threshold=thr, train_dice=float(mean_curve[k]), test=test)
