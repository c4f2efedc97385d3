"""Lookup-table scan kernels: exact asymmetric PQ scores with a top-k heap kept in the loop.

score(query, row) = sum_m lookup_table[m, c_m(row)], higher is better
(`facepq_core.codes.score_codes` is the slow reference these kernels agree with).

Why the kernel looks the way it does (measured, see ARCHITECTURE.md):
* selecting the top-k after scoring all N rows costs as much as the scan itself,
  so a bounded min-heap lives inside the loop and a row only touches it when it
  beats the current k-th best;
* scoring a block and selecting from it are separate loops, so the scoring loop
  vectorises; the byte loop has a constant trip count for the common widths (8
  and 16 bytes) and unsigned table indices (no negative-index wraparound); on
  this machine that measured faster than loading a code as one 8-byte word and
  shifting;
* 4-bit codes (two sub-codes per byte) use "pair tables": subspaces (2j, 2j+1)
  are merged into one 256-entry table indexed by the whole byte, so packed codes
  run through the same byte kernel with half the lookups;
* where the extension is built and AVX2 exists, the native kernels run instead
  (`query_node.fastscan`): for 4-bit codes 7-bit quantized 16-entry tables looked
  up 32 rows per vpshufb prune rows that cannot reach the k-th best, and the rest
  are re-scored with the same pair tables in the same order; 8-bit codes held as
  32-row blocks are pruned the same way through each byte's two nibbles (four
  16-entry bound tables a byte, `ScanTables.bound8`); 8-byte codes of partitioned
  indexes take a fused scalar score-and-compare loop (measured ~10% faster than these two numba
  loops: 8 lookups are load-bound, so vectorising them gains nothing, and the
  second pass costs; at 16 bytes a row's serial chain of adds makes the scalar loop
  latency-bound and the vectorised numba loop wins); with AVX-512 VBMI, 8-bit codes
  of any width up to 64 bytes use 7-bit quantized byte tables the same way as the
  4-bit kernel (`ScanTables.quant8`). Results are bit-identical to the numba kernels
  here, which stay as the fallback and the reference. `TopKHeap(threads=N)` lets a
  native kernel split a segment's rows over N threads (same result).

Scores are summed in float32 in byte order (subspace order for 8-bit codes,
pair order for 4-bit codes), so they can differ from the reference by float
rounding (a few ulp); when the table values are exactly representable sums
(e.g. multiples of 2**-10) they are identical. Ties are broken by the lower row
index, rows being numbered across all segments scanned into one heap.

Tombstones: a `skip_mask` (bool/uint8 [N], True = deleted) is consulted only for
rows that would enter the heap, so it costs nothing per row and the result is the
exact top-k of the live rows.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np

from query_node import fastscan, hamming_scan
from query_node.code_blocks import CodeBlocks

log = logging.getLogger(__name__)

# Sentinel row of an empty heap slot: ranks below every real row at equal score.
_EMPTY_ROW = np.iinfo(np.int64).max


@numba.njit(cache=True, nogil=True, inline="always")
def _worse(sa, ra, sb, rb):
    """True when (sa, ra) ranks below (sb, rb): lower score, or equal score and higher row."""
    return sa < sb or (sa == sb and ra > rb)


@numba.njit(cache=True, nogil=True, inline="always")
def _replace_root(heap_s, heap_r, q, k, s, r):
    """Put (s, r) at the root of min-heap q and sift it down."""
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= k:
            break
        right = child + 1
        if right < k and _worse(heap_s[q, right], heap_r[q, right], heap_s[q, child], heap_r[q, child]):
            child = right
        if _worse(heap_s[q, child], heap_r[q, child], s, r):
            heap_s[q, pos] = heap_s[q, child]
            heap_r[q, pos] = heap_r[q, child]
            pos = child
        else:
            break
    heap_s[q, pos] = s
    heap_r[q, pos] = r


# Scoring and selection are two loops over a block: the scoring loop has no
# branches, so LLVM vectorises it (AVX2 gathers), and a constant byte count per
# width lets it unroll; the selection loop then only compares each score with
# the heap's threshold. Measured on the 2-vCPU EPYC (10M codes, M=8): 24 ms for
# the scoring alone, ~32 ms with selection, vs ~50 ms for one fused loop with
# the heap inside (the branch keeps LLVM from vectorising).
@numba.njit(cache=True, nogil=True)
def _score_w8(codes8, table, out):
    for i in range(codes8.shape[0]):
        s = np.float32(0.0)
        for b in range(8):
            s += table[np.uint64(b * 256) + np.uint64(codes8[i, b])]
        out[i] = s


@numba.njit(cache=True, nogil=True)
def _score_w16(codes8, table, out):
    for i in range(codes8.shape[0]):
        s = np.float32(0.0)
        for b in range(16):
            s += table[np.uint64(b * 256) + np.uint64(codes8[i, b])]
        out[i] = s


@numba.njit(cache=True, nogil=True)
def _score_any(codes8, table, out):
    width = codes8.shape[1]
    for i in range(codes8.shape[0]):
        s = np.float32(0.0)
        for b in range(width):
            s += table[np.uint64(b * 256) + np.uint64(codes8[i, b])]
        out[i] = s


@numba.njit(cache=True, nogil=True)
def _select(scores, first_row, skip, has_skip, skip_offset, heap_s, heap_r, q):
    """Offer rows first_row + j with scores[j] to heap q.

    Equal scores enter only with a lower row, which cannot happen while rows
    increase, so ties keep the earlier row. The tombstone mask is read only for
    the few rows that would enter the heap.
    """
    k = heap_s.shape[1]
    threshold = heap_s[q, 0]
    for j in range(scores.shape[0]):
        s = scores[j]
        if s >= threshold:
            r = first_row + j
            if _worse(heap_s[q, 0], heap_r[q, 0], s, r) and not (has_skip and skip[skip_offset + j]):
                _replace_root(heap_s, heap_r, q, k, s, r)
                threshold = heap_s[q, 0]


@numba.njit(cache=True, nogil=True)
def _scan_into(codes8, tables, skip, has_skip, row_offset, heap_s, heap_r, block):
    """Scan codes for every query table, updating the per-query heaps in place.

    Args:
        codes8: uint8 [N, B] stored codes.
        tables: float32 [Q, B * 256] byte tables (pair tables for packed codes).
        skip: bool [N] (True = tombstoned), read only when has_skip.
        row_offset: added to local row numbers (rows are global across segments).
        heap_s, heap_r: float32 / int64 [Q, k] min-heaps, root = current k-th best.
        block: rows per block; every query scans a block while it is in cache, so a
            batch of queries costs one pass over memory.
    """
    n = codes8.shape[0]
    width = codes8.shape[1]
    buf = np.empty(block, dtype=np.float32)
    for start in range(0, n, block):
        stop = min(start + block, n)
        chunk = codes8[start:stop]
        out = buf[: stop - start]
        for q in range(tables.shape[0]):
            if width == 8:
                _score_w8(chunk, tables[q], out)
            elif width == 16:
                _score_w16(chunk, tables[q], out)
            else:
                _score_any(chunk, tables[q], out)
            _select(out, row_offset + start, skip, has_skip, start, heap_s, heap_r, q)


def byte_tables(lookup_tables: np.ndarray, packed: bool, code_bytes: int) -> np.ndarray:
    """Per-query lookup tables [Q, M, K] -> byte tables float32 [Q, code_bytes * 256].

    For 8-bit codes byte j indexes subspace j (entries >= K are never read, set to 0).
    For packed 4-bit codes byte j holds sub-codes (2j low nibble, 2j+1 high nibble), so
    its table is lut[2j, lo] + lut[2j+1, hi]; with odd M the last byte has no high subspace.
    """
    luts = _as_tables(lookup_tables)
    nq, m, kk = luts.shape
    if not packed:
        if m != code_bytes or kk > 256:
            raise ValueError(f"8-bit codes of {code_bytes} bytes need tables [Q, {code_bytes}, K<=256], got {luts.shape}")
        out = np.zeros((nq, code_bytes, 256), dtype=np.float32)
        out[:, :, :kk] = luts
        return out.reshape(nq, code_bytes * 256)
    return _pair_tables(_packed_nibble_values(luts, code_bytes))


def _as_tables(lookup_tables) -> np.ndarray:
    luts = np.asarray(lookup_tables, dtype=np.float32)
    if luts.ndim != 3:
        raise ValueError(f"lookup tables must be [Q, M, K], got shape {luts.shape}")
    return luts


def _packed_nibble_values(luts: np.ndarray, code_bytes: int) -> np.ndarray:
    """Checked float32 [Q, M, K<=16] tables of packed codes -> nibble values [Q, code_bytes, 2, 16]."""
    nq, m, kk = luts.shape
    if kk > 16 or (m + 1) // 2 != code_bytes:
        raise ValueError(f"packed codes of {code_bytes} bytes need tables [Q, {2 * code_bytes - 1} or "
                         f"{2 * code_bytes}, K<=16], got {luts.shape}")
    return fastscan.nibble_values(luts)


def _pair_tables(nib: np.ndarray) -> np.ndarray:
    """Nibble values [Q, B, 2, 16] -> pair tables float32 [Q, B * 256].

    byte value = high * 16 + low  ->  table[hi, lo] = lut[2j, lo] + lut[2j+1, hi] (float32)
    """
    out = nib[:, :, 0, None, :] + nib[:, :, 1, :, None]
    return out.reshape(nib.shape[0], nib.shape[1] * 256)


@dataclass(frozen=True)
class ScanTables:
    """What a scan needs for one batch of queries."""

    byte: np.ndarray                           # float32 [Q, code_bytes * 256] exact byte tables
    nibble: fastscan.NibbleTables | None = None  # packed codes on the native kernel
    quant8: fastscan.ByteQuantTables | None = None  # 8-bit codes on the native AVX-512 kernel
    bound8: fastscan.Bound8Tables | None = None     # 8-bit codes in 32-row blocks on the native AVX2 kernel
    hamming: np.ndarray | None = None          # uint8 [Q, code_bytes]: the query codes of Hamming tables

    def query(self, q: int) -> ScanTables:
        """Query q's tables alone (every array of every table set has the query as its first axis; the
        slices are views, C-contiguous like the whole)."""
        def one(t):
            if t is None:
                return None
            if isinstance(t, np.ndarray):
                return t[q:q + 1]
            return dataclasses.replace(t, **{f.name: getattr(t, f.name)[q:q + 1] for f in dataclasses.fields(t)})

        return ScanTables(**{f.name: one(getattr(self, f.name)) for f in dataclasses.fields(self)})


def scan_tables(lookup_tables: np.ndarray, packed: bool, code_bytes: int, blocks: bool = True) -> ScanTables:
    """Per-query lookup tables float32 [Q, M, K] -> the tables the fastest available kernel takes.

    `blocks`: whether the codes may be `CodeBlocks`; False spares 8-bit codes the bound tables only the
    block kernel reads (row-major codes: partitioned indexes, remote segments).
    """
    if not packed:
        byte = byte_tables(lookup_tables, packed, code_bytes)
        # binary codes scored by Hamming distance: the popcount kernel (query_node.hamming_scan)
        hamming = hamming_scan.hamming_queries(byte) if hamming_scan.available() else None
        if hamming is not None:
            return ScanTables(byte, hamming=hamming)
        if fastscan.quantized8_available():
            return ScanTables(byte, quant8=fastscan.byte_quant_tables(byte))
        bound8 = fastscan.bound8_tables(byte) if blocks and fastscan.blocks8_preferred() else None
        return ScanTables(byte, bound8=bound8)
    nib = _packed_nibble_values(_as_tables(lookup_tables), code_bytes)  # one pass serves the float and the quantized tables
    return ScanTables(_pair_tables(nib), fastscan.nibble_tables(nib) if fastscan.available() else None)


class TopKHeap:
    """Per-query top-k heaps that several segments are scanned into, in row order.

    Args:
        queries: number of queries Q.
        k: heap size (>= 1).
        native: None uses the native kernels when they are available (`query_node.fastscan`),
            False the numba kernels (the reference the native ones are tested against).
        threads: native threads one segment's scan may be split over (same result for any count).
        first_row: the number of the first row scanned (rows of earlier segments scanned elsewhere).
        stream: the codes come from memory, not the cache: block kernels prefetch ahead (`fastscan.streams`;
            same result either way).
    """

    def __init__(self, queries: int, k: int, native: bool | None = None, threads: int = 1, first_row: int = 0,
                 stream: bool = False):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.scores = np.full((queries, k), -np.inf, dtype=np.float32)
        self.rows = np.full((queries, k), _EMPTY_ROW, dtype=np.int64)
        self.first_row = first_row
        self.rows_scanned = first_row
        self.native = fastscan.available() if native is None else native
        self.threads = max(1, int(threads))
        self.stream = stream

    def scan(self, codes: np.ndarray, tables: np.ndarray | ScanTables, skip_mask: np.ndarray | None = None,
             block: int = 4096) -> None:
        """Scan one segment's codes uint8 [N, B] (or its `CodeBlocks`) with `ScanTables` or byte tables
        float32 [Q, B*256].

        Rows of this segment are numbered from `rows_scanned` (the rows of the segments
        scanned before), so ties are broken across segments by scan order.
        """
        nibble = quant8 = bound8 = hamming = None
        if isinstance(tables, ScanTables):
            tables, nibble, quant8, bound8, hamming = (tables.byte, tables.nibble, tables.quant8, tables.bound8,
                                                       tables.hamming)
        blocks = codes if isinstance(codes, CodeBlocks) else None
        if blocks is not None and not (self.native and (nibble is not None or bound8 is not None)):
            # only the native block kernels read blocks (tables they cannot take, e.g. non-finite: float scan)
            codes, blocks = blocks.codes(), None
        if blocks is None and (codes.ndim != 2 or codes.dtype != np.uint8 or not codes.flags.c_contiguous):
            raise ValueError(f"codes must be C-contiguous uint8 [N, B], got {codes.dtype} {codes.shape}")
        if tables.shape != (self.scores.shape[0], codes.shape[1] * 256) or tables.dtype != np.float32:
            raise ValueError(f"byte tables must be float32 [{self.scores.shape[0]}, {codes.shape[1] * 256}], "
                             f"got {tables.dtype} {tables.shape}")
        n = codes.shape[0]
        if skip_mask is None:
            skip, has_skip = np.zeros(1, dtype=np.bool_), False
        else:
            skip, has_skip = np.ascontiguousarray(skip_mask, dtype=np.bool_), True
            if skip.shape != (n,):
                raise ValueError(f"skip_mask must be bool [{n}], got {skip.shape}")
        tables = np.ascontiguousarray(tables)
        at, threads = self.rows_scanned, self.threads
        if n and blocks is not None:
            fastscan.scan_blocks_into(blocks, tables, nibble if nibble is not None else bound8, skip, has_skip, at,
                                      self.scores, self.rows, threads, self.stream)
        elif n and self.native and hamming is not None:
            hamming_scan.scan_into(codes, hamming, skip, has_skip, at, self.scores, self.rows)
        elif n and self.native and nibble is not None:
            fastscan.scan_into(codes, tables, nibble, skip, has_skip, at, self.scores, self.rows, threads)
        elif n and self.native and quant8 is not None:
            fastscan.scan_q8_into(codes, tables, quant8, skip, has_skip, at, self.scores, self.rows, threads)
        elif n and self.native and codes.shape[1] == fastscan.FUSED_WIDTH:
            fastscan.scan8_into(codes, tables, skip, has_skip, at, self.scores, self.rows, threads)
        elif n:
            _scan_into(codes, tables, skip, has_skip, self.rows_scanned, self.scores, self.rows, block)
        self.rows_scanned += n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [Q, k], rows int64 [Q, k]) best first; short results padded with -inf / -1."""
        return self._sorted(self.scores.copy(), self.rows.copy())

    @staticmethod
    def merged(heaps: list[TopKHeap], k: int) -> tuple[np.ndarray, np.ndarray]:
        """`result()` of one heap that had scanned what every one of `heaps` scanned (disjoint rows)."""
        scores = np.concatenate([h.scores for h in heaps], axis=1)
        rows = np.concatenate([h.rows for h in heaps], axis=1)
        scores, rows = TopKHeap._sorted(scores, rows)   # empty slots (-inf, max row) sort last
        return scores[:, :k].copy(), rows[:, :k].copy()

    @staticmethod
    def _sorted(scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        for q in range(scores.shape[0]):
            order = np.lexsort((rows[q], -scores[q]))
            scores[q], rows[q] = scores[q, order], rows[q, order]
        rows[rows == _EMPTY_ROW] = -1
        return scores, rows


MIN_SPLIT_ROWS = 1 << 16   # rows per thread below which splitting costs more than it saves (as in _fastscan.c)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _segment_pool(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool for scanning groups of segments (its threads wait in native kernels, GIL released)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < threads:
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="facepq-scan")
        return _pool


