"""A batch's queries scanned side by side (the AVX2 8-bit kernels, groups of 16): the float answers exactly.

One code byte selects every query's table entry at once (tables transposed to [byte column][256][lanes]): 16
lanes of quantized byte tables (up to 8 byte columns, finite tables), re-scoring exactly every row whose quantized
sum reaches a query's bound; else 8 or 16 lanes of float tables, each lane summing the columns in order from 0.0f
as the single-query kernels do. Answers must equal the numba reference row for row and score for score, ties
included, for any batch size (a call's rest past a multiple of 16 on the one-query kernels when too few to pay for a
pass), code width, k, skip mask, segment boundary, zero-padded last block and thread count. The kernels' counters
show how many queries of a call took the path, and how many of them on quantized tables. The AVX2 kernels are
forced, so these run on AVX-512 CPUs too.
"""
import numpy as np
import pytest

from query_node import fastscan
from query_node.code_blocks import CodeBlocks
from query_node.scan import TopKHeap, scan_tables
from tests.query_node.test_fastscan import _why_no_native
from tests.query_node.test_fastscan_bound8 import tables_of

pytestmark = pytest.mark.skipif(_why_no_native() is not None, reason=str(_why_no_native()))


def _scan_both(rng, nq, width, kind, layout, threads=1, n_max=3000):
    """(native heap, reference heap, native path's query_parallel_queries increase) over 1-3 segments."""
    k = int(rng.integers(1, 150))
    kk, luts = tables_of(rng, kind, nq, width)
    tables = scan_tables(luts, False, width)
    native, reference = TopKHeap(nq, k, native=True, threads=threads), TopKHeap(nq, k, native=False)
    before = fastscan.query_parallel_queries()
    for _ in range(int(rng.integers(1, 4))):
        n = int(rng.integers(0, n_max))   # rarely a multiple of 4 or 32: scalar tails, zero-padded blocks
        codes = rng.integers(0, kk, size=(n, width), dtype=np.uint8)
        skip = rng.random(n) < 0.3 if rng.integers(0, 2) else None
        native.scan(CodeBlocks.of(codes) if layout == "blocks" else codes, tables, skip)
        reference.scan(codes, tables.byte, skip)
    return native, reference, fastscan.query_parallel_queries() - before, k


def _assert_same(native, reference, what):
    (ns, nr), (fs, fr) = native.result(), reference.result()
    np.testing.assert_array_equal(nr, fr, err_msg=what)
    np.testing.assert_array_equal(ns, fs, err_msg=what)


@pytest.mark.parametrize("nq", [8, 9, 12, 16, 17, 20, 24, 28, 37, 40])
@pytest.mark.parametrize("kind", ["pq", "logprob", "random", "ties"])
def test_blocks_of_any_batch_size_give_the_float_answers(nq, kind, avx2):
    rng = np.random.default_rng(nq * 7 + len(kind))
    for width in (1, 3, 4, 6, 8, 16, 24):   # (more than 8 columns: float tables of 8 and 16 lanes)
        native, reference, scanned, k = _scan_both(rng, nq, width, kind, "blocks")
        _assert_same(native, reference, f"{kind} nq={nq} width={width} k={k}")
        assert scanned > 0, f"nq={nq} width={width}: the side-by-side path did not run"


@pytest.mark.parametrize("nq", [3, 5, 7, 9, 12, 16, 18, 33])
@pytest.mark.parametrize("kind", ["pq", "random", "ties"])
def test_row_major_8_byte_codes_of_any_batch_size_give_the_float_answers(nq, kind, avx2):
    """Row-major 8-byte codes (a partitioned index's cells, remote segments) take the fused float kernel, which
    scans batches side by side too; n % 4 tail rows one query at a time."""
    rng = np.random.default_rng(nq * 11 + len(kind))
    for _ in range(3):
        native, reference, scanned, k = _scan_both(rng, nq, 8, kind, "rows")
        _assert_same(native, reference, f"{kind} nq={nq} k={k}")
        assert scanned > 0


