"""query_node.cell_gather: a shard's cell ranges found for all segments at once, and scanned as one gathered
piece, give the range-by-range answer (native copy and numpy copy alike)."""
import numpy as np
import pytest

from query_node import fastscan
from query_node.cell_gather import GATHER_MIN_RANGES, CellLayout, gather_ranges
from query_node.scan import scan_segments, scan_tables


def _ranges_by_loop(offsets_per_segment, rows, cells):
    """The reference: per segment in order, each probed cell's range, adjacent ones merged, empty ones dropped;
    an ungrouped segment (None) whole."""
    out = []
    for s, offsets in enumerate(offsets_per_segment):
        if offsets is None:
            if rows[s]:
                out.append((s, 0, rows[s]))
            continue
        for c in cells:
            lo, hi = int(offsets[c]), int(offsets[c + 1])
            if hi == lo:
                continue
            if out and out[-1][0] == s and out[-1][2] == lo:
                out[-1] = (s, out[-1][1], hi)
            else:
                out.append((s, lo, hi))
    return out


def _segments(rng, count, cells, with_whole=True):
    offsets, rows = [], []
    for s in range(count):
        if with_whole and s % 4 == 3:
            offsets.append(None)
            rows.append(int(rng.integers(0, 30)))
            continue
        sizes = rng.integers(0, 4, cells)  # many empty cells, many neighbours
        offsets.append(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        rows.append(int(offsets[-1][-1]))
    return offsets, rows


@pytest.mark.parametrize("seed", range(5))
def test_ranges_are_the_per_segment_loop_in_shard_row_order(seed):
    rng = np.random.default_rng(seed)
    offsets, rows = _segments(rng, 9, 64)
    layout = CellLayout(offsets, rows)
    assert layout.starts.tolist() == np.concatenate([[0], np.cumsum(rows)[:-1]]).tolist()
    for cells in (np.sort(rng.choice(64, rng.integers(1, 64), replace=False)), np.array([], dtype=np.int64)):
        seg, lo, hi = layout.ranges(cells)
        assert list(zip(seg.tolist(), lo.tolist(), hi.tolist())) == _ranges_by_loop(offsets, rows, cells.tolist())
    assert CellLayout([], []).starts.size == 0


@pytest.fixture(params=["native", "numpy"])
def copy_path(request, monkeypatch):
    if request.param == "native":
        if not fastscan.available():
            pytest.fail(f"the native extension should be built here: {fastscan.status()}")
    else:
        monkeypatch.setattr(fastscan, "native_module", lambda: None)
    return request.param


@pytest.mark.parametrize("packed,k", [(True, 10), (False, 10), (True, 5000)])
def test_gathered_scan_equals_the_range_by_range_scan(copy_path, packed, k):
    """Ties (few distinct table values), tombstones on some segments, ungrouped segments, k beyond the rows."""
    rng = np.random.default_rng(7)
    width = 8
    offsets, rows = _segments(rng, 12, 200)
    codes = [rng.integers(0, 256, (n, width), dtype=np.uint8) for n in rows]
    skips = [rng.random(n) < 0.1 if s % 3 == 0 else None for s, n in enumerate(rows)]
    layout = CellLayout(offsets, rows)
    seg, lo, hi = layout.ranges(np.sort(rng.choice(200, 90, replace=False)))
    assert seg.size >= GATHER_MIN_RANGES
    pieces = [(codes[s][a:b], None if skips[s] is None else skips[s][a:b]) for s, a, b in zip(seg, lo, hi)]
    starts = (layout.starts[seg] + lo).tolist()
    M, K = (2 * width, 16) if packed else (width, 256)
    luts = rng.integers(0, 3, (2, M, K)).astype(np.float32)  # small integers: many equal scores
    tables = scan_tables(luts, packed, width)
    want_scores, want_rows = scan_segments(pieces, tables, k, 1, starts=starts)
    one, one_starts, row_map = gather_ranges(codes, skips, layout, seg, lo, hi)
    assert len(one) == 1 and row_map is not None and one[0][1] is not None
    got_scores, got_rows = scan_segments(one, tables, k, 1, starts=one_starts)
    np.testing.assert_array_equal(got_scores, want_scores)
    np.testing.assert_array_equal(row_map.shard_rows(got_rows), want_rows)


def test_few_ranges_are_scanned_as_they_are():
    codes = [np.arange(80, dtype=np.uint8).reshape(10, 8)]
    layout = CellLayout([np.array([0, 5, 10])], [10])
    seg, lo, hi = layout.ranges(np.array([1]))
    pieces, starts, row_map = gather_ranges(codes, [None], layout, seg, lo, hi)
    assert row_map is None and starts == [5] and len(pieces) == 1
    assert np.shares_memory(pieces[0][0], codes[0]) and (pieces[0][0] == codes[0][5:]).all()


def test_the_native_copy_refuses_ranges_outside_their_source():
    native = fastscan.native_module()
    if native is None:
        pytest.fail(f"the native extension should be built here: {fastscan.status()}")
    src = [np.zeros((4, 8), np.uint8)]
    out = np.empty((5, 8), np.uint8)
    with pytest.raises(ValueError, match="outside its source"):
        native.gather_rows(src, 8, np.array([0], np.int32), np.array([0], np.int64), np.array([5], np.int64), out)
    with pytest.raises(ValueError, match="outside its source"):
        native.gather_rows(src, 8, np.array([1], np.int32), np.array([0], np.int64), np.array([1], np.int64), out)
    with pytest.raises(ValueError, match="out"):
        native.gather_rows(src, 8, np.array([0], np.int32), np.array([0], np.int64), np.array([4], np.int64), out)
