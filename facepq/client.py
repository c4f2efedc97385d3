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
from query_node.answers import FaceAnswer, PersonMatch
from query_node.people_service import PeopleChange, PeoplePage, PersonFaces
from query_node.service import CompactResult, DeleteResult, EnrolResult  # the service's results: one definition
from query_node.verify import VerifyResult

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
ENROL_TIMEOUT = 120.0  # an enrolment runs the face pipeline on every photo and commits
RETRY_FIRST_WAIT = 0.1
RETRY_MAX_WAIT = 2.0
# Per-request photo bytes of one Enrol call: under the servers' 16 MiB message limit with room to spare.
ENROL_REQUEST_BYTES = 8 << 20

# Statuses the coordinator answers, as the facepq_core.errors class that names each (the others:
# CoordinatorError). FAILED_PRECONDITION is the "no face found" of a photo search, or a model not calibrated.
_ERROR_CLASSES = {"INVALID_ARGUMENT": errors.InvalidRequest, "NOT_FOUND": errors.NotFound,
                  "UNAVAILABLE": errors.Unavailable, "ABORTED": errors.VersionConflict,
                  "FAILED_PRECONDITION": errors.NoFaceFound, "INTERNAL": errors.NodeRefused,
                  "ALREADY_EXISTS": errors.AlreadyExists}
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
    similarity: float | None = None  # calibrated models: the score as a similarity in [0, 1]


