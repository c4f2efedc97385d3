"""The one JSON form of facepq's answers: `facepq search --json`, the HTTP API and clients/node/search.js.

Names are the .proto's (snake_case). face ids are uint64 and are written as decimal strings (as
proto3's JSON mapping writes 64-bit integers, so JavaScript's doubles cannot round them); float32
values from the wire are written as their shortest decimal that reads back as the same float32,
so every client prints the same digits. Keys of optional features appear only when used:
`similarity` on hits of a calibrated model, `unknown` and `threshold` when an operating point was
given, `people` for group_by=person, `faces` for every face of a photo.

The functions take any object with the named attributes (query_node.service results, facepq.client's
typed results), so the server and the client write the same JSON from their own types.
"""
from __future__ import annotations

import numpy as np


def f32(value: float) -> float:
    """A float32 value as the shortest decimal that reads back as it."""
    return float(str(np.float32(value)))


def hit_json(hit, rank: int) -> dict:
    out = {"rank": rank, "face_id": str(hit.face_id), "person": hit.person, "score": f32(hit.score),
           "source": hit.source, "shard": hit.shard}
    if getattr(hit, "similarity", None) is not None:
        out["similarity"] = f32(hit.similarity)
    return out


def hits_json(hits) -> list[dict]:
    return [hit_json(h, i + 1) for i, h in enumerate(hits)]


def person_json(match) -> dict:
    out = {"person": match.person, "score": f32(match.score), "faces": hits_json(match.faces)}
    if match.similarity is not None:
        out["similarity"] = f32(match.similarity)
    return out


def answer_json(answer, threshold) -> dict:
    """The optional keys of one face's answer (hits are written by the caller)."""
    out = {}
    if answer.people:
        out["people"] = [person_json(p) for p in answer.people]
    if threshold is not None:
        out.update(unknown=bool(answer.unknown), threshold=f32(threshold))
    return out


def search_json(reply, query: str = "", took_ms: float = 0.0) -> dict:
    """A search answer (hits, complete, missing_shards, index_version, node_scan_ms, people, unknown, threshold,
    faces) as its JSON object."""
    out = {"query": query, "hits": hits_json(reply.hits), "complete": not reply.missing_shards,
           "missing_shards": [int(s) for s in reply.missing_shards], "index_version": reply.index_version,
           "took_ms": f32(took_ms), "node_scan_ms": f32(reply.node_scan_ms)}
    out.update(answer_json(reply, reply.threshold))
    if reply.faces:
        out["faces"] = [{"box": [int(v) for v in f.box], "hits": hits_json(f.hits), **answer_json(f, reply.threshold)}
                        for f in reply.faces]
    n, alpha = _expansion(getattr(reply, "expansion", None))
    if n:  # only on an answer the coordinator expanded
        out["expansion"] = {"n": n, "alpha": f32(alpha)}
    return out


def _expansion(applied) -> tuple[int, float]:
    """(n, alpha) of an applied αQE: a facepq_core.expansion.Expansion (the service's answer), an (n, alpha)
    tuple (the client's), or None."""
    if applied is None:
        return 0, 0.0
    n, alpha = (applied.n, applied.alpha) if hasattr(applied, "n") else applied
    return int(n), float(alpha)
