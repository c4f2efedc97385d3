"""Errors of the index layer (subclasses of facepq_core.errors, so the CLI prints them as one line)."""
from facepq_core.errors import FacepqError, IndexFormatError


class SegmentCorrupt(IndexFormatError):
    """A segment file whose bytes do not match its manifest entry (checksum, size, schema or rows).

    Query nodes refuse to serve such a segment.
    """


class IndexLockTimeout(FacepqError):
    """Another writer held the index's commit lock for longer than the timeout."""


class IndexPathError(IndexFormatError):
    """A path under the index root that could lead outside it (a symbolic link): refused, never followed."""
