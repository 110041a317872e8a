"""The one command: every sub-command is reachable, teaches with an example, and config comes
from file, environment and flags in that order of precedence."""

from __future__ import annotations

import argparse

import pytest

from neurofed.cli import build_parser, main
from neurofed.config import ConfigError, apply_defaults, load_toml

EXPECTED = {
    "synth", "check-data", "train", "provision", "broker", "coordinator", "edge", "demo",
    "mlflow-server", "export", "infer", "experiment", "site", "health",
}  # fmt: skip


def test_every_subcommand_is_registered_with_an_example(capsys):
    parser, subs = build_parser()
    assert EXPECTED <= set(subs), f"missing: {EXPECTED - set(subs)}"
    for name, sub in subs.items():
        text = sub.format_help()
        assert "example" in text.lower() or "neurofed " + name in text, f"{name} --help has no example"


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("demo", "infer", "coordinator", "edge"):
        assert name in out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--strategy", default="fedavg")
    return p


def test_config_file_then_env_then_flags(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('strategy = "median"\n[coordinator]\nrounds = 7\nfp16 = true\n')
    p = _parser()
    apply_defaults(p, "coordinator", load_toml(cfg))
    a = p.parse_args([])
    assert (a.rounds, a.fp16, a.strategy) == (7, True, "median")
    monkeypatch.setenv("NEUROFED_ROUNDS", "9")
    p = _parser()
    apply_defaults(p, "coordinator", load_toml(cfg))
    assert p.parse_args([]).rounds == 9
    assert p.parse_args(["--rounds", "2"]).rounds == 2


def test_bad_config_values_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROFED_ROUNDS", "many")
    with pytest.raises(ConfigError, match="NEUROFED_ROUNDS"):
        apply_defaults(_parser(), "coordinator", {})
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)
    monkeypatch.delenv("NEUROFED_ROUNDS")
    assert main(["--config", str(tmp_path / "missing.toml"), "synth", "--out", str(tmp_path / "x")]) == 2
