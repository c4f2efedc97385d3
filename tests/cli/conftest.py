"""Fixtures of the command-line tests: the reliability tests' gallery index (tiny model, synthetic faces)."""
from tests.reliability.conftest import gallery, index, procs  # noqa: F401 (pytest fixtures, used by name)
