"""The AVX2 kernel of 8-bit codes in 32-row blocks (q8_scan_blocks): nibble bounds, exactly the float answers.

Each byte's 256-entry table, seen as 16 x 16 by the byte's nibbles, is bounded by min(A[h] + B[l], R[h],
C[l]) (`fastscan.bound8_tables`); rows whose bound cannot reach the k-th best are skipped, the rest
re-scored exactly. A bound that were too tight anywhere would show up here as a missing or different
row; the bound itself is also checked entry by entry. The AVX2 kernels are forced (`use_simd("avx2")`),
so these run on AVX-512 CPUs too.
"""
import functools

import numpy as np
import pytest

from facepq_core.nibble_order import nibble_order
from query_node import fastscan
from query_node.code_blocks import CodeBlocks
from query_node.scan import TopKHeap, scan_tables
from tests.query_node.test_fastscan import _why_no_native
from tests.query_node.test_fastscan_q8 import byte_luts

native_only = pytest.mark.skipif(_why_no_native() is not None, reason=str(_why_no_native()))



@functools.cache
def _codebooks(ordered: bool, dsub: int = 4) -> np.ndarray:
    """8 random codebooks of 256 codewords [8, 256, dsub] (numbered in nibble order unless `ordered` is False):
    ordering costs ~0.2 s a codebook, so wide tables reuse these, column j codebook j % 8."""
    books = np.random.default_rng(99).standard_normal((8, 256, dsub))
    return np.stack([b[nibble_order(b)] for b in books]) if ordered else books


def pq_tables(rng, nq: int, width: int, ordered: bool = True) -> np.ndarray:
    """Inner-product tables float32 [nq, width, 256] of random queries and `_codebooks`: the tables of a
    product quantizer, the kernel's intended case."""
    books = _codebooks(ordered)[np.arange(width) % 8]
    queries = rng.standard_normal((nq, width, books.shape[2]))
    return np.einsum("qmd,mkd->qmk", queries, books).astype(np.float32)


def logprob_tables(rng, nq: int, width: int) -> np.ndarray:
    """Log-softmax tables like OPQN's, peaked on a few codewords."""
    logits = rng.standard_normal((nq, width, 256)) * rng.uniform(0.5, 8)
    return (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)


def tables_of(rng, kind: str, nq: int, width: int) -> tuple[int, np.ndarray]:
    if kind == "pq":
        return 256, pq_tables(rng, nq, width)
    if kind == "logprob":
        return 256, logprob_tables(rng, nq, width)
    return byte_luts(rng, kind, nq, width)


@native_only
@pytest.mark.parametrize("kind", ["pq", "logprob", "random", "ties", "lopsided"])
@pytest.mark.parametrize("width", [1, 3, 8, 16, 24, 64])
def test_block_kernel_matches_numba(kind, width, avx2):
    rng = np.random.default_rng(width * 10 + len(kind))
    for _ in range(8):
        nq, k = int(rng.integers(1, 4)), int(rng.integers(1, 150))
        kk, luts = tables_of(rng, kind, nq, width)
        tables = scan_tables(luts, False, width)
        assert tables.bound8 is not None and tables.quant8 is None
        native, reference = TopKHeap(nq, k, native=True), TopKHeap(nq, k, native=False)
        for _ in range(int(rng.integers(1, 4))):
            n = int(rng.integers(0, 4000))   # rarely a multiple of 32: a zero-padded last block
            codes = rng.integers(0, kk, size=(n, width), dtype=np.uint8)
            skip = rng.random(n) < 0.3 if rng.integers(0, 2) else None
            native.scan(CodeBlocks.of(codes), tables, skip)
            reference.scan(codes, tables.byte, skip)
        (ns, nr), (fs, fr) = native.result(), reference.result()
        np.testing.assert_array_equal(nr, fr, err_msg=f"{kind} width={width} K={kk} k={k}")
        np.testing.assert_array_equal(ns, fs, err_msg=f"{kind} width={width} K={kk} k={k}")


