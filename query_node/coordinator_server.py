"""The coordinator's gRPC server: a thin servicer over query_node.service.CoordinatorService.

Status codes:
* INVALID_ARGUMENT: no query, top_k outside 0..1000 (0 = default 10), an embedding of
  the wrong length or with NaN/inf, a photo that is not a decodable image; an Enrol
  person name that is empty, longer than 256 characters or not printable; a Delete
  with an empty face id list; a Compact with a negative or non-finite grace.
* FAILED_PRECONDITION: the photo decoded but "no face found" in it (Search); an Enrol
  where no photo had a usable face.
* NOT_FOUND: Delete, GetPerson, RenamePerson, MergePeople or a Verify against a person with no live
  face; face ids that are not live (Delete, MoveFaces).
* ALREADY_EXISTS: RenamePerson to a name that has faces (merge them instead).
* FAILED_PRECONDITION also: a `far` (Search, Verify) for a model without calibration.
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

import logging
import time

from facepq_core.errors import ConfigError
from facepq_core.expansion import Expansion
from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
from query_node.admission import default_photo_limit, photo_gate
from query_node.batcher import DEFAULT_MAX_QUERIES
from query_node.grpc_server import GrpcServer, ServedByGrpc, status_on_error
from query_node.service import SEARCH_TIMEOUT, CoordinatorService, Photo, SearchOptions
from query_node.upkeep import Upkeep
from query_node.wire import hit_messages, person_match_message

log = logging.getLogger(__name__)

SERVICE_NAME = "facepq.v1.Coordinator"


PHOTO_THREADS = 20  # photo work in progress and waiting, at most (query_node.admission: 4 + 4 x 4)
WORKERS = 32  # gRPC threads: PHOTO_THREADS, the rest for everything else


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

    Photo work (a photo Search or Verify, an Enrol) passes the service's photo gate (query_node.admission),
    the same for this shell and the HTTP one: a bounded number at once, a few waiting (never past the
    call's deadline), the rest refused at once with RESOURCE_EXHAUSTED and retry advice.
    """

    def __init__(self, service: CoordinatorService):
        self.service = service

    def Search(self, request, context):
        t0 = time.perf_counter()
        kind = request.WhichOneof("query")
        query = request.photo if kind == "photo" else request.embedding.values if kind == "embedding" else None
        options = SearchOptions(
            context.time_remaining(),
            refine_candidates=request.refine_candidates if request.HasField("refine_candidates") else None,
            far=request.far if request.HasField("far") else None,
            threshold=request.threshold if request.HasField("threshold") else None,
            group_by="person" if request.group_by == facepq_pb2.GROUP_BY_PERSON else "face",
            faces_per_person=request.faces_per_person or SearchOptions.faces_per_person,
            faces="all" if request.faces == facepq_pb2.FACES_ALL else "largest",
            min_face_px=request.min_face_px or SearchOptions.min_face_px,
            expansion=Expansion(request.expansion.n, request.expansion.alpha)
            if request.HasField("expansion") else None, nprobe=request.nprobe)
        with status_on_error(context):
            result = self.service.search(query, request.top_k, options)
        reply = facepq_pb2.SearchResponse(complete=result.complete, missing_shards=result.missing_shards,
                                          index_version=result.index_version, node_scan_ms=result.node_scan_ms,
                                          refine_candidates=result.refine_candidates, unknown=result.unknown,
                                          calibrated=result.calibrated)
        if result.expansion.n:
            reply.expansion.n, reply.expansion.alpha = result.expansion.n, result.expansion.alpha
        reply.hits.extend(hit_messages(facepq_pb2, result.hits))
        reply.people.extend(person_match_message(facepq_pb2, p) for p in result.people)
        if result.threshold is not None:
            reply.threshold = result.threshold
        for face in result.faces:
            left, top, right, bottom = face.box
            reply.faces.add(box=facepq_pb2.Box(left=left, top=top, right=right, bottom=bottom),
                            hits=hit_messages(facepq_pb2, face.hits), unknown=face.unknown,
                            people=[person_match_message(facepq_pb2, p) for p in face.people])
        reply.took_ms = (time.perf_counter() - t0) * 1e3
        return reply

    def Verify(self, request, context):
        a_kind, b_kind = request.WhichOneof("a"), request.WhichOneof("b")
        a = request.photo_a if a_kind == "photo_a" else request.embedding_a.values if a_kind == "embedding_a" else None
        b = request.photo_b if b_kind == "photo_b" else request.embedding_b.values if b_kind == "embedding_b" else None
        with status_on_error(context):
            r = self.service.verify(a, b, person_b=request.person_b if b_kind == "person_b" else None,
                                    far=request.far if request.HasField("far") else None,
                                    threshold=request.threshold if request.HasField("threshold") else None,
                                    time_remaining=context.time_remaining())
        reply = facepq_pb2.VerifyResponse(score=r.score, same=r.same, threshold=r.threshold,
                                          best_face_id=r.best_face_id, faces_compared=r.faces_compared)
        if r.similarity is not None:
            reply.similarity = r.similarity
        if r.far is not None:
            reply.far = r.far
        return reply

    def Enrol(self, request, context):
        photos = [Photo(content=p.content, source=p.source) for p in request.photos]
        with status_on_error(context):
            result = self.service.enrol(request.person, photos,
                                        faces="all" if request.faces == facepq_pb2.FACES_ALL else "largest",
                                        min_face_px=request.min_face_px or SearchOptions.min_face_px,
                                        time_remaining=context.time_remaining())
        return facepq_pb2.EnrolResponse(face_ids=result.face_ids, skipped=result.skipped,
                                        index_version=result.index_version,
                                        boxes=[facepq_pb2.Box(left=b[0], top=b[1], right=b[2], bottom=b[3])
                                               for b in result.boxes])

    def ListPeople(self, request, context):
        with status_on_error(context):
            page = self.service.list_people(request.page_size, request.page_token, request.contains)
        return facepq_pb2.ListPeopleResponse(
            people=[facepq_pb2.PersonSummary(person=p.person, faces=p.faces, shards=p.shards) for p in page.people],
            next_page_token=page.next_page_token, total=page.total)

    def GetPerson(self, request, context):
        with status_on_error(context):
            found = self.service.person_faces(request.person)
        return facepq_pb2.GetPersonResponse(person=found.person, faces=[
            facepq_pb2.Face(face_id=f.face_id, person=f.person, source=f.source, shard=f.shard) for f in found.faces])

    def RenamePerson(self, request, context):
        with status_on_error(context):
            return _change_reply(self.service.rename_person(request.person, request.new_name))

    def MergePeople(self, request, context):
        with status_on_error(context):
            return _change_reply(self.service.merge_people(list(request.people), request.into))

    def MoveFaces(self, request, context):
        with status_on_error(context):
            return _change_reply(self.service.move_faces(list(request.face_ids), request.person))

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
                                          index_version=status.index_version,
                                          calibrated=status.calibration is not None)
        for p in status.calibration.operating_points if status.calibration is not None else ():
            reply.operating_points.add(far=p.far, threshold=p.threshold, tar=p.tar)
        for n in status.nodes:
            reply.nodes.add(node_id=n.node_id, address=n.address, shards=n.shards, index_version=n.index_version,
                            healthy=n.healthy)
        return reply


