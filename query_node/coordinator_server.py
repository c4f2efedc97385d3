"""The coordinator's gRPC server: a thin servicer over query_node.service.CoordinatorService.

Status codes:
* INVALID_ARGUMENT: no query, top_k outside 0..1000 (0 = default 10), an embedding of
  the wrong length or with NaN/inf, a photo that is not a decodable image; an Enrol
  person name that is empty, longer than 256 characters or not printable; a Delete
  with an empty face id list; a Compact with a negative or non-finite grace.
* FAILED_PRECONDITION: the photo decoded but "no face found" in it (Search); an Enrol
  where no photo had a usable face.
* NOT_FOUND: Delete of an unknown person / face ids.
* UNAUTHENTICATED: Enrol/Delete/Compact (and Search/Status with --auth-search) without a
  valid `authorization: Bearer <token>` when the coordinator runs with a token.
* ABORTED: the index changed versions too often during one search (retry); UNAVAILABLE:
  another writer held the commit lock too long (retry).
* Every search answers from ONE committed version, at least the one current when it
  started: a face deleted (and acknowledged) before a search began never appears in it.
* RESOURCE_EXHAUSTED: a request above MAX_MESSAGE_BYTES (gRPC's own check); the server full
  (photo work beyond --max-inflight-photos, or more calls than its workers can queue): the
  message and the `grpc-retry-pushback-ms` trailer say when to retry.
* INTERNAL: a query node refused the search itself (coordinator and nodes disagree on the
  index or the node token).
* A search with shards that no replica answered is NOT an error: complete=false and
  missing_shards name them.
The service raises facepq_core.errors; each class names its code, and
query_node.grpc_server.status_on_error answers it: the servicer aborts nothing itself.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time

from facepq_core.errors import ConfigError
from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
from query_node.admission import Admission
from query_node.grpc_server import GrpcServer, ServedByGrpc, status_on_error
from query_node.service import CoordinatorService, Photo, SearchOptions
from query_node.upkeep import Upkeep
from query_node.wire import hit_messages

log = logging.getLogger(__name__)

SERVICE_NAME = "facepq.v1.Coordinator"


def default_photo_limit() -> int:
    """Photo work in progress at once: one per CPU (detection and the trunk are CPU-bound), at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def photo_gate(limit: int) -> Admission:
    """`limit` photo requests at work, four times as many waiting up to 2 s each (they hold worker threads:
    WORKERS leaves room beside them for embedding searches and health checks), the rest refused."""
    return Admission("photo searches and enrolments", limit, queue=4 * limit, max_wait=2.0)


WORKERS = 32  # gRPC threads: photo work in progress and waiting (at most 20), the rest for everything else


def _warn_about_posture(host: str, auth_search: bool, node_tls, node_token) -> None:
    """Say at start what an insecure configuration exposes (the README's production checklist)."""
    from query_node.security import is_loopback

    if not is_loopback(host) and not auth_search:
        log.warning("Search and Status need no token (--auth-search is off) on %s: anyone who can reach this "
                    "coordinator can read every person's name and photo source in the index", host)
    if node_tls is None and not node_token:
        log.warning("query nodes are not authenticated (no --node-tls-ca, no --node-auth-token-file): any process "
                    "listed as a node (a static list, an unprotected Redis) can answer searches with forged hits")


class CoordinatorServicer(facepq_pb2_grpc.CoordinatorServicer):
    """Each RPC: read the request, call the CoordinatorService, build the reply.

    Photo work (a photo Search, an Enrol: face detection and the trunk, up to seconds of CPU each) is
    admitted through `photo_admission` (query_node.admission): a bounded number at once, a few waiting,
    the rest refused at once with RESOURCE_EXHAUSTED and retry advice.
    """

    def __init__(self, service: CoordinatorService, photo_admission: Admission | None = None):
        self.service = service
        self.photo_admission = photo_admission or photo_gate(default_photo_limit())

    def Search(self, request, context):
        t0 = time.perf_counter()
        kind = request.WhichOneof("query")
        query = request.photo if kind == "photo" else request.embedding.values if kind == "embedding" else None
        gate = self.photo_admission.slot(context.time_remaining()) if kind == "photo" else contextlib.nullcontext()
        with status_on_error(context), gate:
            candidates = request.refine_candidates if request.HasField("refine_candidates") else None
            result = self.service.search(query, request.top_k, SearchOptions(context.time_remaining(), candidates,
                                                                                   request.nprobe))
        reply = facepq_pb2.SearchResponse(complete=result.complete, missing_shards=result.missing_shards,
                                          index_version=result.index_version, node_scan_ms=result.node_scan_ms,
                                          refine_candidates=result.refine_candidates)
        reply.hits.extend(hit_messages(facepq_pb2, result.hits))
        reply.took_ms = (time.perf_counter() - t0) * 1e3
        return reply

    def Enrol(self, request, context):
        photos = [Photo(content=p.content, source=p.source) for p in request.photos]
        with status_on_error(context), self.photo_admission.slot(context.time_remaining()):
            result = self.service.enrol(request.person, photos)
        return facepq_pb2.EnrolResponse(face_ids=result.face_ids, skipped=result.skipped,
                                        index_version=result.index_version)

    def Delete(self, request, context):
        target = request.WhichOneof("target")
        with status_on_error(context):
            if target == "face_ids":
                result = self.service.delete(face_ids=list(request.face_ids.ids))
            else:
                result = self.service.delete(person=request.person if target == "person" else None)
        return facepq_pb2.DeleteResponse(deleted=result.deleted, index_version=result.index_version)

    def Compact(self, request, context):
        grace = request.grace_seconds if request.HasField("grace_seconds") else None
        with status_on_error(context):
            result = self.service.compact(grace)
        return facepq_pb2.CompactResponse(index_version=result.index_version, rows_removed=result.rows_removed,
                                          segments_rewritten=result.segments_rewritten,
                                          files_deleted=result.files_deleted, bytes_freed=result.bytes_freed)

    def Status(self, request, context):
        status = self.service.status()
        reply = facepq_pb2.StatusResponse(shard_count=status.shard_count, model_fingerprint=status.model_fingerprint,
                                          uncovered_shards=status.uncovered_shards,
                                          index_version=status.index_version)
        for n in status.nodes:
            reply.nodes.add(node_id=n.node_id, address=n.address, shards=n.shards, index_version=n.index_version,
                            healthy=n.healthy)
        return reply


