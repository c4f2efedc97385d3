"""Live faces: the face ids present in a shard's segments minus its tombstones.

The one definition of "live", used by the writer (its dedup set), the commit (dedup
against other writers, re-enrolment of deleted faces, checking what a delete names),
`index_info` and the tests. Every membership test here is a binary search in a
sorted uint64 array (`indexer.face_id.isin_sorted`): numpy's hash- or sort-based
`np.isin`/`np.unique` are several times slower on random 64-bit ids, and a Python
set costs an object per id.

A query node computes the same masks with `SegmentView.tombstone_mask` (the same
binary search), which reads the face ids of a local file in chunks so a served
segment's id column never becomes resident.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from indexer.face_id import as_id_array, isin_sorted
from indexer.manifest import Manifest, SegmentRef, ShardState
from indexer.person_column import person_mask
from indexer.segment import SegmentView, open_segment
from indexer.store import IndexStore

__all__ = ["live_mask", "live_persons", "person_live_ids", "segment_face_ids", "segment_live_mask", "shard_face_ids",
           "shard_live_ids", "sorted_unique", "tombstone_ids"]

_EMPTY = np.empty(0, dtype=np.uint64)


def sorted_unique(values) -> np.ndarray:
    """Sorted unique uint64 values (sort-based: numpy's hash-based unique is slow on random 64-bit ids)."""
    s = np.sort(np.asarray(values, dtype=np.uint64))
    if s.size < 2:
        return s
    return s[np.concatenate(([True], s[1:] != s[:-1]))]


def segment_face_ids(store: IndexStore, ref: SegmentRef) -> np.ndarray:
    """uint64 [rows]: the face_id column of one segment (a memory-mapped read of that column only)."""
    return open_segment(store, ref, verify=False).face_ids


def shard_face_ids(store: IndexStore, refs: list[SegmentRef]) -> np.ndarray:
    """Sorted unique uint64 face ids present in `refs` (tombstoned ones included)."""
    if not refs:
        return _EMPTY
    return sorted_unique(np.concatenate([segment_face_ids(store, r) for r in refs]))


def tombstone_ids(state: ShardState) -> np.ndarray:
    """Sorted unique uint64 [t]: the shard's tombstoned face ids, the form `live_mask` takes."""
    return sorted_unique(as_id_array(state.tombstones))


def live_mask(face_ids: np.ndarray, dead: np.ndarray) -> np.ndarray:
    """bool [n]: True where a face id is not tombstoned.

    Args:
        face_ids: uint64 [n], any order, repeats allowed.
        dead: sorted unique uint64 tombstones (`tombstone_ids`).
    """
    if not dead.size:
        return np.ones(np.shape(face_ids), dtype=bool)
    return ~isin_sorted(face_ids, dead)


def segment_live_mask(view: SegmentView, dead: np.ndarray) -> np.ndarray:
    """bool [rows]: True for the rows of segment `view` that are live, given the shard's `dead` ids.

    Through `SegmentView.tombstone_mask`: positional, chunked reads of a local file's face ids
    rather than the memory map, so the column does not stay resident.
    """
    if not dead.size:
        return np.ones(view.rows, dtype=bool)
    return ~view.tombstone_mask(dead)


def shard_live_ids(store: IndexStore, state: ShardState, segments: list[SegmentRef] | None = None) -> np.ndarray:
    """Sorted unique uint64: the shard's live face ids.

    Args:
        segments: only the ids present in these of the shard's segments (default: all of them);
            tombstones of the whole shard still apply.
    """
    present = shard_face_ids(store, state.segments if segments is None else segments)
    return present[live_mask(present, tombstone_ids(state))]


def person_live_ids(store: IndexStore, manifest: Manifest, person: str) -> np.ndarray:
    """uint64 [n]: the live face ids of `person` (exact, case-sensitive name, compared in stored form:
    facepq_core.names) in every shard, shard by shard."""
    out = []
    for state in manifest.shards:
        dead = tombstone_ids(state)
        for ref in state.segments:
            view = open_segment(store, ref, verify=False, model=manifest.model)
            mine = person_mask(view.persons, person)
            ids = view.face_ids[mine]
            out.append(ids[live_mask(ids, dead)])
    return np.concatenate(out) if out else _EMPTY


def live_persons(store: IndexStore, segments: list[SegmentRef], dead: np.ndarray,
                 only_ids: np.ndarray | None = None) -> tuple[np.ndarray, pa.Array]:
    """(face ids uint64 [n], persons string [n]) of the live rows of `segments`.

    Args:
        dead: the shard's sorted tombstones (`tombstone_ids`).
        only_ids: when given (sorted uint64), only rows with these ids (a commit checking a few).
    """
    ids_out, persons_out = [_EMPTY], [pa.array([], pa.string())]
    for ref in segments:
        view = open_segment(store, ref, verify=False)
        keep = live_mask(view.face_ids, dead)
        if only_ids is not None:
            keep &= isin_sorted(view.face_ids, only_ids)
        if keep.any():
            ids_out.append(view.face_ids[keep])
            persons_out.append(view.persons.filter(pa.array(keep)))
    return np.concatenate(ids_out), pa.concat_arrays(persons_out)
