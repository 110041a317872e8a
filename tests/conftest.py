"""Shared fixtures. Torch uses one thread per process here: tests and helper processes share
two cores, and two threads each slow a step 5-8x on a shared CPU."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def _expose_benchmarks() -> None:
    """The suite runs with the repository root off ``sys.path`` (``--import-mode=importlib``), so a
    stray ``import wire`` fails instead of loading a second copy of a room. Only the ``benchmarks``
    folder (not installed: it is the repository's, not the kit's) is made importable, by location."""
    if "benchmarks" in sys.modules:
        return
    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    spec = importlib.util.spec_from_file_location(
        "benchmarks", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = module
    spec.loader.exec_module(module)


_expose_benchmarks()

# Cross-room fixtures: data (synthetic federation), broker (provisioned Mosquitto), mlflow (server).
pytest_plugins = ["tests.fixtures.data", "tests.fixtures.broker", "tests.fixtures.mlflow"]


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    yield


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so a fixture's teardown can tell whether the
    test failed (and, for a federation of processes, print every process's log when it did)."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
