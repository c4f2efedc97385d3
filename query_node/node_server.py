"""The query node's gRPC server: a thin servicer over LiveIndex (live_index) + scan + merge.

Status codes (the message always says what to change):
* INVALID_ARGUMENT: no tables, a table whose shape is not the index's [M, K] or whose
  values are not M*K finite floats, top_k outside 1..MAX_TOP_K, too many tables; refinement
  tables that do not fit the index's tier (query_node.two_stage.validate_refine).
* NOT_FOUND: a requested shard that this node does not serve (ask another node / the
  coordinator's topology); the message lists the shards it serves.
* UNAVAILABLE: every requested shard is NOT_SERVING here (corrupt segment, no file
  descriptor left); the coordinator retries another replica. When only some are, the
  others are answered and `shards_searched` leaves the down ones out (the coordinator
  asks another replica for those): one failing shard never costs the node's other answers.
* RESOURCE_EXHAUSTED: a request above MAX_MESSAGE_BYTES (gRPC's own check).
* UNAUTHENTICATED: the node runs with a token (query_node.security) and the call had none
  or a wrong one; a node's token protects Search and Status (its only callers are
  coordinators, which forward their node token).
`validate_search` raises facepq_core.errors (InvalidRequest, NotFound, Unavailable);
each error's class names its status (query_node.grpc_server.status_on_error).

Versions: a request naming `index_version` is answered from that committed version
when the node holds it, loading the current version first when the name is newer than
its view (see LiveIndex.view_at); the reply says which version answered.

Health (grpc.health.v1): "" and "facepq.v1.QueryNode" are SERVING while any shard
serves; "facepq.shard.<n>" per shard; "facepq.index" while the watcher can read the index
(NOT_SERVING: stuck on its last good version, e.g. behind a malformed manifest). Graceful stop flips everything to NOT_SERVING
first, so load balancers and the coordinator stop sending before the port closes.
"""
from __future__ import annotations

import logging
import threading
import time

import numpy as np

from facepq_core.errors import InvalidRequest, NotFound, Unavailable
from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
from query_node import metrics
from query_node.batcher import SearchBatcher
from query_node.grpc_server import NOT_SERVING, SERVING, GrpcServer, ServedByGrpc, status_on_error
from query_node.index_view import IndexView
from query_node.live_index import LiveIndex
from query_node.scan_threads import ThreadBudget, default_threads
from query_node.security import NONCE_HEADER, PROOF_HEADER, is_loopback, node_bearer, node_reply_key, reply_proof
from query_node.shard_search import ScanStats
from query_node.two_stage import validate_refine
from query_node.wire import MAX_TABLES, MAX_TOP_K, hit_messages, tables_of

log = logging.getLogger(__name__)

SERVICE_NAME = "facepq.v1.QueryNode"
# Health service: SERVING while the node's watcher reads the index (new versions, changed files); NOT_SERVING
# while it cannot (e.g. a malformed current manifest): the node then serves its last good version.
INDEX_HEALTH = "facepq.index"


def shard_service_name(shard: int) -> str:
    return f"facepq.shard.{shard}"


def validate_search(tables_msg, top_k: int, shards_msg, view: IndexView) -> tuple[np.ndarray, int, list[int]]:
    """Check a NodeSearchRequest against the served view.

    Returns:
        lookup tables float32 [Q, M, K], k, the shards to scan (sorted; those NOT_SERVING left out).
    Raises:
        InvalidRequest: no tables, too many, a bad shape or NaN/inf values, top_k out of range.
        NotFound: a shard this node does not serve.  Unavailable: every requested shard NOT_SERVING here.
    """
    m, kk = view.model.M, view.model.K
    if not tables_msg:
        raise InvalidRequest("no lookup tables: send at least one table of shape [M, K]")
    if len(tables_msg) > MAX_TABLES:
        raise InvalidRequest(f"{len(tables_msg)} tables in one request; at most {MAX_TABLES}")
    if not 1 <= top_k <= MAX_TOP_K:
        raise InvalidRequest(f"top_k must be in 1..{MAX_TOP_K}, got {top_k}")
    tables = tables_of(tables_msg, (m, kk), "table", f"this index (model {view.model.fingerprint[:12]}) needs "
                                                      f"[M={m}, K={kk}] = {m * kk} values")
    served = set(view.shards)
    shards = sorted(set(int(s) for s in shards_msg)) if len(shards_msg) else sorted(served)
    unknown = [s for s in shards if s not in served]
    if unknown:
        raise NotFound(f"shard(s) {unknown} are not served by this node; it serves {sorted(served)}")
    down = [s for s in shards if not view.shards[s].serving]
    if len(down) == len(shards):
        reasons = "; ".join(f"{s}: {view.shards[s].reason}" for s in down)
        raise Unavailable(f"shard(s) {down} NOT_SERVING on this node ({reasons})")
    # Some shards down: the others are still answered (the reply's shards_searched leaves the down ones
    # out, and the coordinator asks another replica for them) rather than the whole request refused.
    return tables, int(top_k), [s for s in shards if s not in down]


