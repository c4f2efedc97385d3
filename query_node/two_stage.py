"""The second pass of a two-stage search on a node: a shard's first-pass candidates, re-scored exactly.

The first pass scans the compact codes as a single-stage search does, but keeps the top R
(`candidates`, at least k) of each shard. Their refinement rows (facepq_core.refine: longer
product codes or float16 embeddings, stored in the segments' `refine` column) are read with
positional reads, for the candidates only, and re-scored with the query's refinement table;
the shard's answer is the top k of the candidates by that score, ties by the lower row (the
shard's scan order), so the coordinator's merge stays exact. A candidate read by two queries
of one request is read once.

`validate_refine` is the request check of this pass (a node's INVALID_ARGUMENT cases).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from facepq_core.errors import InvalidRequest
from facepq_core.refine import DEFAULT_CANDIDATES, MAX_CANDIDATES, rescore


@dataclass(frozen=True)
class RefineQuery:
    """What a two-stage search adds to a single-stage one.

    Attributes:
        tables: float32 [Q, a, b], one refinement table per query (the tier's query shape).
        candidates: R, first-pass candidates kept per shard (the pass keeps max(R, k)).
        kernel: the tier codec's kernel family ('lut' or 'dot').
    """

    tables: np.ndarray
    candidates: int
    kernel: str


def validate_refine(refine_msgs, candidates: int, view, queries: int) -> RefineQuery | None:
    """The second pass a NodeSearchRequest asks for, checked against the served view (None: single stage).

    Args:
        refine_msgs: the request's `refine_tables` (LookupTable messages, one per query, or none).
        candidates: the request's `refine_candidates` (0 = DEFAULT_CANDIDATES).
        view: the IndexView answering.  queries: the number of first-pass tables.
    Raises:
        InvalidRequest: refinement tables for an index without a tier, a count or shape that does not fit,
            NaN/inf values, candidates without tables or above MAX_CANDIDATES.
    """
    from query_node.wire import tables_of

    if not len(refine_msgs):
        if candidates:
            raise InvalidRequest("refine_candidates without refine_tables: send one refinement table per query")
        return None
    tier = view.model.refine
    if tier is None:
        raise InvalidRequest("this index has no refinement tier (it was created with --refine none): search "
                             "without refine_tables")
    if len(refine_msgs) != queries:
        raise InvalidRequest(f"{len(refine_msgs)} refinement tables for {queries} lookup tables: send one per query")
    if candidates > MAX_CANDIDATES:
        raise InvalidRequest(f"refine_candidates must be at most {MAX_CANDIDATES}, got {candidates}")
    a, b = tier.query_shape
    tables = tables_of(refine_msgs, (a, b), "refinement table", f"this index's tier {tier.kind} needs [{a}, {b}]")
    return RefineQuery(tables, int(candidates) or DEFAULT_CANDIDATES, tier.kernel)


def rescore_candidates(segments, starts: np.ndarray, scores: np.ndarray, rows: np.ndarray, refine: RefineQuery,
                       k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-score each query's first-pass candidates with its refinement table; keep the best k.

    Args:
        segments: the shard's SegmentViews in scan order; starts: int64 [S], the shard row of each one's row 0.
        scores, rows: float32 / int64 [Q, R'] first-pass candidates best first (row -1: none).
        refine: the second pass.  k: hits kept per query.
    Returns:
        (scores float32 [Q, k], rows int64 [Q, k]): refined scores best first, ties by the lower row; -1 / -inf pad.
    """
    queries = rows.shape[0]
    out_scores = np.full((queries, k), -np.inf, dtype=np.float32)
    out_rows = np.full((queries, k), -1, dtype=np.int64)
    wanted = np.unique(rows[rows >= 0])
    if not wanted.size:
        return out_scores, out_rows
    seg_of = np.searchsorted(starts, wanted, side="right") - 1
    stored = np.empty((wanted.size, segments[0].refine.shape[1]), np.uint8)  # every segment has the tier's width
    for s in np.unique(seg_of).tolist():
        mine = seg_of == s
        stored[mine] = segments[s].refine_rows(wanted[mine] - starts[s])
    for q in range(queries):
        cand = rows[q][rows[q] >= 0]
        refined = rescore(refine.kernel, refine.tables[q], stored[np.searchsorted(wanted, cand)])
        order = np.lexsort((cand, -refined.astype(np.float64)))[:k]  # score desc, then row asc
        out_scores[q, :order.size] = refined[order]
        out_rows[q, :order.size] = cand[order]
    return out_scores, out_rows


def timed_rescore(stats, *args, **kwargs):
    """rescore_candidates, adding its seconds to `stats.rescore_seconds` when stats are kept."""
    t0 = time.perf_counter()
    try:
        return rescore_candidates(*args, **kwargs)
    finally:
        if stats is not None:
            stats.rescore_seconds += time.perf_counter() - t0
