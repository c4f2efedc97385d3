"""What crosses the wire between facepq's processes: size limits, lookup tables and hits as messages.

Shared by the query node (which reads tables), the coordinator (which writes them and
reads hits) and the benchmarks, so none of them imports another's server. `pb` is the
generated module `facepq_proto.facepq.v1.facepq_pb2`, passed in so this module needs
nothing but numpy.
"""
from __future__ import annotations

import numpy as np

from facepq_core.errors import InvalidRequest

MAX_TOP_K = 1000
MAX_TABLES = 64
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# Every facepq server and client channel sends and accepts messages up to the same limit.
MESSAGE_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def table_values(table_msg, i: int = 0) -> np.ndarray:
    """The float32 values of one LookupTable message, from `values` or `values_f32le` (never both).

    Raises:
        InvalidRequest: both forms set, or bytes that are not whole float32 values.
    """
    raw = table_msg.values_f32le
    if raw:
        if len(table_msg.values):
            raise InvalidRequest(f"table {i} sets both values and values_f32le; send one")
        if len(raw) % 4:
            raise InvalidRequest(f"table {i}: values_f32le holds {len(raw)} bytes, not a whole number of float32 "
                                 f"values (4 bytes each)")
        return np.frombuffer(raw, dtype="<f4")
    return np.asarray(table_msg.values, dtype=np.float32)


def tables_of(messages, shape: tuple[int, int], what: str, needs: str) -> np.ndarray:
    """float32 [n, a, b] from LookupTable messages that must each hold `shape` = (a, b) finite values.

    Raises:
        InvalidRequest: "<what> <i> has shape ...; <needs>" for a wrong shape, or NaN/inf values.
    """
    a, b = shape
    tables = np.empty((len(messages), a, b), dtype=np.float32)
    for i, t in enumerate(messages):
        values = table_values(t, i)
        if (t.m, t.k) != (a, b) or values.size != a * b:
            raise InvalidRequest(f"{what} {i} has shape [{t.m}, {t.k}] with {values.size} values; {needs}")
        if not np.isfinite(values).all():
            raise InvalidRequest(f"{what} {i} contains NaN or infinite values")
        tables[i] = values.reshape(a, b)
    return tables


def table_message(pb, table: np.ndarray):
    """float32 [M, K] -> a LookupTable message carrying the values as little-endian bytes (`values_f32le`)."""
    t = np.ascontiguousarray(table, dtype="<f4")
    return pb.LookupTable(m=t.shape[0], k=t.shape[1], values_f32le=t.tobytes())


def hit_message(pb, hit):
    """A query_node.merge.Hit (or anything with its fields) -> a Hit message."""
    msg = pb.Hit(face_id=hit.face_id, person=hit.person, source=hit.source, score=hit.score, shard=hit.shard,
                 code=getattr(hit, "code", b""))
    similarity = getattr(hit, "similarity", None)
    if similarity is not None:
        msg.similarity = similarity
    return msg


def hit_messages(pb, hits) -> list:
    """Hit messages for a best-first list of hits, in the same order.

    The other direction has no helper on purpose: the coordinator merges the nodes' Hit
    messages as they are and converts only the k it keeps (query_node.merge.merge_node_replies).
    """
    return [hit_message(pb, h) for h in hits]


def person_match_message(pb, match):
    """A query_node.answers.PersonMatch -> a PersonMatch message (its faces as Hit messages)."""
    msg = pb.PersonMatch(person=match.person, score=match.score, faces=hit_messages(pb, match.faces))
    if match.similarity is not None:
        msg.similarity = match.similarity
    return msg