class CoordinatorServer(ServedByGrpc):
    """A running coordinator: model + registry + service + gRPC server with health and reflection.

    Args:
        model_path: trained checkpoint (FaceEncoder.load).  index_uri: the index (for Enrol/Delete and shard count).
        redis_url / nodes: the registry (Redis) or a static list of node addresses.
        upkeep_seconds: seconds between rounds of small-segment merging (query_node.upkeep); 0 = none.
        max_inflight_photos: photo searches and enrolments in progress at once (default: the CPU count, at
            most 4); four times as many may wait up to 2 s, the rest are refused (RESOURCE_EXHAUSTED).
    """

    def __init__(self, model_path, index_uri, redis_url=None, nodes=None, host="127.0.0.1", port=0,
                 search_timeout=5.0, workers=WORKERS, tls=None, auth_tokens=(), auth_search=False, node_tls=None,
                 node_token=None, upkeep_seconds=30.0, max_inflight_photos=None):
        from indexer.store import IndexStore
        from opqn_model.api import FaceEncoder
        from query_node.coordinator import Coordinator
        from query_node.face_model import FaceModel
        from query_node.registry import RedisRegistry, StaticRegistry

        if bool(redis_url) == bool(nodes):
            raise ConfigError("give exactly one of --redis URL or --nodes host:port,...")
        photo_limit = default_photo_limit() if max_inflight_photos is None else int(max_inflight_photos)
        if photo_limit < 1:
            raise ConfigError(f"--max-inflight-photos must be >= 1, got {max_inflight_photos}")
        self.photo_admission = photo_gate(photo_limit)
        self.encoder = FaceEncoder.load(model_path)
        manifest = IndexStore(index_uri).load_manifest()
        if manifest.model.fingerprint != self.encoder.fingerprint:
            raise ConfigError(f"the index at {index_uri} holds codes of model {manifest.model.fingerprint}, "
                              f"but {model_path} is model {self.encoder.fingerprint}; use the index's model")
        registry = RedisRegistry(redis_url) if redis_url else StaticRegistry(nodes, tls=node_tls, token=node_token)
        if redis_url:
            registry.check()  # refuses credentials Redis rejects instead of serving empty answers
        self.coordinator = Coordinator(registry, manifest.shard_count, tls=node_tls, node_token=node_token)
        self.service = CoordinatorService(self.coordinator, FaceModel(self.encoder), index_uri, redis_url=redis_url,
                                          search_timeout=search_timeout)
        # Enrolments add small segments; merge them in the background (indexer.upkeep), 0 = never.
        self.upkeep = Upkeep(IndexStore(index_uri), redis_url=redis_url, interval=upkeep_seconds) \
            if upkeep_seconds != 0 else None
        _warn_about_posture(host, auth_search, node_tls, node_token)
        protected = ["Enrol", "Delete", "Compact"] + (["Search", "Status"] if auth_search else [])
        self.grpc_server = GrpcServer(SERVICE_NAME, host, port, workers, tls=tls, auth_tokens=auth_tokens,
                                      protected_methods=protected)

    def start(self) -> "CoordinatorServer":
        servicer = CoordinatorServicer(self.service, self.photo_admission)
        self.grpc_server.start(lambda server: facepq_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server))
        if self.upkeep is not None:
            self.upkeep.start()
        return self

    def stop(self, grace: float = 2.0) -> None:
        self.grpc_server.stop(grace)
        if self.upkeep is not None:
            self.upkeep.stop()
        self.coordinator.close()
