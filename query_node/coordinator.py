"""The coordinator: lookup tables -> one replica per shard -> exact merge, over the node registry.

A search asks ONE healthy replica of every shard (shards grouped per node, nodes
called in parallel with the remaining deadline: all but one on a thread pool, the
last one on the calling thread, which saves a thread hand-off). Which replica to ask,
which failures to retry elsewhere and how versions are realigned is decided by
query_node.fanout.FanOut (pure, unit-tested); this module makes the calls, through
a query_node.node_client.NodeClients (gRPC in production, fakes in tests). Shards
that no replica answered are reported: `complete=False` plus `missing_shards`, never
a silent partial answer.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from query_node.fanout import FanOut, FanOutResult, NodeCallError, replicas_by_shard
from query_node.wire import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)


class _Done:
    """A finished call with the `.result()` of a future: the reply, or the exception raised again."""

    def __init__(self, call, *args, **kwargs):
        try:
            self.reply, self.error = call(*args, **kwargs), None
        except Exception as exc:  # noqa: BLE001 (re-raised by result(), as a future does)
            self.reply, self.error = None, exc

    def result(self):
        if self.error is not None:
            raise self.error
        return self.reply


class Coordinator:
    """Fan-out and merge over the nodes a registry reports.

    Args:
        registry: RedisRegistry or StaticRegistry (`.nodes() -> list[NodeRecord]`).
        shard_count: shards of the index (every one must be covered for a complete answer).
        topology_ttl: seconds a registry listing is reused before asking again.
        tls: query_node.security.ClientTls for the node channels (None = plaintext).
        node_token: sent as `authorization: Bearer` on every node call (nodes run with a token).
        node_clients: how nodes are called (query_node.node_client.NodeClients); default: gRPC with
            `tls`, `node_token` and `max_message_bytes`.
    """

    def __init__(self, registry, shard_count: int, topology_ttl: float = 0.5,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, tls=None, node_token: str | None = None,
                 node_clients=None):
        if node_clients is None:
            from query_node.node_client import GrpcNodeClients

            node_clients = GrpcNodeClients(tls=tls, node_token=node_token, max_message_bytes=max_message_bytes)
        self.registry = registry
        self.node_clients = node_clients
        self.shard_count = shard_count
        self.topology_ttl = topology_ttl
        self._lock = threading.Lock()
        self._nodes, self._nodes_at = None, 0.0
        self._refresh_lock = threading.Lock()  # one registry listing at a time
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self._rr = 0
        # Node calls other than a search's last run as blocking calls on these threads, not as grpc
        # futures: a future on an idle channel starts a new thread per call (grpc's channel spin
        # thread), which cost 0.5 ms before the next node was asked and delayed the reply by 0.8 ms.
        self._calls = ThreadPoolExecutor(max_workers=64, thread_name_prefix="facepq-node-call")

    def nodes(self):
        """The registry's nodes, at most `topology_ttl` seconds old.

        A background thread re-lists every topology_ttl / 2 seconds, so a search finds a fresh
        listing instead of paying for one (a static registry lists by calling every node's Status,
        a Redis one by a round trip: milliseconds on one search in every topology_ttl). A listing
        older than the TTL (the first one, a lagging refresher, a TTL of 0) is made on this thread.
        """
        with self._lock:
            nodes, age = self._nodes, time.monotonic() - self._nodes_at
        if nodes is None or age > self.topology_ttl:
            nodes = self._refresh()
        if self._refresher is None and not self._stop.is_set():
            with self._lock:
                if self._refresher is None:
                    # A weak reference: a coordinator dropped without close() still stops its thread.
                    self._refresher = threading.Thread(target=_refresh_loop, args=(weakref.ref(self), self._stop),
                                                       name="facepq-topology", daemon=True)
                    self._refresher.start()
        return list(nodes)

    def _refresh(self):
        with self._refresh_lock:
            nodes = self.registry.nodes()
            with self._lock:
                self._nodes, self._nodes_at = nodes, time.monotonic()
        return nodes

    def replicas(self) -> dict[int, list]:
        """shard -> healthy nodes serving it (rotated per call to spread load)."""
        self._rr += 1
        return replicas_by_shard(self.nodes(), self.shard_count, self._rr)

    def search_tables(self, lookup_tables: np.ndarray, k: int, timeout: float = 5.0,
                      min_version: int | None = None, refine: tuple[np.ndarray, int] | None = None) -> FanOutResult:
        """Exact global top-k for float32 [Q, M, K] tables across every shard, all from ONE index version.

        Args:
            lookup_tables: float32 [Q, M, K].
            k: hits per query.
            timeout: seconds for the whole fan-out (every retry included).
            min_version: the oldest committed version acceptable (e.g. the index's current version
                when the search started): a replica answering from an older one is treated as
                failed, so a face deleted before the search began is never returned.
            refine: a two-stage search: (refinement tables float32 [Q, a, b], candidates per shard); the
                nodes' hits then carry the refined scores, merged exactly as first-pass scores are.
        Returns:
            FanOutResult; shards no replica answered (at the agreed version) are `missing_shards`.
        Raises:
            VersionConflict: the index moved more than MAX_VERSION_ROUNDS times during the search.
            NodeRefused: a node refused the request itself (INVALID_ARGUMENT, UNAUTHENTICATED, ...).
        """
        deadline = time.monotonic() + timeout
        tables = self.node_clients.prepare(lookup_tables, refine)
        fan = FanOut({s: [n.address for n in nodes] for s, nodes in self.replicas().items()}, self.shard_count,
                     min_version)
        while True:
            plan = fan.next_round()
            remaining = deadline - time.monotonic()
            if not plan or remaining <= 0:
                break
            calls = {}
            last = list(plan)[-1]
            for address, shards in plan.items():
                args = (address, tables, k, shards, fan.target, remaining)
                if address == last:  # every other call is in flight: wait for this one on this thread
                    calls[address] = _Done(self.node_clients.search, *args)
                else:
                    calls[address] = self._calls.submit(self.node_clients.search, *args)
            for address, call in calls.items():
                try:
                    reply = call.result()
                except NodeCallError as exc:
                    fan.failed(address, exc)  # raises NodeRefused when retrying elsewhere cannot help
                    continue
                fan.answered(address, reply)
            fan.end_round()  # all shards must come from one version: realign stragglers to the newest
        return fan.result(lookup_tables.shape[0], k)

    def close(self) -> None:
        self._stop.set()
        self.node_clients.close()
        self._calls.shutdown(wait=False)


def _refresh_loop(ref, stop: threading.Event) -> None:
    """Re-list a coordinator's nodes every topology_ttl / 2 s until it is closed or garbage-collected."""
    while True:
        coordinator = ref()
        period = 0.5 if coordinator is None or coordinator.topology_ttl <= 0 else coordinator.topology_ttl / 2
        del coordinator
        if stop.wait(period):
            return
        coordinator = ref()
        if coordinator is None:
            return
        if coordinator.topology_ttl > 0:
            try:
                coordinator._refresh()
            except Exception as exc:  # noqa: BLE001 (keep the last listing; a search re-lists when it is too old)
                log.warning("cannot list the query nodes (keeping the last listing): %s", exc)
        del coordinator
