"""Native popcount scan of binary codes scored by Hamming distance (popcount_kernels.c).

A binary codec's Hamming tables are table[m, v] = -popcount(q_m XOR v) (facepq_core.codecs.binary):
the query's own code byte q_m is the one entry equal to 0. `hamming_queries` recognises such
tables exactly and recovers the query codes, so the node needs no new request field: any
batch of lookup tables that are all Hamming tables is scanned by XOR + popcount instead of
byte-table lookups, with the same heap, the same scores (-distance, exact in float32) and
the same tie-breaking (lower row first). Any other tables (asymmetric scoring, PQ codes)
keep the table kernels.

Variants (picked at import of query_node._fastscan; `status()` says which runs):
avx512_vpopcntdq (8 rows of 64-bit codes per vpopcntq), else avx2 (nibble-lookup popcount).
FACEPQ_SIMD=avx2 keeps the avx2 variant, as it does for every kernel (query_node.fastscan); tests and
the benchmark force each variant by name (`isa`). FACEPQ_NATIVE=0 (or no extension) leaves the
table kernels of query_node.scan, which give the same results.
"""
from __future__ import annotations

import functools

import numpy as np

from query_node import fastscan

_POPCOUNT = np.array([bin(v).count("1") for v in range(256)], dtype=np.float32)
_VALUES = np.arange(256, dtype=np.uint8)


@functools.cache
def _module():
    """The extension module when it has the popcount kernel and a variant runs here, else None."""
    native, _ = fastscan._load()
    if native is None or getattr(native, "kernels", {}).get("hamming_scan") is None:
        return None
    return native


def available() -> bool:
    return _module() is not None


def variants() -> dict[str, bool]:
    """{variant: runs on this CPU}, best first ({} without the extension)."""
    native = _module()
    return dict(native.hamming_variants) if native is not None else {}


def status() -> str:
    """The variant a scan runs ('avx512_vpopcntdq' or 'avx2'), or 'tables (why)' when none does."""
    native = _module()
    if native is None:
        return f"tables ({fastscan.status()})"
    return native.kernels["hamming_scan"]


def hamming_queries(byte_tables: np.ndarray) -> np.ndarray | None:
    """Byte tables float32 [Q, B*256] -> the queries' codes uint8 [Q, B] when every table is a Hamming
    table (table[b, v] == -popcount(q_b XOR v) exactly), else None."""
    nq, size = byte_tables.shape
    if size % 256 or not nq:
        return None
    first = byte_tables[0, :256]  # a Hamming table's column runs from 0 (the query's byte) to -8 (its complement):
    if first.max() != 0 or first.min() != -8:  # a cheap refusal of the other tables every 8-bit query brings
        return None
    tables = byte_tables.reshape(nq, size // 256, 256)
    queries = tables.argmax(axis=2).astype(np.uint8)
    expected = -_POPCOUNT[queries[:, :, None] ^ _VALUES[None, None, :]]
    return np.ascontiguousarray(queries) if np.array_equal(tables, expected) else None


def scan_into(codes: np.ndarray, queries: np.ndarray, skip: np.ndarray, has_skip: bool, row_offset: int,
              heap_s: np.ndarray, heap_r: np.ndarray, isa: str = "") -> None:
    """Exact top-k by Hamming distance into the heaps of `query_node.scan.TopKHeap` (same rules).

    Args:
        codes: C-contiguous uint8 [N, B] (may be a read-only memory map).
        queries: C-contiguous uint8 [Q, B] query codes.
        skip: bool/uint8 [N] tombstones, read only when has_skip.
        heap_s, heap_r: writable C-contiguous float32 / int64 [Q, k] heaps, updated in place.
        isa: a variant name to force (hamming_variants), '' for the one picked at import.
    Raises:
        ValueError for arrays that do not fit; RuntimeError when the variant does not run here.
    """
    native = _module()
    if native is None:
        raise fastscan.NativeUnavailableError(status())
    if queries.dtype != np.uint8 or queries.ndim != 2 or queries.shape[1] != codes.shape[1] or \
            not queries.flags.c_contiguous:
        raise ValueError(f"queries must be C-contiguous uint8 [Q, {codes.shape[1]}], got {queries.dtype} "
                         f"{queries.shape}")
    if queries.shape[0] != heap_s.shape[0]:
        raise ValueError(f"{queries.shape[0]} queries for {heap_s.shape[0]} heaps")
    fastscan._check_arrays(codes, np.zeros(1, np.float32), skip, has_skip, heap_s, heap_r)
    native.hamming_scan(codes, codes.shape[1], queries, skip, has_skip, row_offset, heap_s, heap_r,
                        heap_s.shape[-1], isa)
