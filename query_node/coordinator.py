"""The coordinator: query -> lookup table -> one replica per shard -> exact merge.

A search asks ONE healthy replica of every shard (shards grouped per node, nodes
called in parallel with the remaining deadline). A node that fails with
UNAVAILABLE / DEADLINE_EXCEEDED / NOT_FOUND (it restarted with other shards) has
its shards re-asked from another replica. Shards that no replica answered are
reported: `complete=False` plus `missing_shards`, never a silent partial answer.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import numpy as np

from facepq.errors import ConfigError
from query_node.merge import Hit, merge_node_results

log = logging.getLogger(__name__)

RETRY_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND", "CANCELLED", "UNKNOWN", "INTERNAL")


@dataclass
class FanOutResult:
    hits: list[list[Hit]]                 # one best-first list per query
    missing_shards: list[int] = field(default_factory=list)
    index_version: str = ""

    @property
    def complete(self) -> bool:
        return not self.missing_shards


class Coordinator:
    """Fan-out and merge over the nodes a registry reports.

    Args:
        registry: RedisRegistry or StaticRegistry (`.nodes() -> list[NodeRecord]`).
        shard_count: shards of the index (every one must be covered for a complete answer).
        topology_ttl: seconds a registry listing is reused before asking again.
    """

    def __init__(self, registry, shard_count: int, topology_ttl: float = 0.5, max_message_bytes: int = 16 << 20):
        self.registry = registry
        self.shard_count = shard_count
        self.topology_ttl = topology_ttl
        self.max_message_bytes = max_message_bytes
        self._channels: dict = {}
        self._lock = threading.Lock()
        self._nodes, self._nodes_at = [], 0.0
        self._pool = futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="facepq-fanout")
        self._rr = 0

    def nodes(self):
        with self._lock:
            if time.monotonic() - self._nodes_at > self.topology_ttl:
                self._nodes, self._nodes_at = self.registry.nodes(), time.monotonic()
            return list(self._nodes)

    def _stub(self, address: str):
        import grpc

        from facepq_proto.facepq.v1 import facepq_pb2_grpc

        with self._lock:
            if address not in self._channels:
                opts = [("grpc.max_receive_message_length", self.max_message_bytes),
                        ("grpc.max_send_message_length", self.max_message_bytes)]
                self._channels[address] = facepq_pb2_grpc.QueryNodeStub(grpc.insecure_channel(address, options=opts))
            return self._channels[address]

    def replicas(self) -> dict[int, list]:
        """shard -> healthy nodes serving it (rotated per call to spread load)."""
        nodes = [n for n in self.nodes() if n.healthy]
        self._rr += 1
        out: dict[int, list] = {s: [] for s in range(self.shard_count)}
        for n in nodes:
            for s in n.shards:
                if s in out:
                    out[s].append(n)
        for s, lst in out.items():
            if lst:
                r = self._rr % len(lst)
                out[s] = lst[r:] + lst[:r]
        return out

    def search_tables(self, lookup_tables: np.ndarray, k: int, timeout: float = 5.0) -> FanOutResult:
        """Exact global top-k for float32 [Q, M, K] tables across every shard."""
        import grpc

        from facepq_proto.facepq.v1 import facepq_pb2

        deadline = time.monotonic() + timeout
        q, m, kk = lookup_tables.shape
        tables = [facepq_pb2.LookupTable(m=m, k=kk, values=t.reshape(-1).tolist()) for t in lookup_tables]
        candidates = self.replicas()
        tried: dict[int, set] = {s: set() for s in candidates}
        pending = set(range(self.shard_count))
        answers: list[list[list[Hit]]] = []
        version = ""
        while pending:
            plan: dict[str, list[int]] = {}
            for s in sorted(pending):
                choice = next((n for n in candidates[s] if n.address not in tried[s]), None)
                if choice is not None:
                    plan.setdefault(choice.address, []).append(s)
            remaining = deadline - time.monotonic()
            if not plan or remaining <= 0:
                break
            calls = {}
            for address, shards in plan.items():
                for s in shards:
                    tried[s].add(address)
                req = facepq_pb2.NodeSearchRequest(tables=tables, top_k=k, shards=shards)
                calls[address] = self._pool.submit(self._stub(address).Search, req, timeout=remaining)
            for address, fut in calls.items():
                try:
                    reply = fut.result()
                except grpc.RpcError as exc:
                    code = exc.code().name if exc.code() else "UNKNOWN"
                    log.warning("node %s failed for shards %s: %s %s", address, plan[address], code, exc.details())
                    if code not in RETRY_CODES:
                        raise
                    continue
                pending -= set(reply.shards_searched)
                version = version or reply.index_version
                answers.append([[Hit(h.face_id, h.person, h.source, h.score, h.shard) for h in r.hits]
                                for r in reply.results])
        hits = [merge_node_results([a[i] for a in answers], k) for i in range(q)]
        return FanOutResult(hits=hits, missing_shards=sorted(pending), index_version=version)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for stub in self._channels.values():
            pass  # channels close with the process; grpc closes idle channels itself


def embedding_tables(encoder, values) -> np.ndarray:
    """Embedding floats -> lookup tables float32 [1, M, K]; ConfigError for a bad length or NaN/inf."""
    emb = np.asarray(values, dtype=np.float32)
    if emb.ndim != 1 or emb.shape[0] != encoder.embedding_dim:
        raise ConfigError(f"embedding must have {encoder.embedding_dim} values for this model "
                          f"(trunk {encoder.trunk_name}), got {emb.shape[0] if emb.ndim == 1 else emb.shape}")
    if not np.isfinite(emb).all():
        raise ConfigError("embedding contains NaN or infinite values")
    return np.asarray(encoder.lookup_tables(emb[None]), dtype=np.float32)


def photo_features(encoder, contents: list[bytes]) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """Encoded photos -> (trunk features float32 [n_ok, E], indices kept, {index: reason skipped}).

    Undecodable bytes are skipped with their BadImage reason, photos without a face with 'no_face'.
    """
    from facepq.errors import BadImage
    from opqn_model.images import load_image

    images, idx, skipped = [], [], {}
    for i, content in enumerate(contents):
        try:
            images.append(load_image(bytes(content)))
            idx.append(i)
        except BadImage as exc:
            skipped[i] = exc.reason
    crops, kept, skip2 = encoder.prepare_photos(images)
    skipped.update({idx[j]: reason for j, reason in skip2.items()})
    feats = encoder.trunk_features(crops) if len(kept) else np.zeros((0, encoder.embedding_dim), np.float32)
    return feats, [idx[j] for j in kept], skipped
