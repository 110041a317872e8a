"""Local training and evaluation of the 3D-UNet on one site's (or several sites') cases.

``LocalTrainer`` is the interface the federated edge agent builds on (and the centralized and
single-site arms too, through :class:`CaseTrainer`):

    trainer = LocalTrainer(Path("data/site-01"), model_config, TrainConfig(), device="auto")
    result = trainer.train(global_state, epochs=1, prox_mu=0.0)      # -> TrainResult
    scores = trainer.evaluate(global_state, split="val")              # -> EvalResult

Preprocessed cases are cached in memory on first use, so a site stays warm between rounds. Every
epoch is seeded from (seed, epoch index), so a run resumed from a checkpoint repeats the exact
patches, augmentations and order the uninterrupted run would have used.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neurofed.edge_node.data import Case, discover_cases, load_case
from neurofed.edge_node.errors import TrainingError
from neurofed.edge_node.evaluation import EvalResult, evaluate_model
from neurofed.edge_node.privacy import DPStep
from neurofed.edge_node.splits import load_or_create_splits, select, splits_path_for
from neurofed.models.config import ModelConfig
from neurofed.models.preprocess import IMAGE, LABEL
from neurofed.wire.payload import OPTIMIZER_PREFIX, OPTIMIZER_STEP

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]
"""Called after every optimiser step with (step, total steps, running mean loss)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimiser and sampling settings. ``patch_size`` None means the model's preprocessing patch."""

    lr: float = 2e-3
    weight_decay: float = 1e-5
    batch_size: int = 2
    num_samples: int = 2
    pos: float = 1.0
    neg: float = 1.0
    augment: bool = True
    seed: int = 0
    split_seed: int = 0
    patch_size: tuple[int, int, int] | None = None
    amp: bool = True
    sw_overlap: float = 0.25

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known})


@dataclass
class TrainResult:
    """Weights after local training (CPU tensors), the cases they saw, mean loss, wall time."""

    state_dict: dict[str, torch.Tensor]
    num_cases: int
    loss: float
    seconds: float
    steps: int = 0  # optimiser steps taken (FedNova normalises by it)
    optimizer_state: dict[str, torch.Tensor] | None = None  # continue-global: Adam's by name


