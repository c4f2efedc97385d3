"""What the worker processes of one test run share (scripts/test.sh runs the suite with pytest-xdist).

Each worker is its own pytest session, so a session-scoped fixture runs once per worker. Work that is
expensive and the same for every worker (the dlib embeddings of the ORL photos: ~1 minute of CPU) goes
into a folder of the run that all workers see, under a lock, so the first worker does it and the others
read it. Without xdist the folder is the session's own base temp.
"""
from __future__ import annotations

import contextlib
import os
import pathlib

from filelock import FileLock


def worker_id() -> str | None:
    """This process's xdist worker name (gw0, gw1, ...), None when the suite runs in one process."""
    return os.environ.get("PYTEST_XDIST_WORKER")


def shared_dir(tmp_path_factory, name: str) -> pathlib.Path:
    """The folder `name` of this run, the same for every worker (created if missing)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if worker_id() else base  # xdist: <run>/popen-gwN is each worker's base temp
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def one_at_a_time(folder: pathlib.Path):
    """Hold the folder's lock: the workers of the run enter one after another."""
    with FileLock(str(folder / ".lock")):
        yield
