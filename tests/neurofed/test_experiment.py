"""The study's comparison end to end on a tiny synthetic federation: every arm runs (FL through
real processes, broker and encryption), all are scored on the same test cases, and the outputs a
reader looks at exist."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_experiment_runs_every_arm_on_the_same_test_cases(tmp_path):
    from neurofed.edge_node.synth import synthesize
    from neurofed.experiment import PROFILES, run_experiment, with_overrides

    profile = with_overrides(PROFILES["quick"], sites=2, cases=16, rounds=2, local_epochs=1)
    data = tmp_path / "data"
    synthesize(data, sites=profile.sites, cases=profile.cases, seed=0, shape=profile.shape)
    out = tmp_path / "results"
    said: list[str] = []
    res = run_experiment(data, out, profile, arms=("threshold", "cds", "single", "fl"), progress=said.append)
    # the federated arm says its rounds as they close, not only its start and end
    fl_rounds = [m for m in said if m.startswith("[fl] round ")]
    assert [m.split(":")[0] for m in fl_rounds] == ["[fl] round 1/2", "[fl] round 2/2"], said
    assert fl_rounds[0].startswith("[fl] round 1/2: 2 sites") and "min left" in fl_rounds[0]
    assert any(m.startswith("[fl] final evaluation of round 2's model: 2 sites") for m in said), said

    saved = json.loads((out / "results.json").read_text())
    assert set(saved["arms"]) >= {"threshold", "cds", "single_site", "best_single_site", "fl"}
    n_test = saved["test_cases"]
    assert n_test >= 2
    for arm in ("threshold", "cds", "fl", "best_single_site"):
        d = saved["arms"][arm]["dice"]
        assert d["n"] == n_test, f"{arm} was not scored on the shared test cases"
        assert 0.0 <= d["mean"] <= 1.0
    assert saved["fl_over_cds"] == pytest.approx(
        saved["arms"]["fl"]["dice"]["mean"] / saved["arms"]["cds"]["dice"]["mean"]
    )
    diff = saved["fl_minus_cds"]
    fl_cases, cds_cases = saved["arms"]["fl"]["per_case"], saved["arms"]["cds"]["per_case"]
    assert diff["n"] == n_test
    assert diff["mean"] == pytest.approx(
        sum(fl_cases[k]["dice"] - cds_cases[k]["dice"] for k in fl_cases) / n_test, abs=1e-9
    )
    # FL really ran its rounds through the coordinator: one evaluation per round's model.
    assert [p["round"] for p in saved["curves"]["fl"]][-1] == profile.rounds
    assert len(saved["curves"]["cds"]) == profile.rounds
    assert saved["budget"]["centralized_epochs"] == profile.rounds * profile.local_epochs
    for png in res["plots"]:
        with open(png, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_real_brats_folders_run_with_a_site_mapping_csv(tmp_path):
    """BraTS ships every case in one folder; a case,site CSV says which hospital each came from."""
    import csv
    import shutil

    from neurofed.cli import main
    from neurofed.edge_node.synth import synthesize

    synth = tmp_path / "synth"
    synthesize(synth, sites=2, cases=10, seed=1, shape=(32, 32, 32))
    flat = tmp_path / "BraTS2021_Training_Data"
    flat.mkdir()
    rows = []
    for site_dir in sorted(p for p in synth.iterdir() if p.is_dir()):
        for case in sorted(site_dir.iterdir()):
            shutil.copytree(case, flat / case.name)
            rows.append((case.name, site_dir.name))
    site_map = tmp_path / "sites.csv"
    with site_map.open("w", newline="") as fh:
        csv.writer(fh).writerows([("case", "site"), *rows])
    out = tmp_path / "results"
    code = main(
        [
            "experiment",
            "--data",
            str(flat),
            "--site-map",
            str(site_map),
            "--out",
            str(out),
            "--arms",
            "threshold",
            "--fl-strategy",
            "fedadam",
        ]
    )
    assert code == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["profile"]["fl_strategy"] == "fedadam"  # recorded with the results it shaped
    assert saved["sites"] == sorted({site for _, site in rows})
    assert saved["arms"]["threshold"]["dice"]["n"] == saved["test_cases"] > 0
    assert not any(flat.glob("*.json")), "the experiment must not write into the hospital's data folder"


def test_every_arm_follows_the_federations_lr_schedule_by_epoch():
    """Equal budgets include equal schedules: centralized epoch e runs at the factor of the round
    it falls in, the same factor the coordinator sends the sites that round."""
    from types import SimpleNamespace

    from neurofed.coordinator.rounds import lr_scale
    from neurofed.experiment import PROFILES, Arms, with_overrides

    p = with_overrides(PROFILES["quick"], rounds=4, local_epochs=5, lr_schedule="cosine")
    arms = SimpleNamespace(profile=p)
    scales = [Arms.epoch_lr_scale(arms, e) for e in range(p.epochs)]
    assert scales == [lr_scale("cosine", e // 5 + 1, 4) for e in range(20)]
    assert scales[0] == 1.0 and scales[4] == 1.0 and scales[5] < 1.0 and scales[-1] < 0.2
    flat = SimpleNamespace(profile=with_overrides(p, lr_schedule="constant"))
    assert {Arms.epoch_lr_scale(flat, e) for e in range(20)} == {1.0}
    # half-epoch rounds: epoch e starts in round 2e + 1; the budget must be whole epochs
    half = with_overrides(p, rounds=8, local_epochs=0.5)
    assert half.epochs == 4
    assert [Arms.epoch_lr_scale(SimpleNamespace(profile=half), e) for e in range(4)] == [
        lr_scale("cosine", 2 * e + 1, 8) for e in range(4)
    ]
    with pytest.raises(ValueError, match="whole epochs"):
        _ = with_overrides(p, rounds=3, local_epochs=0.5).epochs


def test_ciil_arm_visits_the_sites_in_turn_for_the_budget_and_is_scored_on_the_shared_tests(
    tmp_path, monkeypatch
):
    """Cyclic institutional incremental learning: one local epoch per visit, sites in turn, as many
    visits as the centralized budget has epochs, each at that epoch's scheduled rate; then the
    same test cases as every arm."""
    from neurofed.edge_node.synth import synthesize
    from neurofed.edge_node.training import CaseTrainer
    from neurofed.experiment import PROFILES, Arms, with_overrides

    profile = with_overrides(
        PROFILES["quick"], sites=2, cases=16, rounds=2, local_epochs=2, lr_schedule="cosine"
    )
    data = tmp_path / "data"
    synthesize(data, sites=profile.sites, cases=profile.cases, seed=0, shape=profile.shape)
    visits: list[tuple[tuple[str, ...], int, int, float]] = []
    real = CaseTrainer.run_epochs

    def spy(self, model, optimizer, epochs, **kw):
        sites = tuple(sorted({c.site for c in self.cases["train"]}))
        visits.append((sites, kw["start_epoch"], epochs, optimizer.param_groups[0]["lr"]))
        return real(self, model, optimizer, epochs, **kw)

    monkeypatch.setattr(CaseTrainer, "run_epochs", spy)
    arms = Arms(data, profile, device="cpu")
    res = arms.ciil(profile.epochs)
    assert [(v[0], v[1], v[2]) for v in visits] == [
        ((arms.sites[e % 2],), e, 1) for e in range(profile.epochs)
    ], "one epoch per visit, the sites in turn, the whole budget"
    assert [v[3] for v in visits] == pytest.approx(
        [arms.train_config.lr * arms.epoch_lr_scale(e) for e in range(4)]
    )
    assert res["dice"]["n"] == len(arms.select("test")) and 0.0 <= res["dice"]["mean"] <= 1.0


def test_train_seed_changes_the_training_draws_not_the_data_or_split(tmp_path, monkeypatch):
    """--train-seed repeats the study on the same cases and split: only the initial weights and
    the patches and augmentations differ, in every arm, the FL sites (neurofed edge --seed) too."""
    import torch

    import neurofed.launch.local as local
    from neurofed.edge_node.synth import synthesize
    from neurofed.experiment import PROFILES, Arms, with_overrides

    p0 = with_overrides(PROFILES["quick"], sites=2, cases=16)
    p3 = with_overrides(p0, train_seed=3)
    data = tmp_path / "data"
    synthesize(data, sites=p0.sites, cases=p0.cases, seed=0, shape=p0.shape)
    a0, a3 = Arms(data, p0, "cpu"), Arms(data, p3, "cpu")
    assert [c.case_id for c in a0.select("test")] == [c.case_id for c in a3.select("test")]
    assert (a0.train_config.seed, a3.train_config.seed) == (0, 3)
    assert a0.train_config.split_seed == a3.train_config.split_seed == 0
    x0, _ = a0._trainer(None)._epoch_batches(0)[0]
    x3, _ = a3._trainer(None)._epoch_batches(0)[0]
    assert not torch.equal(x0, x3)
    seen = []
    monkeypatch.setattr(local, "spawn", lambda name, args, *a, **k: seen.append(args))
    local.spawn_site("site-01", tmp_path, data, tmp_path, tmp_path, extra=["--seed", "3"])
    assert seen[0][-2:] == ["--seed", "3"]


def test_round_line_says_round_sites_dice_and_time_left():
    from neurofed.experiment import round_line

    events = [
        {"event": "round", "round": 1, "train": True, "sites": ["a", "b", "c"]},
        {"event": "evaluation", "round": 0, "dice": 0.1234},
        {"event": "round", "round": 2, "train": True, "sites": ["a", "b"]},
        {"event": "round", "round": 3, "train": False, "metrics": {"a": {}, "b": {}}},
    ]
    assert round_line(events, 0, 10, 5.0) == "round 1/10: 3 sites, 5.0 s/round, about 0.8 min left"
    line = round_line(events, 1, 10, 20.0)
    assert line == "round 2/10: 2 sites, val Dice 0.123 (model r0), 10.0 s/round, about 1.5 min left"
    assert round_line(events, 2, 2, 30.0).startswith("final evaluation of round 2's model: 2 sites")


def test_a_site_process_that_dies_ends_the_federations_wait_with_its_log(tmp_path):
    """A site that crashes stalls a study that needs every site until the coordinator's deadlines
    run out: the wait ends at once instead, naming the site and quoting its log."""
    import subprocess
    import sys
    import time

    from neurofed.experiment import watch_federation
    from neurofed.procs import Proc

    def proc(name: str, code: str) -> Proc:
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as fh:
            popen = subprocess.Popen([sys.executable, "-c", code], stdout=fh, stderr=subprocess.STDOUT)
        return Proc(name, popen, log)

    coord = proc("coordinator", "import time; time.sleep(60)")
    done = proc("site-01", "pass")  # a site that ended with the federation (0) is no failure
    dead = proc("site-07", "import sys; print('ValueError: bad meta'); sys.exit(1)")
    t0 = time.perf_counter()
    try:
        with pytest.raises(RuntimeError, match=r"site-07 exited with 1 during the federation") as err:
            watch_federation(coord, tmp_path, 3, 60.0, None, sites=[done, dead])
    finally:
        coord.kill()
    assert "ValueError: bad meta" in str(err.value) and str(dead.log) in str(err.value)
    assert time.perf_counter() - t0 < 10


def test_dp_arms_curves_are_drawn_beside_fl_and_cds_and_alone(tmp_path):
    """The per-round plot draws each DP arm's validation curve: a run of DP arms alone
    (``--arms fl_dp``) gets its curve instead of an empty plot."""
    from neurofed.experiment import curve_series, plot_results

    pts = [{"round": 0, "dice": 0.1}, {"round": 1, "dice": 0.2}]
    both = {"curves": {"fl": pts, "cds": pts, "fl_dp_eps8": pts, "cds_dp_eps8": pts, "fl_dp_eps2": []}}
    assert [label for label, _, _ in curve_series(both)] == [
        "FL", "CDS", "CDS, DP-SGD, epsilon 8", "FL, DP-SGD, epsilon 8"
    ]  # fmt: skip
    alone = {
        "curves": {"fl_dp_eps8": pts},
        "arms": {"fl_dp_eps8": {"dice": {"mean": 0.1, "std": 0.05}}},
        "test_cases": 3,
        "sites": ["a", "b"],
    }
    assert [label for label, _, _ in curve_series(alone)] == ["FL, DP-SGD, epsilon 8"]
    assert all(p.stat().st_size > 5_000 for p in plot_results(alone, tmp_path))


def test_paired_difference_pairs_by_case_and_says_its_standard_error():
    """A constant gap over cases of very different difficulty: pairing sees the gap exactly (se 0)
    where the arms' own spreads are large; cases only one arm scored are left out."""
    from neurofed.experiment import paired_difference

    base = [0.2, 0.9, 0.5, 0.7]
    a = {"per_case": {f"c{i}": {"dice": d - 0.05} for i, d in enumerate(base)} | {"extra": {"dice": 1.0}}}
    b = {"per_case": {f"c{i}": {"dice": d} for i, d in enumerate(base)}}
    got = paired_difference(a, b)
    assert got["n"] == 4
    assert got["mean"] == pytest.approx(-0.05)
    assert got["se"] == pytest.approx(0.0, abs=1e-12)
    # a noisy gap: se = std(d, ddof=1) / sqrt(n), ci95 = mean +- 1.96 se
    b2 = {"per_case": {"x": {"dice": 0.5}, "y": {"dice": 0.5}, "z": {"dice": 0.5}}}
    a2 = {"per_case": {"x": {"dice": 0.4}, "y": {"dice": 0.6}, "z": {"dice": 0.8}}}
    got = paired_difference(a2, b2)
    assert got["mean"] == pytest.approx(0.1)
    assert got["se"] == pytest.approx(0.2 / 3**0.5)
    assert got["ci95"] == pytest.approx([0.1 - 1.96 * 0.2 / 3**0.5, 0.1 + 1.96 * 0.2 / 3**0.5])
    assert paired_difference({"per_case": {}}, b)["n"] == 0


