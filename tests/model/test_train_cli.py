"""`facepq train` reports honestly: wall time of the whole command split by phase, no progress bars in a log file."""
from __future__ import annotations

import re

import pytest

from tests.support.processes import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _train(tmp_path, out, *verbose):
    from opqn_model.synthetic import write_faces

    data = write_faces(tmp_path / "faces", 8, 4, size=40, seed=0)
    return run_cli(*verbose, "train", "--data", data, "--align", "none", "--out", tmp_path / out, "--epochs", "1",
                   "--width", "8", "--bits", "16", "--batch-size", "16", "--input-size", "32", timeout=280)


def test_train_summary_is_the_commands_wall_time_and_a_log_gets_no_bars(tmp_path):
    out = _train(tmp_path, "model")
    assert out.returncode == 0, out.stderr[-3000:]
    found = re.search(r"in (\d+) s wall \((\d+) s reading photos, (\d+) s fitting, (\d+) s setting up\)", out.stdout)
    assert found, out.stdout
    wall, *parts = map(int, found.groups())
    assert abs(wall - sum(parts)) <= 2  # the phases add up to the wall time (rounding)
    # stderr is a file here, not a terminal: no tqdm bar redraws, and quiet by default (no INFO lines)
    assert "\r" not in out.stderr and "%|" not in out.stderr and " INFO " not in out.stderr, out.stderr[-2000:]
    verbose = _train(tmp_path, "again", "-v")
    assert verbose.returncode == 0 and "photos ready in" in verbose.stderr and "epoch 1/1" in verbose.stderr
