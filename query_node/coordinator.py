"""The coordinator: lookup tables -> one replica per shard -> exact merge, over the node registry.

A search asks ONE healthy replica of every shard (shards grouped per node, nodes
called in parallel on a thread pool; a lone call with no other replica to turn to runs
on the calling thread, which saves a thread hand-off). Replicas are tried healthiest
first; a call that is slow is hedged to a second replica, and one still unanswered
after the per-node timeout counts as failed (query_node.node_health), so a hung
replica costs a search a fraction of its deadline, and later searches avoid it. Which replica to ask,
which failures to retry elsewhere and how versions are realigned is decided by
query_node.fanout.FanOut (pure, unit-tested); this module makes the calls, through
a query_node.node_client.NodeClients (gRPC in production, fakes in tests). Shards
that no replica answered are reported: `complete=False` plus `missing_shards`, never
a silent partial answer.

Searches that arrive while a fan-out is in flight share the next one (`batch_window`,
query_node.batcher): their tables go to each node in one call, as one batched scan, and each
search gets its own queries' hits. A batch of B searches makes one call to each node instead
of B (each a Python gRPC call on both sides, the bulk of a request's CPU on a small machine)
and one pass over each node's codes; a search arriving when none is in flight never waits.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import weakref
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np

from query_node.batcher import DEFAULT_MAX_QUERIES, SearchBatcher
from query_node.fanout import FanOut, FanOutResult, NodeCallError, replicas_by_shard
from query_node.node_health import NodeHealth
from query_node.wire import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

DEFAULT_NODE_TIMEOUT = 1.0  # below the 5 s search timeout: room to ask two more replicas


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
        node_timeout: seconds a node may take before its shards go to another replica (when one exists);
            a call unanswered for a few times the node's usual latency is hedged to a second replica.
        batch_window, batch_max: searches arriving while a fan-out is in flight gather into the next one,
            which leaves when that fan-out ends, when it holds `batch_max` queries or after `batch_window`
            seconds (0 = off).
    """

    def __init__(self, registry, shard_count: int, topology_ttl: float = 0.5,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, tls=None, node_token: str | None = None,
                 node_clients=None, node_timeout: float = DEFAULT_NODE_TIMEOUT, batch_window: float = 0.0,
                 batch_max: int = DEFAULT_MAX_QUERIES):
        if node_clients is None:
            from query_node.node_client import GrpcNodeClients

            node_clients = GrpcNodeClients(tls=tls, node_token=node_token, max_message_bytes=max_message_bytes)
        self.registry = registry
        self.node_clients = node_clients
        self.health = NodeHealth(node_timeout)  # routing, hedging and per-node timeouts (query_node.node_health)
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
        self.batcher = SearchBatcher(batch_window, batch_max)

    def nodes(self):
        """The registry's nodes, at most `topology_ttl` seconds old.

        A background thread re-lists every topology_ttl / 2 seconds, so a search finds a fresh
        listing instead of paying for one (a static registry lists by calling every node's Status,
        a Redis one by a round trip: milliseconds on one search in every topology_ttl). A listing
        older than the TTL (the first one, a lagging refresher, a TTL of 0) is made on this thread.
        """
        with self._lock:
            nodes, age = self._nodes, time.monotonic() - self._nodes_at
        # Re-list on this thread only for the first listing, or when no refresher keeps it fresh (a TTL of
        # 0): a static list's Status call to a hung node takes seconds, and a search must not wait for it.
        if nodes is None or (age > self.topology_ttl and (self.topology_ttl <= 0 or self._refresher is None)):
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
                      min_version: int | None = None, refine: tuple[np.ndarray, int] | None = None,
                      with_codes: bool = False, nprobe: int = 0) -> FanOutResult:
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
            with_codes: each hit carries its stored code (query expansion reads its top hits' codes).
            nprobe: on a partitioned index, the cells each shard scans (0: all of them).
        With batching on, searches of the same k, min_version, with_codes and nprobe that arrive together
        share one fan-out; each gets its own queries' hits (the same hits as alone: a query's heap is its own).
        Returns:
            FanOutResult; shards no replica answered (at the agreed version) are `missing_shards`.
        Raises:
            VersionConflict: the index moved more than MAX_VERSION_ROUNDS times during the search.
            NodeRefused: a node refused the request itself (INVALID_ARGUMENT, UNAUTHENTICATED, ...).
        """
        if refine is not None or not self.batcher.enabled:  # (two-stage searches are never batched)
            return self._fan_out(lookup_tables, k, timeout, min_version, refine, with_codes, nprobe)

        def shared(tables):  # runs once for the searches of a batch, with its first search's timeout
            result = self._fan_out(tables, k, timeout, min_version, None, with_codes, nprobe)
            return result.hits, result

        hits, result = self.batcher.run((k, min_version, with_codes, nprobe), lookup_tables, shared)
        return dataclasses.replace(result, hits=list(hits))

    def _fan_out(self, lookup_tables, k, timeout, min_version, refine, with_codes, nprobe) -> FanOutResult:
        """One fan-out of these tables (one call per node per round); see `search_tables`."""
        deadline = time.monotonic() + timeout
        # only what differs from a plain search: node clients that never scan cells or read codes stay simple
        options = {**({"with_codes": True} if with_codes else {}), **({"nprobe": nprobe} if nprobe else {})}
        tables = self.node_clients.prepare(lookup_tables, refine, **options)
        now = time.monotonic()
        replicas = {s: self.health.order([n.address for n in nodes], now) for s, nodes in self.replicas().items()}
        fan = FanOut(replicas, self.shard_count, min_version)
        while True:
            plan = fan.next_round()
            remaining = deadline - time.monotonic()
            if not plan or remaining <= 0:
                break
            if not any(fan.has_alternative(shards) for shards in plan.values()):
                # Nowhere else to go for any shard: nothing to hedge, so no call needs watching. All calls but
                # the last run on the pool, the last on this thread (one thread hand-off less per search).
                last = list(plan)[-1]
                calls = {a: self._calls.submit(self._call, a, tables, k, sh, fan.target, remaining)
                         for a, sh in plan.items() if a != last}
                calls[last] = _Done(self._call, last, tables, k, plan[last], fan.target, remaining)
                for address, call in calls.items():
                    self._settle(fan, address, call)
            else:
                self._round(fan, plan, tables, k, deadline)
            fan.end_round()  # all shards must come from one version: realign stragglers to the newest
        return fan.result(lookup_tables.shape[0], k)

    def _call(self, address, tables, k, shards, target, budget) -> tuple[object, float]:
        """One node call; returns (reply, seconds) and records the node's health either way."""
        t0 = time.monotonic()
        try:
            reply = self.node_clients.search(address, tables, k, shards, target, budget)
        except NodeCallError:
            self.health.failed(address, time.monotonic())
            raise
        seconds = time.monotonic() - t0
        self.health.answered(address, seconds)
        return reply, seconds

    def _settle(self, fan: FanOut, address: str, call) -> None:
        try:
            reply, _ = call.result()
        except NodeCallError as exc:
            fan.failed(address, exc)  # raises NodeRefused when retrying elsewhere cannot help
            return
        fan.answered(address, reply)

    def _round(self, fan: FanOut, plan: dict, tables, k: int, deadline: float) -> None:
        """Make a round's calls in parallel; hedge slow ones to a second replica, give up on hung ones.

        A call is hedged (the same shards asked of the next replica too) once it has waited
        `health.hedge_after` for its node, and counted as failed after `health.node_timeout`; its own
        gRPC deadline is that timeout when another replica exists, else the whole remaining time. The
        round ends when every shard is answered or no call is left in flight (calls still running then
        finish on their threads, and their answers are ignored).
        """
        inflight: dict = {}  # future -> (address, shards, started, hedged)

        def submit(address, shards):
            now = time.monotonic()
            cut = fan.has_alternative(shards)
            budget = deadline - now
            if cut:
                budget = min(budget, self.health.node_timeout)
            future = self._calls.submit(self._call, address, tables, k, shards, fan.target, max(budget, 0.0))
            inflight[future] = [address, shards, now, not cut]

        for address, shards in plan.items():
            submit(address, shards)
        while inflight and fan.pending:
            now = time.monotonic()
            if now >= deadline:
                break
            wakes = [deadline]
            for address, _, started, hedged in inflight.values():
                if not hedged:
                    wakes.append(started + self.health.hedge_after(address))
                wakes.append(started + self.health.node_timeout)
            done, _ = wait(list(inflight), timeout=max(0.0, min(wakes) - now), return_when=FIRST_COMPLETED)
            for future in done:
                address, _, _, _ = inflight.pop(future)
                self._settle(fan, address, future)
                if address not in {a for a, *_ in inflight.values()}:
                    for alt, shards in fan.reassign(address).items():  # it failed: its pending shards move on
                        submit(alt, shards)
            now = time.monotonic()
            for future, entry in list(inflight.items()):
                address, shards, started, hedged = entry
                if now - started >= self.health.node_timeout and fan.has_alternative(shards):
                    self.health.failed(address, now)  # hung or too slow: route around it from now on
                    log.warning("node %s did not answer within %.2f s; asking another replica", address,
                                self.health.node_timeout)
                    del inflight[future]
                    for alt, alt_shards in fan.reassign(address).items():
                        submit(alt, alt_shards)
                elif not hedged and now - started >= self.health.hedge_after(address):
                    entry[3] = True
                    for alt, alt_shards in fan.reassign(address).items():  # a hedge: first answer wins
                        submit(alt, alt_shards)
        now = time.monotonic()
        for address, _, started, _ in inflight.values():
            if now - started >= self.health.hedge_after(address):
                # Outrun by its hedge (or out of time): try it last until it answers again; its own late
                # answer clears this at once, a hung node's never comes.
                self.health.failed(address, now)

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
