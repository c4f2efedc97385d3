"""Scan kernels agree exactly with the reference scorer (facepq_core.codes.score_codes)."""
import numpy as np
import pytest

from facepq_core.codes import CodeSpec, pack_codes, score_codes
from query_node.scan import TopKHeap, byte_tables, scan_topk, scan_topk_batch
from tests.support.index import dyadic_lut


def reference_topk(lut, codes, spec, k, skip=None):
    scores = score_codes(lut, codes, spec)
    rows = np.arange(len(codes))
    if skip is not None:
        rows = rows[~skip]
    order = rows[np.lexsort((rows, -scores[rows]))][:k]
    return scores[order], order


@pytest.mark.parametrize("M,K", [(8, 256), (16, 256), (16, 16), (7, 16), (5, 64), (3, 256), (1, 16), (32, 16)])
def test_kernel_matches_reference_exactly(M, K):
    rng = np.random.default_rng(M * 1000 + K)
    spec = CodeSpec(M, K)
    codes = pack_codes(rng.integers(0, K, size=(5000, M), dtype=np.uint8), spec)
    lut = dyadic_lut(rng, M, K)  # many ties: exercises the lower-row tie rule
    s, r = scan_topk(codes, lut, 100, spec.packed)
    ref_s, ref_r = reference_topk(lut, codes, spec, 100)
    np.testing.assert_array_equal(r, ref_r)
    np.testing.assert_array_equal(s, ref_s)


def test_real_valued_tables_match_reference_within_rounding():
    rng = np.random.default_rng(1)
    spec = CodeSpec(16, 16)
    codes = pack_codes(rng.integers(0, 16, size=(20000, 16), dtype=np.uint8), spec)
    lut = rng.random((16, 16), dtype=np.float32)
    s, r = scan_topk(codes, lut, 50, True)
    ref = score_codes(lut, codes, spec)
    np.testing.assert_allclose(s, ref[r], rtol=1e-6)
    assert (np.sort(ref)[::-1][:50] - s).max() < 1e-5


def test_ties_prefer_the_lower_row():
    codes = np.zeros((10, 8), dtype=np.uint8)  # every row scores the same
    s, r = scan_topk(codes, np.ones((8, 256), np.float32), 4, False)
    assert r.tolist() == [0, 1, 2, 3] and s.tolist() == [8.0] * 4


def test_k_larger_than_n_pads_with_minus_inf_and_minus_one():
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 256, size=(5, 8), dtype=np.uint8)
    s, r = scan_topk(codes, dyadic_lut(rng, 8, 256), 8, False)
    assert sorted(r[:5].tolist()) == list(range(5))
    assert r[5:].tolist() == [-1, -1, -1] and np.isneginf(s[5:]).all()


def test_tombstoned_rows_are_never_returned_and_result_stays_exact():
    rng = np.random.default_rng(3)
    spec = CodeSpec(8, 256)
    codes = pack_codes(rng.integers(0, 256, size=(3000, 8), dtype=np.uint8), spec)
    lut = dyadic_lut(rng, 8, 256)
    _, best = scan_topk(codes, lut, 30, False)
    skip = np.zeros(3000, bool)
    skip[best[::2]] = True  # delete half of the current top-30
    s, r = scan_topk(codes, lut, 30, False, skip_mask=skip)
    ref_s, ref_r = reference_topk(lut, codes, spec, 30, skip)
    assert not skip[r].any()
    np.testing.assert_array_equal(r, ref_r)
    np.testing.assert_array_equal(s, ref_s)


def test_batch_equals_single_queries():
    rng = np.random.default_rng(4)
    spec = CodeSpec(7, 16)
    codes = pack_codes(rng.integers(0, 16, size=(9000, 7), dtype=np.uint8), spec)
    luts = np.stack([dyadic_lut(rng, 7, 16) for _ in range(5)])
    bs, br = scan_topk_batch(codes, luts, 20, True)
    for q in range(5):
        s, r = scan_topk(codes, luts[q], 20, True)
        np.testing.assert_array_equal(br[q], r)
        np.testing.assert_array_equal(bs[q], s)


def test_heap_across_segments_equals_one_concatenated_scan():
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 256, size=(6000, 16), dtype=np.uint8)
    lut = dyadic_lut(rng, 16, 256)
    tables = byte_tables(lut[None], False, 16)
    heap = TopKHeap(1, 40)
    for start in (0, 1000, 3500):
        stop = {0: 1000, 1000: 3500, 3500: 6000}[start]
        heap.scan(np.ascontiguousarray(codes[start:stop]), tables)
    hs, hr = heap.result()
    s, r = scan_topk(codes, lut, 40, False)
    np.testing.assert_array_equal(hr[0], r)
    np.testing.assert_array_equal(hs[0], s)


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\[Q, 8, K<=256\]"):
        scan_topk(np.zeros((4, 8), np.uint8), np.zeros((7, 256), np.float32), 1, False)
    with pytest.raises(ValueError, match="k must be >= 1"):
        scan_topk(np.zeros((4, 8), np.uint8), np.zeros((8, 256), np.float32), 0, False)


@pytest.mark.parametrize("M, K, packed, blocks", [(16, 16, True, True), (8, 256, False, True), (8, 256, False, False)],
                         ids=["4-bit", "8-bit blocks", "8-bit rows"])
def test_one_querys_tables_out_of_a_batch_are_its_tables_alone(M, K, packed, blocks):
    """`ScanTables.query(q)` (a partitioned batch scans each query's cells with it) equals the tables made for
    query q alone, whichever table sets this machine's kernels use."""
    import dataclasses

    from query_node.scan import scan_tables

    rng = np.random.default_rng(M + K)
    luts = np.stack([dyadic_lut(rng, M, K) for _ in range(3)])
    code_bytes = M // 2 if packed else M
    batch = scan_tables(luts, packed, code_bytes, blocks=blocks)
    for q in range(3):
        alone, one = scan_tables(luts[q:q + 1], packed, code_bytes, blocks=blocks), batch.query(q)
        for field in dataclasses.fields(alone):
            want, got = getattr(alone, field.name), getattr(one, field.name)
            assert (want is None) == (got is None), field.name
            if want is None:
                continue
            arrays = [(want, got)] if isinstance(want, np.ndarray) else \
                [(getattr(want, f.name), getattr(got, f.name)) for f in dataclasses.fields(want)]
            for w, g in arrays:
                assert g.flags.c_contiguous and g.dtype == w.dtype
                np.testing.assert_array_equal(g, w, err_msg=field.name)
