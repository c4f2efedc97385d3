"""Durable file replacement: after a crash a file holds either its old content or the new, never half.

The one way facepq replaces a local file (index files, checkpoints, the local cluster's
state): write a temporary file in the same directory, fsync it, rename it over the
target, fsync the directory (a rename is durable only once the directory entry is on
disk). If the writer fails, the temporary file is removed and the old file is untouched.

    with atomic_writer(path) as f:
        f.write(data)
"""
from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import BinaryIO

# Temporary files start with this, so a crash leftover is recognisable (the index's
# garbage collection deletes any unreferenced file under shards/, these included).
TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file; its content replaces `path` only if the block finishes without error.

    Args:
        path: the file to create or replace; its directory is created if missing.

    The temporary file is `<dir>/.tmp-<random>-<name>`: same directory (so the rename is
    atomic), a name no other writer picks.
    """
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}")
    f = open(tmp, "wb")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, os.path.join(directory, name))
        fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(OSError):  # on a full disk closing fails too (its flush): still remove it
            f.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace the file at `path` with `data` (see `atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(data)


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory, so renames and creations in it survive a crash.

    Best effort: a filesystem or platform that cannot open or fsync a directory is skipped.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
