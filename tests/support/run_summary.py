"""Lines a test wants in the session's terminal summary whatever -q or -s say (the multi-host suite's fault
schedule and history summary), by section. tests/conftest.py prints them at the end of the run; under
pytest-xdist each worker hands its lines to the controller process, which prints them."""
from __future__ import annotations

SECTIONS: dict[str, list[str]] = {}


def add(section: str, line: str) -> None:
    SECTIONS.setdefault(section, []).append(line)


def merge(sections: dict[str, list[str]]) -> None:
    """Add another process's sections (an xdist worker's, in the controller)."""
    for section, lines in sections.items():
        SECTIONS.setdefault(section, []).extend(lines)
