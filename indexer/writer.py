"""IndexWriter: buffer encoded faces per shard, write segments, commit once.

Used by the Ray ingest job (millions of rows) and by the coordinator's Enrol
RPC (a handful), so both share one commit protocol (indexer.commit).

    writer = IndexWriter("gallery.idx", ModelMeta.from_encoder(enc))
    writer.add(face_ids, persons, sources, codes)     # any number of times
    version = writer.commit("ingest photos/")

An index with a refinement tier (ModelMeta.refine) takes each face's refinement row too:
`writer.add(face_ids, persons, sources, codes, refine)`; the rows travel with the codes.

Duplicates are skipped at three points: `add` drops faces already live in the
index version the writer opened, faces in segments it has written, and repeats
within the batch; writing a shard's segment drops faces repeated across `add`
calls; the commit drops faces another writer committed in between. At each of
them the enrol rule (indexer.enrol_rule) compares persons: a face already there
as another person is refused (`on_conflict="raise"`: AlreadyEnrolled, nothing
committed) or reported in `conflicts` (`"skip"`: the ingest's choice).

Why the split: keeping every buffered id in a sorted set that each `add` checks
cost a merge of the whole set per call (quadratic over a job); one sort of a
shard's buffer when its segment is written is linear in the rows.
"""
from __future__ import annotations

import logging
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facepq_core.errors import ConfigError, FacepqError, InvalidRequest
from facepq_core.limits import MAX_SOURCE_CHARS
from facepq_core.partition import CellPartition, check_cells
from facepq_core.routing import shard_of
from indexer.commit import commit_segments
from indexer.enrol_rule import Conflict, PersonKeys, check_on_conflict, conflict_error, repeat_conflicts
from indexer.face_id import isin_sorted
from indexer.lease import WriterLease
from indexer.live import live_persons, segment_face_ids, shard_live_ids, sorted_unique, tombstone_ids
from indexer.manifest import ModelMeta, SegmentRef
from indexer.person_column import checked_persons
from indexer.segment import write_segment
from indexer.store import IndexStore

log = logging.getLogger(__name__)

DEFAULT_SHARDS = 4
DEFAULT_SEGMENT_ROWS = 1_000_000
# Below this many faces met again in one call, the enrol rule reads only their rows' persons; from it on,
# a shard's persons are read once and kept (a re-run of an ingest meets every face again).
FULL_PERSON_LOOKUP = 4096
# Shards written at once by `commit`: hashing, writing and fsync release the GIL, so the
# cores hash while the disk syncs another file.
WRITE_THREADS = 4


@dataclass
class WriterStats:
    """Counts since the writer was opened (exact once the rows are written, i.e. after `commit`)."""

    rows_added: int = 0          # rows taken into segments (after dedup)
    duplicates_skipped: int = 0  # faces already in the index or given twice
    segments_written: int = 0
    shards_written: set = field(default_factory=set)


@dataclass
class _Batch:
    """The rows one `add` call took, grouped by shard (the writer's own copy)."""

    ids: np.ndarray      # uint64 [n]
    persons: pa.Array    # string [n]
    sources: pa.Array    # string [n]
    codes: np.ndarray    # uint8 [n, code_bytes]
    refine: np.ndarray | None = None  # uint8 [n, tier bytes] with a refinement tier


