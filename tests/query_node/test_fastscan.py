"""The native kernels (query_node._fastscan) return exactly what the numba kernels return.

Both fill the same (score desc, row asc) heap and sum the same float32 byte tables in
the same order, so scores and rows must be identical, not merely close. For 4-bit
codes the quantized tables only decide which rows get re-scored: a pruning bound that
were too tight would show up here as a missing row.
"""
import importlib
import importlib.machinery
import os
import pathlib
import platform
import subprocess
import sys

import numpy as np
import pytest

from facepq_core.codes import CodeSpec, pack_codes
from query_node import fastscan
from query_node.code_blocks import CodeBlocks
from query_node.scan import TopKHeap, byte_tables, scan_tables

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _why_no_native() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the native kernels are x86-64 only (this is {platform.machine()})"
    if "avx2" not in pathlib.Path("/proc/cpuinfo").read_text():
        return "this CPU has no AVX2: 4-bit codes scan with the numba kernel"
    try:
        importlib.import_module("query_node._fastscan")
    except ImportError as exc:
        return (f"query_node._fastscan is not built ({exc}): `pip install -e .` or "
                "`python setup.py build_ext --inplace` builds it")
    return None


pytestmark = pytest.mark.skipif(_why_no_native() is not None, reason=str(_why_no_native()))

_FLAGS = set(pathlib.Path("/proc/cpuinfo").read_text().split()) if pathlib.Path("/proc/cpuinfo").exists() else set()
HAS_AVX512 = {"avx512f", "avx512bw", "avx512vbmi"} <= _FLAGS
BEST = "avx512" if HAS_AVX512 else "avx2"


@pytest.fixture(params=["avx512", "avx2"])
def simd(request):
    """Each test using it runs once per SIMD path this CPU has (the AVX2 one forced on AVX-512 CPUs)."""
    if request.param == "avx512" and not HAS_AVX512:
        pytest.skip("this CPU has no AVX-512 (F, BW, VBMI)")
    fastscan.use_simd(request.param)
    yield request.param
    fastscan.use_simd(None)


def test_the_extension_module_is_what_runs_here():
    from query_node import _fastscan

    assert fastscan.available(), fastscan.status()
    assert fastscan.status() == BEST
    assert _fastscan.kernels == {"fs4_scan": BEST, "fs4_scan_blocks": "avx2",
                                 "q8_scan": "avx512" if HAS_AVX512 else None, "q8_scan_blocks": "avx2",
                                 "pq8_scan": "avx2",
                                 "hamming_scan": next(isa for isa, runs in _fastscan.hamming_variants.items() if runs)}
    assert _fastscan.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert _fastscan.FS4_MAX_CODE_BYTES == fastscan.MAX_CODE_BYTES


def scan_both(codes_list, luts, k, skips):
    """(native scores, rows), (numba scores, rows) over several segments scanned into one heap.

    The same segments as `CodeBlocks` (the AVX2 block kernel, whichever `simd` runs) must give the
    numba answer too: asserted here, so every case below covers both layouts.
    """
    packed_bytes = codes_list[0].shape[1]
    native_tables = scan_tables(luts, True, packed_bytes)
    assert native_tables.nibble is not None
    float_tables = byte_tables(luts, True, packed_bytes)
    native, numba_heap = TopKHeap(len(luts), k, native=True), TopKHeap(len(luts), k, native=False)
    blocked = TopKHeap(len(luts), k, native=True)
    for codes, skip in zip(codes_list, skips):
        native.scan(codes, native_tables, skip)
        numba_heap.scan(codes, float_tables, skip)
        blocked.scan(CodeBlocks.of(codes), native_tables, skip)
    expected = numba_heap.result()
    for got, want in zip(blocked.result(), expected):
        np.testing.assert_array_equal(got, want, err_msg="scanned as CodeBlocks")
    return native.result(), expected


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
def test_native_matches_numba_kernel_on_random_cases(tables, simd):
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
def test_wide_codes_and_many_rows(code_bytes, simd):
    rng = np.random.default_rng(code_bytes)
    m = 2 * code_bytes
    codes = rng.integers(0, 256, size=(40_000, code_bytes), dtype=np.uint8)
    luts = rng.standard_normal((2, m, 16)).astype(np.float32)
    (ns, nr), (fs, fr) = scan_both([codes], luts, 100, [None])
    np.testing.assert_array_equal(nr, fr)
    np.testing.assert_array_equal(ns, fs)