def scan_segments(segments: list[tuple[np.ndarray, np.ndarray | None]], tables: np.ndarray | ScanTables, k: int,
                  threads: int = 1, native: bool | None = None, starts=None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over several segments (codes uint8 [N_i, B], skip mask or None), rows numbered across
    them in order; the result of one `TopKHeap` scanning them one after the other.

    `starts` (optional, increasing): the row number of each segment's first row, when the pieces are not
    contiguous (the probed cells of a partitioned shard keep their shard row numbers); default: contiguous.

    With `threads` > 1 the segments are cut into up to `threads` contiguous groups of about equal
    rows, each scanned on its own thread into its own heap, and the heaps are merged by the same
    (score desc, row asc) order, so the answer is the one-thread answer. A group of one big segment
    is split by the kernel instead (`TopKHeap(threads=...)`).
    """
    queries = (tables.byte if isinstance(tables, ScanTables) else tables).shape[0]
    sizes = [codes.shape[0] for codes, _ in segments]
    total = sum(sizes)
    code_bytes = sum(codes.shape[0] * codes.shape[1] for codes, _ in segments)
    # one segment holding half the rows or more: the kernel splits it better than groups would
    grouped = threads > 1 and total >= 2 * MIN_SPLIT_ROWS and max(sizes) < total / 2
    groups = _groups(sizes, threads) if grouped else [range(len(segments))]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64) if starts is None else \
        np.asarray(list(starts) + [0], dtype=np.int64)

    def scan_group(group, kernel_threads, stream):
        heap = TopKHeap(queries, k, native=native, threads=kernel_threads,
                        first_row=int(starts[group.start]) if len(group) else 0, stream=stream)
        for i in group:
            heap.rows_scanned = int(starts[i])
            heap.scan(segments[i][0], tables, segments[i][1])
        return heap

    kernel = _block_kernel(tables, segments[0][0] if segments else None, threads, native)
    with fastscan.stream_choice(queries, code_bytes, kernel) as stream:
        if len(groups) == 1:
            heaps = [scan_group(groups[0], threads, stream)]
        else:
            per_group = max(1, threads // len(groups))
            heaps = list(_segment_pool(len(groups)).map(lambda g: scan_group(g, per_group, stream), groups))
    return heaps[0].result() if len(heaps) == 1 else TopKHeap.merged(heaps, k)


def _block_kernel(tables, codes, threads: int, native: bool | None = None) -> str | None:
    """The block kernel that will scan `codes` (`CodeBlocks`) with these tables on `threads` threads, named as the
    key of what `fastscan.StreamLearner` learns (a scan on more threads takes less time a byte: its own key), or
    None where no kernel reads the prefetch hint: other codes or tables, or the numba kernels (`native` as
    `TopKHeap` takes it, None meaning the extension wherever it runs), so a numba scan never teaches the learner."""
    runs_native = fastscan.available() if native is None else native
    if not runs_native or not isinstance(codes, CodeBlocks) or not isinstance(tables, ScanTables):
        return None
    name = "4-bit blocks" if tables.nibble is not None else "8-bit blocks" if tables.bound8 is not None else None
    return None if name is None else f"{name} on {threads} thread{'s' if threads > 1 else ''}"


def _groups(sizes: list[int], threads: int) -> list[range]:
    """Contiguous ranges of segment indices, at most `threads`, of about total/threads rows each."""
    total = sum(sizes)
    target = total / min(threads, max(1, total // MIN_SPLIT_ROWS))
    groups, start, acc = [], 0, 0
    for i, n in enumerate(sizes):
        acc += n
        if acc >= target * (len(groups) + 1) and i + 1 < len(sizes):
            groups.append(range(start, i + 1))
            start = i + 1
    groups.append(range(start, len(sizes)))
    return groups


def scan_topk_batch(codes: np.ndarray, lookup_tables: np.ndarray, k: int, packed: bool,
                    skip_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of several queries in one pass over the codes.

    Args:
        codes: uint8 [N, code_bytes] stored codes (layout of `facepq_core.codes`), or their `CodeBlocks`.
        lookup_tables: float32 [Q, M, K].
        k: results per query (>= 1).
        packed: True for 4-bit codes (two sub-codes per byte).
        skip_mask: optional bool [N]; True rows are never returned (tombstones).
    Returns:
        scores float32 [Q, k] and rows int64 [Q, k], best first (ties: lower row first);
        when fewer than k rows are live the tail is -inf / -1.
    """
    if not isinstance(codes, CodeBlocks):
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if codes.ndim != 2:
            raise ValueError(f"codes must be uint8 [N, code_bytes], got shape {codes.shape}")
    tables = scan_tables(lookup_tables, packed, codes.shape[1])
    queries = tables.byte.shape[0]
    with fastscan.stream_choice(queries, codes.shape[0] * codes.shape[1], _block_kernel(tables, codes, 1)) as stream:
        heap = TopKHeap(queries, k, stream=stream)
        heap.scan(codes, tables, skip_mask)
    return heap.result()


def scan_topk(codes: np.ndarray, lookup_table: np.ndarray, k: int, packed: bool,
              skip_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of one query: float32 [M, K] table -> (scores float32 [k], rows int64 [k]).

    See `scan_topk_batch` for the arguments and the padding of short results.
    """
    lut = np.asarray(lookup_table, dtype=np.float32)
    if lut.ndim != 2:
        raise ValueError(f"lookup_table must be [M, K], got shape {lut.shape}")
    scores, rows = scan_topk_batch(codes, lut[None], k, packed, skip_mask)
    return scores[0], rows[0]


def warmup() -> None:
    """Compile (or load from the on-disk cache) every kernel signature a node uses.

    Covers writable and read-only (memory-mapped) codes, and the 8/16/other-width paths.
    """
    rng = np.random.default_rng(0)
    for nbytes in (8, 16, 3):
        codes = rng.integers(0, 256, size=(64, nbytes), dtype=np.uint8)
        tables = rng.random((2, nbytes * 256), dtype=np.float32)
        for writeable in (True, False):
            c = codes.copy()
            c.flags.writeable = writeable
            for mask in (None, np.zeros(64, dtype=np.bool_)):
                heap = TopKHeap(2, 5)
                heap.scan(c, tables, mask)
    log.info("scan kernels ready; 4-bit codes scan with %s%s, 8-bit codes with %s, Hamming codes with %s",
             fastscan.status(), " (unpartitioned indexes as 32-row blocks)" if fastscan.blocks_preferred() else "",
             fastscan.status8(), hamming_scan.status())