@dataclass
class SearchReply:
    """One search answer. `complete` False: the shards in `missing_shards` had no replica answering
    and the hits are the best of the others (never silently partial).

    With an operating point (`far` or `threshold`), `hits` are those reaching it and `unknown` says none
    did; with group_by="person", `people` are the best people with their best faces; with faces="all",
    `faces` has one FaceAnswer (box, hits, people, unknown) per face of the photo, largest first."""

    hits: list[Hit]
    complete: bool
    missing_shards: list[int]
    index_version: str
    took_ms: float       # the coordinator's own time
    node_scan_ms: float  # the slowest answering node's kernel time (part of took_ms)
    latency_ms: float = 0.0  # as this client saw it (not part of the JSON form: it is the caller's)
    query: str = ""      # what was searched, as the caller named it (a path, "FILE:ROW", ...)
    people: list[PersonMatch] = field(default_factory=list)
    unknown: bool = False
    threshold: float | None = None
    faces: list[FaceAnswer] = field(default_factory=list)
    calibrated: bool = False
    expansion: tuple[int, float] | None = None  # the αQE the coordinator applied: (n, alpha); None: none

    def to_json(self) -> dict:
        """The search answer's one JSON form (query_node.json_form; also the HTTP API's and search.js's)."""
        from query_node.json_form import search_json

        return search_json(self, self.query, self.took_ms)


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
    calibrated: bool = False
    operating_points: list[dict] = field(default_factory=list)  # {"far", "threshold", "tar"} of the calibration

    @property
    def complete(self) -> bool:
        return not self.uncovered_shards

    def to_json(self) -> dict:
        return {"index_version": self.index_version, "shard_count": self.shard_count,
                "model_fingerprint": self.model_fingerprint, "uncovered_shards": list(self.uncovered_shards),
                "nodes": [vars(n) | {"shards": list(n.shards)} for n in self.nodes],
                "calibrated": self.calibrated, "operating_points": list(self.operating_points)}


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
               far: float | None = None, threshold: float | None = None, group_by: str = "face",
               faces_per_person: int = 0, faces: str = "largest", min_face_px: int = 0,
               expansion: tuple[int, float] | None = None, nprobe: int = 0) -> SearchReply:
        """The top-k faces for a photo (encoded image bytes) or a trunk embedding (floats); give one.

        Args:
            candidates: on an index with a refinement tier, first-pass candidates re-scored per shard
                (None: the coordinator's default, 100; 0: the first pass alone).
            far / threshold: an operating point (at most one): keep hits scoring at least the threshold of
                this per-comparison false-accept rate (a calibrated model) or this raw score; `unknown` when none.
            group_by: "face" (the top k faces) or "person" (the top k people, `faces_per_person` faces each).
            faces: "largest" (a photo's largest face) or "all" (every face at least `min_face_px` wide).
            expansion: (n, alpha) for α-query expansion: the answer is a second search with the query combined
                with its first search's top n hits, each weighted by similarity^alpha (n = 0 or None: none).
            nprobe: on an index with a cell partition, cells each shard scans (0: all, exhaustive).
        Raises:
            InvalidRequest: no or both queries, k outside 1..1000, a photo that is no image, a bad embedding.
            NoFaceFound: no face in the photo.  NotCalibrated: far for a model without calibration.
            Unavailable: no coordinator answered before the deadline.
        """
        from query_node.wire import MAX_TOP_K

        if (photo is None) == (embedding is None):
            raise errors.InvalidRequest("search needs exactly one of a photo or an embedding")
        if not 1 <= int(k) <= MAX_TOP_K:
            raise errors.InvalidRequest(f"k must be in 1..{MAX_TOP_K}, got {k}")
        pb = self._pb
        request = pb.SearchRequest(top_k=int(k), faces_per_person=int(faces_per_person), min_face_px=int(min_face_px),
                                   group_by=_enum(pb, "GROUP_BY_", group_by), faces=_enum(pb, "FACES_", faces))
        if photo is not None:
            request.photo = bytes(photo)
        else:
            values = np.asarray(embedding, dtype=np.float32).reshape(-1)
            request.embedding.CopyFrom(pb.Embedding(values=values.tolist()))
        if candidates is not None:
            request.refine_candidates = int(candidates)
        if far is not None:
            request.far = far
        if threshold is not None:
            request.threshold = threshold
        if expansion is not None and expansion[0]:
            from facepq_core.expansion import check_expansion

            checked = check_expansion(expansion[0], expansion[1])
            request.expansion.n, request.expansion.alpha = checked.n, checked.alpha
        if nprobe:
            request.nprobe = int(nprobe)
        t0 = time.perf_counter()
        reply = self._call("Search", request, timeout)
        latency = (time.perf_counter() - t0) * 1e3
        return SearchReply(_hits(reply.hits), bool(reply.complete), [int(s) for s in reply.missing_shards],
                           reply.index_version, float(reply.took_ms), float(reply.node_scan_ms), latency, query,
                           people=[_person(p) for p in reply.people], unknown=bool(reply.unknown),
                           threshold=float(reply.threshold) if reply.HasField("threshold") else None,
                           faces=[FaceAnswer(_hits(f.hits), [_person(p) for p in f.people], bool(f.unknown),
                                             (f.box.left, f.box.top, f.box.right, f.box.bottom)) for f in reply.faces],
                           calibrated=bool(reply.calibrated),
                           expansion=(int(reply.expansion.n), float(reply.expansion.alpha))
                           if reply.expansion.n else None)

    def verify(self, photo_a: bytes | None = None, embedding_a: Sequence[float] | None = None,
               photo_b: bytes | None = None, embedding_b: Sequence[float] | None = None, person: str | None = None,
               far: float | None = None, threshold: float | None = None, timeout: float | None = None) -> VerifyResult:
        """1:1: is face a (a photo or an embedding) the same person as b (a photo, an embedding, or an enrolled
        `person`)? Decided at `far` (default 0.001 for a calibrated model) or a raw `threshold`.

        Raises:
            InvalidRequest: not exactly one a and one b.  NotFound: `person` has no faces.
            NotCalibrated: no threshold for a model without calibration.  NoFaceFound: a photo without a face.
        """
        pb = self._pb
        if (photo_a is None) == (embedding_a is None):
            raise errors.InvalidRequest("verify needs exactly one of photo_a or embedding_a")
        if sum(x is not None for x in (photo_b, embedding_b, person)) != 1:
            raise errors.InvalidRequest("verify needs exactly one of photo_b, embedding_b or person")
        request = pb.VerifyRequest()
        if photo_a is not None:
            request.photo_a = bytes(photo_a)
        else:
            request.embedding_a.CopyFrom(pb.Embedding(values=np.asarray(embedding_a, np.float32).ravel().tolist()))
        if photo_b is not None:
            request.photo_b = bytes(photo_b)
        elif embedding_b is not None:
            request.embedding_b.CopyFrom(pb.Embedding(values=np.asarray(embedding_b, np.float32).ravel().tolist()))
        else:
            request.person_b = person
        if far is not None:
            request.far = far
        if threshold is not None:
            request.threshold = threshold
        r = self._call("Verify", request, timeout)
        return VerifyResult(score=float(r.score), same=bool(r.same), threshold=float(r.threshold),
                            far=float(r.far) if r.HasField("far") else None,
                            similarity=float(r.similarity) if r.HasField("similarity") else None,
                            best_face_id=int(r.best_face_id), faces_compared=int(r.faces_compared))

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

    def enrol(self, person: str, photos: Sequence[Photo], timeout: float | None = None, faces: str = "largest",
              min_face_px: int = 0) -> EnrolResult:
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
        face_ids, skipped, version, boxes = [], [], "", []
        for batch in _batches(photos, ENROL_REQUEST_BYTES):
            request = self._pb.EnrolRequest(person=person, photos=[self._pb.Photo(content=p.content, source=p.source)
                                                                   for p in batch],
                                            faces=_enum(self._pb, "FACES_", faces), min_face_px=int(min_face_px))
            reply = self._call("Enrol", request, timeout or ENROL_TIMEOUT)
            face_ids += [int(i) for i in reply.face_ids]
            skipped += list(reply.skipped)
            boxes += [(b.left, b.top, b.right, b.bottom) for b in reply.boxes]
            version = reply.index_version or version
        return EnrolResult(face_ids, skipped, version, boxes)

    def delete(self, person: str | None = None, face_ids: Sequence[int] | None = None,
               timeout: float | None = None) -> DeleteResult:
        """Tombstone every face of `person` or the given face ids (NotFound when none is live)."""
        if (person is None) == (face_ids is None):
            raise errors.InvalidRequest("delete needs exactly one of a person or face ids")
        request = self._pb.DeleteRequest(person=person) if person is not None else \
            self._pb.DeleteRequest(face_ids=self._pb.FaceIds(ids=[int(i) for i in face_ids]))
        reply = self._call("Delete", request, timeout)
        return DeleteResult(int(reply.deleted), reply.index_version)

    # ---- people --------------------------------------------------------------------------------
    def people_page(self, page_size: int = 0, page_token: str = "", contains: str = "",
                    timeout: float | None = None) -> PeoplePage:
        """One page of the people (sorted by name, with face counts); pass `next_page_token` for the next."""
        from indexer.people import PersonCount

        r = self._call("ListPeople", self._pb.ListPeopleRequest(page_size=page_size, page_token=page_token,
                                                                contains=contains), timeout)
        return PeoplePage([PersonCount(p.person, int(p.faces), [int(s) for s in p.shards]) for p in r.people],
                          r.next_page_token, int(r.total))

    def people(self, contains: str = "", page_size: int = 0, timeout: float | None = None) -> list:
        """Every person (indexer.people.PersonCount: person, faces, shards), page after page."""
        out, token = [], ""
        while True:
            page = self.people_page(page_size, token, contains, timeout)
            out += page.people
            token = page.next_page_token
            if not token:
                return out

    def person(self, name: str, timeout: float | None = None) -> PersonFaces:
        """A person's live faces (indexer.people.FaceRecord; `segment` is not sent and reads "")."""
        from indexer.people import FaceRecord

        r = self._call("GetPerson", self._pb.GetPersonRequest(person=name), timeout)
        return PersonFaces(r.person, [FaceRecord(int(f.face_id), f.person, f.source, int(f.shard), "")
                                      for f in r.faces])

    def rename_person(self, person: str, new_name: str, timeout: float | None = None) -> PeopleChange:
        """All of `person`'s faces become `new_name`'s (AlreadyExists when that name has faces: merge instead)."""
        return _change(self._call("RenamePerson", self._pb.RenamePersonRequest(person=person, new_name=new_name),
                                  timeout or ENROL_TIMEOUT))

    def merge_people(self, people: Sequence[str], into: str, timeout: float | None = None) -> PeopleChange:
        """All faces of each of `people` become `into`'s (an existing or a new name)."""
        return _change(self._call("MergePeople", self._pb.MergePeopleRequest(people=list(people), into=into),
                                  timeout or ENROL_TIMEOUT))

    def move_faces(self, face_ids: Sequence[int], person: str, timeout: float | None = None) -> PeopleChange:
        """These live faces become `person`'s."""
        return _change(self._call("MoveFaces", self._pb.MoveFacesRequest(face_ids=[int(i) for i in face_ids],
                                                                         person=person), timeout or ENROL_TIMEOUT))

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
                             [int(s) for s in r.uncovered_shards], bool(r.calibrated),
                             [{"far": p.far, "threshold": p.threshold, "tar": p.tar} for p in r.operating_points])

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
        if cls is errors.NoFaceFound and "calibrat" in details.lower():
            cls = errors.NotCalibrated
        elif cls is errors.NoFaceFound and "face" not in details.lower():
            cls = None  # another FAILED_PRECONDITION (an index or checkpoint problem of the coordinator's)
        error = cls(message) if cls is not None else CoordinatorError(message, name)
        error.status = name
        return error


def _hits(messages) -> list[Hit]:
    return [Hit(i + 1, int(h.face_id), h.person, h.source, float(h.score), int(h.shard),
                float(h.similarity) if h.HasField("similarity") else None) for i, h in enumerate(messages)]


def _person(message) -> PersonMatch:
    return PersonMatch(message.person, _hits(message.faces), float(message.score),
                       float(message.similarity) if message.HasField("similarity") else None)


def _change(reply) -> PeopleChange:
    return PeopleChange(int(reply.faces_changed), reply.index_version)


def _enum(pb, prefix: str, value: str) -> int:
    """'person' -> pb.GROUP_BY_PERSON (InvalidRequest naming the choices for anything else)."""
    names = [n[len(prefix):].lower() for n in pb.DESCRIPTOR.enum_types_by_name[
        {"GROUP_BY_": "GroupBy", "FACES_": "FaceSelection"}[prefix]].values_by_name]
    if value not in names:
        raise errors.InvalidRequest(f"{prefix.rstrip('_').lower()} must be one of {', '.join(names)}, got {value!r}")
    return getattr(pb, prefix + value.upper())


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


Client = CoordinatorClient  # the short name: `from facepq.client import Client`
