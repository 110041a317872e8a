"""Make the shared data fixtures available here even before tests/conftest.py lists them."""

from tests.fixtures.data import synth_data, synth_tiny_config  # noqa: F401