# Queries of a call scanned side by side, by call size: every full group of 16, and the rest too from 8 queries on
# 32-row blocks, from 3 on row-major codes (fastscan_kernels.c, QPAR_BLOCKS_MIN / QPAR_ROWS_MIN: what a pass costs
# against one-query scans).
SIDE_BY_SIDE = {
    "blocks": {1: 0, 4: 0, 7: 0, 8: 8, 9: 9, 15: 15, 16: 16, 17: 16, 23: 16, 24: 24, 33: 32, 40: 40},
    "rows": {1: 0, 2: 0, 3: 3, 8: 8, 16: 16, 17: 16, 18: 16, 19: 19, 34: 32, 35: 35},
}


def _counters():
    return fastscan.query_parallel_queries(), fastscan.query_parallel_quantized()


@pytest.mark.parametrize("layout", sorted(SIDE_BY_SIDE))
def test_a_call_scans_side_by_side_exactly_the_queries_a_pass_pays_for(layout, avx2):
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 256, size=(1001, 8), dtype=np.uint8)
    for nq, expected in SIDE_BY_SIDE[layout].items():
        _, luts = tables_of(rng, "pq", nq, 8)
        tables = scan_tables(luts, False, 8)
        native, reference = TopKHeap(nq, 20, native=True), TopKHeap(nq, 20, native=False)
        before = _counters()
        native.scan(CodeBlocks.of(codes) if layout == "blocks" else codes, tables)
        scanned, quantized = (b - a for a, b in zip(before, _counters()))
        reference.scan(codes, tables.byte)
        _assert_same(native, reference, f"{layout} nq={nq}")
        assert scanned == expected, f"{layout}: {scanned} of {nq} queries side by side, not {expected}"
        assert quantized == expected, f"{layout}: {quantized} of {nq} queries on quantized tables, not {expected}"


def test_split_over_threads_many_rows_every_row_tied(avx2):
    """Rows split over threads (runs of >= 65,536), each thread's heaps merged: the one-thread answer. With every
    score equal the lowest rows must win, across threads and across the batch's lane groups. Of 20 queries on blocks,
    16 go side by side and 4 to the one-query kernel; on row-major codes all 20 (groups of 16 and 4)."""
    rng = np.random.default_rng(5)
    n = 3 * 65536 + 777
    codes = rng.integers(0, 256, size=(n, 8), dtype=np.uint8)
    skip = rng.random(n) < 0.1
    for luts in (rng.standard_normal((20, 8, 256)).astype(np.float32), np.full((20, 8, 256), -2.5, np.float32)):
        tables = scan_tables(luts, False, 8)
        reference = TopKHeap(20, 100, native=False)
        reference.scan(codes, tables.byte, skip)
        for threads in (1, 3):
            for layout, side in ((CodeBlocks.of(codes), 16), (codes, 20)):
                heap = TopKHeap(20, 100, threads=threads)
                before = fastscan.query_parallel_queries()
                heap.scan(layout, tables, skip)
                assert fastscan.query_parallel_queries() - before == side * threads
                _assert_same(heap, reference, f"{threads} threads, {type(layout).__name__}")


def test_non_finite_tables_on_row_major_codes_give_the_float_answers(avx2):
    """-inf entries (a codeword no query may match) and NaN: no bound tables, so the fused float kernel scans
    them, and -inf sums and NaN sums must be kept or left out exactly as the reference does. A group of 16 with one
    non-finite table goes on float tables; the next, all finite, on quantized ones."""
    rng = np.random.default_rng(9)
    luts = rng.standard_normal((22, 8, 256)).astype(np.float32)
    luts[:, 2, :40] = -np.inf
    luts[1, 5, 7] = np.nan
    luts[4] = -np.inf   # every score -inf: the first k rows
    luts[16:] = rng.standard_normal((6, 8, 256))   # the second group: finite
    codes = rng.integers(0, 256, size=(2001, 8), dtype=np.uint8)
    tables = scan_tables(luts, False, 8)
    native, reference = TopKHeap(22, 50, native=True), TopKHeap(22, 50, native=False)
    before = _counters()
    native.scan(codes, tables)
    scanned, quantized = (b - a for a, b in zip(before, _counters()))
    reference.scan(codes, tables.byte)
    _assert_same(native, reference, "non-finite")
    assert (scanned, quantized) == (22, 6)