def adam_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's moments by parameter name and its step count, in the payload's naming
    (``neurofed.wire.payload.OPTIMIZER_PREFIX``): names, not positions, so a coordinator can average them."""
    out: dict[str, torch.Tensor] = {}
    step = 0.0
    for name, p in model.named_parameters():
        st = optimizer.state.get(p) or {}
        for m in ("exp_avg", "exp_avg_sq"):
            v = st.get(m)
            out[f"{OPTIMIZER_PREFIX}{m}/{name}"] = (
                v.detach().to("cpu", torch.float32).clone()
                if v is not None
                else torch.zeros_like(p, device="cpu")
            )
        if "step" in st:
            step = max(step, float(st["step"]))
    out[OPTIMIZER_STEP] = torch.tensor([step], dtype=torch.float32)
    return out


def load_adam_tensors(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor]
) -> None:
    """Start ``optimizer`` (a fresh Adam over ``model``) from the federation's averaged state."""
    try:
        step = float(torch.as_tensor(tensors[OPTIMIZER_STEP]).reshape(-1)[0])
        for name, p in model.named_parameters():
            moments = {
                m: torch.as_tensor(tensors[f"{OPTIMIZER_PREFIX}{m}/{name}"]).to(p.device, p.dtype).clone()
                for m in ("exp_avg", "exp_avg_sq")
            }
            if any(v.shape != p.shape for v in moments.values()):
                raise TrainingError(f"optimiser state for {name} does not fit the model ({p.shape})")
            optimizer.state[p] = {"step": torch.tensor(step, dtype=torch.float32), **moments}
    except KeyError as exc:
        raise TrainingError(f"the model's optimiser state lacks {exc}") from None


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate (a schedule's step, also after loading a kept
    optimiser state, which carries the previous round's rate)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def memory_format_for(device: torch.device) -> torch.memory_format:
    """Channels-last (NDHWC) on CPU: oneDNN's 3-D convolution backward, most of a step in
    PyTorch's default NCDHW, runs far faster on it (one thread, batch 2, 64^3 on this 2-core
    machine: small UNet 0.32 -> 0.16 s a step, default UNet 0.41 -> 0.32 s; no gain at batch 1;
    ``benchmarks/train_step.py``). CUDA keeps the default layout: not measured there."""
    return torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format


def set_torch_threads() -> None:
    """One thread unless told otherwise: processes share the CPU (2 threads each slow 5-8x)."""
    n = int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
    torch.set_num_threads(max(1, n))


class CaseTrainer:
    """Train and evaluate on explicit case lists per split (the engine behind every arm)."""

    def __init__(
        self,
        cases: Mapping[str, Sequence[Case]],
        model_config: ModelConfig,
        train_config: TrainConfig | None = None,
        device: str | torch.device = "auto",
    ) -> None:
        self.cases = {k: list(v) for k, v in cases.items()}
        self.model_config = model_config
        self.train_config = train_config or TrainConfig()
        self.device = resolve_device(device)
        self.amp = bool(self.train_config.amp and self.device.type == "cuda")
        self.memory_format = memory_format_for(self.device)
        pre = model_config.preprocessing
        self.patch_size = tuple(self.train_config.patch_size or pre.patch_size)
        from neurofed.models.unet import check_spatial_size

        check_spatial_size(self.patch_size, model_config, where="patch size")
        self._train_cache: list[dict] | None = None
        self._eval_cache: dict[str, list[dict]] = {}
        self._model: torch.nn.Module | None = None
        self.epochs_done = 0  # epochs trained by this object: seeds the next epoch
        self._batch_offset = 0  # batches of epoch ``epochs_done`` already trained (fractional rounds)
        self._epoch_cache: tuple[int, list] | None = None  # that epoch's batches, while it lasts
        self._step_credit = 0.0  # fractional rounds: the part of a step not yet taken
        self._optimizer_state: dict | None = None  # LocalTrainer.train(keep_optimizer=True)

    # ------------------------------------------------------------------ caches
    @property
    def num_train_cases(self) -> int:
        return len(self.cases.get("train", []))

    def _load(self, case: Case) -> dict:
        from neurofed.edge_node.transforms import to_monai

        loaded = load_case(case, self.model_config.modalities, with_label=True)
        d = to_monai(loaded)
        d["case_id"], d["site"] = case.case_id, case.site
        return d

    def train_items(self) -> list[dict]:
        if self._train_cache is None:
            from neurofed.edge_node.transforms import deterministic_transforms

            tf = deterministic_transforms(self.model_config.preprocessing, self.patch_size)
            items = []
            for case in self.cases.get("train", []):
                d = self._load(case)
                out = tf({IMAGE: d[IMAGE], LABEL: d[LABEL]})
                items.append(
                    {IMAGE: out[IMAGE], LABEL: out[LABEL], "case_id": case.case_id, "site": case.site}
                )
            self._warn_if_resampled(items)
            self._train_cache = items
        return self._train_cache

    def eval_items(self, split: str) -> list[dict]:
        if split not in self._eval_cache:
            from neurofed.edge_node.transforms import eval_transforms

            tf = eval_transforms(self.model_config.preprocessing)
            items = []
            for case in self.cases.get(split, []):
                d = self._load(case)
                out = tf({IMAGE: d[IMAGE], LABEL: d[LABEL]})
                items.append(
                    {IMAGE: out[IMAGE], LABEL: out[LABEL], "case_id": case.case_id, "site": case.site}
                )
            self._eval_cache[split] = items
        return self._eval_cache[split]

    def _warn_if_resampled(self, items: list[dict]) -> None:
        if items:
            n = math.prod(items[0][IMAGE].shape[1:])
            if n > 8 * 128**3:
                log.warning(
                    "preprocessed volumes hold %d voxels each: is the model's spacing %s much finer "
                    "than the data's? Use edge_node.data.native_spacing()",
                    n,
                    self.model_config.preprocessing.spacing,
                )

    # ------------------------------------------------------------------ model
    def model(self) -> torch.nn.Module:
        if self._model is None:
            from neurofed.models.unet import build_unet

            self._model = build_unet(self.model_config).to(self.device, memory_format=self.memory_format)
        return self._model

    def load_state(self, state_dict: Mapping[str, torch.Tensor] | None) -> torch.nn.Module:
        model = self.model()
        if state_dict is not None:
            try:
                model.load_state_dict({k: torch.as_tensor(v) for k, v in state_dict.items()}, strict=True)
            except RuntimeError as exc:
                raise TrainingError(
                    f"weights do not fit the model config {self.model_config.digest()}: {exc}"
                ) from None
        return model

    def make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """Adam at the configured rate; :func:`set_lr` rescales it per round or epoch."""
        tc = self.train_config
        return torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)

    # ------------------------------------------------------------------ training
    def _epoch_batches(self, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """All batches of epoch ``epoch``, drawn from an RNG seeded by (seed, epoch)."""
        from neurofed.edge_node.transforms import random_transforms

        items = self.train_items()
        tc = self.train_config
        rng = np.random.default_rng([tc.seed, epoch])
        covers = all(
            int(s) <= int(p) for s, p in zip(items[0][IMAGE].shape[1:], self.patch_size, strict=True)
        )
        ns = 1 if covers else tc.num_samples  # a patch that covers the volume gains nothing from repeats
        tf = random_transforms(self.patch_size, num_samples=ns, augment=tc.augment, pos=tc.pos, neg=tc.neg)
        tf.set_random_state(seed=int(rng.integers(2**31 - 1)))
        patches: list[dict] = []
        for i in rng.permutation(len(items)):
            out = tf({IMAGE: items[i][IMAGE], LABEL: items[i][LABEL]})
            patches.extend(out if isinstance(out, list) else [out])
        batches = []
        bs = max(1, tc.batch_size)
        for j in range(0, len(patches), bs):
            group = patches[j : j + bs]
            x = torch.stack([torch.as_tensor(p[IMAGE]).as_subclass(torch.Tensor) for p in group])
            y = torch.stack([torch.as_tensor(p[LABEL]).as_subclass(torch.Tensor) for p in group])
            batches.append((x, y))
        return batches

    def run_epochs(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        epochs: int,
        *,
        start_epoch: int = 0,
        prox_mu: float = 0.0,
        progress: Progress | None = None,
        scaler: Any = None,
        on_epoch_end: Callable[[int, float], None] | None = None,
    ) -> float:
        """Train ``epochs`` epochs numbered from ``start_epoch``; return the mean loss of the last."""
        step_fn = self._stepper(model, optimizer, prox_mu, scaler)
        n_per_epoch = len(self._epoch_batches_count())
        total = n_per_epoch * epochs
        step = 0
        last = float("nan")
        model.train()
        for e in range(start_epoch, start_epoch + epochs):
            torch.manual_seed(self.train_config.seed * 100003 + e)
            losses = []
            for x, y in self._epoch_batches(e):
                losses.append(step_fn(x, y))
                step += 1
                if progress is not None:
                    progress(step, total, float(np.mean(losses)))
            last = float(np.mean(losses)) if losses else float("nan")
            self.epochs_done = e + 1
            self._batch_offset = 0
            if on_epoch_end is not None:
                on_epoch_end(e + 1, last)
        return last

    def run_steps(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        steps: int,
        *,
        prox_mu: float = 0.0,
        progress: Progress | None = None,
        scaler: Any = None,
    ) -> float:
        """Train ``steps`` batches from where this trainer stopped (epoch, batch), across epoch
        boundaries; return their mean loss. A round of a fraction of an epoch (``--local-epochs
        0.5``) goes on through the epoch's patches where the previous round left off, so two
        half-epoch rounds see exactly the batches of one epoch."""
        step_fn = self._stepper(model, optimizer, prox_mu, scaler)
        model.train()
        losses = []
        for _ in range(steps):
            e, j = self.epochs_done, self._batch_offset
            if self._epoch_cache is None or self._epoch_cache[0] != e:
                self._epoch_cache = (e, self._epoch_batches(e))
            batches = self._epoch_cache[1]
            if j == 0:
                torch.manual_seed(self.train_config.seed * 100003 + e)
            x, y = batches[j]
            losses.append(step_fn(x, y))
            if progress is not None:
                progress(len(losses), steps, float(np.mean(losses)))
            if j + 1 >= len(batches):
                self.epochs_done, self._batch_offset, self._epoch_cache = e + 1, 0, None
            else:
                self._batch_offset = j + 1
        return float(np.mean(losses)) if losses else float("nan")

    def _stepper(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, prox_mu: float, scaler: Any
    ) -> Callable[[torch.Tensor, torch.Tensor], float]:
        """One optimiser step on a batch (DiceCE, FedProx's term when ``prox_mu``): the loop body
        of ``run_epochs`` and ``run_steps``."""
        from monai.losses import DiceCELoss

        if not self.cases.get("train"):
            raise TrainingError("no training cases: check the site folder and splits.json")
        loss_fn = DiceCELoss(sigmoid=True)
        anchor = [p.detach().clone() for p in model.parameters()] if prox_mu > 0 else None

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            x, y = x.to(self.device, memory_format=self.memory_format), y.to(self.device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, enabled=self.amp):
                loss = loss_fn(model(x), y)
            if anchor is not None:  # FedProx: stay near the weights the round started from
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                loss = loss + 0.5 * prox_mu * prox
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            return float(loss.detach())

        return step

    def run_dp_steps(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        dp: DPStep,
        *,
        progress: Progress | None = None,
    ) -> float:
        """``dp.steps`` DP-SGD steps: each Poisson-samples the training cases at ``dp.sample_rate``
        (secret randomness) and takes one crop of each sampled case (the privacy unit is the
        patient), in physical batches of at most ``batch_size``; Opacus clips every crop's gradient
        and adds the noise. Returns the mean loss over the round's crops. No mixed precision."""
        from monai.losses import DiceCELoss

        from neurofed.edge_node.privacy import PrivateStep, secret_rng
        from neurofed.edge_node.transforms import random_transforms

        items = self.train_items()
        if not items:
            raise TrainingError("no training cases: check the site folder and splits.json")
        tc = self.train_config
        loss_fn = DiceCELoss(sigmoid=True)
        tf = random_transforms(self.patch_size, num_samples=1, augment=tc.augment, pos=tc.pos, neg=tc.neg)
        crops_rng = np.random.default_rng([tc.seed, 0xD9, self.epochs_done])
        sampler = secret_rng()
        bs = max(1, tc.batch_size)
        private = PrivateStep(model, optimizer, dp, expected_batch_size=dp.sample_rate * len(items))
        model.train()
        losses: list[float] = []
        try:
            for i in range(dp.steps):
                chosen = np.flatnonzero(sampler.random(len(items)) < dp.sample_rate)
                tf.set_random_state(seed=int(crops_rng.integers(2**31 - 1)))
                crops = []
                for j in chosen:
                    out = tf({IMAGE: items[j][IMAGE], LABEL: items[j][LABEL]})
                    crops.append(out[0] if isinstance(out, list) else out)
                chunks = []
                for k in range(0, len(crops), bs):
                    group = crops[k : k + bs]
                    x = torch.stack([torch.as_tensor(p[IMAGE]).as_subclass(torch.Tensor) for p in group])
                    y = torch.stack([torch.as_tensor(p[LABEL]).as_subclass(torch.Tensor) for p in group])
                    chunks.append((x.to(self.device, memory_format=self.memory_format), y.to(self.device)))
                loss = private.step(chunks, loss_fn)
                if math.isfinite(loss):
                    losses.append(loss)
                if progress is not None:
                    progress(i + 1, dp.steps, float(np.mean(losses)) if losses else math.nan)
        finally:
            private.close()
        self.epochs_done += 1  # a DP round draws fresh crops next time
        return float(np.mean(losses)) if losses else math.nan

    def _epoch_batches_count(self) -> range:
        items = self.train_items()
        covers = all(
            int(s) <= int(p) for s, p in zip(items[0][IMAGE].shape[1:], self.patch_size, strict=True)
        )
        ns = 1 if covers else self.train_config.num_samples
        return range(math.ceil(len(items) * ns / max(1, self.train_config.batch_size)))

    def make_scaler(self) -> Any:
        return torch.amp.GradScaler("cuda") if self.amp else None

    # ------------------------------------------------------------------ evaluation
    def evaluate_module(
        self, model: torch.nn.Module, split: str = "test", *, hd95: bool = True
    ) -> EvalResult:
        items = self.eval_items(split)
        if not items:
            return EvalResult(dice=float("nan"), hd95=float("nan"), per_case={}, num_cases=0)
        return evaluate_model(
            model,
            items,
            self.patch_size,
            threshold=self.model_config.preprocessing.threshold,
            amp=self.amp,
            overlap=self.train_config.sw_overlap,
            hd95=hd95,
        )


class LocalTrainer(CaseTrainer):
    """One site's trainer for federated rounds (and the single-site arm).

    ``site_dir`` is ``DATA/<site>`` as ``neurofed synth`` writes it (or any folder layout that
    :func:`edge_node.data.discover_cases` reads); the split comes from ``DATA/splits.json`` (or
    ``site_dir/splits.json`` for a lone site folder), created deterministically if absent.
    The model config's preprocessing spacing should match the data (see ``native_spacing``).
    """

    def __init__(
        self,
        site_dir: str | os.PathLike[str],
        model_config: ModelConfig,
        train_config: TrainConfig | None = None,
        device: str | torch.device = "auto",
    ) -> None:
        site_dir = Path(site_dir)
        tc = train_config or TrainConfig()
        cases = discover_cases(site_dir)
        splits_file = splits_path_for(site_dir)
        root_cases = cases
        if splits_file.parent != site_dir and not splits_file.is_file():
            root_cases = discover_cases(splits_file.parent)  # the whole federation's split, once
        splits = load_or_create_splits(splits_file, root_cases, seed=tc.split_seed, check=False)
        site_ids = sorted({c.site for c in cases})
        by_split = {name: select(cases, splits, name, site_ids) for name in ("train", "val", "test")}
        if not any(by_split.values()):
            raise TrainingError(
                f"{site_dir}: none of its {len(cases)} cases is listed in {splits_file}; "
                "was the data regenerated? delete the stale splits.json"
            )
        super().__init__(by_split, model_config, tc, device)
        self.site_dir = site_dir
        self.sites = site_ids
        # which validation cases this site scores on: the registry compares two runs' Dice only
        # when they were scored on the same cases
        import hashlib

        val_ids = "\n".join(sorted(f"{c.site}/{c.case_id}" for c in by_split["val"]))
        self.splits_digest = hashlib.sha256(val_ids.encode()).hexdigest()

    def train(
        self,
        state_dict: Mapping[str, torch.Tensor] | None,
        epochs: float,
        *,
        prox_mu: float = 0.0,
        progress: Progress | None = None,
        keep_optimizer: bool = False,
        lr_scale: float = 1.0,
        optimizer_state: Mapping[str, torch.Tensor] | None = None,
        export_optimizer: bool = False,
        dp: DPStep | None = None,
    ) -> TrainResult:
        """Start from ``state_dict`` (None: fresh weights), train ``epochs`` local epochs, return
        the new weights. A fraction (``0.5``: half the epoch's batches) continues through the
        epoch where the previous call stopped (see ``run_steps``).

        The optimiser is fresh each call (the federated convention) unless ``keep_optimizer``:
        then Adam's moments and step count carry over from this trainer's previous call (OpenFL's
        ``continue-local``), so a new round does not restart with Adam's large bias-corrected
        first steps. They live in memory only: a restarted site starts its next round fresh.
        ``prox_mu`` > 0 adds FedProx's (mu/2)·||w - w_start||² to the loss. ``lr_scale`` multiplies
        the configured learning rate for this call (the coordinator's ``--lr-schedule``).
        ``optimizer_state`` (continue-global: the federation's averaged Adam state, by parameter
        name) starts Adam from it; ``export_optimizer`` returns Adam's state after training in
        ``TrainResult.optimizer_state`` for the coordinator to average.
        ``dp`` trains the round with DP-SGD instead (``run_dp_steps``: ``dp.steps`` Poisson-sampled
        steps, per-sample clipping, Gaussian noise); the caller's accountant has counted them.
        """
        if not (math.isfinite(lr_scale) and 0 < lr_scale <= 10):
            raise TrainingError(f"lr_scale must be in (0, 10], got {lr_scale}")
        if not (math.isfinite(epochs) and epochs > 0):
            raise TrainingError(f"epochs must be a positive number, got {epochs}")
        t0 = time.perf_counter()
        model = self.load_state(state_dict)
        optimizer = self.make_optimizer(model)
        if keep_optimizer and self._optimizer_state is not None:
            optimizer.load_state_dict(self._optimizer_state)
        if optimizer_state:
            load_adam_tensors(model, optimizer, optimizer_state)
        set_lr(optimizer, self.train_config.lr * lr_scale)
        if not self.cases.get("train"):
            raise TrainingError("no training cases: check the site folder and splits.json")
        per_epoch = len(self._epoch_batches_count())
        if dp is not None:
            if prox_mu > 0:
                raise TrainingError("DP-SGD does not take FedProx's proximal term; use another strategy")
            steps = dp.steps
            loss = self.run_dp_steps(model, optimizer, dp, progress=progress)
        elif float(epochs).is_integer() and self._batch_offset == 0:
            steps = int(epochs) * per_epoch
            loss = self.run_epochs(
                model,
                optimizer,
                int(epochs),
                start_epoch=self.epochs_done,
                prox_mu=prox_mu,
                progress=progress,
                scaler=self.make_scaler(),
            )
        else:
            # whole steps, the fractions carried over: two 0.5 rounds train exactly one epoch
            credit = self._step_credit + epochs * per_epoch
            steps = max(1, math.floor(credit + 1e-9))
            self._step_credit = credit - steps
            loss = self.run_steps(
                model, optimizer, steps, prox_mu=prox_mu, progress=progress, scaler=self.make_scaler()
            )
        # the default layout leaves the trainer: the update's bytes do not depend on the device
        state = {
            k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
            for k, v in model.state_dict().items()
        }
        self._optimizer_state = optimizer.state_dict() if keep_optimizer else None
        return TrainResult(
            state_dict=state,
            num_cases=self.num_train_cases,
            loss=loss,
            seconds=time.perf_counter() - t0,
            steps=steps,
            optimizer_state=adam_tensors(model, optimizer) if export_optimizer else None,
        )

    def evaluate(self, state_dict: Mapping[str, torch.Tensor] | None, split: str = "val") -> EvalResult:
        """Score ``state_dict`` on this site's ``split`` cases (val, test or train)."""
        return self.evaluate_module(self.load_state(state_dict), split)
