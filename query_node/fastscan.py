"""Native scan kernels (C, AVX2 / AVX-512), exact and bit-identical to the numba kernels of `query_node.scan`.

* 4-bit codes: quantized nibble tables + vpshufb lookups of 32 rows (AVX2) or 64 rows
  (AVX-512) at once prune the rows that cannot reach the k-th best; the rest are
  re-scored with the float tables. Where that kernel runs AVX2, a node scans the codes
  in 32-row blocks instead (`query_node.code_blocks`, kernel fs4_scan_blocks).
* 8-bit codes with AVX-512 VBMI: 7-bit quantized byte tables, each held in four zmm
  registers and looked up 64 rows at a time (two vpermi2b + a blend), prune the same
  way (`byte_quant_tables`, kernel q8_scan).
* 8-bit codes without AVX-512, held in 32-row blocks: each byte's 256-entry table, seen as 16 x 16
  by the byte's nibbles, is bounded by four 16-entry tables looked up with vpshufb like the 4-bit
  ones (`bound8_tables`, kernel q8_scan_blocks); the few rows the bound keeps are re-scored exactly.
* any byte tables (other 8-bit codes without AVX-512, or 4-bit pair tables): one fused scalar
  loop that scores a row and compares it with the heap's threshold.

Every kernel takes `threads`: one call's rows are split into runs scanned on native
threads (GIL released), each into heaps of its own, merged exactly afterwards.
FACEPQ_SIMD=avx2 (or `use_simd("avx2")`) keeps the AVX2 variants on an AVX-512 CPU.

The kernels (`fastscan_kernels.c`) are built by `pip install` into the extension module
`query_node._fastscan` (setup.py; -O3, never -ffast-math, so float sums round exactly like
the numba kernels). One binary runs on any x86-64 CPU: the module picks each kernel's
best variant for this CPU at import. Calls pass numpy arrays as buffers (read-only memory
maps included) and release the GIL while the kernel runs.

When the module was not built (no C compiler at install time), the CPU has no AVX2, or
FACEPQ_NATIVE=0, `available()` is False and `query_node.scan` keeps using its numba
kernels: same results, slower (4-bit codes ~3-4x). `status()` says which kernel runs and why.
"""
from __future__ import annotations

import functools
import glob
import importlib
import logging
import os
import platform
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# pq8_scan is used for 8-byte codes only: at 16 bytes a row's serial chain of 16 float adds
# makes the scalar loop latency-bound (5.7 vs 5.4 ms per 1M rows for numba's vectorised loop).
FUSED_WIDTH = 8
MAX_CODE_BYTES = 64          # the kernel keeps one block's transposed columns on the stack
QUANT_LEVELS = 127           # 7-bit entries: a byte's two nibble values still fit in a byte
_UINT8, _BOOL, _INT32, _INT64, _FLOAT32, _FLOAT64 = map(np.dtype, (np.uint8, np.bool_, np.int32, np.int64,
                                                                   np.float32, np.float64))


class NativeUnavailableError(RuntimeError):
    """A native kernel was called where it does not run (`status()` says why)."""


@functools.cache
def _load():
    """(the extension module, '') when its 4-bit kernel runs here, else (None, why not)."""
    if os.environ.get("FACEPQ_NATIVE", "1") == "0":
        return None, "disabled by FACEPQ_NATIVE=0"
    try:
        module = importlib.import_module("query_node._fastscan")
    except ModuleNotFoundError:
        why = "the extension query_node._fastscan is not built (`pip install .` builds it with a C compiler)"
    except ImportError as exc:
        why = f"the extension query_node._fastscan does not load: {exc}"
    else:
        if module.kernels["fs4_scan"] is not None:
            return module, ""
        if platform.machine().lower() in ("x86_64", "amd64"):
            why = "this CPU has no AVX2"
        else:
            why = f"the native kernels are x86-64 only, this is {platform.machine()}"
    log.warning("native scan kernels unavailable (%s); using the numba kernels", why)
    return None, why


def available() -> bool:
    """True when the extension is built and this CPU runs its kernels."""
    return _load()[0] is not None


def native_module():
    """The extension module when its kernels run here, else None (callers then take their numpy path)."""
    return _load()[0]


def status() -> str:
    """The 4-bit kernel's instruction set ('avx512', 'avx2'), or 'numba (<why the native kernel is not used>)'."""
    native, why = _load()
    return native.kernels["fs4_scan"] if native is not None else f"numba ({why})"


