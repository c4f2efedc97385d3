"""Prometheus metrics of facepq's servers (`prometheus_client`), served on a port of their own.

    facepq node ... --metrics-port 9101        ->  http://HOST:9101/metrics
    facepq coordinator ... --metrics-port 9100

Every server counts its requests and their latency per method and status, for gRPC (an
interceptor on every server, query_node.grpc_server) and for the HTTP API (query_node.http_api):

    facepq_requests_total{server, transport, method, code}     counter
    facepq_request_seconds{server, transport, method}          histogram

A query node adds what its scans cost and what it serves (read from its current view at scrape):

    facepq_node_scan_seconds                                    histogram (kernel time per Search)
    facepq_node_codes_scanned_total                             counter (rows x lookup tables)
    facepq_node_queries_total                                   counter (lookup tables searched)
    facepq_index_version{server}                                gauge
    facepq_shard_segments / _faces / _tombstones / _serving{server, shard}   gauges

A coordinator adds the index it commits to and the health of the cluster as it sees it:

    facepq_index_version, facepq_shard_segments / _faces / _tombstones{server, shard}
    facepq_shard_healthy_replicas{shard}                        gauge (0: searches are incomplete)
    facepq_nodes{healthy}                                       gauge
    facepq_search_answers_total{answer}                         counter: complete, incomplete, unknown

Metrics live in prometheus_client's default registry (with its process_* and python_*
metrics). Gauges of index and cluster are computed when scraped, from sources servers add with
`add_source` (several servers in one process, as in tests, each under their `server` label).
deploy/grafana/facepq-dashboard.json charts them.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter("facepq_requests", "Requests answered, by server, transport, method and status code",
                   ["server", "transport", "method", "code"])
REQUEST_SECONDS = Histogram("facepq_request_seconds", "Time to answer a request, by server, transport and method",
                            ["server", "transport", "method"], buckets=_LATENCY_BUCKETS)
SCAN_SECONDS = Histogram("facepq_node_scan_seconds", "Scan kernel time of one node Search (all tables, all shards)",
                         buckets=_LATENCY_BUCKETS)
CODES_SCANNED = Counter("facepq_node_codes_scanned", "Codes scored by the scan kernels (rows x lookup tables)")
NODE_QUERIES = Counter("facepq_node_queries", "Lookup tables (queries) searched by this node")
SEARCH_ANSWERS = Counter("facepq_search_answers", "Coordinator search answers: complete, incomplete, unknown",
                         ["answer"])

_sources: dict[int, tuple] = {}  # id(owner) -> (weakref to owner, gauges callable)
_lock = threading.Lock()


def record_request(server: str, transport: str, method: str, code: str, seconds: float) -> None:
    REQUESTS.labels(server, transport, method, code).inc()
    REQUEST_SECONDS.labels(server, transport, method).observe(seconds)


def record_scan(seconds: float, rows: int, tables: int) -> None:
    """One scan of a node (a request, or a batch of requests sharing a pass): kernel seconds, rows scanned per
    table, tables."""
    SCAN_SECONDS.observe(seconds)
    CODES_SCANNED.inc(rows * tables)
    NODE_QUERIES.inc(tables)


def record_search(result) -> None:
    """One coordinator search answer (query_node.service.SearchResult)."""
    SEARCH_ANSWERS.labels("complete" if result.complete else "incomplete").inc()
    if result.unknown:
        SEARCH_ANSWERS.labels("unknown").inc()


def serve_metrics(port: int, host: str = "127.0.0.1") -> int:
    """Serve /metrics on `port` (0 = any free port) in a daemon thread; returns the port."""
    server, _ = start_http_server(port, addr=host)
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound


# ---- gRPC -----------------------------------------------------------------------------------------
def grpc_interceptor(server: str):
    """A grpc.ServerInterceptor that counts and times every unary call of the server (refusals included:
    it runs before the token check, so UNAUTHENTICATED calls are counted too)."""
    import grpc

    class _Metrics(grpc.ServerInterceptor):
        def intercept_service(self, continuation, handler_call_details):
            handler = continuation(handler_call_details)
            if handler is None or handler.unary_unary is None:
                return handler
            method = handler_call_details.method.rsplit("/", 1)[-1]
            inner = handler.unary_unary

            def timed(request, context):
                t0 = time.perf_counter()
                code = "UNKNOWN"
                try:
                    reply = inner(request, context)
                    code = _code_name(context.code(), "OK")
                    return reply
                except BaseException:
                    code = _code_name(context.code(), "UNKNOWN")
                    raise
                finally:
                    record_request(server, "grpc", method, code, time.perf_counter() - t0)

            return grpc.unary_unary_rpc_method_handler(timed, request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)

    return _Metrics()


def _code_name(code, default: str) -> str:
    return default if code is None else getattr(code, "name", str(code))


# ---- gauges read at scrape time ---------------------------------------------------------------
def add_source(owner, gauges) -> None:
    """Report `gauges()` (-> iterable of (name, help, labels dict, value)) at every scrape while `owner` lives."""
    ref = weakref.ref(owner)
    with _lock:
        _sources[id(owner)] = (ref, gauges)


def remove_source(owner) -> None:
    with _lock:
        _sources.pop(id(owner), None)


class _SourceCollector:
    def collect(self):
        families: dict[str, GaugeMetricFamily] = {}
        with _lock:
            sources = list(_sources.items())
        for key, (ref, gauges) in sources:
            if ref() is None:  # its server is gone
                with _lock:
                    _sources.pop(key, None)
                continue
            try:
                values = list(gauges())
            except Exception as exc:  # noqa: BLE001 - a scrape must not fail because one source cannot answer
                log.debug("metrics source failed: %s", exc)
                continue
            for name, doc, labels, value in values:
                family = families.get(name)
                if family is None:
                    family = families[name] = GaugeMetricFamily(name, doc, labels=list(labels))
                family.add_metric([str(v) for v in labels.values()], float(value))
        yield from families.values()


REGISTRY.register(_SourceCollector())


def index_gauges(server: str, manifest) -> list:
    """Gauges of an index version (indexer.manifest.Manifest): version, and per shard segments, faces, tombstones."""
    out = [("facepq_index_version", "Index version served or committed to", {"server": server}, manifest.version)]
    for shard, state in enumerate(manifest.shards):
        labels = {"server": server, "shard": shard}
        out += [("facepq_shard_segments", "Segments of a shard", labels, len(state.segments)),
                ("facepq_shard_faces", "Live faces of a shard", labels, state.rows - len(state.tombstones)),
                ("facepq_shard_tombstones", "Deleted faces still in a shard's segments", labels,
                 len(state.tombstones))]
    return out


def node_gauges(server: str, view) -> list:
    """Gauges of what a query node serves (query_node.index_view.IndexView): version; per shard segments, live
    faces, tombstoned rows and whether it serves."""
    out = [("facepq_index_version", "Index version served or committed to", {"server": server}, int(view.version))]
    for shard, data in sorted(view.shards.items()):
        labels = {"server": server, "shard": shard}
        out += [("facepq_shard_segments", "Segments of a shard", labels, len(data.segments)),
                ("facepq_shard_faces", "Live faces of a shard", labels, data.live_rows),
                ("facepq_shard_tombstones", "Deleted faces still in a shard's segments", labels,
                 data.rows - data.live_rows),
                ("facepq_shard_serving", "1 when this node serves the shard, 0 when NOT_SERVING", labels,
                 int(data.serving))]
    return out


class CoordinatorGauges:
    """The coordinator's gauges: its index (the manifest, re-read only when the version moves) and the cluster."""

    def __init__(self, server: str, service):
        self.server, self.service = server, service
        self._manifest = None

    def __call__(self) -> list:
        from query_node.fanout import replicas_by_shard

        store = self.service.store
        version = store.current_version()
        if self._manifest is None or self._manifest.version != version:
            self._manifest = store.load_manifest(version)
        out = index_gauges(self.server, self._manifest)
        nodes = self.service.coordinator.nodes()
        for shard, replicas in replicas_by_shard(nodes, self.service.coordinator.shard_count).items():
            out.append(("facepq_shard_healthy_replicas", "Healthy nodes serving a shard (0: searches miss it)",
                        {"shard": shard}, len(replicas)))
        healthy = sum(1 for n in nodes if n.healthy)
        out += [("facepq_nodes", "Query nodes in the registry", {"healthy": "true"}, healthy),
                ("facepq_nodes", "Query nodes in the registry", {"healthy": "false"}, len(nodes) - healthy)]
        return out
