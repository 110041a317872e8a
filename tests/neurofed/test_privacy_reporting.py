"""How the study and the demo report differential privacy: the federation's epsilon is the
largest any site spent, the privacy-utility table says where DP-FL comes within 0.03 Dice of FL,
and the demo's summary names the delta behind its epsilon."""

from __future__ import annotations

import argparse

import pytest


def _report(eps: float, noise: float, q: float) -> dict:
    return {"epsilon": eps, "noise_multiplier": noise, "sample_rate": q, "steps": 10, "delta": 1e-5,
            "accountant": "rdp", "max_grad_norm": 1.0, "target_epsilon": 8.0}  # fmt: skip


def test_federation_privacy_is_the_largest_epsilon_any_site_spent_over_all_rounds():
    from neurofed.experiment import federation_privacy

    events = [
        {"event": "round", "round": 1, "dp": {"a": _report(3.0, 1.1, 0.2), "b": _report(4.0, 0.9, 0.3)}},
        # site b did not train in round 2: what it spent in round 1 still counts
        {"event": "round", "round": 2, "dp": {"a": _report(5.5, 1.1, 0.2)}},
        {"event": "evaluation", "round": 2, "dice": 0.5},
    ]
    got = federation_privacy(events)
    assert got["epsilon"] == 5.5 and got["noise_multiplier"] == 0.9
    assert {s: d["epsilon"] for s, d in got["per_site"].items()} == {"a": 5.5, "b": 4.0}
    assert got["delta"] == 1e-5 and got["unit"] == "patient"
    assert federation_privacy([{"event": "round", "round": 1}]) == {}


def _arm(dice: float, eps: float | None = None) -> dict:
    return {"dice": {"mean": dice, "std": 0.1}} | ({"dp": {"epsilon": eps}} if eps is not None else {})


def test_privacy_utility_table_names_the_smallest_epsilon_within_003_of_fl():
    from neurofed.experiment import privacy_utility

    results = {
        "profile": {"dp_target_epsilons": [8.0, 1.0, 2.0, 4.0], "dp_delta": 1e-5, "dp_max_grad_norm": 1.0},
        "arms": {
            "fl": _arm(0.80),
            "cds": _arm(0.82),
            "fl_dp_eps1": _arm(0.60, 0.99),
            "fl_dp_eps2": _arm(0.765, 1.98),  # 0.035 below: not within
            "fl_dp_eps4": _arm(0.775, 3.97),  # 0.025 below: within
            "fl_dp_eps8": _arm(0.79, 7.95),
            "cds_dp_eps8": _arm(0.70, 7.99),
        },
    }
    table = privacy_utility(results)
    assert [p["label"] for p in table["points"]] == ["1", "2", "4", "8", "inf"]
    assert table["fl_smallest_epsilon_within"] == 4.0
    assert table["points"][3]["cds"] == {"dice": 0.70, "dice_sd": 0.1, "epsilon": 7.99}
    assert "cds" not in table["points"][0]
    assert table["points"][-1]["target_epsilon"] is None and table["points"][-1]["fl"]["dice"] == 0.80
    results["arms"]["fl_dp_eps8"] = _arm(0.70, 7.95)
    results["arms"]["fl_dp_eps4"] = _arm(0.70, 3.97)
    assert privacy_utility(results)["fl_smallest_epsilon_within"] is None


def test_target_epsilons_parse_as_a_sorted_list_and_refuse_infinity():
    from neurofed.commands.experiment import _epsilons

    assert _epsilons("8,1,2,4,2") == (1.0, 2.0, 4.0, 8.0)
    for bad in ("inf", "0", "1,-2", "one", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            _epsilons(bad)


def test_demo_summary_gives_epsilon_with_its_delta_and_the_sites_that_left():
    from neurofed.launch.demo import privacy_summary

    events = [
        {"event": "update", "site": "a", "epsilon": 2.5},
        {"event": "update", "site": "b", "epsilon": 3.25},
        {"event": "round", "round": 1, "dp": {"a": _report(2.5, 1.0, 0.2), "b": _report(3.25, 1.0, 0.2)}},
        {"event": "left", "site": "b"},
    ]
    line = privacy_summary(events)
    assert "epsilon 3.250 (largest of any site; a 2.500, b 3.250) at delta 1e-05 (RDP accountant)" in line
    assert line.endswith("left with their budget spent: b")


def test_dp_fl_arms_pass_flags_the_coordinator_takes_and_use_fedavg_for_a_fedprox_profile():
    """The DP-FL arm's flags parse as ``neurofed coordinator``'s own, and the full profile's
    FedProx (refused under DP-SGD) becomes FedAvg for its DP arms only."""
    from neurofed.cli import build_parser
    from neurofed.experiment import PROFILES, dp_coordinator_args, dp_federation_profile, with_overrides

    profile = with_overrides(PROFILES["full"], dp_target_epsilons=(8.0,), dp_delta=1e-6, dp_max_grad_norm=0.5)
    parser, _ = build_parser()
    args = parser.parse_args(["coordinator", "--bundle", "b", *dp_coordinator_args(profile, 8.0)])
    assert (args.dp_target_epsilon, args.dp_delta, args.dp_max_grad_norm) == (8.0, 1e-6, 0.5)
    fed = dp_federation_profile(profile)
    assert (fed.fl_strategy, fed.fl_mu, fed.rounds) == ("fedavg", None, 200)
    assert profile.fl_strategy == "fedprox"  # the plain FL arm keeps the profile's
    assert dp_federation_profile(PROFILES["quick"]) == PROFILES["quick"]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--dp-batch-size", "8"], "add --dp-target-epsilon"),
        (["--arms", "cds,fl_dp"], "need --dp-target-epsilon"),
        (["--arms", "cds,fl-dp"], "unknown arm(s) fl-dp"),
        (["--dp-target-epsilon", "8", "--dp-delta", "2"], "--dp-delta must be in (0, 1)"),
    ],
)
def test_experiment_refuses_dp_settings_it_cannot_use_before_any_work(tmp_path, capsys, argv, says):
    from neurofed.cli import main

    out = tmp_path / "out"
    assert main(["experiment", "--out", str(out), *argv]) == 1
    assert says in capsys.readouterr().err
    assert not out.exists()  # said before synthesising data or training an arm
