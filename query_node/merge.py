"""Exact k-way merge of per-shard top-k lists into a global top-k.

Global order (the one every layer uses, and the one a single-process scan of all
shards reproduces): higher score first; at equal score the lower shard number;
within a shard the shard's own order (its scan order, i.e. the lower row).
Because each shard list is the exact top-k of its shard in that order, the first
k of the merge are the exact global top-k.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Hit:
    """One search result. score: higher is better; similarity: calibrated, set by the coordinator (answers.py)."""

    face_id: int
    person: str
    source: str
    score: float
    shard: int
    similarity: float | None = None
    code: bytes = b""  # the stored code, only when a search asked for it (query expansion)


def merge_shard_lists(shard_lists: Iterable[list[Hit]], k: int) -> list[Hit]:
    """Merge lists that each hold the hits of ONE shard, best first, into the global top-k.

    Args:
        shard_lists: per-shard lists sorted best first (every hit of a list has the same shard).
        k: how many to keep (>= 0).
    Returns:
        up to k hits in the global order (score desc, shard asc, position in its shard list).
    """
    keyed = []
    for hits in shard_lists:
        keyed.append([(-h.score, h.shard, pos, h) for pos, h in enumerate(hits)])
    merged = heapq.merge(*keyed, key=lambda t: t[:3])
    return [t[3] for t in itertools.islice(merged, k)]


def merge_node_replies(replies: Iterable[tuple[Iterable[int], list]], k: int) -> list[Hit]:
    """Merge node replies straight into the global top-k, without splitting them by shard first.

    Args:
        replies: (shards, hits) per node: `hits` is that node's best-first list over `shards`, in the
            global order (a node merges its own shards with `merge_shard_lists`); any object with
            face_id, person, source, score and shard works (e.g. a protobuf Hit). Hits of a shard not
            in `shards` are dropped: that shard's hits come from another reply (a shard counted twice
            would repeat its hits); the global top-k stays exact because every hit of it is in the
            top-k of any reply's shard set that contains it.
        k: how many to keep (>= 0).
    Returns:
        up to k `Hit`s in the global order; only these k are converted.

    Within one node's list the hits of one shard keep that shard's order, so ordering by (score desc,
    shard asc, position in the node's list) is the same order `merge_shard_lists` gives.
    """
    keyed = []
    for shards, hits in replies:
        allowed = set(shards)
        keyed.append([(-h.score, h.shard, pos, h) for pos, h in enumerate(hits) if h.shard in allowed])
    merged = heapq.merge(*keyed, key=lambda t: t[:3])
    return [Hit(h.face_id, h.person, h.source, h.score, h.shard, code=bytes(getattr(h, "code", b"")))
            for *_, h in itertools.islice(merged, k)]
