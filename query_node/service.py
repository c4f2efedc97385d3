"""The coordinator's logic without a transport: search, enrol, delete, compact, status.

`CoordinatorService` takes plain Python values and returns the result dataclasses
below; every refusal is a facepq_core.errors.FacepqError whose class names its
status (INVALID_ARGUMENT for a bad request, NOT_FOUND for an unknown person, ...),
so the gRPC servicer (query_node.coordinator_server) and any other edge map errors
the same way without knowing them one by one.

It needs three things: a query_node.coordinator.Coordinator (the fan-out over the
nodes), a query_node.face_model.FaceModel (the trained model: query -> tables,
photos -> codes) and the index location (the version every search must reach, and
where enrolments and deletions commit).

Every search answers from ONE committed version, at least the one current when it
started: a face deleted (and acknowledged) before a search began never appears in
it. A search with shards no replica answered is not an error: `complete` is False
and `missing_shards` names them.

On an index with a refinement tier (facepq_core.refine) a search has two stages unless
told otherwise: each shard re-scores its top `refine_candidates` first-pass candidates
(default facepq_core.refine.DEFAULT_CANDIDATES) and the merge ranks by those scores.
`refine_candidates=0` asks for the first pass alone. Enrolments store the tier's rows too.
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
from facepq_core.limits import MAX_DELETE_FACE_IDS, MAX_ENROL_PHOTOS, MAX_PERSON_CHARS, MAX_SOURCE_CHARS
from query_node.fanout import replicas_by_shard
from query_node.merge import Hit
from query_node.wire import MAX_TOP_K

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 10
DEFAULT_COMPACT_GRACE = 3600.0
DEADLINE_MARGIN = 0.05  # seconds kept back from a caller's deadline to build and send the reply


@dataclass(frozen=True)
class SearchOptions:
    """time_remaining: seconds left of the caller's deadline (None = no deadline: the service's own timeout).
    refine_candidates: candidates per shard a two-stage search re-scores (None = the default; 0 = the first
    pass alone); ignored on an index without a refinement tier.
    nprobe: on an index with a cell partition, the cells each shard scans (0 = all: exhaustive)."""

    time_remaining: float | None = None
    refine_candidates: int | None = None
    nprobe: int = 0


@dataclass
class SearchResult:
    hits: list[Hit]                       # best first
    missing_shards: list[int] = field(default_factory=list)
    index_version: str = ""
    node_scan_ms: float = 0.0             # the slowest answering node's kernel time
    refine_candidates: int = 0            # candidates re-scored per shard (0: the first pass alone)

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


@contextlib.contextmanager
def _index_errors():
    """Index-layer errors as callers should see them: a held lock is worth a retry (UNAVAILABLE)."""
    from indexer.errors import IndexLockTimeout

    try:
        yield
    except IndexLockTimeout as exc:
        raise Unavailable(str(exc)) from exc


class CoordinatorService:
    """Search, Enrol, Delete, Compact and Status of a facepq cluster, transport-free.

    Args:
        coordinator: query_node.coordinator.Coordinator (nodes, fan-out, merge).
        model: query_node.face_model.FaceModel (or anything with its methods).
        index_uri: the index (its current version, and where enrolments and deletions commit).
        redis_url: Redis for the commit lock (None: a file lock next to a local index).
        search_timeout: seconds a search may take at most (all retries included).
    """

    def __init__(self, coordinator, model, index_uri, redis_url: str | None = None, search_timeout: float = 5.0):
        from indexer.store import IndexStore

        self.coordinator, self.model = coordinator, model
        self.index_uri, self.redis_url, self.search_timeout = index_uri, redis_url, search_timeout
        self.store = IndexStore(index_uri)
        self._tier: tuple | None = None  # (the index's refinement tier or None,), once an index exists

    # ---- search ------------------------------------------------------------------------------
    def search(self, query, k: int = 0, options: SearchOptions = SearchOptions()) -> SearchResult:
        """The exact top-k of a photo (bytes) or an embedding (floats) over every shard.

        Args:
            query: encoded photo bytes, or the embedding's values; None is refused.
            k: hits wanted, 1..MAX_TOP_K; 0 = DEFAULT_TOP_K.
        Raises:
            InvalidRequest / ConfigError: no query, k out of range, an unusable photo or embedding.
            NoFaceFound: the photo holds no face.  Unavailable: the index version cannot be read.
            VersionConflict: the index changed too often during the search.  NodeRefused: a node
                refused the search (coordinator and nodes disagree).
        """
        k = k or DEFAULT_TOP_K
        if not 1 <= k <= MAX_TOP_K:
            raise InvalidRequest(f"top_k must be in 1..{MAX_TOP_K}, got {k}")
        if query is None:
            raise InvalidRequest("send a photo (bytes) or an embedding")
        tier = self._refine_tier()
        candidates = _candidates(tier, options.refine_candidates)
        refine = None
        if candidates:
            tables, refine_tables = self.model.refined_tables_for(query, tier)
            refine = (refine_tables, candidates)
        else:
            tables = self.model.tables_for(query)
        try:
            # The version current now is the oldest this search may see (deletes acknowledged before it).
            required = self.store.current_version()
        except FacepqError as exc:
            raise Unavailable(f"cannot read the index version: {exc}") from exc
        result = self.coordinator.search_tables(tables, k, timeout=self._timeout(options), min_version=required,
                                                refine=refine, nprobe=options.nprobe)
        return SearchResult(hits=result.hits[0], missing_shards=result.missing_shards,
                            index_version=result.index_version, node_scan_ms=result.node_scan_ms,
                            refine_candidates=candidates)

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
    def enrol(self, person: str, photos: Sequence[Photo]) -> EnrolResult:
        """Encode the photos' faces and commit them as `person`; photos without a usable face are skipped.

        Raises:
            InvalidRequest: an empty, too long or unprintable name, no photos, more than MAX_ENROL_PHOTOS,
                a source longer than MAX_SOURCE_CHARS (facepq_core.limits).
            NoFaceFound: no photo had a usable face (nothing is committed).
            AlreadyEnrolled: a photo is enrolled as another person (nothing is committed; the message
                names that person). The same photo under the same person is not an error: it is there.
            Unavailable: another writer held the commit lock too long.
        """
        from indexer.face_id import face_id_for_photo
        from indexer.writer import IndexWriter

        _check_person(person)
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
        if tier is None:
            codes, kept, skipped = self.model.encode_photos(contents)
            refine_rows, meta = None, self.model.model_meta()
        else:  # the index stores its tier's rows beside the codes
            codes, refine_rows, kept, skipped = self.model.encode_photos_refined(contents, tier)
            meta = self.model.model_meta(tier)
        skipped_msgs = [f"{sources[i]}: {r}" for i, r in sorted(skipped.items())]
        if not kept:
            raise NoFaceFound(f"no usable face in any photo ({'; '.join(skipped_msgs)})")
        ids = np.array([face_id_for_photo(bytes(contents[i])) for i in kept], dtype=np.uint64)
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
        return EnrolResult(face_ids=ids.tolist(), skipped=skipped_msgs, index_version=str(version or ""))

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
                            index_version=next((n.index_version for n in nodes if n.index_version), ""))


def _candidates(tier, asked: int | None) -> int:
    """Candidates per shard a search re-scores: 0 without a tier or when asked for 0, the default when not asked."""
    from facepq_core.refine import DEFAULT_CANDIDATES, MAX_CANDIDATES

    if asked is not None and not 0 <= asked <= MAX_CANDIDATES:
        raise InvalidRequest(f"refine_candidates must be in 0..{MAX_CANDIDATES}, got {asked}")
    if tier is None:
        return 0
    return DEFAULT_CANDIDATES if asked is None else int(asked)


def _check_person(person: str) -> None:
    if not person.strip():
        raise InvalidRequest("person must be a non-empty name")
    if len(person) > MAX_PERSON_CHARS or not person.isprintable():
        raise InvalidRequest(f"person must be at most {MAX_PERSON_CHARS} printable characters (no control "
                             f"characters or newlines)")
