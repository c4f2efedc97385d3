"""The coordinator's logic without a transport: search, verify, enrol, delete, compact, status, people.

`CoordinatorService` takes plain Python values and returns the result dataclasses
below; every refusal is a facepq_core.errors.FacepqError whose class names its
status (INVALID_ARGUMENT for a bad request, NOT_FOUND for an unknown person, ...),
so the gRPC servicer (query_node.coordinator_server) and any other edge map errors
the same way without knowing them one by one.

It needs three things: a query_node.coordinator.Coordinator (the fan-out over the
nodes), a query_node.face_model.FaceModel (the trained model: query -> tables,
photos -> codes) and the index location (the version every search must reach, and
where enrolments and deletions commit).

A search can answer open-set (an operating point: `far` through the model's calibration, or a
raw `threshold`; `unknown` when no hit reaches it), per person (group_by="person") and per face
of a photo (faces="all"): query_node.answers. Verification is query_node.verify; the people
operations (list, a person's faces, rename, merge, move faces) are query_node.people_service.

Every search answers from ONE committed version, at least the one current when it
started: a face deleted (and acknowledged) before a search began never appears in
it. A search with shards no replica answered is not an error: `complete` is False
and `missing_shards` names them.

On an index with a refinement tier (facepq_core.refine) a search has two stages unless
told otherwise: each shard re-scores its top `refine_candidates` first-pass candidates
(default facepq_core.refine.DEFAULT_CANDIDATES) and the merge ranks by those scores.
`refine_candidates=0` asks for the first pass alone. Enrolments store the tier's rows too.

α-query expansion (`SearchOptions.expansion`, facepq_core.expansion) searches twice: the first
round's top n hits come back with their stored codes (one fan-out, the nodes' ordinary Search
with `with_codes`), the model's codec reconstructs them in the query's space, the query is
combined with them and the second round, with the expanded query's tables, is the answer. The
second round is the first pass alone (the expanded vector lives in the codes' space, not the
refinement tier's); the first round keeps the two stages asked for, so its n hits are the better
ones. Both rounds share one deadline; a shard missing from either is in `missing_shards`.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from facepq_core.errors import (
    DataError,
    FacepqError,
    IndexFormatError,
    InvalidRequest,
    NoFaceFound,
    NotFound,
    Unavailable,
)
from facepq_core.expansion import Expansion, check_expansion
from facepq_core.limits import MAX_DELETE_FACE_IDS, MAX_ENROL_PHOTOS, MAX_PERSON_CHARS, MAX_SOURCE_CHARS
from facepq_core.names import check_person
from query_node import answers, metrics
from query_node.admission import Admission, photo_gate
from query_node.answers import FaceAnswer, PersonMatch, SearchOptions
from query_node.face_model import is_photo
from query_node.fanout import replicas_by_shard
from query_node.merge import Hit
from query_node.people_service import PeopleOperations
from query_node.verify import VerifyResult, verify
from query_node.wire import MAX_TOP_K

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 10
DEFAULT_COMPACT_GRACE = 3600.0
SEARCH_TIMEOUT = 5.0  # seconds a search may take at most, retries included, unless the caller's deadline is sooner
DEADLINE_MARGIN = 0.05  # seconds kept back from a caller's deadline to build and send the reply


__all__ = ["CoordinatorService", "SearchOptions", "SearchResult", "Photo", "EnrolResult", "DeleteResult",
           "CompactResult", "StatusResult", "VerifyResult", "FaceAnswer", "PersonMatch"]


@dataclass
class SearchResult:
    hits: list[Hit]                       # best first (group_by="person": the people's faces, person by person)
    missing_shards: list[int] = field(default_factory=list)
    index_version: str = ""
    node_scan_ms: float = 0.0             # the slowest answering node's kernel time
    refine_candidates: int = 0            # candidates re-scored per shard (0: the first pass alone)
    people: list[PersonMatch] = field(default_factory=list)   # group_by="person"
    unknown: bool = False                 # an operating point was given and no hit reached it
    threshold: float | None = None        # the operating point's score threshold
    faces: list[FaceAnswer] = field(default_factory=list)     # faces="all": one per face (the above: the first)
    calibrated: bool = False              # hits carry a calibrated similarity
    expansion: Expansion = field(default_factory=Expansion)  # the αQE applied (n = 0: none)

    @property
    def complete(self) -> bool:
        return not self.missing_shards


@dataclass(frozen=True)
class Photo:
    """An enrolment photo: encoded image bytes and where it came from (recorded as the face's source)."""

    content: bytes
    source: str = ""


@dataclass
class EnrolResult:
    face_ids: list[int]                   # of the faces added, in the order of the photos kept
    skipped: list[str]                    # "<source>: <reason>" per photo not used
    index_version: str                    # "" when nothing new was committed
    boxes: list = field(default_factory=list)  # faces="all": (left, top, right, bottom) per face id


@dataclass
class DeleteResult:
    deleted: int
    index_version: str


@dataclass
class CompactResult:
    index_version: str
    rows_removed: int
    segments_rewritten: int
    files_deleted: int
    bytes_freed: int


@dataclass
class StatusResult:
    shard_count: int
    model_fingerprint: str
    uncovered_shards: list[int]           # shards no healthy node serves
    nodes: list                           # query_node.registry.NodeRecord
    index_version: str                    # the first node's version
    calibration: object = None            # facepq_core.calibration.Calibration of the model, if measured


@contextlib.contextmanager
def _index_errors():
    """Index-layer errors as callers should see them: a held lock is worth a retry (UNAVAILABLE)."""
    from indexer.errors import IndexLockTimeout

    try:
        yield
    except IndexLockTimeout as exc:
        raise Unavailable(str(exc)) from exc


class CoordinatorService(PeopleOperations):
    """Search, Verify, Enrol, Delete, Compact, Status and the people operations of a facepq cluster, transport-free.

    Args:
        coordinator: query_node.coordinator.Coordinator (nodes, fan-out, merge).
        model: query_node.face_model.FaceModel (or anything with its methods).
        index_uri: the index (its current version, and where enrolments and deletions commit).
        redis_url: Redis for the commit lock (None: a file lock next to a local index).
        search_timeout: seconds a search may take at most (all retries included).
        photo_admission: the gate every photo's work passes (query_node.admission; default `photo_gate()`):
            a photo Search or Verify and every Enrol, whichever shell (gRPC, HTTP) the request came through.
    """

    def __init__(self, coordinator, model, index_uri, redis_url: str | None = None,
                 search_timeout: float = SEARCH_TIMEOUT, photo_admission: Admission | None = None):
        from indexer.store import IndexStore

        self.coordinator, self.model = coordinator, model
        self.photo_admission = photo_admission or photo_gate()
        self.index_uri, self.redis_url, self.search_timeout = index_uri, redis_url, search_timeout
        self.store = IndexStore(index_uri)
        self._tier: tuple | None = None  # (the index's refinement tier or None,), once an index exists

    @property
    def calibration(self):
        """The model's score calibration (facepq_core.calibration.Calibration), None when not measured."""
        return getattr(self.model, "calibration", None)

    def _photo_work(self, photo: bool, time_remaining: float | None = None):
        """A slot of the photo gate for photo work (raises Overloaded when none frees up in time); no gate else."""
        return self.photo_admission.slot(time_remaining) if photo else contextlib.nullcontext()

    # ---- search ------------------------------------------------------------------------------
    def search(self, query, k: int = 0, options: SearchOptions = SearchOptions()) -> SearchResult:
        """The exact top-k of a photo (bytes) or an embedding (floats) over every shard.

        Args:
            query: encoded photo bytes, or the embedding's values; None is refused.
            k: hits wanted, 1..MAX_TOP_K; 0 = DEFAULT_TOP_K (group_by="person": people wanted).
            options: operating point, grouping, faces of a photo (query_node.answers.SearchOptions).
        Raises:
            InvalidRequest / ConfigError: no query, k out of range, an unusable photo or embedding, bad options.
            NoFaceFound: the photo holds no face.  Unavailable: the index version cannot be read.
            NotCalibrated: a far for a model without calibration.
            VersionConflict: the index changed too often during the search.  NodeRefused: a node
                refused the search (coordinator and nodes disagree).  Overloaded: a photo found the photo gate
                full (retry later).
        """
        with self._photo_work(is_photo(query), options.time_remaining):
            return self._search(query, k, options)

    def _search(self, query, k: int, options: SearchOptions) -> SearchResult:
        k = k or DEFAULT_TOP_K
        if not 1 <= k <= MAX_TOP_K:
            raise InvalidRequest(f"top_k must be in 1..{MAX_TOP_K}, got {k}")
        if query is None:
            raise InvalidRequest("send a photo (bytes) or an embedding")
        options.check()
        expansion = check_expansion(options.expansion.n, options.expansion.alpha) if options.expansion else None
        if expansion is not None and expansion.n:
            answer = self._expanded_search(query, k, expansion, options)
            metrics.record_search(answer)
            return answer
        options.check()
        calibration = self.calibration
        point = answers.operating_point(calibration, options.far, options.threshold)
        candidates = self._candidates_for(options, point)
        boxes, refine = None, None
        if options.faces == "all" and is_photo(query):
            tables, boxes = self.model.face_tables(query, options.min_face_px)
        elif candidates:
            tables, refine_tables = self.model.refined_tables_for(query, self._refine_tier())
            refine = (refine_tables, candidates)
        else:
            tables = self.model.tables_for(query)
        try:
            # The version current now is the oldest this search may see (deletes acknowledged before it).
            required = self.store.current_version()
        except FacepqError as exc:
            raise Unavailable(f"cannot read the index version: {exc}") from exc
        timeout = self._timeout(options)
        result = answers.gather(lambda n: self.coordinator.search_tables(tables, n, timeout=timeout,
                                                                         min_version=required, refine=refine,
                                                                         nprobe=options.nprobe),
                                k, options, point)
        # re-scored hits carry the tier's scores, which the calibration never measured: no similarity then
        scored_by = calibration if not candidates else None
        per_face = [answers.answer(hits, k, options, scored_by, point, None if boxes is None else tuple(box))
                    for hits, box in zip(result.hits, boxes if boxes is not None else [None])]
        first = per_face[0]
        answer = SearchResult(hits=first.hits, missing_shards=result.missing_shards,
                              index_version=result.index_version, node_scan_ms=result.node_scan_ms,
                              refine_candidates=candidates, people=first.people, unknown=first.unknown,
                              threshold=None if point is None else point.threshold,
                              faces=per_face if boxes is not None else [], calibrated=scored_by is not None)
        metrics.record_search(answer)
        return answer

    def _candidates_for(self, options: SearchOptions, point) -> int:
        """Candidates per shard this search re-scores with the index's refinement tier (0: the first pass alone).

        The first pass alone answers: an index without a tier, refine_candidates=0, every face of a photo
        (faces="all": one query per face), and a false-accept rate not asked together with candidates
        (the calibration measured the first pass's scores; a tier's scores are on another scale).
        """
        tier = self._refine_tier()
        candidates = _candidates(tier, options.refine_candidates)
        if not candidates:
            return 0
        if options.far is not None:
            if options.refine_candidates is not None:
                raise InvalidRequest("far needs the first pass's scores (the calibration measured those): ask "
                                     "refine_candidates=0, or give a raw threshold on the refinement tier's scores")
            return 0
        return 0 if options.faces == "all" else candidates

    def verify(self, a, b, person_b: str | None = None, far: float | None = None,
               threshold: float | None = None, time_remaining: float | None = None) -> VerifyResult:
        """1:1 verification of `a` (photo bytes or embedding) against `b` (photo or embedding) or `person_b`
        (their best live face); query_node.verify. Photos pass the photo gate (Overloaded when it is full)."""
        with self._photo_work(is_photo(a) or is_photo(b), time_remaining):
            return verify(self.model, self.store, a, b, person_b, far, threshold)

    def _expanded_search(self, query, k: int, expansion: Expansion, options: SearchOptions) -> SearchResult:
        """αQE: the top `expansion.n` with their codes, then the expanded query's exact top-k (first pass)."""
        import time

        if options.far is not None or options.threshold is not None or options.group_by != "face" \
                or options.faces == "all":
            # the expanded query's scores are on no calibrated scale, and its answer is one list of faces
            raise InvalidRequest("query expansion answers the top faces of the expanded query: it does not "
                                 "combine with far, threshold, group_by=person or faces=all")
        tier = self._refine_tier()
        candidates = _candidates(tier, options.refine_candidates)
        deadline = time.monotonic() + self._timeout(options)
        tables, refine_tables, vector = self.model.expansion_start(query, tier if candidates else None)
        refine = (refine_tables, candidates) if candidates else None
        required = self._required_version()
        first = self.coordinator.search_tables(tables, expansion.n, timeout=self._timeout(options), min_version=required,
                                               refine=refine, with_codes=True, nprobe=options.nprobe)
        codes = [h.code for h in first.hits[0]]
        expanded = self.model.expanded_tables(vector, codes, expansion.alpha)
        at_least = max(required or 0, int(first.index_version or 0)) or None  # never an older version than round 1
        second = self.coordinator.search_tables(expanded, k, timeout=max(0.0, deadline - time.monotonic()),
                                                min_version=at_least, nprobe=options.nprobe)
        return SearchResult(hits=second.hits[0], missing_shards=sorted(set(first.missing_shards)
                                                                        | set(second.missing_shards)),
                            index_version=second.index_version,
                            node_scan_ms=first.node_scan_ms + second.node_scan_ms, refine_candidates=0,
                            expansion=expansion)

    def _required_version(self):
        """The version current now: the oldest a search may see (deletes acknowledged before it)."""
        try:
            return self.store.current_version()
        except FacepqError as exc:
            raise Unavailable(f"cannot read the index version: {exc}") from exc

    def _refine_tier(self):
        """The index's refinement tier (None: none, or no index yet). Fixed when an index is created, so read once."""
        if self._tier is None:
            try:
                version = self.store.current_version()
            except FacepqError as exc:
                raise Unavailable(f"cannot read the index version: {exc}") from exc
            if version is None:
                return None
            try:
                self._tier = (self.store.load_manifest(version).model.refine,)
            except IndexFormatError:
                raise  # a malformed manifest is no passing trouble: FAILED_PRECONDITION, as every write path says
            except FacepqError as exc:
                raise Unavailable(f"cannot read the index's manifest: {exc}") from exc
        return self._tier[0]

    def _timeout(self, options: SearchOptions) -> float:
        """The fan-out's time: the service's timeout, cut to end just before the caller's deadline."""
        remaining = options.time_remaining
        if remaining is None:
            return self.search_timeout
        return max(0.0, min(remaining - DEADLINE_MARGIN, self.search_timeout))

    # ---- enrol / delete / compact ------------------------------------------------------------
    def enrol(self, person: str, photos: Sequence[Photo], faces: str = "largest",
              min_face_px: int = answers.DEFAULT_MIN_FACE_PX, time_remaining: float | None = None) -> EnrolResult:
        """Encode the photos' faces and commit them as `person`; photos without a usable face are skipped.

        Args:
            faces: "largest" (one face per photo) or "all" (every face at least `min_face_px` wide; face ids
                count the faces of a photo, largest first, and `boxes` says where each is).
        Raises:
            InvalidRequest: an empty, too long or unprintable name, no photos, more than MAX_ENROL_PHOTOS,
                a source longer than MAX_SOURCE_CHARS (facepq_core.limits).
            NoFaceFound: no photo had a usable face (nothing is committed).
            AlreadyEnrolled: a photo is enrolled as another person (nothing is committed; the message
                names that person). The same photo under the same person is not an error: it is there.
            Unavailable: another writer held the commit lock too long.  Overloaded: the photo gate is full
                (`time_remaining`: seconds of the caller's deadline a request may wait for a slot).
        """
        with self._photo_work(True, time_remaining):
            return self._enrol(person, photos, faces, min_face_px)

    def _enrol(self, person: str, photos: Sequence[Photo], faces: str, min_face_px: int) -> EnrolResult:
        from indexer.face_id import face_id_for_photo
        from indexer.writer import IndexWriter

        person = check_person(person)
        SearchOptions(faces=faces, min_face_px=min_face_px).check()
        if not photos:
            raise InvalidRequest("send at least one photo to enrol")
        if len(photos) > MAX_ENROL_PHOTOS:
            raise InvalidRequest(f"{len(photos)} photos in one Enrol; at most {MAX_ENROL_PHOTOS} (send several "
                                 f"requests, or use `facepq ingest` for a gallery)")
        long_sources = [i for i, p in enumerate(photos) if len(p.source) > MAX_SOURCE_CHARS]
        if long_sources:
            raise InvalidRequest(f"photo source {long_sources[0]} has {len(photos[long_sources[0]].source)} "
                                 f"characters; at most {MAX_SOURCE_CHARS}")
        contents = [p.content for p in photos]
        sources = [p.source or f"enrol:{person}:{i}" for i, p in enumerate(photos)]
        tier = self._refine_tier()
        refine_rows = None
        if faces == "all":
            if tier is not None:
                raise InvalidRequest("faces=all cannot enrol into an index with a refinement tier yet: enrol each "
                                     "photo's largest face (faces=largest), or crops of one face each")
            codes, kept, face_index, boxes, skipped = self.model.encode_photo_faces(contents, min_face_px)
        elif tier is None:
            codes, kept, skipped = self.model.encode_photos(contents)
            face_index, boxes = [0] * len(kept), []
        else:  # the index stores its tier's rows beside the codes
            codes, refine_rows, kept, skipped = self.model.encode_photos_refined(contents, tier)
            face_index, boxes = [0] * len(kept), []
        meta = self.model.model_meta(tier)
        skipped_msgs = [f"{sources[i]}: {r}" for i, r in sorted(skipped.items())]
        if not kept:
            raise NoFaceFound(f"no usable face in any photo ({'; '.join(skipped_msgs)})")
        ids = np.array([face_id_for_photo(bytes(contents[i]), f) for i, f in zip(kept, face_index)], dtype=np.uint64)
        with _index_errors():
            # The enrol rule (indexer.enrol_rule): a photo enrolled as another person is refused
            # (ALREADY_EXISTS naming that person) and nothing of this request is committed.
            writer = IndexWriter(self.index_uri, meta, redis_url=self.redis_url, on_conflict="raise")
            try:
                writer.add(ids, [person] * len(kept), [sources[i] for i in kept], codes, refine_rows)
                version = writer.commit(f"enrol {person!r} ({len(kept)} faces)")
            except BaseException:
                writer.abort()  # no segment of a refused or failed enrolment stays behind
                raise
        return EnrolResult(face_ids=ids.tolist(), skipped=skipped_msgs, index_version=str(version or ""),
                           boxes=[tuple(int(v) for v in b) for b in boxes])

    def delete(self, person: str | None = None, face_ids: Sequence[int] | None = None) -> DeleteResult:
        """Tombstone every live face of `person`, or the given face ids; searches stop returning them at once.

        Raises:
            InvalidRequest: neither (or both) given, or an empty face id list.
            NotFound: no live face of that person, or face ids that are not live (nothing is deleted).
        """
        from indexer.commit import delete_faces

        if person is None and face_ids is None:
            raise InvalidRequest("send a person or face_ids to delete")
        if person is not None and face_ids is not None:
            raise InvalidRequest("send a person or face_ids to delete, not both")
        if face_ids is not None and not len(face_ids):
            raise InvalidRequest("face_ids is empty: send at least one face id")
        if face_ids is not None and len(face_ids) > MAX_DELETE_FACE_IDS:
            raise InvalidRequest(f"{len(face_ids)} face ids in one Delete; at most {MAX_DELETE_FACE_IDS}")
        if person is not None and len(person) > MAX_PERSON_CHARS:
            raise InvalidRequest(f"person must be at most {MAX_PERSON_CHARS} characters")
        target = {"person": person} if person is not None else {"face_ids": list(face_ids)}
        try:
            with _index_errors():
                version, n = delete_faces(self.store, redis_url=self.redis_url, **target)
        except DataError as exc:  # delete_faces' way of saying it found nothing to delete
            raise NotFound(str(exc)) from exc
        return DeleteResult(deleted=n, index_version=str(version))

    def compact(self, grace: float | None = None) -> CompactResult:
        """Rewrite segments without their tombstoned rows and delete files unreferenced for `grace` seconds.

        Raises:
            InvalidRequest: a negative, infinite or NaN grace.
        """
        from indexer.commit import compact

        grace = DEFAULT_COMPACT_GRACE if grace is None else grace
        if not grace >= 0 or math.isinf(grace):
            raise InvalidRequest(f"grace_seconds must be a finite number >= 0, got {grace}")
        with _index_errors():
            stats = compact(self.store, redis_url=self.redis_url, grace_seconds=grace)
        return CompactResult(index_version=str(stats.version or ""), rows_removed=stats.rows_removed,
                             segments_rewritten=stats.segments_rewritten, files_deleted=stats.files_deleted,
                             bytes_freed=stats.bytes_freed)

    # ---- status ------------------------------------------------------------------------------
    def status(self) -> StatusResult:
        """The nodes as the registry lists them, shards no healthy node serves, the model's fingerprint."""
        nodes = self.coordinator.nodes()
        replicas = replicas_by_shard(nodes, self.coordinator.shard_count)
        return StatusResult(shard_count=self.coordinator.shard_count, model_fingerprint=self.model.fingerprint,
                            uncovered_shards=[s for s, r in replicas.items() if not r], nodes=nodes,
                            index_version=next((n.index_version for n in nodes if n.index_version), ""),
                            calibration=self.calibration)


def _candidates(tier, asked: int | None) -> int:
    """Candidates per shard a search re-scores: 0 without a tier or when asked for 0, the default when not asked."""
    from facepq_core.refine import DEFAULT_CANDIDATES, MAX_CANDIDATES

    if asked is not None and not 0 <= asked <= MAX_CANDIDATES:
        raise InvalidRequest(f"refine_candidates must be in 0..{MAX_CANDIDATES}, got {asked}")
    if tier is None:
        return 0
    return DEFAULT_CANDIDATES if asked is None else int(asked)
