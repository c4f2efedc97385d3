"""Retrieval metrics: mAP@all, precision@k, recall@k.

Conventions (stated because papers differ):
- Higher score = more similar. Ties are ranked by gallery order (stable sort),
  so results are deterministic.
- mAP@all: for each query, AP = mean over the relevant gallery items of the
  precision at that item's rank, over the whole ranked gallery; queries with no
  relevant item in the gallery are left out of the mean (and counted).
- P@k: fraction of the top k that share the query's label (k capped at the gallery size).
- R@k: fraction of the query's relevant items found in the top k.
"""
from __future__ import annotations

import numpy as np


def ranking(scores: np.ndarray) -> np.ndarray:
    """scores float [Q, G] -> gallery indices [Q, G], best first, ties by gallery order."""
    return np.argsort(-np.asarray(scores), axis=1, kind="stable")


def relevance(scores: np.ndarray, query_labels, gallery_labels) -> np.ndarray:
    """bool [Q, G]: relevant[q, r] is True when the r-th ranked item shares query q's label."""
    q = np.asarray(query_labels)
    g = np.asarray(gallery_labels)
    order = ranking(scores)
    return g[order] == q[:, None]


def average_precisions(relevant: np.ndarray) -> np.ndarray:
    """relevant bool [Q, G] (in rank order) -> AP per query, NaN where a query has no relevant item."""
    relevant = relevant.astype(np.float64)
    hits = np.cumsum(relevant, axis=1)
    ranks = np.arange(1, relevant.shape[1] + 1)
    n_rel = relevant.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (relevant * hits / ranks).sum(axis=1) / n_rel
    ap[n_rel == 0] = np.nan
    return ap


def retrieval_metrics(scores: np.ndarray, query_labels, gallery_labels, ks=(1, 5, 10)) -> dict:
    """All metrics of a [Q, G] score matrix.

    Returns a dict: map, p_at_{k}, r_at_{k}, n_queries (with >= 1 relevant item), n_skipped_queries.
    """
    rel = relevance(scores, query_labels, gallery_labels)
    ap = average_precisions(rel)
    valid = ~np.isnan(ap)
    out = {"map": float(ap[valid].mean()) if valid.any() else float("nan"),
           "n_queries": int(valid.sum()), "n_skipped_queries": int((~valid).sum())}
    n_rel = rel.sum(axis=1)
    for k in ks:
        kk = min(k, rel.shape[1])
        top = rel[valid, :kk].sum(axis=1)
        out[f"p_at_{k}"] = float((top / kk).mean()) if valid.any() else float("nan")
        out[f"r_at_{k}"] = float((top / n_rel[valid]).mean()) if valid.any() else float("nan")
    return out


def mean_average_precision(scores: np.ndarray, query_labels, gallery_labels) -> float:
    return retrieval_metrics(scores, query_labels, gallery_labels, ks=())["map"]