def test_arms_side_by_side_in_worker_processes_learn_what_they_learn_one_after_another(tmp_path):
    """--workers 2 trains the non-federated arms in two spawned processes: each arm is seeded on
    its own, so a single site trained there scores case for case what it scores in this process
    (both at one torch thread), the longest arms are handed out first, and every arm reports."""
    from neurofed.edge_node.synth import synthesize
    from neurofed.experiment import PROFILES, Arms, arm_jobs, run_arms, with_overrides

    profile = with_overrides(PROFILES["quick"], sites=2, cases=16, rounds=2, local_epochs=1)
    data = tmp_path / "data"
    synthesize(data, sites=profile.sites, cases=profile.cases, seed=0, shape=profile.shape)
    seq = Arms(data, with_overrides(profile, workers=1), "cpu")
    jobs = arm_jobs(seq, ("threshold", "cds", "single"))
    sizes = [len(seq.select("train", [j.split(":")[1]])) for j in jobs if j.startswith("single:")]
    assert jobs[0] == "cds" and jobs[-1] == "threshold" and sizes == sorted(sizes, reverse=True)

    side_by_side = run_arms(
        Arms(data, with_overrides(profile, workers=2), "cpu"), jobs, progress=lambda s: None
    )
    one_by_one = run_arms(seq, ["single:site-01", "threshold"], progress=lambda s: None)
    assert set(side_by_side) == set(jobs)
    assert all(v["seconds"] > 0 for v in side_by_side.values())
    for job in one_by_one:
        a, b = side_by_side[job]["result"]["per_case"], one_by_one[job]["result"]["per_case"]
        assert a.keys() == b.keys() and len(a) >= 2
        # equal to float rounding (a worker on a machine with more cores gets more torch threads)
        assert [a[k]["dice"] for k in sorted(a)] == pytest.approx(
            [b[k]["dice"] for k in sorted(b)], abs=1e-5
        ), job
    assert len(side_by_side["cds"]["curve"]) == profile.epochs


