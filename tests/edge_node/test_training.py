"""LocalTrainer interface, exact checkpoints and resume, and a tiny model that learns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from neurofed.cli import main
from neurofed.edge_node.centralized import load_checkpoint, save_checkpoint, train_arm
from neurofed.edge_node.data import discover_cases
from neurofed.edge_node.evaluation import EvalResult, dice_hd95, flair_threshold_baseline
from neurofed.edge_node.splits import load_or_create_splits, select
from neurofed.edge_node.training import LocalTrainer, TrainConfig, TrainResult
from neurofed.models.checkpoint import load_weights


def test_dice_definition() -> None:
    empty = torch.zeros(8, 8, 8)
    assert dice_hd95(empty, empty)[0] == 1.0  # empty truth + empty prediction = 1
    one = empty.clone()
    one[2:4, 2:4, 2:4] = 1
    d, hd = dice_hd95(one, empty)
    assert d == 0.0 and np.isnan(hd)
    d, hd = dice_hd95(one, one, (2.0, 2.0, 2.0))
    assert d == pytest.approx(1.0) and hd == pytest.approx(0.0)


def test_splits_deterministic_and_cover_every_site(synth_data: Path, tmp_path: Path) -> None:
    cases = discover_cases(synth_data)
    a = load_or_create_splits(synth_data / "splits.json", cases)
    b = load_or_create_splits(tmp_path / "splits.json", cases)  # recomputed elsewhere: identical
    assert a["sites"] == b["sites"]
    for site, parts in a["sites"].items():
        assert parts["test"] and parts["train"], site
    assert len(select(cases, a, "test")) == 3


@pytest.mark.slow
def test_local_trainer_interface(synth_data: Path, synth_tiny_config) -> None:
    trainer = LocalTrainer(synth_data / "site-02", synth_tiny_config, TrainConfig(), device="cpu")
    assert trainer.num_train_cases == 2 and trainer.sites == ["site-02"]
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in trainer.model().state_dict().items()}
    res = trainer.train(start, epochs=4)
    assert isinstance(res, TrainResult) and res.num_cases == 2 and np.isfinite(res.loss) and res.seconds > 0
    assert res.state_dict.keys() == start.keys()
    assert any(not torch.equal(res.state_dict[k], start[k]) for k in start)
    prox = trainer.train(start, epochs=4, prox_mu=1000.0)

    def dist(sd):
        return sum(
            float(((sd[k].float() - start[k].float()) ** 2).sum()) for k in start if sd[k].is_floating_point()
        )

    assert dist(prox.state_dict) < dist(res.state_dict)  # FedProx pulls towards the start
    ev = trainer.evaluate(res.state_dict, split="val")
    assert isinstance(ev, EvalResult) and ev.num_cases == 1
    ((case_id, rec),) = ev.per_case.items()
    assert rec["site"] == "site-02" and 0.0 <= rec["dice"] <= 1.0
    steps = []
    trainer.train(res.state_dict, epochs=1, progress=lambda s, t, loss: steps.append((s, t)))
    assert steps and steps[-1][0] == steps[-1][1]


def test_cpu_training_runs_channels_last_with_the_default_layouts_gradients(
    synth_data: Path, synth_tiny_config
) -> None:
    """On CPU the trainer keeps the UNet and each batch channels-last (oneDNN's 3-D convolutions
    run about twice as fast on it); the layout is an implementation detail: one batch gives the
    default layout's loss and gradients to float rounding (Adam's sign-like first steps would
    magnify rounding, so the gradients are compared, not weights after training), and what
    leaves the trainer is in the default layout, so an update's bytes do not depend on it."""
    from monai.losses import DiceCELoss

    from neurofed.edge_node.training import memory_format_for
    from neurofed.models.unet import build_unet

    assert memory_format_for(torch.device("cpu")) == torch.channels_last_3d
    assert memory_format_for(torch.device("cuda")) == torch.contiguous_format
    trainer = LocalTrainer(synth_data / "site-02", synth_tiny_config, TrainConfig(), device="cpu")
    fast = trainer.model()
    assert all(
        p.is_contiguous(memory_format=torch.channels_last_3d) for p in fast.parameters() if p.dim() == 5
    )
    default = build_unet(synth_tiny_config)
    default.load_state_dict(fast.state_dict())
    x, y = trainer._epoch_batches(0)[0]
    grads = []
    for model, layout in ((fast, torch.channels_last_3d), (default, torch.contiguous_format)):
        model.zero_grad()
        loss = DiceCELoss(sigmoid=True)(model(x.to(memory_format=layout)), y)
        loss.backward()
        grads.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_fast, g_fast), (loss_default, g_default) = grads
    assert loss_fast == pytest.approx(loss_default, rel=1e-5)
    scale = max(float(g.abs().max()) for g in g_default.values())  # biases before a norm: ~0 +- rounding
    for n, g in g_default.items():
        torch.testing.assert_close(g_fast[n], g, rtol=1e-3, atol=1e-5 * scale, msg=n)
    res = trainer.train(None, epochs=1)
    assert all(v.is_contiguous() for v in res.state_dict.values())


