"""One served shard at one index version, and its exact top-k search.

A shard is a list of memory-mapped segments (indexer.segment.SegmentView) in scan
order, each with an optional tombstone mask. `ShardData.search` runs every segment
through one top-k heap (query_node.scan) and then looks up the metadata of the rows
it kept. A two-stage search keeps R candidates instead and re-scores them with the
index's refinement tier before the lookup (query_node.two_stage). A shard that could
not be opened (a missing or corrupt segment) is kept as NOT_SERVING with its reason:
it is never scanned, so it never returns wrong scores.

A search limited to some cells of a partitioned index scans, in each segment grouped by cell,
only those cells' row ranges, numbering rows as the whole scan would (shard row numbers), so
its hits are exactly the exhaustive scan's scores and tie order restricted to those rows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from query_node.cell_gather import CellLayout, gather_ranges
from query_node.merge import Hit
from query_node.scan import ScanTables, scan_segments
from query_node.two_stage import RefineQuery, timed_rescore


@dataclass
class ScanStats:
    """What one search cost inside a node: kernel seconds (all shards, all queries) and rows scanned."""

    scan_seconds: float = 0.0
    rows: int = 0
    rescore_seconds: float = 0.0  # a two-stage search's second pass (reading and re-scoring candidates)


@dataclass
class ShardData:
    """One served shard at one version."""

    shard: int
    segments: list = field(default_factory=list)   # indexer.segment.SegmentView, scan order
    skips: list = field(default_factory=list)      # bool [rows] per segment (True = tombstoned) or None
    blocks: list = field(default_factory=list)     # per segment: its codes as CodeBlocks, or None (see load_view)
    rows: int = 0
    live_rows: int = 0
    code_bytes: int = 0
    serving: bool = True
    reason: str = ""
    _layout: CellLayout | None = field(default=None, init=False, repr=False, compare=False)

    def search(self, tables: ScanTables, k: int, stats: ScanStats | None = None,
               refine: RefineQuery | None = None, threads: int = 1, with_codes: bool = False,
               cells: np.ndarray | None = None) -> list[list[Hit]]:
        """Top-k of this shard for `query_node.scan.ScanTables`; one best-first list per query.

        `stats` (optional) accumulates the seconds spent in the scan kernel and the rows scanned.
        `refine` (optional): two stages, the top max(R, k) of the scan re-scored by the refinement
        tier, whose scores the hits then carry. `threads`: native threads per segment scan (same answer).
        `with_codes`: each hit carries its stored code (read from what the scan just read: the segment's
        blocks or its map, so no page becomes resident that the scan did not already touch).
        `cells` (optional, int64 [Q, n], each row sorted): scan only query q's cells `cells[q]` of segments
        grouped by cell (a segment without cell offsets is scanned whole), each query its own.
        """
        keep = max(k, refine.candidates) if refine is not None else k
        layout = self.cell_layout()
        t0 = time.perf_counter()
        if cells is None:
            pieces = list(zip(self.scanned_codes(), self.skips))
            scores, rows = scan_segments(pieces, tables, keep, threads, starts=layout.starts.tolist())
            scanned = _rows_in(pieces)
        else:
            codes = self.segments_codes()
            per_query = [self._scan_cells(codes, tables.query(q), keep, threads, cells[q], layout)
                         for q in range(len(cells))]
            scores, rows = np.concatenate([r[0] for r in per_query]), np.concatenate([r[1] for r in per_query])
            scanned = sum(r[2] for r in per_query)
        if stats is not None:
            stats.scan_seconds += time.perf_counter() - t0
            stats.rows += scanned
        starts = layout.starts
        if refine is not None:
            scores, rows = timed_rescore(stats, self.segments, starts, scores, rows, refine, k)
        # One searchsorted for every hit of every query, not one per hit.
        seg_of = np.searchsorted(starts, rows, side="right") - 1
        meta = self._hit_metadata(rows, seg_of, starts)
        out = []
        for q in range(scores.shape[0]):
            hits = []
            for j, (score, row) in enumerate(zip(scores[q].tolist(), rows[q].tolist())):
                if row < 0:
                    break
                face_id, person, source = meta[row]
                code = b""
                if with_codes:
                    code = self._code_of(int(seg_of[q, j]), row - int(starts[seg_of[q, j]]))
                hits.append(Hit(face_id=face_id, person=person, source=source, score=score, shard=self.shard,
                                code=code))
            out.append(hits)
        return out

    def _scan_cells(self, codes: list, tables: ScanTables, keep: int, threads: int, cells: np.ndarray,
                    layout: CellLayout):
        """One query's top `keep` over its cells (sorted ids): their ranges in every segment (`codes`: the
        segments' codes), gathered into one piece (query_node.cell_gather) and scanned, rows numbered as the
        shard's. Returns (scores [1, keep], shard rows [1, keep], rows scanned)."""
        seg, lo, hi = layout.ranges(cells)
        pieces, piece_starts, row_map = gather_ranges(codes, self.skips, layout, seg, lo, hi)
        scores, rows = scan_segments(pieces, tables, keep, threads, starts=piece_starts)
        if row_map is not None:
            rows = row_map.shard_rows(rows)
        return scores, rows, _rows_in(pieces)

    def segments_codes(self) -> list:
        """Each segment's codes (uint8 [rows, code_bytes], memory-mapped), in scan order."""
        return [seg.codes for seg in self.segments]

    def scanned_codes(self) -> list:
        """What an exhaustive scan reads of each segment: its `CodeBlocks` where the node made them, else its codes."""
        if not self.blocks:
            return self.segments_codes()
        return [b if b is not None else seg.codes for seg, b in zip(self.segments, self.blocks)]

    def _code_of(self, s: int, row: int) -> bytes:
        """Segment s's stored code of `row`: from its blocks where the node keeps them (the map's code pages
        were released), else through the map the scan just read (no page becomes resident that it did not)."""
        blocks = self.blocks[s] if self.blocks else None
        return blocks.row(row) if blocks is not None else self.segments[s].codes[row].tobytes()

    def cell_layout(self) -> CellLayout:
        """The segments' row starts and cell offsets as tables (built on first use; segments never change)."""
        if self._layout is None:
            self._layout = CellLayout([seg.cell_offsets for seg in self.segments], [seg.rows for seg in self.segments])
        return self._layout

    def _hit_metadata(self, rows: np.ndarray, seg_of: np.ndarray, starts: np.ndarray) -> dict:
        """{shard row: (face_id, person, source)} for every hit (rows >= 0) of every query.

        Read with SegmentView.hit_metadata (positional reads of a local file), not through the
        segment's map: mapped pages once touched stay resident, so looking hits up through the
        map made a node's RSS grow with traffic towards the whole file (measured 1.3 x the code
        bytes after 310 searches on 5M rows, and growing). A native reader doing the same reads
        in one C call measured slower here (ctypes' per-call cost), so the reads stay in Python.
        """
        found = rows >= 0
        hit_rows, hit_segs = rows[found], seg_of[found]
        meta = {}
        for s in np.unique(hit_segs).tolist():
            shard_rows = np.unique(hit_rows[hit_segs == s])
            ids, persons, sources = self.segments[s].hit_metadata(shard_rows - starts[s])
            meta.update(zip(shard_rows.tolist(), zip(ids.tolist(), persons, sources)))
        return meta


def _rows_in(pieces) -> int:
    """Rows of (codes, skip mask) pieces a scan covered."""
    return sum(piece_codes.shape[0] for piece_codes, _ in pieces)