def blocks_preferred() -> bool:
    """True when 4-bit codes scan faster as `query_node.code_blocks.CodeBlocks` here: the 4-bit kernel
    runs AVX2 (blocks are its 32-row vectors; the AVX-512 kernels read row-major codes 64 rows at a time)."""
    native = _load()[0]
    return native is not None and native.kernels["fs4_scan"] == "avx2" and \
        native.kernels.get("fs4_scan_blocks") is not None


def blocks8_preferred() -> bool:
    """True when 8-bit codes scan fastest as `query_node.code_blocks.CodeBlocks` here: no AVX-512 q8_scan
    (it reads row-major codes 64 rows at a time) and the AVX2 nibble-bound kernel q8_scan_blocks runs."""
    native = _load()[0]
    return native is not None and native.kernels["q8_scan"] is None and \
        native.kernels.get("q8_scan_blocks") is not None


def status8() -> str:
    """What scans 8-bit codes: 'avx512 (quantized tables)', 'avx2 (nibble bounds ...)' or 'numba (...)'."""
    native, why = _load()
    if native is None:
        return f"numba ({why})"
    if native.kernels["q8_scan"] is not None:
        return f"{native.kernels['q8_scan']} (quantized tables)"
    return (f"{native.kernels['q8_scan_blocks']} (nibble bounds on 32-row blocks; row-major codes: fused float "
            f"loop for {FUSED_WIDTH}-byte codes, numba otherwise)")


# When /sys does not say (no cache files in this container): 32 MiB, the L3 of the EPYC and Xeon kinds measured here.
DEFAULT_CACHE_BYTES = 32 << 20


@functools.lru_cache(maxsize=1)
def last_level_cache_bytes() -> int:
    """Bytes of this CPU's largest cache (cpu0's highest-level cache in /sys), else `DEFAULT_CACHE_BYTES`."""
    sizes = []
    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size")):
        try:
            text = open(index).read().strip().upper()
            unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * unit)
        except (OSError, ValueError):
            continue
    return max(sizes, default=DEFAULT_CACHE_BYTES)


# Below this a one-query scan never prefetches: its codes stay in the core's own caches, and a call (~0.1 ms) is too
# short to time against the other choice.
LEARN_MIN_BYTES = 2 << 20


def streams(queries: int, code_bytes: int, kernel: str | None = None) -> bool:
    """Whether a block kernel should prefetch ahead (its `stream` argument) for a call of `queries` queries on
    a scan that covers `code_bytes` bytes of codes in all (`scan.scan_segments`: every segment it is given,
    i.e. a shard's, not one call's). Scans take it through `stream_choice`, which times them.

    A single query over more codes than the last-level cache holds reads them from memory as fast as a core
    can: prefetching 16 blocks ahead took 10M 4-bit codes from 5.0 to 4.0 ms (AVX2-only EPYC). Several queries
    per pass (bound by the lookups) only pay for the prefetches (16 queries on 10M: 2.9 -> 3.1 ms per query).
    Between `LEARN_MIN_BYTES` and the cache's size it depends on what else the cache holds: 1M 4-bit codes (8 MB)
    took 0.41 -> 0.44 ms with prefetches where they stayed in a quiet L3 (2026-12-03, morning), and 0.60-0.69 ->
    0.46-0.47 ms where other work (FAISS's calls in between, another tenant) had evicted them (that night; the
    same machine kind, `bench scan` alternating our calls with FAISS's).
    So there a one-query scan of a block kernel (`kernel`: its name, the learner's key with the size; None: the
    rule without learning) learns the faster choice from its own calls (`StreamLearner`).
    """
    if queries != 1:
        return False
    if code_bytes > last_level_cache_bytes():
        return True
    return _learned(queries, code_bytes, kernel) and stream_learner.choose(kernel, code_bytes)


def _learned(queries: int, code_bytes: int, kernel: str | None) -> bool:
    return kernel is not None and queries == 1 and LEARN_MIN_BYTES < code_bytes <= last_level_cache_bytes()


@contextmanager
def stream_choice(queries: int, code_bytes: int, kernel: str | None = None):
    """`streams(queries, code_bytes, kernel)` for the scan inside the block; a scan whose choice is learned teaches
    the learner its time (only when it completes)."""
    stream = streams(queries, code_bytes, kernel)
    t0 = time.perf_counter()
    yield stream
    if _learned(queries, code_bytes, kernel):
        stream_learner.record(kernel, code_bytes, stream, time.perf_counter() - t0)


