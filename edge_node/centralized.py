"""The centralized (all sites pooled) and single-site arms: train, checkpoint, resume, score.

``train_arm`` reads the federation's ``splits.json`` (creating it once if absent), trains on the
chosen sites' training cases and scores the final model on the held-out test cases of *every*
site, so all arms (and federated runs) are compared on the same cases.

Training checkpoints are safetensors: weights under ``model.*``, the optimiser's tensors under
``optim.<param>.<name>``, and epoch, configs and param groups as JSON metadata. No pickle, and a
resumed run repeats exactly what the uninterrupted run would have done (epochs are seeded).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from neurofed.edge_node.data import Case, discover_cases, training_spacing
from neurofed.edge_node.errors import TrainingError
from neurofed.edge_node.splits import load_or_create_splits, select, splits_path_for
from neurofed.edge_node.training import CaseTrainer, TrainConfig
from neurofed.models.checkpoint import TRAIN_CHECKPOINT_FORMAT
from neurofed.models.config import ModelConfig, preset
from neurofed.scans import DataReport, ScanError

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "model.safetensors"
METRICS = "metrics.json"
_FORMAT = TRAIN_CHECKPOINT_FORMAT


def auto_patch_size(shape: Sequence[int], multiple: int, cap: int = 64) -> tuple[int, int, int]:
    """The largest patch up to ``cap`` per axis that covers the volume and fits the UNet."""
    return tuple(min(cap, int(math.ceil(int(s) / multiple) * multiple)) for s in shape)  # type: ignore[return-value]


def model_config_for(
    cases: Sequence[Case],
    size: str = "default",
    modalities: Sequence[str] = ("flair",),
    patch_size: Sequence[int] | None = None,
    *,
    spacing: Sequence[float] | None = None,
    label_ml: dict[str, float] | None = None,
) -> ModelConfig:
    """A model preset whose preprocessing matches the training ``cases``: the spacing rule
    (median per RAS axis, :mod:`neurofed.scans.spacing`) unless ``spacing`` is given, and a patch
    that fits the median resampled volume. The spacing's spread and the training label volumes
    (``label_ml``: min/median/max ml) are recorded in ``training_data``."""
    from neurofed.models.unet import required_multiple

    summary = training_spacing(cases)
    chosen = tuple(float(v) for v in spacing) if spacing is not None else summary.median
    if spacing is None:
        log.info("training spacing %s", summary.describe())
    else:
        log.info("training spacing %s mm as given; the cases' own: %s", chosen, summary.describe())
    if summary.uneven:
        log.warning(
            "the training cases' spacings differ a lot (%s); every case is resampled to %s mm",
            summary.describe(),
            "x".join(f"{v:g}" for v in chosen),
        )
    cfg = preset(size, modalities=tuple(modalities), spacing=chosen)
    if patch_size is None:
        patch_size = auto_patch_size(_median_resampled_shape(cases, chosen), required_multiple(cfg))
    cfg = preset(
        size, modalities=tuple(modalities), spacing=chosen, patch_size=tuple(int(p) for p in patch_size)
    )
    return cfg.with_training_data(spacing=summary.to_dict(), label_ml=label_ml)


def _median_resampled_shape(cases: Sequence[Case], spacing: Sequence[float]) -> tuple[int, int, int]:
    """The median RAS extent of the cases in voxels of ``spacing`` (headers only)."""
    import nibabel as nib
    import numpy as np
    from nibabel.orientations import io_orientation

    from neurofed.scans.spacing import ras_spacing

    sizes = []
    for c in cases:
        path = c.image4d or c.unnamed or next(iter(c.images.values()), None)
        if path is None:
            continue
        img = nib.load(str(path))
        ornt = io_orientation(img.affine)
        shape_ras = [0, 0, 0]
        for i, (axis, _flip) in enumerate(ornt[:3]):
            shape_ras[int(axis)] = int(img.shape[i])
        sp = ras_spacing(img.affine)
        sizes.append([round(n * s / t) for n, s, t in zip(shape_ras, sp, spacing, strict=True)])
    return tuple(int(v) for v in np.median(np.asarray(sizes), axis=0))  # type: ignore[return-value]


def preflight(
    data: str | os.PathLike[str], modalities: Sequence[str] = ("flair",), *, progress: bool = False
) -> DataReport:
    """Check every case of the federation as training reads it (every problem at once)."""
    from neurofed.scans import check

    if not progress:
        return check(data, modalities=tuple(modalities), with_label=True)
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("checking cases", total=None)
        return check(
            data,
            modalities=tuple(modalities),
            with_label=True,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    model_config: ModelConfig,
    train_config: TrainConfig,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Weights + optimiser state + epoch + configs in one safetensors file (atomic write)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()
    }
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in opt["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    meta = {
        "format": _FORMAT,
        "epoch": str(int(epoch)),
        "model_config": model_config.to_json(),
        "train_config": json.dumps(train_config.to_dict(), sort_keys=True),
        "param_groups": json.dumps(opt["param_groups"]),
        "optim_scalars": json.dumps(scalars),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """{model_state, optim_state, epoch, model_config, train_config, extra} from ``save_checkpoint``."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TrainingError(
            f"{path}: not a readable training checkpoint ({exc}); delete it to start over"
        ) from None
    if meta.get("format") != _FORMAT:
        raise TrainingError(f"{path}: not a neurofed training checkpoint (format {meta.get('format')!r})")
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, values in json.loads(meta["optim_scalars"]).items():
        state.setdefault(int(pid), {}).update(values)
    groups = json.loads(meta["param_groups"])
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {
        "model_state": model_state,
        "optim_state": {"state": state, "param_groups": groups},
        "epoch": int(meta["epoch"]),
        "model_config": ModelConfig.from_json(meta["model_config"]),
        "train_config": TrainConfig.from_dict(json.loads(meta["train_config"])),
        "extra": json.loads(meta.get("extra", "{}")),
    }


