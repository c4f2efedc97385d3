"""Popcount kernel vs FAISS IndexBinaryFlat: exact Hamming top-k of the same 64-bit codes, one thread, one run.

For each size N: N random B-bit codes (uniform bits, so few rows beat the heap's threshold:
the scan itself is measured), Q queries searched one at a time by each popcount variant this
CPU runs (query_node.hamming_scan, through query_node.scan.TopKHeap as a node scans) and by
FAISS IndexBinaryFlat (faiss.omp_set_num_threads(1)); best of `repeats` per query, summed.
Prints ms per query, the ratio FAISS ms / ours (> 1: ours is faster; target >= 1.0 at 64 bits)
and whether the top-k distances equal FAISS's (the rows may differ only among equal distances:
FAISS does not promise our lower-row-first order; ours is checked against a brute force in the tests).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from bench.scan_bench import _best_ms


def _ours(codes, query, k, isa):
    from query_node import hamming_scan
    from query_node.scan import TopKHeap

    heap = TopKHeap(1, k)
    hamming_scan.scan_into(codes, query, np.zeros(1, np.bool_), False, 0, heap.scores, heap.rows, isa=isa)
    return heap.result()


def run(sizes, bits: int = 64, k: int = 100, queries: int = 5, repeats: int = 3, seed: int = 0, log=print) -> list:
    import faiss

    from query_node import hamming_scan

    if not hamming_scan.available():
        log(f"popcount kernel unavailable: {hamming_scan.status()}")
        return []
    faiss.omp_set_num_threads(1)
    variants = [isa for isa, runs in hamming_scan.variants().items() if runs]
    rng = np.random.default_rng(seed)
    width = bits // 8
    log(f"popcount kernel vs FAISS IndexBinaryFlat, {bits}-bit codes, top-{k}, {queries} queries, one thread; "
        f"variants here: {', '.join(variants)} (default {hamming_scan.status()})")
    rows = []
    for n in sizes:
        codes = rng.integers(0, 256, (n, width), dtype=np.uint8)
        q = rng.integers(0, 256, (queries, width), dtype=np.uint8)
        index = faiss.IndexBinaryFlat(bits)
        index.add(codes)
        for isa in variants:
            pairs = [_best_ms(lambda: _ours(codes, q[i:i + 1], k, isa), lambda: index.search(q[i:i + 1], k), repeats)
                     for i in range(queries)]
            ours_ms, faiss_ms = (sum(side) / queries for side in zip(*pairs))
            same = all(np.array_equal(-_ours(codes, q[i:i + 1], k, isa)[0][0], index.search(q[i:i + 1], k)[0][0])
                       for i in range(queries))
            rows.append(dict(n=n, isa=isa, ours_ms=ours_ms, faiss_ms=faiss_ms, ratio=faiss_ms / ours_ms, same=same))
            log(f"  N={n:>11,d}  {isa:17s} {ours_ms:8.3f} ms   IndexBinaryFlat {faiss_ms:8.3f} ms   "
                f"ratio {faiss_ms / ours_ms:5.2f}x ({'meets' if faiss_ms >= ours_ms else 'misses'} 1.0x)   "
                f"top-{k} distances equal FAISS's: {same}")
    return rows


def main(argv=None) -> int:
    from facepq_core.errors import ConfigError

    ap = argparse.ArgumentParser(prog="facepq bench popcount", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000,10000000", help="comma-separated code counts")
    ap.add_argument("--bits", type=int, default=64, help="code length (a multiple of 8)")
    ap.add_argument("-k", "--top-k", type=int, default=100)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--sizes must be comma-separated integers, got {args.sizes!r}") from None
    if not sizes or min(sizes) < args.top_k or args.top_k < 1 or args.bits % 8 or args.bits < 8:
        raise ConfigError("every size must be >= top-k >= 1, and --bits a positive multiple of 8")
    run(sizes, args.bits, args.top_k, args.queries, args.repeats, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
