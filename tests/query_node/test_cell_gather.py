"""query_node.cell_gather: many cell ranges scanned as one gathered piece give the range-by-range answer."""
import numpy as np
import pytest

from facepq_core.partition import cell_ranges
from query_node.cell_gather import GATHER_MIN_PIECES, gather
from query_node.scan import scan_segments, scan_tables


def _ranges_by_loop(offsets, cells):
    out = []
    for c in cells:
        lo, hi = int(offsets[c]), int(offsets[c + 1])
        if hi == lo:
            continue
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_cell_ranges_merge_adjacent_cells_and_drop_empty_ones(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 4, 64)  # many empty cells, many neighbours
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    cells = np.sort(rng.choice(64, rng.integers(1, 64), replace=False))
    assert cell_ranges(offsets, cells) == _ranges_by_loop(offsets, cells)
    assert cell_ranges(offsets, np.array([], dtype=np.int64)) == []


@pytest.mark.parametrize("packed,k", [(True, 10), (False, 10), (True, 5000)])
def test_gathered_scan_equals_the_range_by_range_scan(packed, k):
    """Ties (few distinct table values), tombstones on some ranges, k beyond the rows (padding kept)."""
    rng = np.random.default_rng(7)
    width = 8
    segment = rng.integers(0, 256 if not packed else 256, (6000, width), dtype=np.uint8)
    skip = rng.random(6000) < 0.1
    pieces, starts, at = [], [], 0
    for i in range(3 * GATHER_MIN_PIECES):
        lo = at + int(rng.integers(0, 40))
        hi = lo + int(rng.integers(1, 200))
        pieces.append((segment[lo:hi], skip[lo:hi] if i % 3 == 0 else None))
        starts.append(lo)
        at = hi
    M, K = (2 * width, 16) if packed else (width, 256)
    luts = rng.integers(0, 3, (2, M, K)).astype(np.float32)  # small integers: many equal scores
    tables = scan_tables(luts, packed, width)
    want_scores, want_rows = scan_segments(pieces, tables, k, 1, starts=starts)
    one, one_starts, row_map = gather(pieces, starts)
    assert len(one) == 1 and row_map is not None
    got_scores, got_rows = scan_segments(one, tables, k, 1, starts=one_starts)
    np.testing.assert_array_equal(got_scores, want_scores)
    np.testing.assert_array_equal(row_map.shard_rows(got_rows), want_rows)


def test_few_ranges_are_scanned_as_they_are():
    codes = np.zeros((10, 8), np.uint8)
    pieces = [(codes[:5], None), (codes[5:], None)]
    assert gather(pieces, [0, 5]) == (pieces, [0, 5], None)
