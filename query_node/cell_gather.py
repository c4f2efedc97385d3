"""A partitioned search's many small row ranges, gathered into one piece for one kernel call.

A search of `nprobe` cells scans, in each segment grouped by cell, every probed cell's row range.
At 100M faces in 100 segments with 4096 cells, 64 probed cells are ~6,400 ranges of ~250 rows, and
one kernel call per range cost ~7 us of argument handling each: 47 ms of a 57 ms search, while the
1.6M rows themselves take ~1 ms (`facepq bench scale`, 2026-12-01). Copying the ranges' codes (and
tombstones) into one buffer and scanning it with one call costs a copy of the rows scanned instead
(8 bytes a row). Gathered rows keep their order, so ties still break by the lower shard row, and the
kernel's row numbers are mapped back to shard row numbers for the kept rows only.
"""
from __future__ import annotations

import numpy as np

GATHER_MIN_PIECES = 8          # fewer ranges: one call each costs less than the copy
GATHER_MAX_BYTES = 256 << 20   # more rows than this to scan: range by range (no large transient buffer)


class RowMap:
    """Row numbers of a gathered piece -> shard row numbers."""

    def __init__(self, gathered_starts: np.ndarray, shard_starts: np.ndarray):
        self.gathered = gathered_starts   # int64 [P]: where each range starts in the gathered piece
        self.shard = shard_starts         # int64 [P]: its first row's shard row number

    def shard_rows(self, rows: np.ndarray) -> np.ndarray:
        """int64 [Q, k] rows of the gathered piece (-1 = no row) -> shard row numbers (-1 kept)."""
        idx = np.maximum(np.searchsorted(self.gathered, rows, side="right") - 1, 0)
        out = self.shard[idx] + (rows - self.gathered[idx])
        return np.where(rows < 0, rows, out)


def gather(pieces: list, starts: list) -> tuple[list, list, RowMap | None]:
    """(codes uint8 [n_i, B], skip bool [n_i] or None) pieces with their shard row starts -> one piece
    and a RowMap, or the pieces unchanged (and None) when there are few of them or too many rows."""
    if len(pieces) < GATHER_MIN_PIECES:
        return pieces, starts, None
    sizes = np.fromiter((codes.shape[0] for codes, _ in pieces), dtype=np.int64, count=len(pieces))
    if int(sizes.sum()) * pieces[0][0].shape[1] > GATHER_MAX_BYTES:
        return pieces, starts, None
    codes = np.concatenate([c for c, _ in pieces])
    skip = None
    if any(s is not None for _, s in pieces):
        skip = np.concatenate([s if s is not None else np.zeros(c.shape[0], np.bool_) for c, s in pieces])
    gathered_starts = np.zeros(len(pieces), dtype=np.int64)
    np.cumsum(sizes[:-1], out=gathered_starts[1:])
    return [(codes, skip)], [0], RowMap(gathered_starts, np.asarray(starts, dtype=np.int64))