def test_a_failing_arm_in_a_worker_says_which_and_stops_the_run(tmp_path):
    from neurofed.edge_node.synth import synthesize
    from neurofed.experiment import PROFILES, Arms, run_arms, with_overrides

    profile = with_overrides(PROFILES["quick"], sites=2, cases=16, workers=2)
    data = tmp_path / "data"
    synthesize(data, sites=profile.sites, cases=profile.cases, seed=0, shape=profile.shape)
    with pytest.raises(RuntimeError, match=r"arm single:site-99 failed: ValueError: no training cases"):
        run_arms(Arms(data, profile, "cpu"), ["single:site-99", "threshold"], progress=lambda s: None)


def test_validation_curves_can_skip_hd95_and_keep_the_same_dice():
    """The CDS curve plots Dice only: HD95's surface search on an untrained model's scattered
    voxels costs several forward passes, so the curve skips it; Dice is unchanged."""
    import torch

    from neurofed.edge_node.evaluation import dice_hd95

    g = torch.Generator().manual_seed(0)
    truth = torch.zeros(1, 24, 24, 24)
    truth[:, 8:16, 8:16, 8:16] = 1
    pred = (torch.rand(1, 24, 24, 24, generator=g) > 0.7).float()
    dice, hd = dice_hd95(pred, truth, (1.0, 1.0, 1.0))
    dice_only, no_hd = dice_hd95(pred, truth, (1.0, 1.0, 1.0), hd95=False)
    assert dice_only == dice and 0 < dice < 1
    assert hd > 0 and no_hd != no_hd  # NaN: not computed