def test_equal_tables_every_row_ties(simd):
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


_SCAN_BOTH_WIDTHS = """
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
codes8 = rng.integers(0, 256, size=(5000, 8), dtype=np.uint8)
luts8 = rng.standard_normal((3, 8, 256)).astype(np.float32)
s4, r4 = scan_topk_batch(codes4, luts4, 50, packed=True, skip_mask=skip)
s8, r8 = scan_topk_batch(codes8, luts8, 50, packed=False, skip_mask=skip)
np.savez(sys.argv[1], s4=s4, r4=r4, s8=s8, r8=r8)
print(fastscan.status())
"""


def test_numba_path_under_facepq_native_0_gives_identical_results(tmp_path):
    """The same script in two processes: the extension's kernels here, numba with FACEPQ_NATIVE=0."""
    results = {}
    for native in ("1", "0"):
        out_file = tmp_path / f"native{native}.npz"
        env = {**os.environ, "FACEPQ_NATIVE": native}
        out = subprocess.run([sys.executable, "-c", _SCAN_BOTH_WIDTHS, str(out_file)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300, check=False)
        assert out.returncode == 0, out.stderr
        results[native] = (out.stdout.strip(), dict(np.load(out_file)))
    assert results["1"][0] == BEST
    assert results["0"][0] == "numba (disabled by FACEPQ_NATIVE=0)"
    for key in ("s4", "r4", "s8", "r8"):
        np.testing.assert_array_equal(results["1"][1][key], results["0"][1][key], err_msg=key)


def _scan8_args(n=100, width=8, nq=2, k=5):
    rng = np.random.default_rng(0)
    return {"codes": rng.integers(0, 256, size=(n, width), dtype=np.uint8),
            "byte_tables": rng.standard_normal((nq, width * 256)).astype(np.float32),
            "skip": np.zeros(n, np.bool_), "has_skip": True, "row_offset": 0,
            "heap_s": np.full((nq, k), -np.inf, np.float32), "heap_r": np.full((nq, k), np.iinfo(np.int64).max)}


@pytest.mark.parametrize("change, error", [
    ({"byte_tables": np.zeros((2, 8 * 256), np.float64)}, r"byte_tables must be a .* float32 array, got float64"),
    ({"byte_tables": np.zeros((3, 8 * 256), np.float32)}, r"pq8_scan: byte tables .* 24576 bytes, expected 16384"),
    ({"heap_r": np.zeros((2, 4), np.int64)}, r"pq8_scan: heap rows .* holds 64 bytes, expected 80"),
    ({"skip": np.zeros(99, np.bool_)}, r"pq8_scan: skip mask .* holds 99 bytes, expected 100"),
    ({"skip": np.zeros(100, np.float32)}, r"skip must be a C-contiguous bool array, got float32"),
    ({"codes": np.zeros((100, 8), np.int8)}, r"codes must be a C-contiguous uint8 array, got int8"),
    ({"codes": np.zeros(800, np.uint8)}, r"codes must be uint8 \[N, B\], got shape \(800,\)"),
    ({"codes": np.zeros((100, 16), np.uint8)[:, ::2]}, r"codes must be .* got uint8, not C-contiguous"),
])
def test_bad_arguments_raise_clear_errors_instead_of_reading_past_a_buffer(change, error):
    args = {**_scan8_args(), **change}
    with pytest.raises(ValueError, match=error):
        fastscan.scan8_into(**args)


def test_heaps_must_be_writable_and_codes_may_be_read_only():
    args = _scan8_args()
    args["codes"].flags.writeable = False   # a memory-mapped segment: scanned in place
    fastscan.scan8_into(**args)
    assert (args["heap_r"] < 100).all()
    args["heap_s"].flags.writeable = False
    with pytest.raises(ValueError, match="heap_s and heap_r are updated in place: they must be writable"):
        fastscan.scan8_into(**args)


def test_4bit_kernel_checks_its_nibble_tables_against_the_heaps():
    luts = np.zeros((2, 16, 16), np.float32)
    tables = scan_tables(luts, True, 8)
    args = _scan8_args()
    fastscan.scan_into(args["codes"], tables.byte, tables.nibble, args["skip"], True, 0, args["heap_s"],
                       args["heap_r"])
    one_query = fastscan.nibble_tables(fastscan.nibble_values(luts[:1]))
    with pytest.raises(ValueError, match=r"fs4_scan: nibble tables .* holds 512 bytes, expected 1024"):
        fastscan.scan_into(args["codes"], tables.byte, one_query, args["skip"], True, 0, args["heap_s"],
                           args["heap_r"])


def _reference_quantize(values: np.ndarray, row_terms: int, code_bytes: int):
    """The quantization formulas in numpy (float64; what the native quantize_tables must reproduce):
    values [Q, C, V] -> (q uint8 [Q, C, V], base, delta, terms)."""
    v = values.astype(np.float64)
    lo = v.min(axis=2)
    delta = (v.max(axis=2) - lo).max(axis=1) / fastscan.QUANT_LEVELS
    delta[delta == 0] = 1.0
    q = np.clip(np.floor((v - lo[..., None]) / delta[:, None, None]), 0, fastscan.QUANT_LEVELS).astype(np.uint8)
    eps = 4.0 * (code_bytes + 2) * row_terms * np.abs(v).max(axis=(1, 2)) * 2.0 ** -24
    terms = np.minimum(row_terms + np.ceil(eps / delta) + 2, 1 << 20).astype(np.int32)
    return q, lo.sum(axis=1), delta, terms


@pytest.mark.parametrize("seed", range(4))
def test_native_quantizer_gives_the_reference_tables(seed):
    """nibble_tables / byte_quant_tables (one native call) equal the numpy formulas: the same quantized
    entries, steps and slack, the padding zero, the nibble tables' second lane a copy of the first."""
    rng = np.random.default_rng(seed)
    nq = 1 + seed
    scale = [1.0, 1e-6, 1e4, 0.0][seed]  # 0.0: every table constant (the step falls back to 1)
    for code_bytes in (1, 3, 8, 9):
        luts = (scale * rng.standard_normal((nq, 2 * code_bytes - seed % 2, 16))).astype(np.float32)
        nib_values = fastscan.nibble_values(luts)
        got = fastscan.nibble_tables(nib_values)
        q, base, delta, terms = _reference_quantize(nib_values.reshape(nq, 2 * code_bytes, 16), 2 * code_bytes,
                                                    code_bytes)
        width8 = (code_bytes + 7) // 8 * 8
        assert got.nib.shape == (nq, width8, 2, 32)
        np.testing.assert_array_equal(got.nib[:, :code_bytes, :, :16], q.reshape(nq, code_bytes, 2, 16))
        np.testing.assert_array_equal(got.nib[..., 16:], got.nib[..., :16])
        assert not got.nib[:, code_bytes:].any()
        np.testing.assert_array_equal(got.delta, delta)
        np.testing.assert_array_equal(got.terms, terms)
        np.testing.assert_allclose(got.base, base, rtol=1e-12, atol=0)

        tables = byte_tables((scale * rng.standard_normal((nq, code_bytes, 256))).astype(np.float32), False,
                             code_bytes)
        got8 = fastscan.byte_quant_tables(tables)
        q8, base8, delta8, terms8 = _reference_quantize(tables.reshape(nq, code_bytes, 256), code_bytes, code_bytes)
        assert got8.qt.shape == (nq, width8, 256)
        np.testing.assert_array_equal(got8.qt[:, :code_bytes], q8)
        assert not got8.qt[:, code_bytes:].any()
        np.testing.assert_array_equal(got8.delta, delta8)
        np.testing.assert_array_equal(got8.terms, terms8)
        np.testing.assert_allclose(got8.base, base8, rtol=1e-12, atol=0)


def test_native_quantizer_refuses_non_finite_tables():
    luts = np.zeros((2, 4, 16), np.float32)
    luts[1, 2, 3] = np.nan
    assert fastscan.nibble_tables(fastscan.nibble_values(luts)) is None
    tables = np.zeros((1, 4 * 256), np.float32)
    tables[0, 7] = np.inf
    assert fastscan.byte_quant_tables(tables) is None