class QueryNodeServicer(facepq_pb2_grpc.QueryNodeServicer):
    """Search and Status over a LiveIndex: read the request, validate, scan, build the reply."""

    def __init__(self, live: LiveIndex, node_id: str, address: str, reply_keys: tuple = (), threads: int = 1,
                 batcher: SearchBatcher | None = None):
        self.live, self.node_id, self.address = live, node_id, address
        self.reply_keys = reply_keys  # query_node.security.node_reply_key of each node token
        self.queries_served = 0
        self._lock = threading.Lock()
        self.threads = ThreadBudget(threads)
        self.batcher = batcher if batcher is not None else SearchBatcher(window=0)

    def _scan(self, view: IndexView, tables, k: int, shards: list[int], refine,
              with_codes: bool = False, nprobe: int = 0) -> tuple[list, ScanStats]:
        """Scan on this node's share of threads; single-stage searches may share a batched scan."""
        def scan(batch_tables):
            stats = ScanStats()
            with self.threads.share() as threads:
                results = view.search(batch_tables, k, shards, stats, refine, threads, with_codes, nprobe)
            # once per pass over the codes: the members of a batched scan share it
            metrics.record_scan(stats.scan_seconds, stats.rows, len(batch_tables))
            return results, stats

        if refine is not None:
            return scan(tables)
        return self.batcher.run((view.version, id(view), k, tuple(shards), with_codes, nprobe), tables, scan)

    def _sign(self, reply, context) -> None:
        """Prove to the coordinator that this reply comes from a node holding the node token."""
        nonce = next((v for k, v in context.invocation_metadata() or () if k == NONCE_HEADER), None)
        if nonce and self.reply_keys:
            data = reply.SerializeToString(deterministic=True)
            context.set_trailing_metadata(((PROOF_HEADER, ",".join(reply_proof(k, nonce, data)
                                                                   for k in self.reply_keys)),))

    def Search(self, request, context):
        t0 = time.perf_counter()
        # One view for the whole request, even if a reload swaps it meanwhile.
        view = self.live.view_at(request.index_version) if request.index_version else self.live.view
        with status_on_error(context):
            tables, k, shards = validate_search(request.tables, request.top_k, request.shards, view)
            refine = validate_refine(request.refine_tables, request.refine_candidates, view, len(tables))
        results, stats = self._scan(view, tables, k, shards, refine, request.with_codes, request.nprobe)
        with self._lock:
            self.queries_served += len(results)
        reply = facepq_pb2.NodeSearchResponse(shards_searched=shards, index_version=view.version,
                                              scan_ms=stats.scan_seconds * 1e3,
                                              rescore_ms=stats.rescore_seconds * 1e3)
        for hits in results:
            reply.results.add(hits=hit_messages(facepq_pb2, hits))
        reply.took_ms = (time.perf_counter() - t0) * 1e3
        self._sign(reply, context)
        return reply

    def Status(self, request, context):
        view = self.live.view
        model = view.model
        reply = facepq_pb2.NodeStatusResponse(
            node_id=self.node_id, address=self.address, index_version=view.version, m=model.M, k=model.K,
            code_bytes=model.code_bytes, codec=model.codec, model_fingerprint=model.fingerprint,
            shard_count=view.manifest.shard_count, queries_served=self.queries_served,
            refine=model.refine.kind if model.refine else "",
            refine_bytes=model.refine.code_bytes if model.refine else 0,
            cells=view.cell_probe.cells if view.cell_probe is not None else 0)
        for s in sorted(view.shards):
            d = view.shards[s]
            reply.shards.add(shard=s, state=facepq_pb2.SHARD_SERVING if d.serving else facepq_pb2.SHARD_NOT_SERVING,
                             rows=d.rows, live_rows=d.live_rows, code_bytes=d.code_bytes,
                             segments=len(d.segments), reason=d.reason)
        return reply


