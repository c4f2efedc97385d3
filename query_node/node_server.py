"""The query node's gRPC server: a thin servicer over LiveIndex (live_index) + scan + merge.

Status codes (the message always says what to change):
* INVALID_ARGUMENT: no tables, a table whose shape is not the index's [M, K] or whose
  values are not M*K finite floats, top_k outside 1..MAX_TOP_K, too many tables.
* NOT_FOUND: a requested shard that this node does not serve (ask another node / the
  coordinator's topology); the message lists the shards it serves.
* UNAVAILABLE: a requested shard is NOT_SERVING here (corrupt segment); the coordinator
  retries another replica.
* RESOURCE_EXHAUSTED: a request above MAX_MESSAGE_BYTES (gRPC's own check).
* UNAUTHENTICATED: the node runs with a token (query_node.security) and the call had none
  or a wrong one; a node's token protects Search and Status (its only callers are
  coordinators, which forward their node token).

Versions: a request naming `index_version` is answered from that committed version
when the node holds it, loading the current version first when the name is newer than
its view (see LiveIndex.view_at); the reply says which version answered.

Health (grpc.health.v1): "" and "facepq.v1.QueryNode" are SERVING while any shard
serves; "facepq.shard.<n>" per shard. Graceful stop flips everything to NOT_SERVING
first, so load balancers and the coordinator stop sending before the port closes.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import numpy as np

from query_node.index_view import IndexView
from query_node.live_index import LiveIndex
from query_node.shard_search import ScanStats

log = logging.getLogger(__name__)

MAX_TOP_K = 1000
MAX_TABLES = 64
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
SERVICE_NAME = "facepq.v1.QueryNode"


class RequestError(Exception):
    """A bad request: `code_name` is a grpc.StatusCode name, the message is for the caller."""

    def __init__(self, code_name: str, message: str):
        self.code_name = code_name
        super().__init__(message)


def shard_service_name(shard: int) -> str:
    return f"facepq.shard.{shard}"


def table_values(table_msg, i: int = 0) -> np.ndarray:
    """The float32 values of one LookupTable message, from `values` or `values_f32le` (never both).

    Raises:
        RequestError INVALID_ARGUMENT: both forms set, or bytes that are not whole float32 values.
    """
    raw = table_msg.values_f32le
    if raw:
        if len(table_msg.values):
            raise RequestError("INVALID_ARGUMENT", f"table {i} sets both values and values_f32le; send one")
        if len(raw) % 4:
            raise RequestError("INVALID_ARGUMENT", f"table {i}: values_f32le holds {len(raw)} bytes, not a "
                               f"whole number of float32 values (4 bytes each)")
        return np.frombuffer(raw, dtype="<f4")
    return np.asarray(table_msg.values, dtype=np.float32)


def table_message(pb, table: np.ndarray):
    """float32 [M, K] -> a LookupTable message carrying the values as little-endian bytes (`values_f32le`)."""
    t = np.ascontiguousarray(table, dtype="<f4")
    return pb.LookupTable(m=t.shape[0], k=t.shape[1], values_f32le=t.tobytes())


def validate_search(tables_msg, top_k: int, shards_msg, view: IndexView) -> tuple[np.ndarray, int, list[int]]:
    """Check a NodeSearchRequest against the served view.

    Returns:
        lookup tables float32 [Q, M, K], k, the shards to scan (sorted).
    Raises:
        RequestError with the status code to answer.
    """
    m, kk = view.model.M, view.model.K
    if not tables_msg:
        raise RequestError("INVALID_ARGUMENT", "no lookup tables: send at least one table of shape [M, K]")
    if len(tables_msg) > MAX_TABLES:
        raise RequestError("INVALID_ARGUMENT", f"{len(tables_msg)} tables in one request; at most {MAX_TABLES}")
    if not 1 <= top_k <= MAX_TOP_K:
        raise RequestError("INVALID_ARGUMENT", f"top_k must be in 1..{MAX_TOP_K}, got {top_k}")
    tables = np.empty((len(tables_msg), m, kk), dtype=np.float32)
    for i, t in enumerate(tables_msg):
        values = table_values(t, i)
        if (t.m, t.k) != (m, kk) or values.size != m * kk:
            raise RequestError("INVALID_ARGUMENT",
                               f"table {i} has shape [{t.m}, {t.k}] with {values.size} values; this index "
                               f"(model {view.model.fingerprint[:12]}) needs [M={m}, K={kk}] = {m * kk} values")
        if not np.isfinite(values).all():
            raise RequestError("INVALID_ARGUMENT", f"table {i} contains NaN or infinite values")
        tables[i] = values.reshape(m, kk)
    served = set(view.shards)
    shards = sorted(set(int(s) for s in shards_msg)) if len(shards_msg) else sorted(served)
    unknown = [s for s in shards if s not in served]
    if unknown:
        raise RequestError("NOT_FOUND", f"shard(s) {unknown} are not served by this node; it serves {sorted(served)}")
    down = [s for s in shards if not view.shards[s].serving]
    if down:
        reasons = "; ".join(f"{s}: {view.shards[s].reason}" for s in down)
        raise RequestError("UNAVAILABLE", f"shard(s) {down} NOT_SERVING on this node ({reasons})")
    return tables, int(top_k), shards


def _servicer_class():
    from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc

    class QueryNodeServicer(facepq_pb2_grpc.QueryNodeServicer):
        def __init__(self, live: LiveIndex, node_id: str, address: str):
            self.live, self.node_id, self.address = live, node_id, address
            self.queries_served = 0
            self._lock = threading.Lock()

        def Search(self, request, context):
            import grpc

            t0 = time.perf_counter()
            # One view for the whole request, even if a reload swaps it meanwhile.
            view = self.live.view_at(request.index_version) if request.index_version else self.live.view
            try:
                tables, k, shards = validate_search(request.tables, request.top_k, request.shards, view)
            except RequestError as exc:
                context.abort(getattr(grpc.StatusCode, exc.code_name), str(exc))
            stats = ScanStats()
            results = view.search(tables, k, shards, stats)
            with self._lock:
                self.queries_served += len(results)
            reply = facepq_pb2.NodeSearchResponse(shards_searched=shards, index_version=view.version,
                                                  scan_ms=stats.scan_seconds * 1e3)
            for hits in results:
                reply.results.add(hits=[facepq_pb2.Hit(face_id=h.face_id, person=h.person, source=h.source,
                                                       score=h.score, shard=h.shard) for h in hits])
            reply.took_ms = (time.perf_counter() - t0) * 1e3
            return reply

        def Status(self, request, context):
            view = self.live.view
            model = view.model
            reply = facepq_pb2.NodeStatusResponse(
                node_id=self.node_id, address=self.address, index_version=view.version, m=model.M, k=model.K,
                code_bytes=model.code_bytes, packed=model.packed, model_fingerprint=model.fingerprint,
                shard_count=view.manifest.shard_count, queries_served=self.queries_served)
            for s in sorted(view.shards):
                d = view.shards[s]
                reply.shards.add(shard=s, state=facepq_pb2.SHARD_SERVING if d.serving else facepq_pb2.SHARD_NOT_SERVING,
                                 rows=d.rows, live_rows=d.live_rows, code_bytes=d.code_bytes,
                                 segments=len(d.segments), reason=d.reason)
            return reply

    return QueryNodeServicer


class NodeServer:
    """A running query node: gRPC server + health + reflection + index watcher.

    Args:
        index_uri: the index.  shards: shard numbers to serve.
        host, port: where to listen (port 0 = any free port; see `.port` after start()).
        node_id: name announced in the registry (default host:port).
        poll_seconds: how often the index's CURRENT is checked for a new version.
        workers: gRPC worker threads (the scan releases the GIL, so they run in parallel).
    """

    def __init__(self, index_uri, shards, host="127.0.0.1", port=0, node_id=None, poll_seconds=0.5, workers=4,
                 tls=None, auth_tokens=(), view_grace=None):
        from query_node.scan import warmup

        # Open the index first: a bad index or shard list fails in a second, not after the kernels load.
        extra = {} if view_grace is None else {"view_grace": view_grace}
        self.live = LiveIndex(index_uri, shards, poll_seconds=poll_seconds, on_change=self._on_change, **extra)
        warmup()  # compile (or load cached) kernels before the first query, not during it
        self.host, self.requested_port, self.workers = host, port, workers
        self.node_id = node_id
        self.tls, self.auth_tokens = tls, list(auth_tokens)
        self.server = None
        self.health = None
        self.port = None
        self.listeners = []  # callables(view) told about every swap (registry)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _set_health(self, view: IndexView | None) -> None:
        from grpc_health.v1 import health_pb2

        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        any_serving = False
        for s in self.live.shard_ids:
            ok = view is not None and s in view.shards and view.shards[s].serving
            any_serving |= ok
            self.health.set(shard_service_name(s), serving if ok else not_serving)
        for name in ("", SERVICE_NAME):
            self.health.set(name, serving if any_serving else not_serving)

    def _on_change(self, view: IndexView) -> None:
        if self.health is not None:
            self._set_health(view)
        for fn in list(self.listeners):
            fn(view)

    def start(self) -> "NodeServer":
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc

        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        from query_node.security import add_port, interceptors

        protected = {f"/{SERVICE_NAME}/Search", f"/{SERVICE_NAME}/Status"}
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers), options=options,
                                  interceptors=interceptors(self.auth_tokens, protected))
        self.port = add_port(self.server, self.host, self.requested_port, self.tls)
        self.node_id = self.node_id or self.address
        servicer = _servicer_class()(self.live, self.node_id, self.address)
        facepq_pb2_grpc.add_QueryNodeServicer_to_server(servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (facepq_pb2.DESCRIPTOR.services_by_name["QueryNode"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self._set_health(self.live.view)
        self.server.start()
        self.live.start()
        log.info("query node %s serving shards %s of version %s", self.node_id, self.live.shard_ids,
                 self.live.view.version)
        return self

    def stop(self, grace: float = 2.0) -> None:
        """Flip health to NOT_SERVING, stop watching, let in-flight calls finish (up to `grace` s)."""
        if self.health is not None:
            self.health.enter_graceful_shutdown()
        self.live.stop()
        if self.server is not None:
            self.server.stop(grace).wait(grace + 1)
