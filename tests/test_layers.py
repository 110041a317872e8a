"""The package shape: one import root (``neurofed.<room>``) and layers that run one way.

import-linter holds both (pyproject.toml's contracts, run through scripts/lint_imports.py); the
tests here also plant a violation of each contract, so a contract that stopped checking fails.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _lint_module():
    spec = importlib.util.spec_from_file_location("nf_lint_imports", REPO / "scripts" / "lint_imports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_repository_keeps_every_import_contract():
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "lint_imports.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("room", "source", "contract"),
    [
        ("models", "from neurofed.mlflow_server import registry  # noqa\n", "layered"),
        ("wire", "import neurofed.coordinator.rounds  # noqa\n", "layered"),
        ("edge_node", "from neurofed.launch import local  # noqa\n", "layered"),
        ("coordinator", "import wire.api  # noqa\n", "One import root"),
        ("edge_node", "from models import config  # noqa\n", "One import root"),
    ],
)
def test_a_planted_violation_breaks_its_contract(tmp_path, room, source, contract):
    lint = _lint_module()
    pkg = lint.build_view(tmp_path, copy=True)
    (pkg / room / "_planted.py").write_text(source)
    done = lint.run(tmp_path)
    assert done.returncode != 0, done.stdout
    broken = done.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken and "_planted" in broken, done.stdout


def _run_outside(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env
    )


def test_the_kit_imports_under_one_root_from_outside_the_repository(tmp_path):
    done = _run_outside(
        tmp_path,
        "import neurofed.wire, neurofed.models, neurofed.edge_node, neurofed.coordinator, "
        "neurofed.mlflow_server, neurofed.launch\n"
        "import logging, neurofed.wire.mqtt; logging.getLogger('neurofed')\n"
        "print(neurofed.wire.mqtt.log.parent.name)\n"
        "for bare in ('wire', 'models', 'edge_node', 'coordinator', 'mlflow_server'):\n"
        "    try:\n"
        "        __import__(bare)\n"
        "    except ImportError:\n"
        "        print('absent', bare)\n"
        "    else:\n"
        "        print('PRESENT', bare)\n",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    assert lines[0] == "neurofed"  # wire.mqtt's logger hangs under the one root
    assert "PRESENT" not in lines, done.stdout
    assert lines.count("absent") == 5


def test_a_users_own_models_folder_does_not_shadow_the_kit(tmp_path):
    """A hospital's notebook folder with its own ``models/`` and ``wire/`` packages in the working
    directory: ``neurofed --help`` still works and the kit's rooms are its own."""
    for name in ("models", "wire"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise RuntimeError('the user\\'s own package')\n")
    neurofed = Path(sys.executable).parent / "neurofed"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(neurofed), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "infer" in done.stdout
    done = _run_outside(
        tmp_path,
        "import sys; sys.path.insert(0, '.')\n"
        "import neurofed.models.config, neurofed.wire.api\n"
        "print(neurofed.models.config.__file__)\n",
    )
    assert done.returncode == 0, done.stderr
    assert str(tmp_path) not in done.stdout