# --------------------------------------------------------------------------- arms


def resolve_cases(
    data: str | os.PathLike[str], *, split_seed: int = 0
) -> tuple[list[Case], dict[str, Any], Path]:
    """All cases of the federation and its splits (created next to sites.csv if absent)."""
    data = Path(data)
    cases = discover_cases(data)
    split_file = splits_path_for(data)
    splits = load_or_create_splits(split_file, cases, seed=split_seed)
    return cases, splits, split_file


def train_arm(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    epochs: int,
    sites: Sequence[str] | None = None,
    model_size: str = "default",
    modalities: Sequence[str] = ("flair",),
    train_config: TrainConfig | None = None,
    resume: bool = False,
    device: str = "auto",
    show_progress: bool = True,
    model_config: ModelConfig | None = None,
) -> dict[str, Any]:
    """Train the pooled arm (``sites`` None) or a subset, checkpoint every epoch, then write
    ``model.safetensors`` and ``metrics.json`` (Dice/HD95 per case, per site, overall on test)."""
    from neurofed.models.checkpoint import save_weights

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tc = train_config or TrainConfig()
    report = preflight(data, modalities, progress=show_progress)
    for w in report.warnings:
        log.warning("%s", w.line())
    if not report.ok:
        raise ScanError(report.problems)
    cases, splits, split_file = resolve_cases(data, split_seed=tc.split_seed)
    all_sites = sorted({c.site for c in cases})
    chosen = list(sites) if sites else all_sites
    unknown = sorted(set(chosen) - set(all_sites))
    if unknown:
        raise TrainingError(f"unknown site(s) {', '.join(unknown)}; the data has {', '.join(all_sites)}")
    by_split = {
        "train": select(cases, splits, "train", chosen),
        "val": select(cases, splits, "val", chosen),
        "test": select(cases, splits, "test"),  # every site's held-out cases, whatever the arm
    }
    ckpt_path = out / CHECKPOINT
    start_epoch = 0
    ckpt = None
    if resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        model_config = ckpt["model_config"]
        if ckpt["train_config"] != tc:
            log.warning("resuming with the checkpoint's training settings, not the ones given")
        tc = ckpt["train_config"]
        start_epoch = ckpt["epoch"]
    elif model_config is None:
        train_ids = {c.case_id for c in by_split["train"]}
        volumes = [c.label_ml for c in report.good if c.case in train_ids and c.label_ml is not None]
        label_ml = (
            {
                "min": min(volumes),
                "median": statistics.median(volumes),
                "max": max(volumes),
                "cases": len(volumes),
            }
            if volumes
            else None
        )
        model_config = model_config_for(by_split["train"] or cases, model_size, modalities, label_ml=label_ml)
    trainer = CaseTrainer(by_split, model_config, tc, device)
    torch.manual_seed(tc.seed)
    model = trainer.model()
    optimizer = trainer.make_optimizer(model)
    if ckpt is not None:
        model.load_state_dict(ckpt["model_state"], strict=True)
        optimizer.load_state_dict(ckpt["optim_state"])
        trainer.epochs_done = start_epoch
    arm = "centralized" if sorted(chosen) == all_sites else ("single-site" if len(chosen) == 1 else "subset")

    def save(epoch: int, loss: float) -> None:
        save_checkpoint(ckpt_path, model, optimizer, epoch, model_config, tc, {"loss": loss, "sites": chosen})

    remaining = max(0, epochs - start_epoch)
    loss = float("nan")
    if remaining:
        with _progress_bar(show_progress, f"train {arm} ({len(by_split['train'])} cases)") as bar:
            loss = trainer.run_epochs(
                model,
                optimizer,
                remaining,
                start_epoch=start_epoch,
                progress=bar,
                on_epoch_end=save,
                scaler=trainer.make_scaler(),
            )
    save_weights(
        out / WEIGHTS, model.state_dict(), model_config, {"epochs": epochs, "sites": chosen, "arm": arm}
    )
    result = trainer.evaluate_module(model, "test")
    metrics = {
        "arm": arm,
        "sites": chosen,
        "epochs": epochs,
        "train_cases": len(by_split["train"]),
        "test_cases": result.num_cases,
        "splits": str(split_file),
        "model_config": model_config.to_dict(),
        "train_config": tc.to_dict(),
        "final_loss": loss,
        "overall": {"dice": result.dice, "hd95": result.hd95},
        "per_site": result.per_site(),
        "per_case": result.per_case,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / METRICS).write_text(json.dumps(_json_safe(metrics), indent=2, sort_keys=True) + "\n")
    return metrics


def _json_safe(obj: Any) -> Any:
    """NaN is not JSON: undefined HD95 (an empty mask) is written as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


class _progress_bar:
    """A rich progress bar as a ``Progress`` callback, or a no-op."""

    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled, self.label = enabled, label
        self._progress = None
        self._task = None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
        )
        self._progress.start()
        self._task = self._progress.add_task(self.label, total=None, loss="-")

        def update(step: int, total: int, loss: float) -> None:
            self._progress.update(self._task, completed=step, total=total, loss=f"{loss:.3f}")

        return update

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
