"""A partitioned search's many small row ranges, found for all segments at once and gathered into one piece.

A search of `nprobe` cells scans, in each segment grouped by cell, every probed cell's row range.
At 100M faces in 100 segments with 4096 cells, 64 probed cells are ~6,400 ranges of ~250 rows:
one kernel call per range cost ~7 us of argument handling each (47 ms of a 57 ms search, `facepq
bench scale`, 2026-12-01), and slicing and concatenating them in numpy still ~1 us each. So:

* `CellLayout` keeps a shard's cell offsets as one table [segments, L + 1]: a search's ranges in
  every segment are two indexing operations, not a loop over segments;
* `gather_ranges` copies the ranges' codes (and tombstones) into one buffer with one native call
  (`_fastscan.gather_rows`; numpy's concatenate where the extension is not built), scanned with one
  kernel call: a copy of the rows scanned (8 bytes a row) instead of a call per range.

Ranges are in shard row order (segment, then cell), so ties still break by the lower shard row, and
the kernel's row numbers are mapped back to shard row numbers (`RowMap`) for the kept rows only.
"""
from __future__ import annotations

import numpy as np

GATHER_MIN_RANGES = 8          # fewer ranges: one call each costs less than the copy
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


class CellLayout:
    """Where each cell's rows lie in every segment of a shard.

    Args:
        cell_offsets: per segment, in scan order, its int64 [L + 1] cell offsets, or None for a segment
            not grouped by cell (scanned whole by every search).
        rows: per segment, its row count.
    """

    def __init__(self, cell_offsets: list, rows: list[int]):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.starts = np.zeros(len(rows), dtype=np.int64)  # each segment's first shard row
        np.cumsum(self.rows[:-1], out=self.starts[1:])
        grouped = [i for i, off in enumerate(cell_offsets) if off is not None]
        self.grouped = np.asarray(grouped, dtype=np.int32)
        self.offsets = (np.stack([cell_offsets[i] for i in grouped]).astype(np.int64) if grouped
                        else np.zeros((0, 1), np.int64))  # [G, L + 1]
        self.whole = np.asarray([i for i, off in enumerate(cell_offsets) if off is None], dtype=np.int32)
        self._all_kept = None  # zeros as long as the longest segment: the tombstones of a segment without any

    def all_kept(self) -> np.ndarray:
        """bool [longest segment], all False: what a segment without tombstones reads as (made once; untouched
        pages of it cost no memory)."""
        if self._all_kept is None:
            self._all_kept = np.zeros(int(self.rows.max(initial=0)), dtype=np.bool_)
        return self._all_kept

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.rows.nbytes + self.starts.nbytes

    def ranges(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sorted cell ids -> (segment int32 [P], lo int64 [P], hi int64 [P]): segment-local row ranges of those
        cells in every grouped segment, and every ungrouped segment whole; in shard row order, empty ranges
        dropped, adjacent cells of one segment merged into one range."""
        cells = np.asarray(cells, dtype=np.intp)
        lo, hi = self.offsets[:, cells], self.offsets[:, cells + 1]  # [G, c]
        seg = np.broadcast_to(self.grouped[:, None], lo.shape)
        keep = hi > lo
        seg, lo, hi = seg[keep], lo[keep], hi[keep]  # row-major: segment, then cell
        if lo.size:
            first = np.ones(lo.size, dtype=bool)  # a range starts where the previous kept cell does not end
            first[1:] = (lo[1:] != hi[:-1]) | (seg[1:] != seg[:-1])
            last = np.append(first[1:], True)
            seg, lo, hi = seg[first], lo[first], hi[last]
        if self.whole.size:
            whole = self.whole[self.rows[self.whole] > 0]
            seg = np.concatenate([seg, whole])
            lo = np.concatenate([lo, np.zeros(whole.size, np.int64)])
            hi = np.concatenate([hi, self.rows[whole]])
            order = np.argsort(seg, kind="stable")
            seg, lo, hi = seg[order], lo[order], hi[order]
        return seg.astype(np.int32), lo, hi


def gather_ranges(codes: list, skips: list, layout: CellLayout, seg: np.ndarray, lo: np.ndarray,
                  hi: np.ndarray) -> tuple[list, list, RowMap | None]:
    """Row ranges of the segments (codes uint8 [n_s, B], skips bool [n_s] or None) -> (pieces, shard row
    starts, RowMap): one gathered piece and its RowMap, or the ranges as pieces (and None) when there are
    few of them or too many rows to copy."""
    shard_starts = layout.starts[seg] + lo
    width = codes[0].shape[1] if codes else 0
    total = int((hi - lo).sum())
    if seg.size < GATHER_MIN_RANGES or total * width > GATHER_MAX_BYTES:
        pieces = [(codes[s][a:b], None if skips[s] is None else skips[s][a:b])
                  for s, a, b in zip(seg.tolist(), lo.tolist(), hi.tolist())]
        return pieces, shard_starts.tolist(), None
    out = np.empty((total, width), dtype=np.uint8)
    _copy_rows(codes, width, seg, lo, hi, out)
    skip = None
    if any(skips[s] is not None for s in np.unique(seg).tolist()):
        kept = layout.all_kept()
        skip = np.empty(total, dtype=np.bool_)
        _copy_rows([s if s is not None else kept for s in skips], 1, seg, lo, hi, skip)
    gathered_starts = np.zeros(seg.size, dtype=np.int64)
    np.cumsum((hi - lo)[:-1], out=gathered_starts[1:])
    return [(out, skip)], [0], RowMap(gathered_starts, shard_starts)


def _copy_rows(sources: list, width: int, seg: np.ndarray, lo: np.ndarray, hi: np.ndarray, out: np.ndarray) -> None:
    """out <- the ranges' rows, in order (one native call; numpy where the extension is not built)."""
    from query_node import fastscan

    native = fastscan.native_module()
    if native is not None:
        native.gather_rows(sources, width, np.ascontiguousarray(seg, np.int32), np.ascontiguousarray(lo, np.int64),
                           np.ascontiguousarray(hi, np.int64), out)
    else:
        np.concatenate([sources[s][a:b] for s, a, b in zip(seg.tolist(), lo.tolist(), hi.tolist())], out=out)