class StreamLearner:
    """Whether one-query scans of a kernel and size class (a power of two of code bytes) run faster with prefetches,
    from their own times: each class times one call without and one with, then takes the faster by a moving average
    of its seconds per byte, and tries the other every `explore_every`-th call so that a change of the machine's
    phase (another tenant's cache use) is noticed. Any choice gives the same answer; only speed is learned."""

    def __init__(self, explore_every: int = 16, weight: float = 0.25):
        if explore_every < 2 or not 0 < weight <= 1:
            raise ValueError(f"explore_every must be >= 2 and weight in (0, 1], got {explore_every} and {weight}")
        self.explore_every = explore_every
        self.weight = weight
        self._lock = threading.Lock()
        self._cost: dict[tuple, list] = {}    # (kernel, size class) -> [seconds a byte without, with] (None: untimed)
        self._calls: dict[tuple, int] = {}

    def choose(self, kernel: str, code_bytes: int) -> bool:
        key = kernel, code_bytes.bit_length()
        with self._lock:
            cost = self._cost.setdefault(key, [None, None])
            calls = self._calls[key] = self._calls.get(key, 0) + 1
            if cost[0] is None or cost[1] is None:
                return cost[0] is not None          # time the call without prefetches first, then one with
            faster = cost[1] < cost[0]
            return not faster if calls % self.explore_every == 0 else faster

    def record(self, kernel: str, code_bytes: int, stream: bool, seconds: float) -> None:
        per_byte = seconds / max(1, code_bytes)
        with self._lock:
            cost = self._cost.setdefault((kernel, code_bytes.bit_length()), [None, None])
            old = cost[stream]
            cost[stream] = per_byte if old is None else old + self.weight * (per_byte - old)

    def costs(self) -> dict[tuple, tuple]:
        """{(kernel, size class: the bit length of the code bytes): (seconds a byte without, with)}: for the
        benchmark's lines."""
        with self._lock:
            return {key: tuple(c) for key, c in self._cost.items()}


stream_learner = StreamLearner()


def streamed_calls() -> int:
    """Block kernel calls told to stream (prefetch ahead, `streams`) since the extension loaded: which calls
    prefetched, for tests and the benchmark."""
    return _native().counters()["streamed_calls"]


def dense_blocks() -> int:
    """32-row blocks the 8-bit block kernel scored densely (every row exactly, where its nibble bound passed most
    rows) since the extension loaded, over all threads: which mode ran, for tests and the benchmark."""
    return _native().counters()["dense_blocks"]


def query_parallel_queries() -> int:
    """Queries of batches the AVX2 8-bit kernels scanned side by side (a call's groups of up to 16 queries, one code
    byte selecting every query's table entry; fastscan_kernels.c qpar_count) since the extension loaded, once per
    call and thread: which path ran."""
    return _native().counters()["query_parallel_queries"]


def query_parallel_quantized() -> int:
    """Of `query_parallel_queries`, those scanned on quantized tables (tables of up to 8 byte columns, all finite;
    the others on float tables): which path ran."""
    return _native().counters()["query_parallel_quantized"]


def quantized8_available() -> bool:
    """True when 8-bit codes scan with quantized tables here (AVX-512 VBMI, not capped by FACEPQ_SIMD)."""
    native = _load()[0]
    return native is not None and native.kernels["q8_scan"] is not None


def use_simd(isa: str | None) -> dict:
    """Cap the kernels at instruction set `isa` ('avx512', 'avx2'; None: the best here). For tests and
    benchmarks, while no scan runs; returns {kernel: instruction set or None}."""
    return _native().use(isa)


@dataclass(frozen=True)
class NibbleTables:
    """Per-query quantized tables: value(sub-code) ~ lo + delta * q, q in 0..127."""

    nib: np.ndarray     # uint8 [Q, width8, 2, 32]: byte column, (low, high) nibble, 16 entries twice (both lanes)
    base: np.ndarray    # float64 [Q]: sum of every table's minimum
    delta: np.ndarray   # float64 [Q]: one quantization step for all tables of the query
    terms: np.ndarray   # int32 [Q]: quantized terms per row + rounding slack, for the pruning bound


