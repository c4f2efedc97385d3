"""facepq_core.atomic: a replaced file holds the old content or the new, never half, and no temp file is left."""
from __future__ import annotations

import os

import pytest

from facepq_core import atomic
from facepq_core.atomic import atomic_writer, write_bytes_atomic


@pytest.fixture
def synced_dirs(monkeypatch) -> list[str]:
    """The directories atomic writes fsync (the real fsync still runs)."""
    seen: list[str] = []
    real = atomic.fsync_dir

    def record(directory):
        seen.append(os.fspath(directory))
        real(directory)

    monkeypatch.setattr(atomic, "fsync_dir", record)
    return seen


def test_write_replaces_the_file_creates_its_directory_and_syncs_it(tmp_path, synced_dirs):
    target = tmp_path / "new" / "state.json"
    write_bytes_atomic(target, b"one")
    write_bytes_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(target.parent) == ["state.json"]
    assert synced_dirs == [str(target.parent)] * 2  # after each rename, so the rename itself is durable


def test_a_failed_write_leaves_the_old_file_and_removes_the_temp_file(tmp_path, synced_dirs):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old content")
    with pytest.raises(RuntimeError, match="killed mid-write"):
        with atomic_writer(target) as f:
            f.write(b"half of the new")
            assert [n for n in os.listdir(tmp_path) if n.startswith(atomic.TMP_PREFIX)]  # written beside it
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["model.pt"]
    assert synced_dirs == []


def test_a_failed_first_write_creates_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_writer(tmp_path / "x.bin") as f:
            f.write(b"partial")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