class NodeServer(ServedByGrpc):
    """A running query node: gRPC server + health + reflection + index watcher.

    Args:
        index_uri: the index.  shards: shard numbers to serve.
        host, port: where to listen (port 0 = any free port; see `.port` after start()).
        node_id: name announced in the registry (default host:port).
        poll_seconds: how often the index's CURRENT is checked for a new version.
        workers: gRPC worker threads (the scan releases the GIL, so they run in parallel).
        threads: native scan threads (query_node.scan_threads; default: the CPU affinity mask).
        batch_window, batch_max: batched scans (query_node.batcher; window 0 = off); with batching on,
            `workers` is raised to at least batch_max so that many requests can meet in a batch.
    """

    def __init__(self, index_uri, shards, host="127.0.0.1", port=0, node_id=None, poll_seconds=0.5, workers=4,
                 tls=None, auth_tokens=(), view_grace=None, threads=None, batch_window=0.0, batch_max=16):
        from query_node.fd_limit import check_fd_budget, raise_fd_limit
        from query_node.scan import warmup

        soft_fds, _ = raise_fd_limit()  # two descriptors per served segment
        # Open the index first: a bad index or shard list fails in a second, not after the kernels load.
        extra = {} if view_grace is None else {"view_grace": view_grace}
        self.live = LiveIndex(index_uri, shards, poll_seconds=poll_seconds, on_change=self._on_change,
                              on_status=self._on_watch_status, **extra)
        check_fd_budget(sum(len(d.segments) for d in self.live.view.shards.values()), soft_fds)
        warmup()  # compile (or load cached) kernels before the first query, not during it
        self.node_id = node_id
        # A node's token protects everything it serves: its only callers are coordinators, which send the
        # bearer derived from it; with it the node signs its replies (query_node.security).
        tokens = list(auth_tokens)
        if not tokens and not is_loopback(host):
            log.warning("this node serves %s without a token: anyone who can reach it can read every name and "
                        "source of its shards, and coordinators cannot tell it from an impostor; give it the node "
                        "token (--auth-token-file)", host)
        self.reply_keys = tuple(node_reply_key(t) for t in tokens)
        self.threads = threads if threads is not None else default_threads()
        self.batcher = SearchBatcher(batch_window, batch_max)
        if self.batcher.enabled:
            workers = max(workers, batch_max)
        self.grpc_server = GrpcServer(SERVICE_NAME, host, port, workers, tls=tls,
                                      auth_tokens=tokens + [node_bearer(t) for t in tokens],
                                      protected_methods=("Search", "Status"))
        self.listeners = []  # callables(view) told about every swap (registry)

    def _set_health(self, view: IndexView | None) -> None:
        health = self.grpc_server.health
        any_serving = False
        for s in self.live.shard_ids:
            ok = view is not None and s in view.shards and view.shards[s].serving
            any_serving |= ok
            health.set(shard_service_name(s), SERVING if ok else NOT_SERVING)
        for name in ("", SERVICE_NAME):
            health.set(name, SERVING if any_serving else NOT_SERVING)
        if view is self.live.view:  # at start and on swaps; the watcher's own state changes set it too
            health.set(INDEX_HEALTH, NOT_SERVING if self.live.last_error else SERVING)

    def _on_watch_status(self, ok: bool, error: str) -> None:
        """Health INDEX_HEALTH: NOT_SERVING while the watcher cannot read the index (the last good view
        is still served; the log says why)."""
        if self.grpc_server.health is not None:
            self.grpc_server.health.set(INDEX_HEALTH, SERVING if ok else NOT_SERVING)

    def _on_change(self, view: IndexView) -> None:
        if self.grpc_server.health is not None:
            self._set_health(view)
        for fn in list(self.listeners):
            fn(view)

    def _add_servicer(self, server) -> None:
        self.node_id = self.node_id or self.address
        facepq_pb2_grpc.add_QueryNodeServicer_to_server(
            QueryNodeServicer(self.live, self.node_id, self.address, self.reply_keys, self.threads, self.batcher),
            server)

    def start(self) -> "NodeServer":
        self.grpc_server.start(self._add_servicer, initial_health=lambda _: self._set_health(self.live.view))
        self.live.start()
        metrics.add_source(self, lambda: metrics.node_gauges(self.address, self.live.view))
        log.info("query node %s serving shards %s of version %s", self.node_id, self.live.shard_ids,
                 self.live.view.version)
        return self

    def stop(self, grace: float = 2.0) -> None:
        """Flip health to NOT_SERVING, stop watching, let in-flight calls finish (up to `grace` s)."""
        self.grpc_server.begin_shutdown()
        self.live.stop()
        self.grpc_server.stop(grace)