def nibble_values(lookup_tables: np.ndarray) -> np.ndarray:
    """float32 [Q, M, K<=16] tables -> float32 [Q, ceil(M/2), 2, 16] per byte and nibble (low, high).

    Byte j holds sub-code 2j in its low nibble and 2j+1 in its high nibble; entries the
    codes never address (k >= K, the missing high subspace of an odd M) are 0.
    """
    luts = np.asarray(lookup_tables, dtype=np.float32)
    nq, m, kk = luts.shape
    values = np.zeros((nq, (m + 1) // 2, 2, 16), dtype=np.float32)
    values[:, : (m + 1) // 2, 0, :kk] = luts[:, 0::2]
    values[:, : m // 2, 1, :kk] = luts[:, 1::2]
    return values


def nibble_tables(nibble_values: np.ndarray) -> NibbleTables | None:
    """Quantize `nibble_values` [Q, B, 2, 16] for the native kernel.

    Returns None when the kernel cannot take them (non-finite values, more than
    MAX_CODE_BYTES bytes), so the caller scans with float tables. The unaddressed
    entries are 0 in the float pair tables too (`query_node.scan.byte_tables`), so
    the pruning bound holds for every byte value. Per query: lo = each table's minimum,
    delta = the largest table range / QUANT_LEVELS, q = floor((value - lo) / delta); the bound's
    slack covers float32 rounding of the exact sums (a pair add, then one add per byte): 2B terms
    a row, eps = 4 (B + 2) 2B max|value| 2^-24 (`_quantize`).
    """
    nq, code_bytes = nibble_values.shape[:2]
    if code_bytes > MAX_CODE_BYTES:
        return None
    width8 = (code_bytes + 7) // 8 * 8
    nib = np.empty((nq, width8, 2, 32), dtype=np.uint8)  # (low, high) nibble, 16 entries twice (both lanes)
    done = _quantize(nibble_values, nq, 2 * code_bytes, 16, nib, 2 * width8, 32, 2, code_bytes, 2 * code_bytes)
    return NibbleTables(nib, *done) if done is not None else None


def _quantize(values, nq, cols, nv, out, out_cols, stride, copies, code_bytes, row_terms):
    """(base, delta, terms) of the native quantizer (_fastscan.quantize_tables: the formulas above,
    in one native call instead of ~60 us of small numpy calls), `out` filled; None for non-finite values."""
    base, delta, terms = np.empty(nq), np.empty(nq), np.empty(nq, dtype=np.int32)
    values = np.ascontiguousarray(values, dtype=np.float32)
    if not _native().quantize_tables(values, nq, cols, nv, out, out_cols, stride, copies, code_bytes, row_terms,
                                     QUANT_LEVELS, base, delta, terms):
        return None
    return base, delta, terms


@dataclass(frozen=True)
class ByteQuantTables:
    """Per-query 7-bit byte tables of 8-bit codes: value(byte b = v) ~ lo_b + delta * q."""

    qt: np.ndarray      # uint8 [Q, width8, 256]: byte column, value (padding columns 0)
    base: np.ndarray    # float64 [Q]: sum of every column's minimum
    delta: np.ndarray   # float64 [Q]
    terms: np.ndarray   # int32 [Q]: quantized terms per row + rounding slack


def byte_quant_tables(byte_tables: np.ndarray) -> ByteQuantTables | None:
    """Quantize exact byte tables float32 [Q, width * 256] for the q8 kernel (None: it cannot take them).

    Every entry of a column is quantized, also those no code addresses (0 in the byte
    tables), so the bound holds for every byte value. Bound as `nibble_tables`':
    exact = base + delta * (sum q + F), 0 <= F < width, plus float32 rounding (width terms a row).
    """
    nq, cols = byte_tables.shape
    width = cols // 256
    if width > MAX_CODE_BYTES:
        return None
    qt = np.empty((nq, (width + 7) // 8 * 8, 256), dtype=np.uint8)
    done = _quantize(byte_tables, nq, width, 256, qt, qt.shape[1], 256, 1, width, width)
    return ByteQuantTables(qt, *done) if done is not None else None


BOUND_LEVELS = 126.5  # A and B steps (ceil: <= 127 each, so their sum fits a byte; R and C stay <= 254)


@dataclass(frozen=True)
class Bound8Tables:
    """Per-query nibble bounds of 8-bit codes' byte tables: exact(byte b = 16h + l) <= base_b + delta *
    min(A[h] + B[l], R[h], C[l]), base = the sum of the columns' base_b."""

    bound: np.ndarray   # uint8 [Q, width8, 4, 32]: byte column, (A, B, R, C), 16 entries twice (both lanes)
    base: np.ndarray    # float64 [Q]
    delta: np.ndarray   # float64 [Q]
    terms: np.ndarray   # int32 [Q]: rounding slack in steps, for the pruning bound


def bound8_tables(byte_tables: np.ndarray) -> Bound8Tables | None:
    """Nibble bounds of exact byte tables float32 [Q, width * 256] for q8_scan_blocks (None: it cannot take them).

    Column b's table T[h, l] (h, l: the byte's high and low nibble) is covered three ways: R[h] = max_l T,
    C[l] = max_h T, and A[h] + B[l] with A the row means and B[l] = max_h (T[h, l] - A[h]). Quantized
    upwards with base_b = min A + min B and one delta per query (the widest A or B range / BOUND_LEVELS):
    q = ceil((x - base) / delta), at least 0 (a bound rounded up is still a bound), so
    T[h, l] <= base_b + delta * min(qA[h] + qB[l], qR[h], qC[l]); R[h] - base_b <= (max A - min A) +
    (max B - min B), so qR, qC <= 254 and qA + qB <= 254 fit a byte. The slack in `terms` covers float32
    rounding of the exact sums as in `nibble_tables` (a row's width terms) and float64 rounding here (2).
    Every entry of a column is bounded, also those no code addresses (0 in the byte tables). Computed by the
    extension (`_fastscan.bound8_tables`, ~100 us of numpy calls a query otherwise); NativeUnavailableError
    where it does not run.
    """
    nq, cols = byte_tables.shape
    width = cols // 256
    if width > MAX_CODE_BYTES:
        return None
    bound = np.empty((nq, (width + 7) // 8 * 8, 4, 32), dtype=np.uint8)
    base, delta, terms = np.empty(nq), np.empty(nq), np.empty(nq, dtype=np.int32)
    if not _native().bound8_tables(np.ascontiguousarray(byte_tables, dtype=np.float32), nq, width, BOUND_LEVELS,
                                   bound, base, delta, terms):
        return None
    return Bound8Tables(bound, base, delta, terms)


def bound8_row_bounds(tables: Bound8Tables, codes: np.ndarray) -> np.ndarray:
    """What the kernel's bound allows each row, float64 [Q, N] (numpy, for tests and the benchmark): a row's
    exact score is at most this (base + delta * (quantized bound + terms)); it is re-scored when this
    reaches the current k-th best. codes: uint8 [N, width]."""
    width = codes.shape[1]
    cols = np.arange(width)
    hi, lo = (codes >> 4).astype(np.intp), (codes & 15).astype(np.intp)
    out = np.empty((len(tables.base), len(codes)))
    for q in range(len(tables.base)):
        a, b, r, c = (tables.bound[q, :width, i, :16].astype(np.int64) for i in range(4))
        per_byte = np.minimum(np.minimum(a[cols, hi] + b[cols, lo], r[cols, hi]), c[cols, lo])
        out[q] = tables.base[q] + tables.delta[q] * (per_byte.sum(1) + tables.terms[q])
    return out


def scan_q8_into(codes: np.ndarray, byte_tables: np.ndarray, tables: ByteQuantTables, skip: np.ndarray,
                 has_skip: bool, row_offset: int, heap_s: np.ndarray, heap_r: np.ndarray, threads: int = 1) -> None:
    """Native twin of `query_node.scan._scan_into` for 8-bit codes with `ByteQuantTables` (same results).

    Args and errors as `scan_into`.
    """
    _check_arrays(codes, byte_tables, skip, has_skip, heap_s, heap_r, ("qt", tables.qt, _UINT8),
                  ("base", tables.base, _FLOAT64), ("delta", tables.delta, _FLOAT64), ("terms", tables.terms, _INT32))
    _native().q8_scan(codes, codes.shape[1], byte_tables, tables.qt, tables.base, tables.delta, tables.terms,
                      skip, has_skip, row_offset, heap_s, heap_r, heap_s.shape[-1], threads)


def scan_into(codes: np.ndarray, byte_tables: np.ndarray, tables: NibbleTables, skip: np.ndarray,
              has_skip: bool, row_offset: int, heap_s: np.ndarray, heap_r: np.ndarray, threads: int = 1) -> None:
    """Native twin of `query_node.scan._scan_into` for packed codes (same heap, same results).

    Args:
        codes: C-contiguous uint8 [N, B] packed codes (may be a read-only memory map).
        byte_tables: float32 [Q, B*256] exact pair tables.
        tables: the same queries' `NibbleTables`.
        skip: bool [N] tombstones, read only when has_skip.
        heap_s, heap_r: C-contiguous, writable float32 / int64 [Q, k] heaps, updated in place.
        threads: native threads to split the rows over (runs of >= 65536 rows; same result).
    Raises:
        ValueError: an array's dtype, layout or size does not fit the others (the
            extension checks every size, so a wrong argument never reads past a buffer).
    """
    _check_arrays(codes, byte_tables, skip, has_skip, heap_s, heap_r, ("nib", tables.nib, _UINT8),
                  ("base", tables.base, _FLOAT64), ("delta", tables.delta, _FLOAT64), ("terms", tables.terms, _INT32))
    _native().fs4_scan(codes, codes.shape[1], byte_tables, tables.nib, tables.base, tables.delta, tables.terms,
                       skip, has_skip, row_offset, heap_s, heap_r, heap_s.shape[-1], threads)


def scan_blocks_into(blocks, byte_tables: np.ndarray, tables: NibbleTables | Bound8Tables, skip: np.ndarray,
                     has_skip: bool, row_offset: int, heap_s: np.ndarray, heap_r: np.ndarray,
                     threads: int = 1, stream: bool = False) -> None:
    """`scan_into` for codes held as `query_node.code_blocks.CodeBlocks` (same heap, same results): 4-bit codes
    with their `NibbleTables` (kernel fs4_scan_blocks), 8-bit codes with their `Bound8Tables` (q8_scan_blocks).

    Args and errors as `scan_into`, `blocks` in place of the codes; `stream`: prefetch ahead (`streams`).
    """
    kernel, name, quantized = (("fs4_scan_blocks", "nib", tables.nib) if isinstance(tables, NibbleTables)
                               else ("q8_scan_blocks", "bound", tables.bound))
    _check_arrays(blocks.blocks.reshape(-1, blocks.width), byte_tables, skip, has_skip, heap_s, heap_r,
                  (name, quantized, _UINT8), ("base", tables.base, _FLOAT64), ("delta", tables.delta, _FLOAT64),
                  ("terms", tables.terms, _INT32))
    getattr(_native(), kernel)(blocks.blocks, blocks.rows, blocks.width, byte_tables, quantized, tables.base,
                               tables.delta, tables.terms, skip, has_skip, row_offset, heap_s, heap_r,
                               heap_s.shape[-1], threads, stream)


def scan8_into(codes: np.ndarray, byte_tables: np.ndarray, skip: np.ndarray, has_skip: bool, row_offset: int,
               heap_s: np.ndarray, heap_r: np.ndarray, threads: int = 1) -> None:
    """Native twin of `query_node.scan._scan_into` for any byte tables (same heap, same results).

    Args and errors as `scan_into`, without the nibble tables.
    """
    _check_arrays(codes, byte_tables, skip, has_skip, heap_s, heap_r)
    _native().pq8_scan(codes, codes.shape[1], byte_tables, skip, has_skip, row_offset, heap_s, heap_r,
                       heap_s.shape[-1], threads)


def _native():
    native, why = _load()
    if native is None:
        raise NativeUnavailableError(why)
    return native


def _check_arrays(codes, byte_tables, skip, has_skip, heap_s, heap_r, *more: tuple[str, np.ndarray, np.dtype]):
    """Dtypes, C order and writable heaps; the extension sees bytes only and checks their sizes."""
    if codes.ndim != 2:
        raise ValueError(f"codes must be uint8 [N, B], got shape {codes.shape}")
    if not (heap_s.flags.writeable and heap_r.flags.writeable):
        raise ValueError("heap_s and heap_r are updated in place: they must be writable")
    arrays = (("codes", codes, _UINT8), ("byte_tables", byte_tables, _FLOAT32), ("heap_s", heap_s, _FLOAT32),
              ("heap_r", heap_r, _INT64), *more)
    if has_skip:
        arrays += (("skip", skip, _UINT8 if skip.dtype == _UINT8 else _BOOL),)
    for name, array, dtype in arrays:
        if array.dtype != dtype or not array.flags.c_contiguous:
            layout = "" if array.flags.c_contiguous else ", not C-contiguous"
            raise ValueError(f"{name} must be a C-contiguous {dtype} array, got {array.dtype}{layout}")
