"""The popcount kernel (query_node.hamming_scan): exact Hamming top-k equal to a brute-force ranking, on every
SIMD variant this CPU runs, with ties, tombstones, batched queries and rows numbered across segments."""
from __future__ import annotations

import numpy as np
import pytest

from facepq_core.codecs.binary import BinaryCodec
from query_node import hamming_scan
from query_node.scan import TopKHeap, scan_tables, scan_topk_batch

pytestmark = pytest.mark.skipif(not hamming_scan.available(), reason=f"no popcount kernel: {hamming_scan.status()}")
VARIANTS = [isa for isa, runs in hamming_scan.variants().items() if runs]


def brute_force(codes, queries, k, skip=None):
    """(scores -distance [Q, k], rows [Q, k]) by sorting every live row: distance, then row."""
    bits = np.unpackbits(codes, axis=1)
    dist = (np.unpackbits(queries, axis=1)[:, None, :] != bits[None]).sum(2)
    live = np.flatnonzero(~skip) if skip is not None else np.arange(len(codes))
    scores = np.full((len(queries), k), -np.inf, np.float32)
    rows = np.full((len(queries), k), -1, np.int64)
    for q in range(len(queries)):
        order = live[np.lexsort((live, dist[q, live]))][:k]
        scores[q, :len(order)], rows[q, :len(order)] = -dist[q, order], order
    return scores, rows


def tied_codes(rng, n, width, patterns=40):
    """Codes drawn from a few patterns, so many rows share a distance (ties are the point)."""
    return rng.integers(0, 256, (patterns, width), dtype=np.uint8)[rng.integers(0, patterns, n)]


def scan(codes, queries, k, skip=None, isa="", offsets=(0,)):
    """Scan `codes` split at `offsets` into one heap with the popcount kernel of variant `isa`."""
    heap = TopKHeap(len(queries), k)
    bounds = list(offsets) + [len(codes)]
    for a, b in zip(bounds, bounds[1:]):
        mask = np.ascontiguousarray(skip[a:b]) if skip is not None else np.zeros(1, np.bool_)
        hamming_scan.scan_into(np.ascontiguousarray(codes[a:b]), queries, mask, skip is not None, heap.rows_scanned,
                               heap.scores, heap.rows, isa=isa)
        heap.rows_scanned += b - a
    return heap.result()


@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("width", [8, 4, 6, 16])
@pytest.mark.parametrize("k", [1, 7, 60])
def test_popcount_top_k_equals_brute_force_hamming_ranking(isa, width, k):
    rng = np.random.default_rng(width * 100 + k)
    codes = tied_codes(rng, 20011, width)  # not a multiple of 8 rows: the vector loops' tails count
    queries = np.ascontiguousarray(np.concatenate([codes[:3], rng.integers(0, 256, (3, width), dtype=np.uint8)]))
    skip = rng.random(len(codes)) < 0.3
    for mask in (None, skip):
        got = scan(codes, queries, k, mask, isa=isa, offsets=(0, 8195, 8200))
        want = brute_force(codes, queries, k, mask)
        assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])


@pytest.mark.parametrize("isa", VARIANTS)
def test_short_results_are_padded_and_tombstones_never_return(isa):
    codes = np.arange(10, dtype=np.uint8).repeat(8).reshape(10, 8)
    skip = np.zeros(10, bool)
    skip[[0, 3, 4]] = True
    scores, rows = scan(codes, np.ascontiguousarray(codes[:1]), 12, skip, isa=isa)
    assert rows[0, 7:].tolist() == [-1] * 5 and np.isneginf(scores[0, 7:]).all()
    assert sorted(rows[0, :7].tolist()) == [1, 2, 5, 6, 7, 8, 9]


def test_the_node_scan_path_takes_the_popcount_kernel_for_hamming_tables_only():
    rng = np.random.default_rng(5)
    codec = BinaryCodec(rng.normal(size=(16, 64)).astype(np.float32), np.zeros(16, np.float32), normalize=False)
    emb = rng.normal(size=(3000, 16)).astype(np.float32)
    codes = codec.encode(emb)
    hamming = scan_tables(codec.query_tables(emb[:4]), False, 8)
    assert np.array_equal(hamming.hamming, codes[:4])
    assert scan_tables(codec.with_scoring("asymmetric").query_tables(emb[:4]), False, 8).hamming is None
    skip = rng.random(3000) < 0.1
    for tables in (codec.query_tables(emb[:4]), codec.with_scoring("asymmetric").query_tables(emb[:4])):
        native = scan_topk_batch(codes, tables, 25, False, skip)
        heap = TopKHeap(4, 25, native=False)  # the numba table kernel: the reference
        heap.scan(codes, scan_tables(tables, False, 8).byte, skip)
        reference = heap.result()
        assert np.array_equal(native[1], reference[1]) and np.array_equal(native[0], reference[0])


def test_forcing_a_variant_this_cpu_lacks_or_an_unknown_one_is_an_error():
    heap = TopKHeap(1, 3)
    codes = np.zeros((4, 8), np.uint8)
    with pytest.raises(ValueError, match="no variant"):
        hamming_scan.scan_into(codes, codes[:1].copy(), np.zeros(1, bool), False, 0, heap.scores, heap.rows,
                               isa="sse9")
    with pytest.raises(ValueError):
        hamming_scan.scan_into(codes, np.zeros((2, 8), np.uint8), np.zeros(1, bool), False, 0, heap.scores,
                               heap.rows, isa="")


def test_both_simd_variants_run_on_this_machine():
    """The development machine has AVX-512 VPOPCNTDQ and AVX2: both variants are tested here."""
    import pathlib

    flags = pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
    if "avx512_vpopcntdq" not in flags:
        pytest.skip("this CPU has no AVX-512 VPOPCNTDQ")
    assert VARIANTS == ["avx512_vpopcntdq", "avx2"] and hamming_scan.status() in VARIANTS