@native_only
def test_many_rows_batched_and_split_over_threads_give_the_one_query_answer(avx2):
    rng = np.random.default_rng(8)
    codes = rng.integers(0, 256, size=(3 * 65536 + 777, 8), dtype=np.uint8)
    skip = rng.random(len(codes)) < 0.1
    luts = pq_tables(rng, 5, 8)
    blocks = CodeBlocks.of(codes)
    reference = TopKHeap(5, 100, native=False)
    reference.scan(codes, scan_tables(luts, False, 8).byte, skip)
    for threads in (1, 2, 3):
        heap = TopKHeap(5, 100, threads=threads)
        heap.scan(blocks, scan_tables(luts, False, 8), skip)
        for got, want in zip(heap.result(), reference.result()):
            np.testing.assert_array_equal(got, want, err_msg=f"{threads} threads")


@native_only
@pytest.mark.parametrize("kind", ["unordered", "gaussian", "equal"])
@pytest.mark.parametrize("width", [8, 12, 16])
def test_where_the_bound_passes_most_rows_the_kernel_scores_densely_with_the_same_answers(kind, width, avx2):
    """Tables whose nibble bound passes most rows (codebooks not in nibble order, independent entries, every
    row tied): after a window of 64 blocks the kernel scores every row exactly (dense_block8) for 512 blocks,
    then bounds again (the kernel's count of densely scored blocks rises); answers equal the float reference's,
    with skips, any k, batches and split over threads."""
    rng = np.random.default_rng(width)
    n = 52_000   # past a window, a dense stretch and the next window, on every thread of three
    codes = rng.integers(0, 256, size=(n, width), dtype=np.uint8)
    skip = rng.random(n) < 0.2
    luts = {"unordered": lambda: pq_tables(rng, 3, width, ordered=False),
            "gaussian": lambda: rng.standard_normal((3, width, 256)).astype(np.float32),
            "equal": lambda: np.full((3, width, 256), -2.5, dtype=np.float32)}[kind]()
    tables = scan_tables(luts, False, width)
    bounds = fastscan.bound8_row_bounds(tables.bound8, codes)
    exact = tables.byte.reshape(3, width, 256)[:, np.arange(width), codes].sum(-1)   # [3, n]
    passing = (bounds >= np.sort(exact, axis=1)[:, -10:-9]).mean(1)
    assert (passing > 0.25).all(), passing   # the dense case: the bound passes more than 8 rows of 32
    blocks = CodeBlocks.of(codes)
    for k in (1, 10, 700):
        reference = TopKHeap(3, k, native=False)
        reference.scan(codes, tables.byte, skip)
        for threads in (1, 3):
            heap = TopKHeap(3, k, threads=threads)
            dense_before = fastscan.dense_blocks()
            heap.scan(blocks, tables, skip)
            assert fastscan.dense_blocks() > dense_before, f"{kind} width={width} k={k} threads={threads}: not dense"
            for got, want in zip(heap.result(), reference.result()):
                np.testing.assert_array_equal(got, want, err_msg=f"{kind} width={width} k={k} threads={threads}")


@native_only
def test_every_row_ties_lower_rows_win(avx2):
    codes = np.random.default_rng(0).integers(0, 256, size=(1000, 8), dtype=np.uint8)
    heap = TopKHeap(1, 10)
    heap.scan(CodeBlocks.of(codes), scan_tables(np.full((1, 8, 256), -2.5, dtype=np.float32), False, 8))
    np.testing.assert_array_equal(heap.result()[1], [np.arange(10)])


@native_only
def test_tables_the_kernel_cannot_take_scan_the_blocks_rows_with_float_tables(avx2):
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 256, size=(500, 8), dtype=np.uint8)
    luts = rng.standard_normal((1, 8, 256)).astype(np.float32)
    luts[0, 3, 7] = -np.inf   # a codeword no query may match: non-finite, so no quantized bound
    tables = scan_tables(luts, False, 8)
    assert tables.bound8 is None
    heap, reference = TopKHeap(1, 20), TopKHeap(1, 20, native=False)
    heap.scan(CodeBlocks.of(codes), tables)
    reference.scan(codes, tables.byte)
    for got, want in zip(heap.result(), reference.result()):
        np.testing.assert_array_equal(got, want)


