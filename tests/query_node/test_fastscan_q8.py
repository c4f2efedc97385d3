"""The AVX-512 8-bit kernel (quantized byte tables), SIMD paths and native threads: exactly the float kernels' answers.

The quantized tables only decide which rows get re-scored: a pruning bound that were
too tight would show up here as a missing or different row. Threads split one call's
rows, each into heaps of its own merged afterwards: any thread count must give the
one-thread answer, ties included.
"""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from facepq_core.codes import CodeSpec, pack_codes
from query_node import fastscan
from query_node.scan import TopKHeap, scan_tables
from tests.query_node.test_fastscan import BEST, HAS_AVX512, _why_no_native

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(_why_no_native() is not None, reason=str(_why_no_native()))
needs_avx512 = pytest.mark.skipif(not HAS_AVX512, reason="this CPU has no AVX-512 (F, BW, VBMI)")


def byte_luts(rng, kind, nq, width):
    """float32 [nq, width, K] lookup tables of 8-bit codes: random, tie-heavy or lopsided."""
    kk = int(rng.choice([16, 100, 256]))
    if kind == "ties":          # quarter steps: many equal scores, the lower row must win
        luts = rng.integers(-8, 8, size=(nq, width, kk)) / 4
    elif kind == "lopsided":    # one wide column sets the step; the rest quantize to ~0
        luts = rng.standard_normal((nq, width, kk)) * 10.0 ** rng.uniform(-4, 1, size=(1, width, 1))
    else:
        luts = rng.standard_normal((nq, width, kk)) * rng.uniform(0.01, 100)
    return kk, luts.astype(np.float32)


@needs_avx512
@pytest.mark.parametrize("kind", ["random", "ties", "lopsided"])
@pytest.mark.parametrize("width", [1, 3, 4, 6, 8, 16, 24, 64])
def test_quantized_8bit_kernel_matches_numba(kind, width):
    rng = np.random.default_rng(width * 10 + len(kind))
    for _ in range(12):
        nq, k = int(rng.integers(1, 4)), int(rng.integers(1, 150))
        kk, luts = byte_luts(rng, kind, nq, width)
        tables = scan_tables(luts, False, width)
        assert tables.quant8 is not None
        native, reference = TopKHeap(nq, k, native=True), TopKHeap(nq, k, native=False)
        for _ in range(int(rng.integers(1, 4))):
            n = int(rng.integers(0, 3000))   # rarely a multiple of 64: exercises the scalar tail
            codes = rng.integers(0, kk, size=(n, width), dtype=np.uint8)
            codes.flags.writeable = bool(rng.integers(0, 2))   # memory-mapped segments are read-only
            skip = rng.random(n) < 0.3 if rng.integers(0, 2) else None
            native.scan(codes, tables, skip)
            reference.scan(codes, tables.byte, skip)
        (ns, nr), (fs, fr) = native.result(), reference.result()
        np.testing.assert_array_equal(nr, fr, err_msg=f"width={width} K={kk} k={k}")
        np.testing.assert_array_equal(ns, fs, err_msg=f"width={width} K={kk} k={k}")


@needs_avx512
def test_every_row_ties_lower_rows_win():
    codes = np.random.default_rng(0).integers(0, 256, size=(1000, 8), dtype=np.uint8)
    tables = scan_tables(np.full((1, 8, 256), -2.5, dtype=np.float32), False, 8)
    heap = TopKHeap(1, 10)
    heap.scan(codes, tables)
    np.testing.assert_array_equal(heap.result()[1], [np.arange(10)])


def test_8bit_tables_follow_the_simd_path():
    luts = np.zeros((1, 8, 256), np.float32)
    try:
        fastscan.use_simd("avx2")
        assert scan_tables(luts, False, 8).quant8 is None
        assert fastscan.status8().startswith("avx2")
    finally:
        fastscan.use_simd(None)
    assert (scan_tables(luts, False, 8).quant8 is not None) == HAS_AVX512
    luts[0, 2, 3] = np.inf
    assert scan_tables(luts, False, 8).quant8 is None   # non-finite: the float kernels take it


def test_unknown_instruction_set_is_refused():
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        fastscan.use_simd("sse9")


def _segment_cases(rng):
    """(name, codes, ScanTables) for each kernel, each segment big enough to be split over 3 threads."""
    n = 3 * 65536 + 777
    luts4 = (rng.integers(-8, 8, size=(2, 16, 16)) / 4).astype(np.float32)     # ties
    codes4 = pack_codes(rng.integers(0, 16, size=(n, 16), dtype=np.uint8), CodeSpec(16, 16))
    luts8 = (rng.integers(-8, 8, size=(2, 8, 256)) / 4).astype(np.float32)
    codes8 = rng.integers(0, 256, size=(n, 8), dtype=np.uint8)
    luts16 = rng.standard_normal((2, 16, 256)).astype(np.float32)
    codes16 = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    return [("4-bit", codes4, scan_tables(luts4, True, 8)), ("8x256", codes8, scan_tables(luts8, False, 8)),
            ("16x256", codes16, scan_tables(luts16, False, 16))]


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_thread_counts_give_the_one_thread_answer(isa):
    if isa == "avx512" and not HAS_AVX512:
        pytest.skip("this CPU has no AVX-512 (F, BW, VBMI)")
    rng = np.random.default_rng(5)
    try:
        fastscan.use_simd(isa)
        for name, codes, tables in _segment_cases(rng):   # tables of the kernels `isa` runs
            skip = rng.random(len(codes)) < 0.1
            answers = []
            for threads in (1, 2, 3):
                heap = TopKHeap(2, 100, threads=threads)
                heap.scan(codes[:1000], tables)   # a first segment: rows continue across segments
                heap.scan(codes, tables, skip)
                answers.append(heap.result())
            for threads, (s, r) in zip((2, 3), answers[1:]):
                np.testing.assert_array_equal(r, answers[0][1], err_msg=f"{name}, {threads} threads")
                np.testing.assert_array_equal(s, answers[0][0], err_msg=f"{name}, {threads} threads")
    finally:
        fastscan.use_simd(None)


