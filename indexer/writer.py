"""IndexWriter: buffer encoded faces per shard, write segments, commit once.

Used by the Ray ingest job (millions of rows) and by the coordinator's Enrol
RPC (a handful), so both share one commit protocol (indexer.commit).

    writer = IndexWriter("gallery.idx", ModelMeta.from_encoder(enc))
    writer.add(face_ids, persons, sources, codes)     # any number of times
    version = writer.commit("ingest photos/")

Duplicates are skipped at two levels: `add` drops faces already live in the
index version the writer opened (and faces it has already taken), and the
commit drops faces another writer committed in between.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from facepq.errors import ConfigError
from indexer.commit import (_check_compatible, commit_segments, isin_sorted, segment_face_ids, shard_face_ids,
                            sorted_unique)
from indexer.manifest import ModelMeta, SegmentRef
from indexer.segment import write_segment
from indexer.store import IndexStore

log = logging.getLogger(__name__)

DEFAULT_SHARDS = 4
DEFAULT_SEGMENT_ROWS = 1_000_000


@dataclass
class WriterStats:
    """Counts since the writer was opened."""

    rows_added: int = 0          # rows taken into segments (after dedup)
    duplicates_skipped: int = 0  # faces already in the index or given twice
    segments_written: int = 0
    shards_written: set = field(default_factory=set)


class IndexWriter:
    """Append faces to the index at `index_uri` (created on the first commit).

    Args:
        index_uri: local path or pyarrow.fs URI.
        model_meta: the model the codes come from; must match an existing index.
        shard_count: shards of a NEW index (default 4); for an existing index None or its own count.
        redis_url: Redis commit lock (needed for object stores).
        segment_rows: rows per segment file; a shard's buffer is written when it reaches this.
    """

    def __init__(self, index_uri, model_meta: ModelMeta, shard_count: int | None = None,
                 redis_url: str | None = None, segment_rows: int = DEFAULT_SEGMENT_ROWS):
        self.store = index_uri if isinstance(index_uri, IndexStore) else IndexStore(index_uri)
        self.model = model_meta
        self.redis_url = redis_url
        if segment_rows < 1:
            raise ConfigError(f"segment_rows must be >= 1, got {segment_rows}")
        self.segment_rows = segment_rows
        if not self.store.is_local and not redis_url:
            raise ConfigError(f"{self.store.uri} is on an object store, which has no file lock: pass a Redis URL "
                              f"(--redis) so concurrent commits are serialised")
        self._lock = threading.RLock()  # one writer may serve concurrent Enrol RPCs
        self.base_version = self.store.current_version()  # the version `_seen` describes
        if self.base_version is None:
            self.shard_count = int(shard_count or DEFAULT_SHARDS)
            if self.shard_count < 1:
                raise ConfigError(f"shard count must be >= 1, got {shard_count}")
            self._seen = [np.empty(0, dtype=np.uint64) for _ in range(self.shard_count)]
        else:
            manifest = self.store.load_manifest(self.base_version)
            _check_compatible(manifest, model_meta, shard_count, self.store.uri)
            self.shard_count = manifest.shard_count
            self._seen = self._live_ids(manifest)
        # The version `_seen` described when the oldest uncommitted row was accepted: the commit
        # re-checks everything committed by others since then.
        self._pending_base: int | None = None
        self._buffers: list[list[tuple]] = [[] for _ in range(self.shard_count)]
        self._buffered_rows = [0] * self.shard_count
        self._refs: dict[int, list[SegmentRef]] = {}
        self.stats = WriterStats()

    def _live_ids(self, manifest) -> list[np.ndarray]:
        # Tombstoned faces count as absent: adding one again enrols it again.
        out = []
        for st in manifest.shards:
            present = shard_face_ids(self.store, st.segments)
            dead = np.array(sorted(st.tombstones), dtype=np.uint64)
            out.append(present[~isin_sorted(present, dead)])
        return out

    def _sync(self) -> None:
        """Another writer committed (or deleted, or compacted): rebuild the dedup set from the new version."""
        current = self.store.current_version()
        if current == self.base_version:
            return
        manifest = self.store.load_manifest(current)
        _check_compatible(manifest, self.model, self.shard_count, self.store.uri)
        seen = self._live_ids(manifest)
        for shard in range(self.shard_count):  # rows of ours not yet committed stay "seen"
            pending = [p[0] for p in self._buffers[shard]]
            pending += [segment_face_ids(self.store, r) for r in self._refs.get(shard, [])]
            if pending:
                seen[shard] = sorted_unique(np.concatenate([seen[shard]] + pending))
        self._seen, self.base_version = seen, current
        log.debug("writer for %s now deduplicates against version %s", self.store.uri, current)

    # ------------------------------------------------------------------
    def add(self, face_ids, persons, sources, codes) -> int:
        with self._lock:
            return self._add(face_ids, persons, sources, codes)

    def _add(self, face_ids, persons, sources, codes) -> int:
        """Buffer faces; returns how many were new (not duplicates).

        Args:
            face_ids: uint64 [n].
            persons, sources: n strings (list, numpy array or pyarrow string array).
            codes: uint8 [n, code_bytes].
        """
        ids = np.asarray(face_ids, dtype=np.uint64).reshape(-1)
        n = ids.shape[0]
        codes = np.asarray(codes)
        if codes.dtype != np.uint8 or codes.shape != (n, self.model.code_bytes):
            raise ConfigError(f"codes must be uint8 [{n}, {self.model.code_bytes}] for this index's model, "
                              f"got {codes.dtype} {codes.shape}")
        persons, sources = _strings(persons, n, "persons"), _strings(sources, n, "sources")
        if n == 0:
            return 0
        self._sync()
        # One stable argsort serves both checks: duplicates within the batch are neighbours in
        # sorted order, and each shard's candidates come out sorted for the binary search.
        order = np.argsort(ids)  # quicksort: 2x a stable sort; first occurrences are recovered below
        sorted_ids = ids[order]
        starts = np.flatnonzero(np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))
        if starts.size < n:
            order, sorted_ids = np.minimum.reduceat(order, starts), sorted_ids[starts]
        shard_of = (sorted_ids % np.uint64(self.shard_count)).astype(np.int64)
        new = 0
        for shard in range(self.shard_count):
            in_shard = shard_of == shard
            cand, sel = sorted_ids[in_shard], order[in_shard]
            fresh = ~isin_sorted(cand, self._seen[shard])
            if not fresh.any():
                continue
            # Both runs are sorted: a stable sort of their concatenation is a linear merge (timsort).
            self._seen[shard] = np.sort(np.concatenate([self._seen[shard], cand[fresh]]), kind="stable")
            sel = np.sort(sel[fresh])  # keep the input order within a segment
            idx = pa.array(sel)
            self._buffers[shard].append((ids[sel], persons.take(idx), sources.take(idx), codes[sel]))
            self._buffered_rows[shard] += sel.size
            if self._pending_base is None:
                self._pending_base = self.base_version
            new += sel.size
            if self._buffered_rows[shard] >= self.segment_rows:
                self._flush(shard)
        self.stats.rows_added += new
        self.stats.duplicates_skipped += n - new
        return new

    def _flush(self, shard: int) -> None:
        parts = self._buffers[shard]
        if not parts:
            return
        ids = np.concatenate([p[0] for p in parts])
        persons = pa.concat_arrays([p[1] for p in parts])
        sources = pa.concat_arrays([p[2] for p in parts])
        codes = np.concatenate([p[3] for p in parts])
        for start in range(0, ids.shape[0], self.segment_rows):
            stop = start + self.segment_rows
            ref = write_segment(self.store, shard, ids[start:stop], persons[start:stop], sources[start:stop],
                                codes[start:stop], self.model)
            self._refs.setdefault(shard, []).append(ref)
            self.stats.segments_written += 1
            self.stats.shards_written.add(shard)
            log.debug("wrote segment %s (%d rows)", ref.path, ref.rows)
        self._buffers[shard] = []
        self._buffered_rows[shard] = 0

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
            for shard in range(self.shard_count):
                self._flush(shard)
            if not self._refs:
                log.info("nothing new to commit to %s", self.store.uri)
                return self.store.current_version()
            # The segments were hashed as this process wrote them: the commit checks size and schema only.
            version = commit_segments(self.store, self._refs, self.model, self.shard_count, message,
                                      redis_url=self.redis_url, base_version=self._pending_base, verify_new=False)
            self._refs, self._pending_base = {}, None
            # Only when no other writer committed in between does our dedup set describe `version` exactly;
            # otherwise the next add rebuilds it.
            if self.store.load_manifest(version).parent_version == self.base_version:
                self.base_version = version
            return version


def _strings(values, n: int, what: str) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    arr = values if isinstance(values, pa.Array) else pa.array(np.asarray(values, dtype=object), type=pa.string())
    if arr.type != pa.string():
        arr = arr.cast(pa.string())
    if len(arr) != n:
        raise ConfigError(f"{what} has {len(arr)} entries for {n} face ids")
    return arr