class IndexWriter:
    """Append faces to the index at `index_uri` (created on the first commit).

    Args:
        index_uri: local path or pyarrow.fs URI.
        model_meta: the model the codes come from; must match an existing index.
        shard_count: shards of a NEW index (default 4); for an existing index None or its own count.
        redis_url: Redis commit lock (needed for object stores).
        segment_rows: rows per segment file; a shard's buffer is written when it reaches this.
        on_conflict: what the enrol rule does with a face already enrolled as another person: "raise"
            (AlreadyEnrolled; the Enrol RPC) or "skip" (recorded in `conflicts`; the ingest job).
        cells: a NEW index gets a cell partition of this many cells (facepq_core.partition), fitted on the
            codes of the first segments it writes; None/0: no partition. An existing index keeps its own
            partition (the writer adopts it: Enrol lands each face in its cell); asking another is a ConfigError.
        codewords: with `cells`, the model codec's `codewords()` (float32 [M, K, s]): the space the cells are
            fitted in (None: one-hot sub-codes).
    """

    def __init__(self, index_uri, model_meta: ModelMeta, shard_count: int | None = None,
                 redis_url: str | None = None, segment_rows: int = DEFAULT_SEGMENT_ROWS, on_conflict: str = "raise",
                 cells: int | None = None, codewords: np.ndarray | None = None):
        self.store = index_uri if isinstance(index_uri, IndexStore) else IndexStore(index_uri)
        self.model = model_meta
        self.redis_url = redis_url
        if segment_rows < 1:
            raise ConfigError(f"segment_rows must be >= 1, got {segment_rows}")
        self.segment_rows = segment_rows
        # The manifest's `augmentation` the next commit records (the DBA ingest sets it); None: an augmentation
        # the index records becomes stale with these faces.
        self.augmentation: dict | None = None
        if not self.store.is_local and not redis_url:
            raise ConfigError(f"{self.store.uri} is on an object store, which has no file lock: pass a Redis URL "
                              f"(--redis) so concurrent commits are serialised")
        self._lock = threading.RLock()  # one writer may serve concurrent Enrol RPCs
        self.base_version = self.store.current_version()  # the committed part of `_seen` is this version
        if self.base_version is None:
            self.shard_count = int(shard_count or DEFAULT_SHARDS)
            if self.shard_count < 1:
                raise ConfigError(f"shard count must be >= 1, got {shard_count}")
            self._seen = [np.empty(0, dtype=np.uint64) for _ in range(self.shard_count)]
            self.cells = check_cells(int(cells)) if cells else None
            self.codewords = codewords
        else:
            manifest = self.store.load_manifest(self.base_version)
            self.model = model_meta = _with_index_partition(model_meta, manifest.model, cells, self.store.uri)
            self.cells = None
            manifest.check_compatible(model_meta, shard_count, self.store.uri)
            self.shard_count = manifest.shard_count
            self._seen = self._live_ids(manifest)
        # `_seen[s]`: sorted ids live in shard s of `base_version` plus those in segments this writer
        # wrote and has not committed yet. Buffered rows are not in it (see the module docstring).
        # The version `_seen` described when the oldest uncommitted row was accepted: the commit
        # re-checks everything committed by others since then.
        self._pending_base: int | None = None
        self._buffers: list[list[tuple[_Batch, int, int]]] = [[] for _ in range(self.shard_count)]
        self._buffered_rows = [0] * self.shard_count
        self._refs: dict[int, list[SegmentRef]] = {}
        self.stats = WriterStats()
        self.on_conflict = check_on_conflict(on_conflict)
        self.conflicts: list[Conflict] = []  # photos the enrol rule refused (on_conflict="skip")
        self._persons: dict[int, PersonKeys] = {}  # shard -> persons of `_seen`, built on the first repeat
        # Held from before the first segment file until commit or abort: garbage collection keeps what
        # this writer wrote whatever its grace (indexer.lease).
        self.lease = WriterLease(self.store)
        weakref.finalize(self, self.lease.release)

    def _live_ids(self, manifest) -> list[np.ndarray]:
        # Tombstoned faces count as absent: adding one again enrols it again.
        return [shard_live_ids(self.store, state) for state in manifest.shards]

    def _sync(self) -> None:
        """Another writer committed (or deleted, or compacted): rebuild the dedup set from the new version."""
        current = self.store.current_version()
        if current == self.base_version:
            return
        manifest = self.store.load_manifest(current)
        manifest.check_compatible(self.model, self.shard_count, self.store.uri)
        seen = self._live_ids(manifest)
        for shard, refs in self._refs.items():  # segments of ours not yet committed stay "seen"
            if refs:
                seen[shard] = sorted_unique(np.concatenate([seen[shard]] + [segment_face_ids(self.store, r)
                                                                            for r in refs]))
        self._seen, self.base_version = seen, current
        self._persons = {}
        log.debug("writer for %s now deduplicates against version %s", self.store.uri, current)

    # ------------------------------------------------------------------
    def add(self, face_ids, persons, sources, codes, refine=None) -> int:
        """Buffer faces; returns how many were taken (not already in the index or repeated in this batch).

        Args:
            face_ids: uint64 [n].
            persons, sources: n strings (pyarrow string array, numpy array or list).
            codes: uint8 [n, code_bytes].
            refine: uint8 [n, tier bytes], exactly when the index has a refinement tier.
        Returns:
            Rows taken. A face repeating a row of an earlier, still buffered `add` is dropped when its
            shard's segment is written; `stats` counts it then.
        """
        with self._lock:
            return self._add(face_ids, persons, sources, codes, refine)

    def _add(self, face_ids, persons, sources, codes, refine=None) -> int:
        ids = np.asarray(face_ids, dtype=np.uint64).reshape(-1)
        n = ids.shape[0]
        codes = np.asarray(codes)
        if codes.dtype != np.uint8 or codes.shape != (n, self.model.code_bytes):
            raise ConfigError(f"codes must be uint8 [{n}, {self.model.code_bytes}] for this index's model, "
                              f"got {codes.dtype} {codes.shape}")
        refine = _refine_rows(refine, n, self.model)
        persons, sources = _strings(persons, n, "persons"), _strings(sources, n, "sources")
        persons = checked_persons(persons)  # the one name rule, on every path that writes rows
        _check_lengths(sources, MAX_SOURCE_CHARS, "source")
        if n == 0:
            return 0
        self._sync()
        keep = self._fresh_mask(ids)
        if keep is not None:  # some rows repeat a face: the enrol rule compares their persons first
            self._refuse(self._person_conflicts(ids, persons, ~keep), ids, persons, sources)
        rows = None if keep is None else np.flatnonzero(keep)
        taken = ids if rows is None else ids[rows]
        new = taken.shape[0]
        self.stats.rows_added += new
        self.stats.duplicates_skipped += n - new
        if new == 0:
            return 0
        if self._pending_base is None:
            self._pending_base = self.base_version
        # Group rows by shard with a counting sort (radix on small ints: linear, and stable, so each
        # shard keeps the input order), then gather every column once in that order: one call per
        # column (Arrow's per-call overhead is 4x a 25k-row string take), and the copy is ours, so the
        # caller may reuse its arrays. Each shard's rows are then a zero-copy slice.
        row_shards = shard_of(taken, self.shard_count)
        order = np.argsort(row_shards, kind="stable")
        if rows is not None:
            order = rows[order]
        batch = _Batch(np.take(ids, order), persons.take(order), sources.take(order),
                       np.take(codes, order, axis=0),  # not codes[order]: 2-D fancy indexing is 8x slower
                       None if refine is None else np.take(refine, order, axis=0))
        bounds = np.concatenate(([0], np.cumsum(np.bincount(row_shards, minlength=self.shard_count))))
        full = []
        for shard in range(self.shard_count):
            lo, hi = int(bounds[shard]), int(bounds[shard + 1])
            if hi > lo:
                self._buffers[shard].append((batch, lo, hi))
                self._buffered_rows[shard] += hi - lo
                if self._buffered_rows[shard] >= self.segment_rows:
                    full.append(shard)
        if full:
            self._write_shards(full)
        return new

    def _fresh_mask(self, ids: np.ndarray) -> np.ndarray | None:
        """bool [n]: first occurrences of ids not in `_seen`; None when that is every row (the usual case)."""
        s = np.sort(ids)  # sorted queries make the binary searches below cache-friendly (10x)
        repeated = _has_repeats(s)
        known = []
        if any(seen.size for seen in self._seen):
            s_shard = shard_of(s, self.shard_count)
            for shard, seen in enumerate(self._seen):
                if seen.size:
                    cand = s[s_shard == shard]
                    known.append(cand[isin_sorted(cand, seen)])
        known = np.sort(np.concatenate(known)) if known else np.empty(0, np.uint64)
        if not repeated and not known.size:
            return None
        keep = np.ones(ids.shape[0], dtype=bool)
        if repeated:  # of rows sharing an id, keep the first
            order, _, later = _later_repeats(ids)
            keep[order[later]] = False
        if known.size:
            keep &= ~isin_sorted(ids, known)
        return keep

    # ---- the enrol rule (indexer.enrol_rule) ----------------------------------------------------
    def _persons_of(self, shard: int, ids: np.ndarray) -> PersonKeys:
        """Persons of the faces `ids` (uint64, all in `_seen[shard]`): live rows of `base_version` plus this
        writer's segments. A few ids (an Enrol of a photo already there) read only their rows; many (a
        re-run of an ingest) read the shard's persons once and keep them until the next version."""
        found = self._persons.get(shard)
        if found is not None:
            return found
        only = sorted_unique(ids) if len(ids) < FULL_PERSON_LOOKUP else None
        refs = list(self._refs.get(shard, ()))
        found_ids, persons = live_persons(self.store, refs, np.empty(0, np.uint64), only)
        if self.base_version:
            state = self.store.load_manifest(self.base_version).shards[shard]
            old_ids, old_persons = live_persons(self.store, state.segments, tombstone_ids(state), only)
            found_ids, persons = np.concatenate([old_ids, found_ids]), pa.concat_arrays([old_persons, persons])
        found = PersonKeys(found_ids, persons)
        if only is None:
            self._persons[shard] = found
        return found

    def _person_conflicts(self, ids: np.ndarray, persons: pa.Array, repeats: np.ndarray) -> dict[int, str]:
        """{row: person it is enrolled as} among `repeats` (bool [n]: rows not taken as new faces)."""
        clashes = repeat_conflicts(ids, persons)  # two rows of this write, one face, two names
        rows = np.flatnonzero(repeats)
        shards = shard_of(ids[rows], self.shard_count)
        for shard in np.unique(shards).tolist():
            mine = rows[shards == shard]
            found = self._persons_of(shard, ids[mine]).conflicts(ids[mine], persons.take(pa.array(mine)))
            clashes.update({int(mine[r]): name for r, name in found.items()})
        return clashes

    def _refuse(self, clashes: dict[int, str], ids, persons: pa.Array, sources: pa.Array) -> None:
        """Raise AlreadyEnrolled (on_conflict="raise") or record the refused rows (they are dropped anyway)."""
        if not clashes:
            return
        found = [Conflict(int(ids[r]), persons[r].as_py(), name, sources[r].as_py()) for r, name in sorted(clashes.items())]
        if self.on_conflict == "raise":
            raise conflict_error(found)
        self.conflicts.extend(found)
        log.warning("%d photos are already enrolled as another person; skipped (e.g. %s as %r)", len(found),
                    found[0].source or found[0].face_id, found[0].enrolled_as)

    # ------------------------------------------------------------------
    def _write_shards(self, shards: list[int]) -> None:
        """Write the buffers of `shards` as segments (in threads when several) and record the results."""
        if not shards:
            return
        self.lease.acquire()
        if self.cells and self.model.partition is None:
            self._fit_partition()
        if len(shards) == 1:
            outcomes = [_outcome(self._write_shard, shards[0])]
        else:
            with ThreadPoolExecutor(max_workers=min(WRITE_THREADS, len(shards)),
                                    thread_name_prefix="facepq-segment") as pool:
                outcomes = list(pool.map(lambda shard: _outcome(self._write_shard, shard), shards))
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:  # nothing of this call is kept: the segments the other shards wrote are removed again
            for o in outcomes:
                if not isinstance(o, BaseException):
                    for ref in o[0]:
                        self.store.delete(ref.path)
            raise failed[0]
        results = outcomes
        # Shared state changes here, in one thread, and only once every write succeeded.
        for shard, (refs, written_ids, dropped) in zip(shards, results):
            self._persons.pop(shard, None)  # rebuilt with the new segment when next needed
            self._buffers[shard], self._buffered_rows[shard] = [], 0
            seen = self._seen[shard]
            self._seen[shard] = written_ids if not seen.size else np.sort(np.concatenate([seen, written_ids]),
                                                                          kind="stable")  # two runs: a merge
            self._refs.setdefault(shard, []).extend(refs)
            self.stats.rows_added -= dropped
            self.stats.duplicates_skipped += dropped
            self.stats.segments_written += len(refs)
            if refs:
                self.stats.shards_written.add(shard)

    def _fit_partition(self) -> None:
        """Fit the new index's cells on every buffered code (CellPartition.fit samples them) and store them."""
        from indexer.partition_store import save_partition

        codes = np.concatenate([b.codes[lo:hi] for parts in self._buffers for b, lo, hi in parts])
        partition = CellPartition.fit(codes, self.model.code_spec(), self.cells, self.model.fingerprint,
                                      self.codewords)
        self.model = replace(self.model, partition=save_partition(self.store, partition))
        log.info("fitted %d cells on %d faces for %s", self.cells, codes.shape[0], self.store.uri)

    def _write_shard(self, shard: int) -> tuple[list[SegmentRef], np.ndarray, int]:
        """Gather, deduplicate and write one shard's buffer; changes no state of the writer.

        Returns:
            (segment refs, sorted uint64 ids written, rows dropped as repeats).
        """
        parts = self._buffers[shard]
        ids = np.concatenate([b.ids[lo:hi] for b, lo, hi in parts])
        codes = np.concatenate([b.codes[lo:hi] for b, lo, hi in parts])
        refine = None if self.model.refine is None else np.concatenate([b.refine[lo:hi] for b, lo, hi in parts])
        persons = pa.concat_arrays([b.persons[lo:hi] for b, lo, hi in parts])
        sources = pa.concat_arrays([b.sources[lo:hi] for b, lo, hi in parts])
        sorted_ids = np.sort(ids)
        repeated = _has_repeats(sorted_ids)
        known = isin_sorted(sorted_ids, self._seen[shard]) if self._seen[shard].size else None
        dropped = 0
        if repeated or (known is not None and known.any()):
            # Rows repeating an id of an earlier add (the first is kept), or committed by another
            # writer since they were added (the commit would drop them; dropping here is cheaper).
            order, sorted_ids, drop_sorted = _later_repeats(ids)
            if known is not None:
                drop_sorted |= known
            keep = np.ones(ids.size, dtype=bool)
            keep[order[drop_sorted]] = False
            self._refuse(self._person_conflicts(ids, persons, ~keep), ids, persons, sources)
            dropped = int((~keep).sum())
            rows = np.flatnonzero(keep)
            ids, codes = ids[rows], np.take(codes, rows, axis=0)
            refine = None if refine is None else np.take(refine, rows, axis=0)
            persons, sources = persons.take(rows), sources.take(rows)
            sorted_ids = sorted_ids[~drop_sorted]
        refs = []
        for start in range(0, ids.shape[0], self.segment_rows):
            stop = start + self.segment_rows
            ref = write_segment(self.store, shard, ids[start:stop], persons[start:stop], sources[start:stop],
                                codes[start:stop], self.model, None if refine is None else refine[start:stop])
            log.debug("wrote segment %s (%d rows)", ref.path, ref.rows)
            refs.append(ref)
        return refs, sorted_ids, dropped

    def abort(self) -> None:
        """Drop everything added since the last commit and delete the segment files written for it."""
        with self._lock:
            for refs in self._refs.values():
                for ref in refs:
                    try:
                        self.store.delete(ref.path)
                    except (OSError, FacepqError) as exc:  # garbage collection removes it later
                        log.warning("could not remove uncommitted segment %s: %s", ref.path, exc)
            self._refs, self._pending_base = {}, None
            self._buffers = [[] for _ in range(self.shard_count)]
            self._buffered_rows = [0] * self.shard_count
            self._persons = {}
            self.lease.release()

    @property
    def pending_rows(self) -> int:
        """Rows added since the last commit (buffered or in written, uncommitted segments)."""
        return sum(self._buffered_rows) + sum(r.rows for refs in self._refs.values() for r in refs)

    def commit(self, message: str = "") -> int | None:
        """Write remaining buffers and commit everything added since the last commit.

        Returns:
            The new version, or the current version unchanged (None for a still-empty index) when
            there was nothing new to commit.
        """
        with self._lock:
            self._write_shards([s for s in range(self.shard_count) if self._buffers[s]])
            if not self._refs:
                log.info("nothing new to commit to %s", self.store.uri)
                self.lease.release()
                return self.store.current_version()
            # The segments were hashed as this process wrote them: the commit checks size and schema only.
            counts: dict = {}
            version = commit_segments(self.store, self._refs, self.model, self.shard_count, message,
                                      redis_url=self.redis_url, base_version=self._pending_base, verify_new=False,
                                      counts=counts, on_conflict=self.on_conflict,
                                      augmentation=self.augmentation)
            self.conflicts.extend(counts["conflicts"])
            self.stats.rows_added -= counts["dropped"]
            self.stats.duplicates_skipped += counts["dropped"]
            self._refs, self._pending_base = {}, None
            if not any(self._buffers):
                self.lease.release()
            # Only when no other writer committed in between does our dedup set describe `version` exactly;
            # otherwise the next add rebuilds it.
            if self.store.load_manifest(version).parent_version == self.base_version:
                self.base_version = version
            return version