_SCAN = """
import sys
import numpy as np
from facepq_core.codes import CodeSpec, pack_codes
from query_node import fastscan
from query_node.code_blocks import CodeBlocks
from query_node.scan import scan_topk_batch

rng = np.random.default_rng(7)
skip = rng.random(5000) < 0.1
codes4 = pack_codes(rng.integers(0, 16, size=(5000, 16), dtype=np.uint8), CodeSpec(16, 16))
luts4 = rng.standard_normal((3, 16, 16)).astype(np.float32)
out = {}
for width in (8, 16):
    codes8 = rng.integers(0, 256, size=(5000, width), dtype=np.uint8)
    luts8 = rng.standard_normal((3, width, 256)).astype(np.float32)
    out[f"s{width}"], out[f"r{width}"] = scan_topk_batch(codes8, luts8, 50, packed=False, skip_mask=skip)
    # as a node holds them where the AVX2 8-bit kernel runs (elsewhere the same rows, row-major)
    out[f"bs{width}"], out[f"br{width}"] = scan_topk_batch(CodeBlocks.of(codes8), luts8, 50, packed=False,
                                                           skip_mask=skip)
out["s4"], out["r4"] = scan_topk_batch(codes4, luts4, 50, packed=True, skip_mask=skip)
np.savez(sys.argv[1], **out)
print(fastscan.status(), "|", fastscan.status8())
"""


def test_facepq_simd_avx2_runs_the_avx2_kernels_with_identical_results(tmp_path):
    """The same script in two processes: the best kernels here, and FACEPQ_SIMD=avx2."""
    results = {}
    for simd in ("", "avx2"):
        out_file = tmp_path / f"simd{simd}.npz"
        env = {**os.environ, "FACEPQ_SIMD": simd}
        out = subprocess.run([sys.executable, "-c", _SCAN, str(out_file)], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300, check=False)
        assert out.returncode == 0, out.stderr
        results[simd] = (out.stdout.strip(), dict(np.load(out_file)))
    assert results[""][0].startswith(f"{BEST} | ")
    assert results["avx2"][0].startswith("avx2 | avx2 (nibble bounds on 32-row blocks")
    for key in results[""][1]:
        np.testing.assert_array_equal(results[""][1][key], results["avx2"][1][key], err_msg=key)
    for width in (8, 16):   # blocks and row-major codes: the same answers
        np.testing.assert_array_equal(results["avx2"][1][f"br{width}"], results["avx2"][1][f"r{width}"])
        np.testing.assert_array_equal(results["avx2"][1][f"bs{width}"], results["avx2"][1][f"s{width}"])


def test_facepq_simd_unknown_value_says_so():
    env = {**os.environ, "FACEPQ_SIMD": "sse9"}
    out = subprocess.run([sys.executable, "-c", "from query_node import fastscan; print(fastscan.status())"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "FACEPQ_SIMD=sse9: unknown instruction set" in out.stdout


@pytest.mark.parametrize("sizes", [[70_000, 50_000, 90_000, 3, 0, 40_000], [200_000, 1000], [10, 20]])
def test_segments_scanned_in_groups_on_threads_give_the_one_thread_answer(sizes):
    """scan_segments cuts a shard's segments into groups, one thread each, and merges their heaps."""
    from query_node.scan import _groups, scan_segments

    if len(sizes) > 2:   # the case that must run as groups of segments (the others: kernel split, one thread)
        assert [list(g) for g in _groups(sizes, 2)] == [[0, 1, 2], [3, 4, 5]]
    rng = np.random.default_rng(len(sizes))
    for packed, luts in ((False, (rng.integers(-8, 8, size=(3, 8, 256)) / 4).astype(np.float32)),
                         (True, (rng.integers(-8, 8, size=(3, 16, 16)) / 4).astype(np.float32))):
        segments = []
        for n in sizes:
            codes = rng.integers(0, 256, size=(n, 8), dtype=np.uint8)
            segments.append((codes, rng.random(n) < 0.2 if n % 2 else None))
        tables = scan_tables(luts, packed, 8)
        one = scan_segments(segments, tables, 50, threads=1)
        reference = TopKHeap(3, 50, native=False)
        for codes, skip in segments:
            reference.scan(codes, tables.byte, skip)
        np.testing.assert_array_equal(one[1], reference.result()[1])
        np.testing.assert_array_equal(one[0], reference.result()[0])
        for threads in (2, 3):
            scores, rows = scan_segments(segments, tables, 50, threads=threads)
            np.testing.assert_array_equal(rows, one[1], err_msg=f"{threads} threads, packed={packed}")
            np.testing.assert_array_equal(scores, one[0], err_msg=f"{threads} threads, packed={packed}")
