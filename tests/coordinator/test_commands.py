"""The federation's sub-commands: registered, documented with an example, options mapped."""

from __future__ import annotations

import numpy as np
import pytest

from neurofed.cli import build_parser
from neurofed.coordinator.errors import CoordinatorError
from neurofed.coordinator.faults import fault_point
from neurofed.coordinator.service import load_start_weights
from neurofed.coordinator.state import StateStore


@pytest.mark.parametrize("name", ["coordinator", "edge", "demo"])
def test_commands_are_registered_with_an_example(name):
    _, subs = build_parser()
    assert name in subs
    assert "example:" in subs[name].epilog


def test_coordinator_options_become_the_model_config():
    from neurofed.commands.coordinator import model_config_from

    parser, _ = build_parser()
    args = parser.parse_args(
        [
            "coordinator",
            "--bundle",
            "b",
            "--model-size",
            "tiny",
            "--patch-size",
            "32",
            "--spacing",
            "6",
            "--strategy",
            "fedprox",
            "--mu",
            "0.1",
        ]
    )
    cfg = model_config_from(args)
    assert cfg["channels"] == (4, 8, 16)
    assert tuple(cfg["preprocessing"]["patch_size"]) == (32, 32, 32)
    assert tuple(cfg["preprocessing"]["spacing"]) == (6.0, 6.0, 6.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["coordinator", "--bundle", "b", "--strategy", "fedsgd"])


def test_init_weights_must_match_the_model(tmp_path):
    w = {"a": np.zeros(3, dtype=np.float32)}
    path = StateStore(tmp_path).write_round_weights(0, w, {"channels": [4, 8, 16], "strides": [2, 2]})
    assert set(load_start_weights(path, {"channels": [4, 8, 16], "strides": [2, 2]})) == {"a"}
    with pytest.raises(CoordinatorError, match="channels"):
        load_start_weights(path, {"channels": [8, 16, 32, 64, 128], "strides": [2, 2, 2, 2]})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    with pytest.raises(CoordinatorError, match="not a readable"):
        load_start_weights(bad, {})


def test_fault_points_are_named_and_inert_without_the_variable(monkeypatch):
    monkeypatch.delenv("NEUROFED_FAULT", raising=False)
    fault_point("after-persist", 1)  # no variable: nothing happens
    monkeypatch.setenv("NEUROFED_FAULT", "after-persist")
    monkeypatch.setenv("NEUROFED_FAULT_ROUND", "2")
    fault_point("after-persist", 1)  # another round: nothing happens
    fault_point("after-aggregate", 2)  # another point: nothing happens
    with pytest.raises(ValueError, match="unknown fault point"):
        fault_point("after-lunch", 1)


def test_cli_choices_are_the_coordinators_own():
    """The CLI keeps literal tuples so building the parser imports no numpy; they must not drift."""
    from neurofed.commands import coordinator as cli
    from neurofed.coordinator.rounds import LR_SCHEDULES, SITE_OPTIMIZER
    from neurofed.coordinator.strategies import STRATEGIES

    assert tuple(cli.STRATEGIES) == tuple(STRATEGIES)
    assert tuple(cli.SITE_OPTIMIZER) == SITE_OPTIMIZER
    assert tuple(cli.LR_SCHEDULES) == LR_SCHEDULES
    from neurofed.wire.compression import COMPRESSIONS

    assert tuple(cli.COMPRESSIONS) == COMPRESSIONS


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            "coordinator --bundle b --strategy fedadam --server-lr 0.003 --site-optimizer continue-local",
            {"server_lr": 0.003, "site_optimizer": "continue-local", "lr_schedule": "constant"},
        ),
        (
            "coordinator --bundle b --strategy fedavgm --server-momentum 0.5 --lr-schedule cosine",
            {"strategy": "fedavgm", "server_momentum": 0.5, "lr_schedule": "cosine"},
        ),
        (
            "experiment --out o --fl-strategy fednova --fl-server-lr 0.01",
            {"fl_strategy": "fednova", "fl_server_lr": 0.01, "lr_schedule": None},
        ),
        (
            "experiment --out o --fl-server-momentum 0.5 --lr-schedule cosine --fl-mu 0.1",
            {"fl_server_momentum": 0.5, "lr_schedule": "cosine", "fl_mu": 0.1},
        ),
        ("coordinator --bundle b --local-epochs 0.5", {"local_epochs": 0.5}),
        ("coordinator --bundle b --local-epochs 2", {"local_epochs": 2}),
        ("experiment --out o --rounds 100 --local-epochs 0.5", {"rounds": 100, "local_epochs": 0.5}),
        ("experiment --out o --train-seed 2", {"train_seed": 2}),
        ("experiment --out o", {"fl_strategy": None, "workers": None}),  # None: the profile's
        ("experiment --out o --workers 1", {"workers": 1}),
        ("edge --bundle b --data d --seed 4", {"seed": 4}),
    ],
)
def test_strategy_and_schedule_flags_parse(argv, expected):
    parser, _ = build_parser()
    args = parser.parse_args(argv.split())
    assert {k: getattr(args, k) for k in expected} == expected


def test_the_full_profiles_fl_arm_is_fedprox_unless_a_flag_says_otherwise():
    from neurofed.experiment import PROFILES, with_overrides

    full = PROFILES["full"]
    assert (full.fl_strategy, full.rounds, full.local_epochs, full.epochs) == ("fedprox", 200, 0.5, 100)
    assert with_overrides(full, fl_strategy=None).fl_strategy == "fedprox"
    assert with_overrides(full, fl_strategy="fedavg").fl_strategy == "fedavg"
    assert PROFILES["quick"].fl_strategy == "fedavg"


@pytest.mark.parametrize("bad", ["0", "-2"])
def test_experiment_workers_must_be_one_or_more(bad, capsys):
    parser, _ = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["experiment", "--out", "o", "--workers", bad])
    assert "--workers" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf", "half"])
def test_local_epochs_must_be_a_positive_number(bad, capsys):
    parser, _ = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["coordinator", "--bundle", "b", "--local-epochs", bad])
    assert "--local-epochs" in capsys.readouterr().err