def _with_index_partition(model: ModelMeta, index_model: ModelMeta, cells: int | None, uri: str) -> ModelMeta:
    """`model` with the existing index's partition (a model from a checkpoint names none); ConfigError when
    `cells` asks for another partition than the index has."""
    ref = index_model.partition
    if cells and (ref is None or ref.cells != cells):
        have = f"{ref.cells} cells" if ref else "no cell partition"
        raise ConfigError(f"{uri} exists with {have}; cells are chosen when an index is created (drop --cells, "
                          f"or write a new index)")
    if model.partition is None and ref is not None and model.fingerprint == index_model.fingerprint:
        return replace(model, partition=ref)
    return model


def _outcome(fn, *args):
    """fn(*args), or the exception it raised (so one failing shard does not hide what the others wrote)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - re-raised by the caller once the others are cleaned up
        return exc


def _has_repeats(sorted_ids: np.ndarray) -> bool:
    return sorted_ids.size > 1 and bool((sorted_ids[1:] == sorted_ids[:-1]).any())


def _later_repeats(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stable argsort of ids, the sorted ids, bool in sorted order: True where an id repeats the one
    before). `order[mask]` are the rows repeating an earlier row of the same id: the first one stays."""
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    later = np.zeros(ids.size, dtype=bool)
    later[1:] = ordered[1:] == ordered[:-1]
    return order, ordered, later