def test_keep_optimizer_carries_adams_moments_into_the_next_round(
    synth_data: Path, synth_tiny_config
) -> None:
    """continue-local: round 2 starts from round 1's Adam state (step count and moments), which a
    fresh optimiser (reset) does not; the weights differ accordingly."""
    start = {
        k: v.clone()
        for k, v in LocalTrainer(synth_data / "site-02", synth_tiny_config).model().state_dict().items()
    }

    def two_rounds(keep: bool) -> tuple[list[float], dict]:
        tr = LocalTrainer(synth_data / "site-02", synth_tiny_config, TrainConfig(), device="cpu")
        first = tr.train(start, epochs=1, keep_optimizer=keep)
        steps = [float(v["step"]) for v in tr._optimizer_state["state"].values()] if keep else []
        second = tr.train(first.state_dict, epochs=1, keep_optimizer=keep)
        if keep:
            steps += [float(v["step"]) for v in tr._optimizer_state["state"].values()]
        else:
            assert tr._optimizer_state is None
        return steps, second.state_dict

    steps, w_kept = two_rounds(True)
    _, w_reset = two_rounds(False)
    half = len(steps) // 2
    assert half and steps[0] >= 1 and steps[half:] == [2 * x for x in steps[:half]], steps
    assert any(not torch.equal(w_kept[k], w_reset[k]) for k in w_kept if w_kept[k].is_floating_point())


def test_exported_adam_state_restarts_training_exactly_where_it_stopped(
    synth_data: Path, synth_tiny_config
) -> None:
    """continue-global: Adam's state exported by parameter name and loaded into a fresh trainer
    (another process, in a federation) continues bit-exactly as keeping the optimiser does."""
    from neurofed.edge_node.errors import TrainingError
    from neurofed.wire.payload import OPTIMIZER_STEP, optimizer_names

    tr = LocalTrainer(synth_data / "site-02", synth_tiny_config, TrainConfig(), device="cpu")
    start = {k: v.clone() for k, v in tr.model().state_dict().items()}
    first = tr.train(start, epochs=1, keep_optimizer=True, export_optimizer=True)
    opt = first.optimizer_state
    params = dict(tr.model().named_parameters())
    assert sorted(opt) == sorted(optimizer_names({k: v for k, v in first.state_dict.items() if k in params}))
    assert float(opt[OPTIMIZER_STEP][0]) == first.steps > 0
    assert all(float(v.abs().sum()) > 0 for k, v in opt.items() if "/exp_avg_sq/" in k)
    kept = tr.train(first.state_dict, epochs=1, keep_optimizer=True).state_dict
    other = LocalTrainer(synth_data / "site-02", synth_tiny_config, TrainConfig(), device="cpu")
    other.epochs_done = tr.epochs_done - 1  # the same epoch's patches
    loaded = other.train(first.state_dict, epochs=1, optimizer_state=opt).state_dict
    assert all(torch.equal(kept[k], loaded[k]) for k in kept)
    other.epochs_done = tr.epochs_done - 1
    fresh = other.train(first.state_dict, epochs=1).state_dict  # same patches, a fresh Adam
    assert any(not torch.equal(kept[k], fresh[k]) for k in kept if kept[k].is_floating_point())
    with pytest.raises(TrainingError, match="lacks"):
        other.train(first.state_dict, epochs=1, optimizer_state={OPTIMIZER_STEP: opt[OPTIMIZER_STEP]})


def test_fractional_rounds_go_through_the_epoch_where_the_last_one_stopped(
    synth_data: Path, synth_tiny_config
) -> None:
    """--local-epochs 0.5: two half-epoch rounds train exactly the batches of one epoch, in order
    (bit-exact with one full epoch when Adam's state is kept), and the step count says so."""
    from neurofed.edge_node.errors import TrainingError

    def trainer() -> LocalTrainer:
        return LocalTrainer(
            synth_data / "site-01", synth_tiny_config, TrainConfig(batch_size=1), device="cpu"
        )

    a, b = trainer(), trainer()
    start = {k: v.clone() for k, v in a.model().state_dict().items()}
    per_epoch = len(a._epoch_batches_count())
    assert per_epoch >= 2
    halves = []
    w = start
    for _ in range(2):
        r = a.train(w, 0.5, keep_optimizer=True)
        halves.append(r.steps)
        w = r.state_dict
    full = b.train(start, 1, keep_optimizer=True)
    assert sum(halves) == full.steps == per_epoch and min(halves) >= 1, (halves, per_epoch)
    assert a.epochs_done == b.epochs_done == 1
    assert all(torch.equal(w[k], full.state_dict[k]) for k in w)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(TrainingError, match="epochs"):
            a.train(start, bad)


