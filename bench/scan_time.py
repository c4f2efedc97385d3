"""Search time per query at 1M codes for each row of the quality tables, measured in the same run.

Each row's codes are the row's own codec applied to 1M embeddings drawn from the benchmark's
gallery (each a gallery embedding plus a little noise, re-normalised: the code distribution of a
face gallery, not of random vectors). What is timed is what a query node spends on one query in
memory, one thread, top-10: the lookup tables from the query embedding (`codec.query_tables`) and
the scan kernel the node picks for them (`query_node.scan`: popcount for Hamming codes, the
AVX-512 / AVX2 table kernels otherwise). Not timed: gRPC, the coordinator's merge and the hit
metadata a node reads for its top-k (the same for every row). Rows with two searches time both:
alpha-QE (first scan, reconstruction of the top n from their codes, second scan: what the
coordinator's two rounds cost the nodes) and two-stage search (first scan keeping R, the R rows
re-scored from the refinement tier held in memory here; a node reads them with positional reads,
~1.3 us a row more: `facepq bench twostage`). References in the same run, one thread: FAISS
IndexFlatIP on the float embeddings and FAISS IndexPQ (behind its OPQ rotation) on its own codes.
"""
from __future__ import annotations

import math
import time

import numpy as np

MILLION = 1_000_000
TOP_K = 10
QUERIES = 30
_CHUNK = 65_536


def gallery_like(base: np.ndarray, n: int, seed: int, noise: float = 0.3) -> np.ndarray:
    """n unit embeddings float32 [n, D]: rows of `base` drawn at random, plus Gaussian noise of norm ~`noise`."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(base), n)
    out = np.empty((n, base.shape[1]), np.float32)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        x = base[pick[lo:hi]] + (noise / math.sqrt(base.shape[1])) * rng.standard_normal((hi - lo, base.shape[1]),
                                                                                          dtype=np.float32)
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def encode(codec, embeddings: np.ndarray) -> np.ndarray:
    """`codec.encode` of many embeddings, a chunk at a time (a codec's intermediates are ~M*K floats a face:
    16 GiB for a million 64-bit OPQN codes at once)."""
    return np.concatenate([codec.encode(embeddings[lo:lo + _CHUNK]) for lo in range(0, len(embeddings), _CHUNK)])


def median_ms(one_query, queries: int = QUERIES) -> float:
    """Median wall time of `one_query(i)` over `queries` queries, after one unmeasured warm-up call."""
    one_query(0)
    times = []
    for i in range(queries):
        t0 = time.perf_counter()
        one_query(i)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def _node_scan(codec, lookup_tables: np.ndarray, codes: np.ndarray, keep: int):
    from query_node.scan import scan_segments, scan_tables

    tables = scan_tables(lookup_tables, codec.spec.packed, codec.spec.code_bytes)
    return scan_segments([(codes, None)], tables, keep, 1)


def codec_ms(codec, queries: np.ndarray, codes: np.ndarray) -> float:
    """One query: its tables + the node's kernel over `codes` uint8 [N, B] -> ms (median)."""
    return median_ms(lambda i: _node_scan(codec, codec.query_tables(queries[i % len(queries)][None]), codes, TOP_K))


def expansion_ms(codec, queries: np.ndarray, codes: np.ndarray, n: int, alpha: float) -> float:
    """alpha-QE as the coordinator runs it: first search, its top n reconstructed, expanded query, second search."""
    from facepq_core.expansion import alpha_expand

    def one(i):
        q = queries[i % len(queries)][None]
        _, rows = _node_scan(codec, codec.query_tables(q), codes, max(TOP_K, n))
        expanded = alpha_expand(codec.expansion_vector(q)[0], codec.reconstruct(codes[rows[0][:n]]), alpha)
        _node_scan(codec, codec.tables_from_vector(expanded[None]), codes, TOP_K)

    return median_ms(one)


def two_stage_ms(codec, refine_codec, queries: np.ndarray, codes: np.ndarray, refine_rows: np.ndarray,
                 candidates: int) -> float:
    """First scan keeping `candidates`, re-scored from the refinement rows uint8 [N, b] (in memory)."""
    from facepq_core.refine import rescore

    def one(i):
        q = queries[i % len(queries)][None]
        _, rows = _node_scan(codec, codec.query_tables(q), codes, max(TOP_K, candidates))
        scores = rescore(refine_codec.kernel, refine_codec.query_tables(q)[0], refine_rows[rows[0]])
        np.argsort(-scores, kind="stable")[:TOP_K]

    return median_ms(one)


def faiss_ms(index, queries: np.ndarray) -> float:
    """A FAISS index's search of one query for the top 10, one OpenMP thread."""
    import faiss

    faiss.omp_set_num_threads(1)
    return median_ms(lambda i: index.search(queries[i % len(queries)][None], TOP_K))


def float_ms(embeddings: np.ndarray, queries: np.ndarray) -> float:
    """The float reference: FAISS IndexFlatIP (cosine of unit embeddings) over `embeddings`."""
    import faiss

    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(embeddings)
    return faiss_ms(index, np.ascontiguousarray(queries, dtype=np.float32))
