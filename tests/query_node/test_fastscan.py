"""The native kernels (query_node/fastscan4.c) return exactly what the numba kernels return.

Both fill the same (score desc, row asc) heap and sum the same float32 byte tables in
the same order, so scores and rows must be identical, not merely close. For 4-bit
codes the quantized tables only decide which rows get re-scored: a pruning bound that
were too tight would show up here as a missing row.
"""
import os
import pathlib
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest

from facepq_core.codes import CodeSpec, pack_codes
from query_node import fastscan
from query_node.scan import TopKHeap, byte_tables, scan_tables

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _why_no_native() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the native kernel is x86-64 only (this is {platform.machine()})"
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        return "no C compiler on PATH: 4-bit codes scan with the numba kernel"
    if "avx2" not in pathlib.Path("/proc/cpuinfo").read_text():
        return "this CPU has no AVX2: 4-bit codes scan with the numba kernel"
    return None


pytestmark = pytest.mark.skipif(_why_no_native() is not None, reason=str(_why_no_native()))


def test_native_kernel_builds_and_runs_here():
    assert fastscan.available(), fastscan.status()
    assert fastscan.status() == "avx2"


def scan_both(codes_list, luts, k, skips):
    """(native scores, rows), (numba scores, rows) over several segments scanned into one heap."""
    packed_bytes = codes_list[0].shape[1]
    native_tables = scan_tables(luts, True, packed_bytes)
    assert native_tables.nibble is not None
    float_tables = byte_tables(luts, True, packed_bytes)
    native, numba_heap = TopKHeap(len(luts), k, native=True), TopKHeap(len(luts), k, native=False)
    for codes, skip in zip(codes_list, skips):
        native.scan(codes, native_tables, skip)
        numba_heap.scan(codes, float_tables, skip)
    return native.result(), numba_heap.result()


def random_case(rng, tables: str):
    m = int(rng.integers(1, 41))
    kk = int(rng.choice([2, 4, 8, 16]))
    nq = int(rng.integers(1, 4))
    if tables == "ties":          # quarter steps: many equal scores, the lower row must win
        luts = rng.integers(-8, 8, size=(nq, m, kk)) / 4
    elif tables == "lopsided":    # one wide subspace sets the step; the rest quantize to ~0
        scale = 10.0 ** rng.uniform(-4, 1, size=(1, m, 1))
        luts = rng.standard_normal((nq, m, kk)) * scale
    else:                         # log-probabilities, like OPQN's tables
        logits = rng.standard_normal((nq, m, kk)) * rng.uniform(0.5, 8)
        luts = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return m, kk, luts.astype(np.float32)


@pytest.mark.parametrize("tables", ["ties", "lopsided", "logprob"])
def test_native_matches_numba_kernel_on_random_cases(tables):
    rng = np.random.default_rng({"ties": 1, "lopsided": 2, "logprob": 3}[tables])
    for _ in range(60):
        m, kk, luts = random_case(rng, tables)
        segments, skips = [], []
        for _ in range(int(rng.integers(1, 4))):
            n = int(rng.integers(0, 2500))   # rarely a multiple of 32: exercises the scalar tail
            sub = rng.integers(0, kk, size=(n, m), dtype=np.uint8)
            codes = pack_codes(sub, CodeSpec(m, 16))
            codes.flags.writeable = bool(rng.integers(0, 2))   # memory-mapped segments are read-only
            segments.append(codes)
            skips.append(rng.random(n) < 0.2 if rng.integers(0, 2) else None)
        k = int(rng.integers(1, 120))
        (ns, nr), (fs, fr) = scan_both(segments, luts, k, skips)
        np.testing.assert_array_equal(nr, fr, err_msg=f"M={m} K={kk} k={k}")
        np.testing.assert_array_equal(ns, fs, err_msg=f"M={m} K={kk} k={k}")


@pytest.mark.parametrize("code_bytes", [8, 16, 64])
def test_wide_codes_and_many_rows(code_bytes):
    rng = np.random.default_rng(code_bytes)
    m = 2 * code_bytes
    codes = rng.integers(0, 256, size=(40_000, code_bytes), dtype=np.uint8)
    luts = rng.standard_normal((2, m, 16)).astype(np.float32)
    (ns, nr), (fs, fr) = scan_both([codes], luts, 100, [None])
    np.testing.assert_array_equal(nr, fr)
    np.testing.assert_array_equal(ns, fs)


def test_equal_tables_every_row_ties():
    codes = np.random.default_rng(0).integers(0, 256, size=(1000, 8), dtype=np.uint8)
    luts = np.full((1, 16, 16), -2.5, dtype=np.float32)
    (ns, nr), (fs, fr) = scan_both([codes], luts, 10, [None])
    np.testing.assert_array_equal(nr, [np.arange(10)])
    np.testing.assert_array_equal(fr, nr)
    np.testing.assert_array_equal(ns, fs)


@pytest.mark.parametrize("width", [1, 3, 8, 16, 24])
def test_native_byte_table_kernel_matches_numba(width):
    """pq8_scan on any width (nodes use it for 8-byte codes: see fastscan.FUSED_WIDTH)."""
    rng = np.random.default_rng(100 + width)
    for trial in range(20):
        nq, k = int(rng.integers(1, 4)), int(rng.integers(1, 150))
        if trial % 2:
            tables = (rng.integers(0, 16, size=(nq, width * 256)) / 8).astype(np.float32)  # ties
        else:
            tables = rng.standard_normal((nq, width * 256)).astype(np.float32)
        native, numba_heap = TopKHeap(nq, k, native=True), TopKHeap(nq, k, native=False)
        for _ in range(int(rng.integers(1, 3))):
            n = int(rng.integers(0, 9000))
            codes = rng.integers(0, 256, size=(n, width), dtype=np.uint8)
            skip = rng.random(n) < 0.3 if rng.integers(0, 2) else None
            mask = np.zeros(1, np.bool_) if skip is None else skip
            fastscan.scan8_into(codes, tables, mask, skip is not None, native.rows_scanned, native.scores, native.rows)
            native.rows_scanned += n
            numba_heap.scan(codes, tables, skip)
        (ns, nr), (fs, fr) = native.result(), numba_heap.result()
        np.testing.assert_array_equal(nr, fr)
        np.testing.assert_array_equal(ns, fs)


def test_tables_the_kernel_cannot_take_fall_back_to_float_scan():
    luts = np.zeros((1, 16, 16), dtype=np.float32)
    luts[0, 3, 5] = -np.inf
    assert scan_tables(luts, True, 8).nibble is None
    wide = np.zeros((1, 2 * (fastscan.MAX_CODE_BYTES + 1), 16), dtype=np.float32)
    assert scan_tables(wide, True, fastscan.MAX_CODE_BYTES + 1).nibble is None
    assert scan_tables(np.zeros((1, 8, 256), np.float32), False, 8).nibble is None  # 8-bit codes


def test_disabled_by_environment_variable_uses_numba():
    code = "from query_node import fastscan; print(fastscan.status())"
    env = {**os.environ, "FACEPQ_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "numba (disabled by FACEPQ_NATIVE=0)"


def test_build_is_cached_and_rebuilt_in_a_fresh_cache_dir(tmp_path):
    code = ("from query_node import fastscan; p = fastscan.build(); "
            "print(p.parent, fastscan.build() == p, p.exists())")
    env = {**os.environ, "FACEPQ_NATIVE_DIR": str(tmp_path / "native")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path / "native"), "True", "True"]
