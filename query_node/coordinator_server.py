"""The coordinator's gRPC server: Search / Enrol / Delete / Status over `Coordinator`.

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
* RESOURCE_EXHAUSTED: a request above MAX_MESSAGE_BYTES (gRPC's own check).
* A search with shards that no replica answered is NOT an error: complete=false and
  missing_shards name them.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from facepq_core.errors import ConfigError, DataError, FacepqError
from query_node.wire import MAX_TOP_K

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 10
MAX_PERSON_CHARS = 256
SERVICE_NAME = "facepq.v1.Coordinator"


def _servicer_class():
    import grpc

    from facepq_core.errors import NodeRefused, VersionConflict
    from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
    from indexer.errors import IndexLockTimeout
    from indexer.store import IndexStore
    from query_node.coordinator import embedding_tables, photo_features

    def abort_for(context, exc: FacepqError):
        """Map an error from the index layer to the status a client can act on."""
        if isinstance(exc, IndexLockTimeout):
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if isinstance(exc, DataError):
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        if isinstance(exc, ConfigError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))

    class CoordinatorServicer(facepq_pb2_grpc.CoordinatorServicer):
        def __init__(self, coordinator, encoder, index_uri, redis_url, search_timeout):
            from query_node.table_builder import TableBuilder

            self.coordinator, self.encoder = coordinator, encoder
            self.tables = TableBuilder(encoder)  # embedding -> lookup table without torch's per-op cost
            self.index_uri, self.redis_url, self.search_timeout = index_uri, redis_url, search_timeout
            self.store = IndexStore(index_uri)

        def Search(self, request, context):
            t0 = time.perf_counter()
            k = request.top_k or DEFAULT_TOP_K
            if not 1 <= k <= MAX_TOP_K:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"top_k must be in 1..{MAX_TOP_K}, got {k}")
            kind = request.WhichOneof("query")
            if kind is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "send a photo (bytes) or an embedding")
            if kind == "embedding":
                try:
                    tables = embedding_tables(self.encoder, request.embedding.values, self.tables)
                except ConfigError as exc:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            else:
                feats, kept, skipped = photo_features(self.encoder, [request.photo])
                if not kept:
                    reason = skipped.get(0, "unknown")
                    if reason == "no_face":
                        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                      "no face found in the photo; send a photo with a visible, frontal face")
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the photo cannot be used: {reason} "
                                  f"(send JPEG/PNG/PGM bytes of a face photo)")
                tables = self.tables(feats[:1])
            remaining = context.time_remaining()
            timeout = self.search_timeout if remaining is None else max(0.0, min(remaining - 0.05, self.search_timeout))
            try:
                # The version current now is the oldest this search may see (deletes acknowledged before it).
                required = self.store.current_version()
                result = self.coordinator.search_tables(tables, k, timeout=timeout, min_version=required)
            except VersionConflict as exc:
                context.abort(grpc.StatusCode.ABORTED, str(exc))
            except NodeRefused as exc:  # a node refused the request itself: a coordinator/node mismatch
                context.abort(grpc.StatusCode.INTERNAL, str(exc))
            except FacepqError as exc:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot read the index version: {exc}")
            reply = facepq_pb2.SearchResponse(complete=result.complete, missing_shards=result.missing_shards,
                                              index_version=result.index_version, node_scan_ms=result.node_scan_ms)
            reply.hits.extend(facepq_pb2.Hit(face_id=h.face_id, person=h.person, source=h.source, score=h.score,
                                             shard=h.shard) for h in result.hits[0])
            reply.took_ms = (time.perf_counter() - t0) * 1e3
            return reply

        def Enrol(self, request, context):
            from indexer.face_id import face_id_for_photo
            from indexer.manifest import ModelMeta
            from indexer.writer import IndexWriter

            if not request.person.strip():
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "person must be a non-empty name")
            if len(request.person) > MAX_PERSON_CHARS or not request.person.isprintable():
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"person must be at most {MAX_PERSON_CHARS} printable "
                              f"characters (no control characters or newlines)")
            if not request.photos:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "send at least one photo to enrol")
            contents = [p.content for p in request.photos]
            sources = [p.source or f"enrol:{request.person}:{i}" for i, p in enumerate(request.photos)]
            feats, kept, skipped = photo_features(self.encoder, contents)
            skipped_msgs = [f"{sources[i]}: {r}" for i, r in sorted(skipped.items())]
            if not kept:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"no usable face in any photo ({'; '.join(skipped_msgs)})")
            codes = self.encoder.encode(feats)
            ids = np.array([face_id_for_photo(bytes(contents[i])) for i in kept], dtype=np.uint64)
            try:
                writer = IndexWriter(self.index_uri, ModelMeta.from_encoder(self.encoder), redis_url=self.redis_url)
                writer.add(ids, [request.person] * len(kept), [sources[i] for i in kept], codes)
                version = writer.commit(f"enrol {request.person!r} ({len(kept)} faces)")
            except FacepqError as exc:
                abort_for(context, exc)
            return facepq_pb2.EnrolResponse(face_ids=ids.tolist(), skipped=skipped_msgs,
                                            index_version=str(version or ""))

        def Delete(self, request, context):
            from indexer.commit import delete_faces
            from indexer.store import IndexStore

            target = request.WhichOneof("target")
            if target is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "send a person or face_ids to delete")
            if target == "face_ids" and not request.face_ids.ids:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "face_ids is empty: send at least one face id")
            try:
                if target == "person":
                    version, n = delete_faces(IndexStore(self.index_uri), person=request.person,
                                              redis_url=self.redis_url)
                else:
                    version, n = delete_faces(IndexStore(self.index_uri), face_ids=list(request.face_ids.ids),
                                              redis_url=self.redis_url)
            except FacepqError as exc:
                abort_for(context, exc)
            return facepq_pb2.DeleteResponse(deleted=n, index_version=str(version))

        def Compact(self, request, context):
            from indexer.commit import compact

            grace = request.grace_seconds if request.HasField("grace_seconds") else 3600.0
            if not grace >= 0 or grace == float("inf"):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"grace_seconds must be a finite number >= 0, "
                              f"got {grace}")
            try:
                stats = compact(IndexStore(self.index_uri), redis_url=self.redis_url, grace_seconds=grace)
            except FacepqError as exc:
                abort_for(context, exc)
            return facepq_pb2.CompactResponse(index_version=str(stats.version or ""), rows_removed=stats.rows_removed,
                                              segments_rewritten=stats.segments_rewritten,
                                              files_deleted=stats.files_deleted, bytes_freed=stats.bytes_freed)

        def Status(self, request, context):
            replicas = self.coordinator.replicas()
            reply = facepq_pb2.StatusResponse(shard_count=self.coordinator.shard_count,
                                              model_fingerprint=self.encoder.fingerprint,
                                              uncovered_shards=[s for s, r in replicas.items() if not r])
            for n in self.coordinator.nodes():
                reply.nodes.add(node_id=n.node_id, address=n.address, shards=n.shards,
                                index_version=n.index_version, healthy=n.healthy)
                reply.index_version = reply.index_version or n.index_version
            return reply

    return CoordinatorServicer


class CoordinatorServer:
    """A running coordinator: model + registry + gRPC server with health and reflection.

    Args:
        model_path: trained checkpoint (FaceEncoder.load).  index_uri: the index (for Enrol/Delete and shard count).
        redis_url / nodes: the registry (Redis) or a static list of node addresses.
    """

    def __init__(self, model_path, index_uri, redis_url=None, nodes=None, host="127.0.0.1", port=0,
                 search_timeout=5.0, workers=8, tls=None, auth_tokens=(), auth_search=False, node_tls=None,
                 node_token=None):
        from indexer.store import IndexStore
        from opqn_model.api import FaceEncoder
        from query_node.coordinator import Coordinator
        from query_node.registry import RedisRegistry, StaticRegistry

        if bool(redis_url) == bool(nodes):
            raise ConfigError("give exactly one of --redis URL or --nodes host:port,...")
        self.encoder = FaceEncoder.load(model_path)
        manifest = IndexStore(index_uri).load_manifest()
        if manifest.model.fingerprint != self.encoder.fingerprint:
            raise ConfigError(f"the index at {index_uri} holds codes of model {manifest.model.fingerprint}, "
                              f"but {model_path} is model {self.encoder.fingerprint}; use the index's model")
        registry = RedisRegistry(redis_url) if redis_url else StaticRegistry(nodes, tls=node_tls, token=node_token)
        self.coordinator = Coordinator(registry, manifest.shard_count, tls=node_tls, node_token=node_token)
        self.tls, self.auth_tokens, self.auth_search = tls, list(auth_tokens), auth_search
        self.index_uri, self.redis_url = index_uri, redis_url
        self.host, self.requested_port, self.workers, self.search_timeout = host, port, workers, search_timeout
        self.grpc_server = self.port = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "CoordinatorServer":
        from facepq_proto.facepq.v1 import facepq_pb2_grpc
        from query_node.grpc_server import GrpcServer

        protected = ["Enrol", "Delete", "Compact"] + (["Search", "Status"] if self.auth_search else [])
        self.grpc_server = GrpcServer(SERVICE_NAME, self.host, self.requested_port, self.workers, tls=self.tls,
                                      auth_tokens=self.auth_tokens, protected_methods=protected)
        servicer = _servicer_class()(self.coordinator, self.encoder, self.index_uri, self.redis_url,
                                     self.search_timeout)
        self.grpc_server.start(lambda server: facepq_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server))
        self.port = self.grpc_server.port
        return self

    def stop(self, grace: float = 2.0) -> None:
        if self.grpc_server is not None:
            self.grpc_server.stop(grace)
        self.coordinator.close()
