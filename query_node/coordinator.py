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
from facepq.errors import FacepqError
from query_node.merge import Hit, merge_shard_lists

log = logging.getLogger(__name__)

RETRY_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND", "CANCELLED", "UNKNOWN", "INTERNAL")
MAX_VERSION_ROUNDS = 3


class VersionConflict(FacepqError):
    """The index moved to new versions faster than one search could gather all shards at one version."""


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
        tls: query_node.security.ClientTls for the node channels (None = plaintext).
        node_token: sent as `authorization: Bearer` on every node call (nodes run with a token).
    """

    def __init__(self, registry, shard_count: int, topology_ttl: float = 0.5, max_message_bytes: int = 16 << 20,
                 tls=None, node_token: str | None = None):
        from query_node.security import bearer_metadata

        self.registry = registry
        self.tls = tls  # query_node.security.ClientTls for node channels, or None (plaintext)
        self.node_metadata = bearer_metadata(node_token)
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
        from facepq_proto.facepq.v1 import facepq_pb2_grpc
        from query_node.security import make_channel

        with self._lock:
            if address not in self._channels:
                opts = [("grpc.max_receive_message_length", self.max_message_bytes),
                        ("grpc.max_send_message_length", self.max_message_bytes)]
                channel = make_channel(address, self.tls, opts)
                self._channels[address] = (channel, facepq_pb2_grpc.QueryNodeStub(channel))
            return self._channels[address][1]

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

    def search_tables(self, lookup_tables: np.ndarray, k: int, timeout: float = 5.0,
                      min_version: int | None = None) -> FanOutResult:
        """Exact global top-k for float32 [Q, M, K] tables across every shard, all from ONE index version.

        Args:
            lookup_tables: float32 [Q, M, K].
            k: hits per query.
            timeout: seconds for the whole fan-out (every retry included).
            min_version: the oldest committed version acceptable (e.g. the index's current version
                when the search started): a replica answering from an older one is treated as
                failed, so a face deleted before the search began is never returned.
        Returns:
            FanOutResult; shards no replica answered (at the agreed version) are `missing_shards`.
        Raises:
            VersionConflict: the index moved more than MAX_VERSION_ROUNDS times during the search.
            grpc.RpcError: a node refused the request itself (INVALID_ARGUMENT, UNAUTHENTICATED, ...).
        """
        import grpc

        from facepq_proto.facepq.v1 import facepq_pb2

        deadline = time.monotonic() + timeout
        q, m, kk = lookup_tables.shape
        tables = [facepq_pb2.LookupTable(m=m, k=kk, values=t.reshape(-1).tolist()) for t in lookup_tables]
        candidates = self.replicas()
        tried: dict[int, set] = {s: set() for s in candidates}
        pending = set(range(self.shard_count))
        answers: dict[int, tuple[int, list[list[Hit]]]] = {}  # shard -> (version, hits per query)
        target = str(min_version) if min_version else ""
        rounds = 0
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
                req = facepq_pb2.NodeSearchRequest(tables=tables, top_k=k, shards=shards, index_version=target)
                calls[address] = self._pool.submit(self._stub(address).Search, req, timeout=remaining,
                                                   metadata=self.node_metadata)
            for address, fut in calls.items():
                try:
                    reply = fut.result()
                except grpc.RpcError as exc:
                    code = exc.code().name if exc.code() else "UNKNOWN"
                    log.warning("node %s failed for shards %s: %s %s", address, plan[address], code, exc.details())
                    if code not in RETRY_CODES:
                        raise
                    continue
                version = int(reply.index_version or 0)
                if target and version < int(target):  # it could not load the version asked for
                    log.warning("node %s answered from version %d, older than the required %s; asking another "
                                "replica", address, version, target)
                    continue
                for s in reply.shards_searched:
                    answers[s] = (version, [[h for h in r.hits if h.shard == s] for r in reply.results])
                    pending.discard(s)
            # All shards must come from one version: realign stragglers to the newest one seen.
            versions = {v for v, _ in answers.values()}
            if len(versions) > 1:
                rounds += 1
                if rounds > MAX_VERSION_ROUNDS:
                    raise VersionConflict(f"the index changed {rounds} times during one search; retry")
                newest = max(versions)
                target = str(newest)
                for s in [s for s, (v, _) in answers.items() if v != newest]:
                    del answers[s]
                    pending.add(s)
                    tried[s] = set()  # the same replica can answer the new version after loading it
        version = str(next(iter({v for v, _ in answers.values()}), "")) if answers else ""
        hits = []
        for i in range(q):
            per_shard = [[Hit(h.face_id, h.person, h.source, h.score, h.shard) for h in answers[s][1][i]]
                         for s in sorted(answers)]
            hits.append(merge_shard_lists(per_shard, k))
        return FanOutResult(hits=hits, missing_shards=sorted(pending), index_version=version)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel, _ in channels:
            channel.close()


def embedding_tables(encoder, values) -> np.ndarray:
    """Embedding floats -> lookup tables float32 [1, M, K]; ConfigError for a bad length or NaN/inf."""
    emb = np.asarray(values, dtype=np.float32)
    if emb.ndim != 1 or emb.shape[0] != encoder.embedding_dim:
        raise ConfigError(f"embedding must have {encoder.embedding_dim} values for this model "
                          f"(trunk {encoder.trunk_name}), got {emb.shape[0] if emb.ndim == 1 else emb.shape}")
    if not np.isfinite(emb).all():
        raise ConfigError("embedding contains NaN or infinite values")
    # Tables depend on each sub-vector's direction only, so scaling the whole embedding changes nothing,
    # except that squares of values near float32's limit overflow in the normalisation (NaN tables).
    peak = float(np.abs(emb).max(initial=0.0))
    if peak > 1e15:
        emb = (emb.astype(np.float64) / peak).astype(np.float32)
    tables = np.asarray(encoder.lookup_tables(emb[None]), dtype=np.float32)
    if not np.isfinite(tables).all():
        raise ConfigError("this embedding gives a lookup table with NaN/inf values; send a usable embedding")
    return tables


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