def _children(pid: int) -> set[int]:
    from pathlib import Path

    out = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == pid:
            out.add(int(status.parent.name))
    return out


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_stopping_the_experiment_stops_the_arms_worker_processes(tmp_path, how):
    """SIGTERM unwinds like Ctrl-C (the pool is terminated on the way out); SIGKILL leaves no
    clean-up to run, so each worker asked the kernel to end it with its parent."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from neurofed.edge_node.synth import synthesize

    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux /proc to find the worker processes")
    data = tmp_path / "data"
    synthesize(data, sites=2, cases=16, seed=0, shape=(32, 32, 32))
    log = tmp_path / "experiment.log"
    argv = [sys.executable, "-m", "neurofed", "experiment", "--data", str(data), "--out", str(tmp_path / "out"),
            "--arms", "cds,single", "--rounds", "2000", "--local-epochs", "1", "--workers", "2"]  # fmt: skip
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "[cds] epoch 1/" not in log.read_text():  # both workers are up and training
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers  # two workers (and the spawn context's resource tracker)
        proc.send_signal(getattr(signal, how))
        assert proc.wait(60) == (128 + signal.SIGTERM if how == "SIGTERM" else -signal.SIGKILL)
        deadline = time.monotonic() + 20
        while any(Path(f"/proc/{p}").exists() and "zombie" not in Path(f"/proc/{p}/status").read_text()
                  for p in workers):  # fmt: skip
            assert time.monotonic() < deadline, f"workers {workers} outlived the experiment ({how})"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_dp_arms_spend_at_most_their_epsilon_and_plot_privacy_against_utility(tmp_path):
    """``--dp-target-epsilon`` adds an FL arm with DP-SGD at every site (through the real
    coordinator and edge processes) and a pooled CDS arm with DP-SGD on the same accounting; each
    reports what Google's dp-accounting RDP accountant computes for its noise, sampling rate and
    steps, at most the target, and the privacy-utility plot is written beside results.json."""
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant
    from opacus.accountants.rdp import RDPAccountant

    from neurofed.edge_node.synth import synthesize
    from neurofed.experiment import PROFILES, run_experiment, with_overrides

    profile = with_overrides(
        PROFILES["quick"],
        sites=2,
        cases=12,
        rounds=2,
        local_epochs=1,
        workers=1,
        dp_target_epsilons=(4.0,),
        dp_delta=1e-4,
        dp_max_grad_norm=0.5,
    )
    data = tmp_path / "data"
    synthesize(data, sites=profile.sites, cases=profile.cases, seed=0, shape=profile.shape)
    out = tmp_path / "results"
    # the DP-FL arm without the plain FL arm (one federation fewer); CDS stands for no DP
    res = run_experiment(data, out, profile, arms=("cds", "fl_dp"), progress=lambda m: None)

    saved = json.loads((out / "results.json").read_text())
    assert set(saved["arms"]) == {"cds", "cds_dp_eps4", "fl_dp_eps4"}
    fl_dp, cds_dp = saved["arms"]["fl_dp_eps4"]["dp"], saved["arms"]["cds_dp_eps4"]["dp"]
    # the DP-FL arm went through the coordinator: both sites reported their ledger, the
    # federation's figure is the largest, and every site trained both rounds under DP-SGD
    assert set(fl_dp["per_site"]) == set(saved["sites"])
    assert fl_dp["epsilon"] == max(d["epsilon"] for d in fl_dp["per_site"].values())
    ledgers = [(d, d["steps"]) for d in fl_dp["per_site"].values()] + [(cds_dp, cds_dp["steps"])]
    # Poisson sampling rate = batch (2) / training cases: each site's own, the pooled arm's over all
    splits = json.loads((data / "splits.json").read_text())["sites"]
    n_train = {site: len(parts["train"]) for site, parts in splits.items()}
    for site, d in fl_dp["per_site"].items():
        assert d["sample_rate"] == pytest.approx(min(1.0, 2 / n_train[site]))
    assert cds_dp["sample_rate"] == pytest.approx(2 / sum(n_train.values()))
    for d, steps in ledgers:
        assert d["delta"] == 1e-4 and d["max_grad_norm"] == 0.5 and d["target_epsilon"] == 4.0
        ref = RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
        ref.compose(
            SelfComposedDpEvent(
                PoissonSampledDpEvent(d["sample_rate"], GaussianDpEvent(d["noise_multiplier"])), steps
            )
        )
        expected = ref.get_epsilon(1e-4)
        assert d["epsilon"] == pytest.approx(expected, rel=0.01)
        assert expected <= 4.0 * 1.001
        assert d["epsilon"] > 2.0  # the noise was solved for the budget, not set far above it
    for arm in ("cds_dp_eps4", "fl_dp_eps4"):
        assert saved["arms"][arm]["dice"]["n"] == saved["test_cases"]
    pu = saved["privacy_utility"]
    assert [p["label"] for p in pu["points"]] == ["4", "inf"]
    assert pu["points"][0]["fl"]["epsilon"] == fl_dp["epsilon"]
    assert pu["points"][1]["cds"]["dice"] == saved["arms"]["cds"]["dice"]["mean"]
    png = out / "privacy_utility.png"
    assert str(png) in res["plots"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_experiment_passes_compression_to_the_fl_arms_coordinator():
    from neurofed.cli import build_parser
    from neurofed.commands.experiment import fl_coordinator_args

    parser, _ = build_parser()
    args = parser.parse_args(
        ["experiment", "--out", "x", "--compression", "int8-topk", "--topk-density", "0.05"]
    )
    assert fl_coordinator_args(args) == ["--compression", "int8-topk", "--topk-density", "0.05"]
    assert fl_coordinator_args(parser.parse_args(["experiment", "--out", "x"])) == []
    with pytest.raises(SystemExit, match="int8-topk only"):
        fl_coordinator_args(parser.parse_args(["experiment", "--out", "x", "--topk-density", "0.05"]))
