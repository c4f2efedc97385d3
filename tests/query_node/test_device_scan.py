"""query_node.device_scan on the CPU device (CI has no GPU): the same answers as the reference scan.

The order is facepq's (higher score first, the lower row at equal scores), so answers are compared
row for row, ties included; dyadic tables make every float32 sum exact.
"""
import numpy as np
import pytest

from facepq_core.codes import CodeSpec, pack_codes, score_codes
from query_node.device_scan import DeviceCodes
from tests.support.index import dyadic_lut

pytest.importorskip("torch")


def _expected(tables, stored, spec, k):
    """Reference top-k: score_codes, then (score desc, row asc)."""
    scores = score_codes(tables, stored, spec)
    out_rows, out_scores = [], []
    for s in scores:
        order = np.lexsort((np.arange(len(s)), -s))[:k]
        out_rows.append(order)
        out_scores.append(s[order])
    return np.array(out_scores), np.array(out_rows)


@pytest.mark.parametrize("m,kk", [(8, 256), (16, 16), (5, 16)])
def test_device_scan_answers_as_the_reference_scan(m, kk):
    rng = np.random.default_rng(m * kk)
    spec = CodeSpec(m, kk)
    stored = pack_codes(rng.integers(0, kk, size=(1000, m), dtype=np.uint8), spec)
    tables = np.stack([dyadic_lut(rng, m, kk) - 0.5 for _ in range(4)])  # negative, zero and positive sums
    # chunks of 64 rows given as three arrays: the top-k is merged across gathers and across the parts
    codes = DeviceCodes([stored[:300], stored[300:301], stored[301:]], spec, device="cpu", chunk_rows=64)
    assert codes.rows == 1000 and codes.nbytes == 1000 * m
    scores, rows = codes.search(tables, 25)
    want_scores, want_rows = _expected(tables, stored, spec, 25)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(scores, want_scores)


def test_ties_go_to_the_lower_row_and_k_beyond_the_rows_returns_every_row():
    spec = CodeSpec(4, 16)
    rng = np.random.default_rng(1)
    stored = pack_codes(rng.integers(0, 16, size=(50, 4), dtype=np.uint8), spec)
    flat = np.zeros((2, 4, 16), np.float32)
    flat[1] = -0.0                                   # sums of -0.0 are +0.0: the same keys, row order
    scores, rows = DeviceCodes(stored, spec, device="cpu", chunk_rows=7).search(flat, 10)
    assert rows.tolist() == [list(range(10))] * 2 and not scores.any()
    tables = np.stack([dyadic_lut(rng, 4, 16)])
    scores, rows = DeviceCodes(stored, spec, device="cpu", chunk_rows=16).search(tables, 80)
    want_scores, want_rows = _expected(tables, stored, spec, 50)
    assert rows.shape == (1, 50)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(scores, want_scores)


def test_tables_of_another_shape_are_refused():
    spec = CodeSpec(8, 256)
    codes = DeviceCodes(np.zeros((10, 8), np.uint8), spec, device="cpu")
    with pytest.raises(ValueError, match=r"tables must be \[Q, 8, 256\]"):
        codes.search(np.zeros((1, 8, 16), np.float32), 5)