def reference_bound8(byte_tables: np.ndarray):
    """The formulas of `fastscan.bound8_tables` in numpy: (bound [Q, width, 4, 16], base, delta, terms)."""
    nq, width = byte_tables.shape[0], byte_tables.shape[1] // 256
    t = byte_tables.reshape(nq, width, 16, 16).astype(np.float64)   # [query, column, high, low]
    a = t.mean(3)
    b = (t - a[..., None]).max(2)
    a0, b0 = a.min(2, keepdims=True), b.min(2, keepdims=True)
    steps = np.maximum(a.max(2, keepdims=True) - a0, b.max(2, keepdims=True) - b0).max(1, keepdims=True)
    delta = np.where(steps > 0, steps / fastscan.BOUND_LEVELS, 1.0)
    covers = ((a, a0), (b, b0), (t.max(3), a0 + b0), (t.max(2), a0 + b0))
    bound = np.stack([np.maximum(np.ceil((x - lo) / delta), 0) for x, lo in covers], axis=2)
    eps = 4.0 * (width + 2) * width * np.abs(t).max(axis=(1, 2, 3)) * 2.0 ** -24
    terms = np.ceil(eps / delta[:, 0, 0]) + 2
    return bound, (a0 + b0)[:, :, 0].sum(1), delta[:, 0, 0], terms


@native_only
@pytest.mark.parametrize("kind", ["pq", "logprob", "random", "ties", "lopsided"])
def test_native_bound_tables_are_the_reference_formulas(kind):
    rng = np.random.default_rng(10 + len(kind))
    for width in (1, 3, 8, 16, 64):
        _, luts = tables_of(rng, kind, 3, width)
        byte = scan_tables(luts, False, width).byte
        got = fastscan.bound8_tables(byte)
        bound, base, delta, terms = reference_bound8(byte)
        np.testing.assert_allclose(got.delta, delta, rtol=1e-12)
        np.testing.assert_allclose(got.base, base, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(got.terms, terms)
        # the column sums' order differs from numpy's pairwise one: a level may land one step apart
        assert np.abs(got.bound[:, :width, :, :16].astype(int) - bound).max() <= 1
        assert (got.bound[:, :width, :, :16] == bound).mean() > 0.99
        assert not got.bound[:, width:].any()   # padding columns


@native_only
@pytest.mark.parametrize("kind", ["pq", "logprob", "random", "ties", "lopsided"])
def test_the_bound_covers_every_byte_value_of_every_column(kind):
    """Per column, every one of the 256 entries is at most base_b + delta * min(A + B, R, C), and the
    quantized entries fit the kernel's bytes (A, B <= 127 so A + B fits; R, C <= 254)."""
    rng = np.random.default_rng(len(kind))
    for _ in range(20):
        _, luts = tables_of(rng, kind, 2, 1)          # one column: base is that column's base_b
        byte = scan_tables(luts, False, 1).byte
        tables = fastscan.bound8_tables(byte)
        every_value = np.arange(256, dtype=np.uint8)[:, None]
        bound = fastscan.bound8_row_bounds(tables, every_value) - tables.delta[:, None] * tables.terms[:, None]
        assert (byte <= bound + 1e-12 * np.abs(byte).max()).all(), kind
        a, b, r, c = (tables.bound[:, 0, i, :16] for i in range(4))
        assert a.max() <= 127 and b.max() <= 127 and r.max() <= 254 and c.max() <= 254
        np.testing.assert_array_equal(tables.bound[..., :16], tables.bound[..., 16:])   # both lanes


@native_only
def test_bound8_tables_refuse_what_the_kernel_cannot_take():
    assert fastscan.bound8_tables(np.full((1, 256), np.nan, np.float32)) is None
    assert fastscan.bound8_tables(np.zeros((1, 65 * 256), np.float32)) is None   # wider than MAX_CODE_BYTES
    flat = fastscan.bound8_tables(np.zeros((1, 8 * 256), np.float32))           # constant tables: any step
    assert flat.delta[0] > 0 and not flat.bound.any()


@native_only
def test_nibble_order_is_what_makes_the_bound_tight():
    """The share of rows a top-100 query re-scores, codebooks numbered in nibble order vs as they came."""
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 256, size=(100_000, 8), dtype=np.uint8)
    kept = {}
    for ordered in (True, False):
        luts = pq_tables(np.random.default_rng(5), 4, 8, ordered=ordered)
        byte = scan_tables(luts, False, 8).byte
        exact = np.stack([luts[q][np.arange(8), codes].sum(1) for q in range(4)])
        kth = np.sort(exact, axis=1)[:, -100]
        kept[ordered] = (fastscan.bound8_row_bounds(fastscan.bound8_tables(byte), codes) >= kth[:, None]).mean()
    assert kept[True] < 0.05 < 0.5 < kept[False], kept