def _check_lengths(values: pa.Array, limit: int, what: str) -> None:
    """Refuse values longer than `limit` characters (facepq_core.limits: what every write path may store)."""
    if not len(values):
        return
    lengths = pc.utf8_length(values)
    longest = pc.max(lengths).as_py()
    if longest is not None and longest > limit:
        row = int(pc.index(lengths, longest).as_py())
        raise InvalidRequest(f"a {what} of {longest} characters (row {row}: {values[row].as_py()[:60]!r}...); "
                             f"at most {limit}")


def _refine_rows(refine, n: int, model: ModelMeta) -> np.ndarray | None:
    """The refinement rows an `add` must bring: uint8 [n, tier bytes] with a tier, none without (ConfigError)."""
    tier = model.refine
    if tier is None:
        if refine is not None:
            raise ConfigError("this index has no refinement tier: add codes only (a tier is chosen when an index "
                              "is created, --refine)")
        return None
    refine = np.asarray(refine) if refine is not None else None
    if refine is None or refine.dtype != np.uint8 or refine.shape != (n, tier.code_bytes):
        got = "none" if refine is None else f"{refine.dtype} {refine.shape}"
        raise ConfigError(f"this index stores refinement tier {tier.kind}: add uint8 [{n}, {tier.code_bytes}] "
                          f"refinement rows with the codes, got {got}")
    return refine


def _strings(values, n: int, what: str) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    arr = values if isinstance(values, pa.Array) else pa.array(np.asarray(values, dtype=object), type=pa.string())
    if arr.type != pa.string():
        arr = arr.cast(pa.string())
    if len(arr) != n:
        raise ConfigError(f"{what} has {len(arr)} entries for {n} face ids")
    return arr
