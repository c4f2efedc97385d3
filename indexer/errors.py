"""Errors of the index layer (subclasses of facepq_core.errors, so the CLI prints them as one line)."""
import errno

from facepq_core.errors import FacepqError, IndexFormatError, StorageFull, StorageReadOnly, Unavailable


class SegmentCorrupt(IndexFormatError):
    """A segment file whose bytes do not match its manifest entry (checksum, size, schema or rows).

    Query nodes refuse to serve such a segment.
    """


class IndexLockTimeout(FacepqError):
    """Another writer held the index's commit lock for longer than the timeout."""


class IndexPathError(IndexFormatError):
    """A path under the index root that could lead outside it (a symbolic link): refused, never followed."""


def storage_error(exc: OSError, uri: str, what: str) -> FacepqError:
    """What an OSError while writing the index means to a caller, as one actionable error.

    A full disk or quota -> StorageFull (RESOURCE_EXHAUSTED); a read-only file system or a missing
    permission -> StorageReadOnly (FAILED_PRECONDITION); anything else (an I/O error) -> Unavailable.
    """
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space left on the device holding {uri} while {what}: nothing was committed and "
                           f"no partial file was left; free space or grow the volume, then retry")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StorageReadOnly(f"cannot write to {uri} while {what}: {reason} (a read-only index can be served "
                               f"and searched, not changed); nothing was committed")
    return Unavailable(f"I/O error on {uri} while {what}: {reason}; nothing was committed")
