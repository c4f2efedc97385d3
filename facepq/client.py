"""The Python client of a facepq coordinator: typed results, deadlines, retries, TLS and tokens.

    from facepq.client import CoordinatorClient

    with CoordinatorClient("search.example.org") as client:        # port 50050 when none is given
        reply = client.search(photo=open("face.jpg", "rb").read(), k=5)
        if not reply.complete:
            print("shards", reply.missing_shards, "did not answer")
        for hit in reply.hits:
            print(hit.rank, hit.person, hit.score)
        client.enrol("Ada Lovelace", [Photo(open("ada.jpg", "rb").read(), "ada.jpg")])

Every command of the `facepq` CLI that talks to a coordinator (search, enrol, status), the
demo and the local launcher use this class. A call has one deadline (`timeout`, seconds)
that covers its retries: UNAVAILABLE (the coordinator not up yet, a connection reset, the
commit lock held by another writer) is retried with exponential backoff until the
deadline, since the coordinator did nothing for such a call; every other status is raised
at once as the facepq_core.errors class that names it (NotFound, InvalidRequest, ...) or as
`CoordinatorError`, each carrying `.status` (the gRPC code name).

`SearchReply.to_json()` is the one JSON form of a search answer: `facepq search --json`
prints it and clients/node/search.js prints the same keys and values (see the README's
*gRPC API*). face ids are uint64 and are written as decimal strings, as proto3's JSON
mapping writes 64-bit integers, so that JavaScript's doubles cannot round them.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from facepq_core import errors
from facepq_core.addresses import DEFAULT_COORDINATOR_ADDRESS, parse_address
from query_node.service import CompactResult, DeleteResult, EnrolResult  # the service's results: one definition

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
ENROL_TIMEOUT = 120.0  # an enrolment runs the face pipeline on every photo and commits
RETRY_FIRST_WAIT = 0.1
RETRY_MAX_WAIT = 2.0
# Per-request photo bytes of one Enrol call: under the servers' 16 MiB message limit with room to spare.
ENROL_REQUEST_BYTES = 8 << 20

# Statuses the coordinator answers, as the facepq_core.errors class that names each (the others:
# CoordinatorError). FAILED_PRECONDITION is the "no face found" of a photo search.
_ERROR_CLASSES = {"INVALID_ARGUMENT": errors.InvalidRequest, "NOT_FOUND": errors.NotFound,
                  "UNAVAILABLE": errors.Unavailable, "ABORTED": errors.VersionConflict,
                  "FAILED_PRECONDITION": errors.NoFaceFound, "INTERNAL": errors.NodeRefused}
_HINTS = {"UNAVAILABLE": "is a coordinator running there? (`facepq up`, or `facepq coordinator`)",
          "UNAUTHENTICATED": "this coordinator needs a token: --auth-token-file FILE or FACEPQ_AUTH_TOKEN",
          "DEADLINE_EXCEEDED": "no answer in time: raise --timeout, or check the coordinator's load"}


class CoordinatorError(errors.FacepqError):
    """A status the coordinator answered that no facepq_core.errors class stands for (UNAUTHENTICATED,
    DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ...). `.status` is its gRPC code name."""

    def __init__(self, message: str, status: str):
        super().__init__(message)
        self.status = status


# ---- typed results -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hit:
    rank: int        # 1 = best
    face_id: int     # uint64, stable across index versions
    person: str
    source: str      # where the photo came from (recorded at ingest/enrol)
    score: float     # higher is better; comparable within one answer only
    shard: int


@dataclass
class SearchReply:
    """One search answer. `complete` False: the shards in `missing_shards` had no replica answering
    and the hits are the best of the others (never silently partial)."""

    hits: list[Hit]
    complete: bool
    missing_shards: list[int]
    index_version: str
    took_ms: float       # the coordinator's own time
    node_scan_ms: float  # the slowest answering node's kernel time (part of took_ms)
    latency_ms: float = 0.0  # as this client saw it (not part of the JSON form: it is the caller's)
    query: str = ""      # what was searched, as the caller named it (a path, "FILE:ROW", ...)

    def to_json(self) -> dict:
        """The search answer's one JSON form (also clients/node/search.js's output)."""
        return {"query": self.query,
                "hits": [{"rank": h.rank, "face_id": str(h.face_id), "person": h.person, "score": _f32(h.score),
                          "source": h.source, "shard": h.shard} for h in self.hits],
                "complete": self.complete, "missing_shards": list(self.missing_shards),
                "index_version": self.index_version, "took_ms": _f32(self.took_ms),
                "node_scan_ms": _f32(self.node_scan_ms)}


@dataclass
class NodeInfo:
    node_id: str
    address: str
    shards: list[int]
    index_version: str
    healthy: bool


@dataclass
class ClusterStatus:
    index_version: str
    shard_count: int
    model_fingerprint: str
    nodes: list[NodeInfo] = field(default_factory=list)
    uncovered_shards: list[int] = field(default_factory=list)  # shards no live node serves

    @property
    def complete(self) -> bool:
        return not self.uncovered_shards

    def to_json(self) -> dict:
        return {"index_version": self.index_version, "shard_count": self.shard_count,
                "model_fingerprint": self.model_fingerprint, "uncovered_shards": list(self.uncovered_shards),
                "nodes": [vars(n) | {"shards": list(n.shards)} for n in self.nodes]}


@dataclass(frozen=True)
class Photo:
    """A photo to enrol: its encoded bytes and where it came from (stored as the face's source)."""

    content: bytes
    source: str = ""


# ---- the client ----------------------------------------------------------------------------------
class CoordinatorClient:
    """A connection to one coordinator.

    Args:
        address: `host[:port]` (port 50050 when omitted; see facepq_core.addresses).
        tls: query_node.security.ClientTls (None = plaintext, fine on loopback only).
        token: bearer token sent with every call (needed for Enrol/Delete/Compact when the coordinator
            has one, and for Search/Status with its --auth-search).
        timeout: default deadline of a call in seconds, retries included.
        retry_unavailable: retry UNAVAILABLE until the deadline (False: raise it at once).
    """

    def __init__(self, address: str = DEFAULT_COORDINATOR_ADDRESS, tls=None, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, retry_unavailable: bool = True):
        import grpc

        from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
        from query_node.security import bearer_metadata, make_channel
        from query_node.wire import MESSAGE_OPTIONS

        if not timeout > 0:
            raise errors.ConfigError(f"timeout must be > 0 seconds, got {timeout}")
        self.address = parse_address(address)
        self.timeout, self.retry_unavailable = timeout, retry_unavailable
        self._grpc, self._pb = grpc, facepq_pb2
        self._metadata = bearer_metadata(token)
        self._channel = make_channel(self.address, tls, options=MESSAGE_OPTIONS)
        self._stub = facepq_pb2_grpc.CoordinatorStub(self._channel)

    @classmethod
    def from_args(cls, args) -> CoordinatorClient:
        """From the CLI's --coordinator, --timeout and client security flags (query_node.security)."""
        from query_node.security import client_security

        tls, token = client_security(args)
        return cls(args.coordinator, tls=tls, token=token, timeout=args.timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- calls -------------------------------------------------------------------------------
    def search(self, photo: bytes | None = None, embedding: Sequence[float] | None = None, k: int = 10,
               timeout: float | None = None, query: str = "", candidates: int | None = None,
               nprobe: int = 0) -> SearchReply:
        """The top-k faces for a photo (encoded image bytes) or a trunk embedding (floats); give one.

        `candidates`: on an index with a refinement tier, first-pass candidates re-scored per shard
        (None: the coordinator's default, 100; 0: the first pass alone).
        `nprobe`: on an index with a cell partition, cells each shard scans (0: all, exhaustive).

        Raises:
            InvalidRequest: no or both queries, k outside 1..1000, a photo that is no image, a bad embedding.
            NoFaceFound: no face in the photo.  Unavailable: no coordinator answered before the deadline.
        """
        from query_node.wire import MAX_TOP_K

        if (photo is None) == (embedding is None):
            raise errors.InvalidRequest("search needs exactly one of a photo or an embedding")
        if not 1 <= int(k) <= MAX_TOP_K:
            raise errors.InvalidRequest(f"k must be in 1..{MAX_TOP_K}, got {k}")
        if photo is not None:
            request = self._pb.SearchRequest(photo=bytes(photo), top_k=int(k))
        else:
            values = np.asarray(embedding, dtype=np.float32).reshape(-1)
            request = self._pb.SearchRequest(embedding=self._pb.Embedding(values=values.tolist()), top_k=int(k))
        if candidates is not None:
            request.refine_candidates = int(candidates)
        if nprobe:
            request.nprobe = int(nprobe)
        t0 = time.perf_counter()
        reply = self._call("Search", request, timeout)
        latency = (time.perf_counter() - t0) * 1e3
        hits = [Hit(i + 1, int(h.face_id), h.person, h.source, float(h.score), int(h.shard))
                for i, h in enumerate(reply.hits)]
        return SearchReply(hits, bool(reply.complete), [int(s) for s in reply.missing_shards], reply.index_version,
                           float(reply.took_ms), float(reply.node_scan_ms), latency, query)

    def search_many(self, queries: Iterable[tuple[str, dict]], k: int = 10, concurrency: int = 4,
                    timeout: float | None = None):
        """Search many queries over this one channel, `concurrency` in flight; yields in input order.

        Args:
            queries: (name, search keyword arguments: `photo=` or `embedding=`) pairs.
        Yields:
            (name, SearchReply or the FacepqError that query raised): one query's refusal (no face,
            a bad photo) does not stop the others.
        """
        from concurrent.futures import ThreadPoolExecutor

        def one(item):
            name, kwargs = item
            try:
                return name, self.search(k=k, timeout=timeout, query=name, **kwargs)
            except errors.FacepqError as exc:
                return name, exc

        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            yield from pool.map(one, queries)

    def enrol(self, person: str, photos: Sequence[Photo], timeout: float | None = None) -> EnrolResult:
        """Add `photos` as faces of `person`; photos without a usable face are skipped (and listed).

        Large sets go in several requests (each under ENROL_REQUEST_BYTES of photos, each its own
        commit); face ids are content hashes, so a retried or repeated photo is one face.
        Raises:
            InvalidRequest: a bad name, no photos, or one photo above the message limit.
            NoFaceFound: no photo of a request had a usable face.
        """
        from query_node.wire import MAX_MESSAGE_BYTES

        if not photos:
            raise errors.InvalidRequest("enrol needs at least one photo")
        for p in photos:
            if len(p.content) > MAX_MESSAGE_BYTES - (64 << 10):
                raise errors.InvalidRequest(f"photo {p.source or '?'} is {len(p.content) >> 20} MiB; a request "
                                            f"carries at most {MAX_MESSAGE_BYTES >> 20} MiB")
        face_ids, skipped, version = [], [], ""
        for batch in _batches(photos, ENROL_REQUEST_BYTES):
            request = self._pb.EnrolRequest(person=person, photos=[self._pb.Photo(content=p.content, source=p.source)
                                                                   for p in batch])
            reply = self._call("Enrol", request, timeout or ENROL_TIMEOUT)
            face_ids += [int(i) for i in reply.face_ids]
            skipped += list(reply.skipped)
            version = reply.index_version or version
        return EnrolResult(face_ids, skipped, version)

    def delete(self, person: str | None = None, face_ids: Sequence[int] | None = None,
               timeout: float | None = None) -> DeleteResult:
        """Tombstone every face of `person` or the given face ids (NotFound when none is live)."""
        if (person is None) == (face_ids is None):
            raise errors.InvalidRequest("delete needs exactly one of a person or face ids")
        request = self._pb.DeleteRequest(person=person) if person is not None else \
            self._pb.DeleteRequest(face_ids=self._pb.FaceIds(ids=[int(i) for i in face_ids]))
        reply = self._call("Delete", request, timeout)
        return DeleteResult(int(reply.deleted), reply.index_version)

    def compact(self, grace_seconds: float | None = None, timeout: float | None = None) -> CompactResult:
        request = self._pb.CompactRequest() if grace_seconds is None else \
            self._pb.CompactRequest(grace_seconds=grace_seconds)
        r = self._call("Compact", request, timeout or ENROL_TIMEOUT)
        return CompactResult(r.index_version, int(r.rows_removed), int(r.segments_rewritten), int(r.files_deleted),
                             int(r.bytes_freed))

    def status(self, timeout: float | None = None) -> ClusterStatus:
        r = self._call("Status", self._pb.StatusRequest(), timeout)
        nodes = [NodeInfo(n.node_id, n.address, [int(s) for s in n.shards], n.index_version, bool(n.healthy))
                 for n in r.nodes]
        return ClusterStatus(r.index_version, int(r.shard_count), r.model_fingerprint, nodes,
                             [int(s) for s in r.uncovered_shards])

    # ---- one call, its deadline and its retries -----------------------------------------------
    def _call(self, method: str, request, timeout: float | None):
        grpc = self._grpc
        deadline = time.monotonic() + (timeout or self.timeout)
        wait, attempt = RETRY_FIRST_WAIT, 0
        while True:
            attempt += 1
            try:
                return getattr(self._stub, method)(request, timeout=max(0.01, deadline - time.monotonic()),
                                                   metadata=self._metadata)
            except grpc.RpcError as exc:
                code = exc.code()
                left = deadline - time.monotonic()
                if code == grpc.StatusCode.UNAVAILABLE and self.retry_unavailable and left > wait:
                    log.debug("%s to %s: UNAVAILABLE (%s); retry %d in %.2f s", method, self.address,
                              exc.details(), attempt, wait)
                    time.sleep(wait * random.uniform(0.5, 1.0))  # jitter: many clients do not retry in step
                    wait = min(wait * 2, RETRY_MAX_WAIT)
                    continue
                raise self._error(method, exc, attempt) from None

    def _error(self, method: str, exc, attempts: int) -> errors.FacepqError:
        name = exc.code().name
        details = exc.details() or ""
        hint = _HINTS.get(name, "")
        tried = f" after {attempts} attempts" if attempts > 1 else ""
        message = f"{method} at {self.address}: {name}: {details}{tried}" + (f" ({hint})" if hint else "")
        cls = _ERROR_CLASSES.get(name)
        if cls is errors.NoFaceFound and "face" not in details.lower():
            cls = None  # another FAILED_PRECONDITION (an index or checkpoint problem of the coordinator's)
        error = cls(message) if cls is not None else CoordinatorError(message, name)
        error.status = name
        return error


def _f32(value: float) -> float:
    """A float32 value (what the wire carries) as the shortest decimal that reads back as it, so every
    client prints the same digits (clients/node/search.js does the same)."""
    return float(str(np.float32(value)))


def _batches(photos: Sequence[Photo], max_bytes: int):
    batch, size = [], 0
    for p in photos:
        if batch and size + len(p.content) > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(p)
        size += len(p.content)
    if batch:
        yield batch