def test_lr_scale_sets_this_rounds_rate_also_over_a_kept_optimizer(
    synth_data: Path, synth_tiny_config
) -> None:
    """--lr-schedule: the round's factor is the rate Adam runs at, including after continue-local
    loads the previous round's state (which carries that round's rate); a bad factor is refused."""
    from neurofed.edge_node.errors import TrainingError

    tr = LocalTrainer(synth_data / "site-02", synth_tiny_config, TrainConfig(lr=1e-3), device="cpu")
    start = {k: v.clone() for k, v in tr.model().state_dict().items()}
    first = tr.train(start, epochs=1, keep_optimizer=True, lr_scale=0.5)
    assert [g["lr"] for g in tr._optimizer_state["param_groups"]] == [pytest.approx(5e-4)]
    tr.train(first.state_dict, epochs=1, keep_optimizer=True, lr_scale=0.25)
    assert [g["lr"] for g in tr._optimizer_state["param_groups"]] == [pytest.approx(2.5e-4)]
    # a smaller rate moves the weights less from the same start
    moved = {}
    for scale in (1.0, 0.01):
        out = tr.train(start, epochs=1, lr_scale=scale).state_dict
        moved[scale] = sum(float((out[k].float() - start[k].float()).abs().sum()) for k in start)
    assert moved[0.01] < 0.2 * moved[1.0]
    for bad in (0.0, -1.0, float("nan"), 11.0):
        with pytest.raises(TrainingError, match="lr_scale"):
            tr.train(start, epochs=1, lr_scale=bad)


def test_checkpoint_round_trip_bit_exact(tmp_path: Path, synth_tiny_config) -> None:
    from neurofed.models.unet import build_unet

    torch.manual_seed(0)
    model = build_unet(synth_tiny_config)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(1, 1, 16, 16, 16)).mean().backward()
        opt.step()
    save_checkpoint(tmp_path / "c.safetensors", model, opt, 3, synth_tiny_config, TrainConfig(lr=1e-3))
    ck = load_checkpoint(tmp_path / "c.safetensors")
    assert ck["epoch"] == 3 and ck["model_config"] == synth_tiny_config and ck["train_config"].lr == 1e-3
    for k, v in model.state_dict().items():
        assert torch.equal(ck["model_state"][k], v), k
    model2 = build_unet(synth_tiny_config)
    model2.load_state_dict(ck["model_state"])
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(ck["optim_state"])
    want, got = opt.state_dict(), opt2.state_dict()
    assert want["param_groups"] == got["param_groups"]
    for pid, st in want["state"].items():
        for name, val in st.items():
            assert torch.equal(got["state"][pid][name], val), (pid, name)
    assert b"pickle" not in (tmp_path / "c.safetensors").read_bytes()[:200]


@pytest.mark.slow
def test_resume_is_exact_and_cli_writes_metrics(synth_data: Path, tmp_path: Path) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["train", "--data", str(synth_data), "--model-size", "tiny", "--lr", "5e-3"]
    assert main(args + ["--epochs", "2", "--out", str(full)]) == 0
    assert main(args + ["--epochs", "1", "--out", str(part)]) == 0
    assert load_checkpoint(part / "checkpoint.safetensors")["epoch"] == 1
    assert main(args + ["--epochs", "2", "--out", str(part), "--resume"]) == 0
    a, cfg, _ = load_weights(full / "model.safetensors")
    b, _, _ = load_weights(part / "model.safetensors")
    assert cfg.channels == (4, 8, 16) and cfg.preprocessing.spacing == (6.0, 6.0, 6.0)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # resumed == uninterrupted, bit for bit
    m = json.loads((full / "metrics.json").read_text())
    assert m["arm"] == "centralized" and m["test_cases"] == 3
    assert set(m["per_site"]) == {"site-01", "site-02", "site-03"} and len(m["per_case"]) == 3
    assert 0.0 <= m["overall"]["dice"] <= 1.0
    rec = next(iter(m["per_case"].values()))
    assert {"site", "dice", "hd95"} <= set(rec)


@pytest.mark.slow
def test_tiny_model_learns_and_beats_flair_threshold(tmp_path: Path) -> None:
    """A tiny UNet on 32^3 synthetic data reaches test Dice > 0.5 and beats the best single
    FLAIR threshold on the same test cases."""
    from tests.fixtures.data import make_federation

    root = make_federation(tmp_path / "data", sites=3, cases=60, seed=0)
    m = train_arm(
        root,
        tmp_path / "run",
        epochs=40,
        model_size="tiny",
        train_config=TrainConfig(lr=5e-3, batch_size=1),
        show_progress=False,
    )
    cases = discover_cases(root)
    splits = json.loads((root / "splits.json").read_text())
    base = flair_threshold_baseline(select(cases, splits, "train"), select(cases, splits, "test"))
    assert base.test.num_cases == m["test_cases"] == 12
    print("unet", m["overall"], "baseline", base.threshold, base.test.dice)
    assert m["overall"]["dice"] > 0.5
    assert m["overall"]["dice"] > base.test.dice + 0.1