def _change_reply(change):
    return facepq_pb2.PeopleChangeResponse(faces_changed=change.faces_changed, index_version=change.index_version)


# Calls that change the index: they need the token whenever the coordinator has one.
MUTATING_METHODS = ("Enrol", "Delete", "Compact", "RenamePerson", "MergePeople", "MoveFaces")
# Calls that read the gallery: they need it with --auth-search.
READING_METHODS = ("Search", "Status", "Verify", "ListPeople", "GetPerson")


class CoordinatorServer(ServedByGrpc):
    """A running coordinator: model + registry + service + gRPC server with health and reflection.

    Args:
        model_path: trained checkpoint (FaceEncoder.load).  index_uri: the index (for Enrol/Delete and shard count).
        redis_url / nodes: the registry (Redis) or a static list of node addresses.
        upkeep_seconds: seconds between rounds of small-segment merging (query_node.upkeep); 0 = none.
        max_inflight_photos: photo searches and enrolments in progress at once (default: the CPU count, at
            most 4); four times as many may wait up to 2 s, the rest are refused (RESOURCE_EXHAUSTED).
        batch_window, batch_max: searches arriving together share one fan-out (query_node.coordinator;
            window 0 = off); with batching on, `workers` is raised to at least batch_max + the photo slots.
    """

    def __init__(self, model_path, index_uri, redis_url=None, nodes=None, host="127.0.0.1", port=0,
                 search_timeout=SEARCH_TIMEOUT, workers=WORKERS, tls=None, auth_tokens=(), auth_search=False,
                 node_tls=None, node_token=None, upkeep_seconds=30.0, max_inflight_photos=None, thumbnail_roots=(),
                 batch_window=0.0, batch_max=DEFAULT_MAX_QUERIES):
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
        self.encoder = FaceEncoder.load(model_path)
        manifest = IndexStore(index_uri).load_manifest()
        if manifest.model.fingerprint != self.encoder.fingerprint:
            raise ConfigError(f"the index at {index_uri} holds codes of model {manifest.model.fingerprint}, "
                              f"but {model_path} is model {self.encoder.fingerprint}; use the index's model")
        registry = RedisRegistry(redis_url) if redis_url else StaticRegistry(nodes, tls=node_tls, token=node_token)
        if redis_url:
            registry.check()  # refuses credentials Redis rejects instead of serving empty answers
        self.coordinator = Coordinator(registry, manifest.shard_count, tls=node_tls, node_token=node_token,
                                       batch_window=batch_window, batch_max=batch_max)
        if self.coordinator.batcher.enabled:  # room for a whole batch of searches beside the photo work
            workers = max(workers, PHOTO_THREADS + batch_max)
        self.service = CoordinatorService(self.coordinator, FaceModel(self.encoder), index_uri, redis_url=redis_url,
                                          search_timeout=search_timeout, photo_admission=photo_gate(photo_limit))
        # Enrolments add small segments; merge them in the background (indexer.upkeep), 0 = never.
        self.upkeep = Upkeep(IndexStore(index_uri), redis_url=redis_url, interval=upkeep_seconds) \
            if upkeep_seconds != 0 else None
        _warn_about_posture(host, auth_search, node_tls, node_token)
        protected = list(MUTATING_METHODS) + (list(READING_METHODS) if auth_search else [])
        self.tls, self.auth_tokens, self.auth_search = tls, list(auth_tokens), auth_search
        self.thumbnail_roots = list(thumbnail_roots)
        self.http = None
        self.grpc_server = GrpcServer(SERVICE_NAME, host, port, workers, tls=tls, auth_tokens=auth_tokens,
                                      protected_methods=protected)

    def start(self) -> "CoordinatorServer":
        from query_node import metrics

        servicer = CoordinatorServicer(self.service)
        self.grpc_server.start(lambda server: facepq_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server))
        metrics.add_source(self, metrics.CoordinatorGauges(self.address, self.service))
        if self.upkeep is not None:
            self.upkeep.start()
        return self

    def serve_http(self, host: str, port: int):
        """Also serve the HTTP/JSON API and the web page (query_node.http_api) on `host:port`, same tokens and TLS."""
        from query_node.http_api import HttpServer, build_app

        app = build_app(self.service, self.auth_tokens, self.auth_search, self.thumbnail_roots)
        self.http = HttpServer(app, host, port, tls=self.tls).start()
        return self.http

    def stop(self, grace: float = 2.0) -> None:
        if self.http is not None:
            self.http.stop(grace)
        self.grpc_server.stop(grace)
        if self.upkeep is not None:
            self.upkeep.stop()
        self.coordinator.close()
