"""Serialised, atomic commits: the only way an index changes.

Every change runs under the commit lock (`indexer.lock.commit_lock`): read the
current manifest, build its successor, write `manifests/<v+1>.json`, then
atomically replace `CURRENT`. A process killed anywhere before that last
rename leaves the index at its previous version; files it wrote are
unreferenced and garbage-collected by `compact` (indexer.gc).

Invariants kept here (readers rely on them):
* a face id is live in at most one row of the index (dedup on commit);
* a tombstone always names a row physically present in its shard;
* the index's model (fingerprint, code shape) and shard count never change.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from facepq_core.errors import ConfigError, DataError, IndexFormatError
from facepq_core.routing import shard_of
from indexer.enrol_rule import Conflict, PersonKeys, conflict_error
from indexer.face_id import as_id_array, isin_sorted
from indexer.live import (
    live_persons,
    person_live_ids,
    segment_face_ids,
    shard_live_ids,
    sorted_unique,
    tombstone_ids,
)
from indexer.lock import commit_lock
from indexer.manifest import Manifest, ModelMeta, SegmentRef
from indexer.segment import column_view, open_segment, write_segment
from indexer.store import IndexStore

log = logging.getLogger(__name__)

__all__ = ["commit_segments", "delete_faces", "compact", "CompactStats", "rewrite_segment", "rewrite_without",
           "commit_change"]

_EMPTY = np.empty(0, dtype=np.uint64)


def _isin_runs(values: np.ndarray, runs: list[np.ndarray]) -> np.ndarray:
    """bool mask: which `values` are in any of the sorted arrays `runs`."""
    found = np.zeros(values.shape, dtype=bool)
    if not runs:
        return found
    ordered = np.sort(values)  # sorted queries: the binary searches stay in cache (10x faster)
    hits = [ordered[isin_sorted(ordered, run)] for run in runs]
    hits = np.concatenate(hits)
    if hits.size:
        found = isin_sorted(values, np.sort(hits))
    return found


def shard_of_path(ref: SegmentRef) -> int:
    return int(ref.path.split("/")[1])


def rewrite_without(store: IndexStore, ref: SegmentRef, drop_ids, model: ModelMeta) -> SegmentRef | None:
    """Write a copy of segment `ref` without the rows whose face_id is in `drop_ids`.

    Returns the new segment's ref (`ref` itself when no row is dropped), or None when no row is left.
    The old file is not touched (readers of older versions may still use it); garbage collection
    removes it later.
    """
    view = open_segment(store, ref, verify=True, model=model)
    keep = ~isin_sorted(view.face_ids, sorted_unique(as_id_array(drop_ids)))
    if keep.all():
        return ref
    return rewrite_segment(store, ref, model, view=view, keep=keep)


def rewrite_segment(store: IndexStore, ref: SegmentRef, model: ModelMeta, keep=None, persons=None,
                    view=None) -> SegmentRef | None:
    """Write a changed copy of segment `ref`: only the rows `keep` (bool [rows]; None = all), with the person
    column replaced by `persons` (n strings for every row of the segment; None = unchanged).

    How compaction drops rows and people operations (indexer.relabel) change whose a face is: a segment
    is never modified, a new one replaces it in the next commit. Returns None when no row is left.
    """
    view = view if view is not None else open_segment(store, ref, verify=True, model=model)
    batch = view.batch
    if persons is not None:
        batch = batch.set_column(1, batch.schema.field(1), pa.array(persons, type=pa.string()))
    if keep is not None:
        if not keep.any():
            return None
        batch = batch.filter(keep)
    codes = column_view(batch.column(3), np.uint8, model.code_bytes)
    # the refinement rows go with their faces: a deleted face's are physically gone too
    refine = column_view(batch.column(4), np.uint8, model.refine.code_bytes) if model.refine is not None else None
    return write_segment(store, shard_of_path(ref), column_view(batch.column(0), np.uint64, 1), batch.column(1),
                         batch.column(2), codes, model, refine)


def _publish(store: IndexStore, manifest: Manifest) -> int:
    store.write_manifest(manifest)
    store.set_current(manifest.version)  # the commit point
    log.info("committed %s version %d: %s", store.uri, manifest.version, manifest.message)
    return manifest.version


def commit_change(store: IndexStore, change, redis_url: str | None = None, lock_timeout: float = 60.0):
    """Run `change(old, new)` under the commit lock on the current manifest and its successor, and publish `new`.

    `change` edits `new` (segments replaced, tombstones) and returns (commit message, value); it may write
    segment files (unreferenced until the publish) and raise to commit nothing. Returns (new version, value).
    The one protocol of people operations (indexer.relabel); ingest, delete and compact keep their own steps.
    """
    with commit_lock(store, redis_url, lock_timeout):
        old = store.load_manifest()
        new = old.successor("")
        new.message, value = change(old, new)
        return _publish(store, new), value


def commit_segments(store: IndexStore, new_refs_by_shard: dict[int, list[SegmentRef]], model_meta: ModelMeta,
                    shard_count: int, message: str, redis_url: str | None = None, base_version: int | None = None,
                    lock_timeout: float = 60.0, verify_new: bool = True, counts: dict | None = None,
                    on_conflict: str = "raise", augmentation: dict | None = None) -> int:
    """Add written segments to the index in one new version (creating the index on first commit).

    Args:
        new_refs_by_shard: shard -> segments written with `write_segment` and not yet committed.
        base_version: the version the writer deduplicated against (None: it did not). Rows whose face id
            became live in a version committed after it are dropped (the segment is rewritten), so two
            concurrent ingests of the same photos never duplicate a face.
        verify_new: re-check the sha256 of the new segments. Only a caller that hashed the bytes while
            writing them in this process (IndexWriter) passes False; size and schema are always checked.
        counts: when given, filled with {"added": rows committed, "dropped": rows dropped because another
            writer committed their face ids meanwhile, "conflicts": those of them refused by the enrol rule
            (indexer.enrol_rule.Conflict: the face is live as another person)}.
        on_conflict: "raise" (AlreadyEnrolled, nothing committed) or "skip" (commit the rest, report them).
        augmentation: how these codes were made (the manifest's `augmentation`, e.g. indexer.dba), written into
            the new version; None: an augmentation the index already records becomes stale (new neighbours).
    Returns:
        The new version.
    Raises:
        IndexFormatError: the index holds codes of another model (fingerprint or code shape), or is corrupt.
        ConfigError: `shard_count` differs from the index's.
        AlreadyEnrolled: with on_conflict="raise", a new face is live as another person (indexer.enrol_rule).
    """
    conflicts: list = []
    with commit_lock(store, redis_url, lock_timeout):
        current = store.current_version()
        if current is None:
            old = Manifest.empty(model_meta, shard_count)
        else:
            old = store.load_manifest(current)
            old.check_compatible(model_meta, shard_count, store.uri)
        new = old.successor(message)
        known: set[str] = set()
        if base_version and current and base_version <= current:
            try:
                known = {s.id for s in store.load_manifest(base_version).segments}
            except IndexFormatError:  # base manifest garbage-collected: check against everything
                known = set()
        added = 0
        for shard, refs in sorted(new_refs_by_shard.items()):
            if not 0 <= shard < new.shard_count:
                raise ConfigError(f"shard {shard} out of range for an index of {new.shard_count} shards")
            added += _add_to_shard(store, new, shard, refs, known, model_meta, verify_new, conflicts)
        if conflicts and on_conflict == "raise":
            raise conflict_error(conflicts)
        if counts is not None:
            counts.update(added=added, dropped=sum(r.rows for refs in new_refs_by_shard.values() for r in refs) - added,
                          conflicts=conflicts)
        new.message = f"{message} (+{added} faces)" if message else f"+{added} faces"
        if augmentation is not None:
            new.augmentation = dict(augmentation)
        elif added:
            new.mark_augmentation_stale()
        return _publish(store, new)


def _add_to_shard(store, new: Manifest, shard: int, refs: list[SegmentRef], known: set[str], model,
                  verify_new: bool, conflicts: list) -> int:
    state = new.shards[shard]
    dead = tombstone_ids(state)
    live = shard_live_ids(store, state, [s for s in state.segments if s.id not in known])
    # Sorted runs of the ids live so far: merging each new segment into one sorted array would
    # re-sort the whole shard per segment (most of a large commit's CPU time).
    live_runs = [live] if live.size else []
    revived: list[np.ndarray] = []
    added = 0
    for i, ref in enumerate(refs):
        view = open_segment(store, ref, verify=verify_new, model=model)  # never reference an unchecked file
        ids = view.face_ids
        dup = _isin_runs(ids, live_runs)
        if dup.any():
            # The enrol rule, again under the lock: a face committed meanwhile as another person is refused.
            since_base = [s for s in state.segments if s.id not in known]
            current = PersonKeys(*live_persons(store, since_base, dead, sorted_unique(ids[dup])))
            rows = np.flatnonzero(dup)
            for r, enrolled_as in current.conflicts(ids[rows], view.persons.take(rows)).items():
                row = int(rows[r])
                conflicts.append(Conflict(int(ids[row]), view.persons[row].as_py(), enrolled_as,
                                          view.sources[row].as_py()))
            log.info("segment %s: %d faces were committed meanwhile by another writer; dropping them",
                     ref.id, int(dup.sum()))
            kept_ref = rewrite_without(store, ref, ids[dup], model)
            store.delete(ref.path)
            if kept_ref is None:
                continue
            ref, ids = kept_ref, segment_face_ids(store, kept_ref)
        if dead.size:
            revived.append(ids[isin_sorted(ids, dead)])
        if i + 1 < len(refs):  # the last segment's ids are checked against nothing after it
            live_runs.append(np.sort(ids))
        added += ref.rows
        state.segments.append(ref)
    back = np.concatenate(revived) if revived else _EMPTY
    if back.size:
        # A deleted face enrolled again: its old row goes (rewritten away) and the new row is live.
        log.info("shard %d: %d previously deleted faces enrolled again", shard, back.size)
        new_ids = {r.id for r in refs}
        segments = []
        for seg in state.segments:
            segments.append(seg if seg.id in new_ids else rewrite_without(store, seg, back, model))
        state.segments = [s for s in segments if s is not None]
        state.tombstones -= set(back.tolist())
    return added


def delete_faces(store: IndexStore, person: str | None = None, face_ids=None, redis_url: str | None = None,
                 lock_timeout: float = 60.0) -> tuple[int, int]:
    """Tombstone every live face of `person`, or the given `face_ids`, in one new version.

    The rows stay in their segment files until `compact` rewrites them; readers drop them now.
    Returns:
        (new version, number of faces deleted).
    Raises:
        DataError: unknown person / face ids (nothing is committed).
    """
    if (person is None) == (face_ids is None):
        raise ConfigError("delete needs exactly one of a person name or face ids")
    with commit_lock(store, redis_url, lock_timeout):
        old = store.load_manifest()
        new = old.successor("")
        new.mark_augmentation_stale()  # a deleted face was a neighbour averaged into others' codes
        if person is not None:
            found = person_live_ids(store, old, person)
            if not found.size:
                from indexer.people import unknown_person_message

                raise DataError(f"{unknown_person_message(store, person)}; nothing deleted")
            what = f"person {person!r}"
        else:
            found = present_face_ids(store, old, as_id_array(face_ids))
            what = f"{len(found)} face ids"
        shards = shard_of(found, new.shard_count)
        for shard in np.unique(shards):
            new.shards[int(shard)].tombstones.update(found[shards == shard].tolist())
        new.message = f"delete {what} ({len(found)} faces)"
        return _publish(store, new), len(found)


def present_face_ids(store: IndexStore, manifest: Manifest, ids: np.ndarray) -> np.ndarray:
    """Sorted unique `ids`, after checking that every one is live (else DataError, nothing deleted)."""
    if ids.size == 0:
        raise DataError("no face ids given; nothing deleted")
    ids = sorted_unique(ids)
    shards = shard_of(ids, manifest.shard_count)
    missing: list[int] = []
    for shard, state in enumerate(manifest.shards):
        mine = ids[shards == shard]
        if mine.size:
            missing.extend(mine[~isin_sorted(mine, shard_live_ids(store, state))].tolist())
    if missing:
        shown = ", ".join(str(i) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(f"{len(missing)} of the face ids are not live in {store.uri}: {shown}; nothing deleted")
    return ids


@dataclass
class CompactStats:
    """What `compact` did."""

    version: int | None
    rows_removed: int = 0
    segments_rewritten: int = 0
    tombstones_cleared: int = 0
    files_deleted: int = 0
    bytes_freed: int = 0
    manifests_deleted: int = 0
    files_kept_for_writers: int = 0  # unreferenced but written since a running writer's lease began


def compact(store: IndexStore, redis_url: str | None = None, grace_seconds: float = 3600.0,
            keep_manifests: int = 10, lock_timeout: float = 60.0) -> CompactStats:
    """Physically remove tombstoned rows, then garbage-collect unreferenced files.

    Every segment holding a tombstoned face is rewritten without it and the tombstones are
    dropped in one new version; then `indexer.gc.collect_garbage` deletes files no retained
    manifest references (see docs/index-format.md, "Garbage collection").
    """
    from indexer.gc import collect_garbage

    store.check_no_links()  # refuse an index a link could lead outside of, before rewriting anything
    with commit_lock(store, redis_url, lock_timeout):
        old = store.load_manifest()
        stats = CompactStats(version=old.version)
        if old.tombstone_count:
            new = old.successor("")
            for state in new.shards:
                if not state.tombstones:
                    continue
                dead = tombstone_ids(state)
                kept = []
                for ref in state.segments:
                    out = rewrite_without(store, ref, dead, new.model)
                    if out is not ref:
                        stats.segments_rewritten += 1
                        stats.rows_removed += ref.rows - (out.rows if out else 0)
                    if out is not None:
                        kept.append(out)
                state.segments = kept
                stats.tombstones_cleared += len(state.tombstones)
                state.tombstones = set()
            new.message = f"compact: removed {stats.rows_removed} deleted rows from {stats.segments_rewritten} segments"
            stats.version = _publish(store, new)
        collect_garbage(store, stats, grace_seconds=grace_seconds, keep_manifests=keep_manifests)
    return stats
