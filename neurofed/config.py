"""Configuration by file, environment and flags, in rising precedence.

Every sub-command option ``--foo-bar`` can also come from ``NEUROFED_FOO_BAR`` in the environment
or from ``foo_bar = ...`` in a TOML file given with ``--config`` (top level, or a table named after
the sub-command, e.g. ``[coordinator]``). Flags always win, so a hospital can keep a config file in
its bundle and override one value on the command line.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import tomllib

ENV_PREFIX = "NEUROFED_"


class ConfigError(Exception):
    """A configuration file or value that cannot be used, with the reason."""


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None


def _coerce(action: argparse.Action, raw: Any, source: str) -> Any:
    """Convert a value from env/TOML the way argparse would convert the flag."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off", ""}:
            return False
        raise ConfigError(f"{source}: expected a boolean, got {raw!r}")
    if action.nargs in ("*", "+") and isinstance(raw, list):
        conv = action.type or (lambda x: x)
        return [conv(v) for v in raw]
    if action.type is not None and not isinstance(raw, (list, dict)):
        try:
            return action.type(raw if isinstance(raw, str) else str(raw))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return raw


def apply_defaults(parser: argparse.ArgumentParser, command: str, file_cfg: dict[str, Any]) -> None:
    """Set parser defaults from the config file and the environment (flags still override)."""
    section = file_cfg.get(command, {}) if isinstance(file_cfg.get(command), dict) else {}
    defaults: dict[str, Any] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config"):
            continue
        key = action.dest
        if key in file_cfg and not isinstance(file_cfg[key], dict):
            defaults[key] = _coerce(action, file_cfg[key], f"config key {key!r}")
        if key in section:
            defaults[key] = _coerce(action, section[key], f"config key [{command}].{key}")
        env = ENV_PREFIX + key.upper()
        if env in os.environ:
            defaults[key] = _coerce(action, os.environ[env], f"environment variable {env}")
    if defaults:
        parser.set_defaults(**defaults)
