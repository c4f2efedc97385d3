"""People operations: rename a person, merge people, move faces to another person.

Whose a face is lives in its segment's `person` column, and segments are immutable, so an
operation is one commit (indexer.commit.commit_change, under the commit lock) that replaces
every segment holding an affected live face by a copy with the new names
(indexer.commit.rewrite_segment, as compaction replaces segments): face ids, codes and sources
stay, tombstones stay valid (they name face ids, and every row is kept), and readers of older
versions keep their files until garbage collection. Nodes pick the version up like any other;
the manifest format does not change, so every reader of format 2 reads the result.

Cost: each affected segment is read and written once (a rename of a person whose faces sit in
one 1M-row segment writes that segment again, ~20-60 MB); segments without the person are
untouched. Names go through facepq_core.names (the one rule of every write path); a name is
looked up in its stored form, so "José" finds a person stored in either Unicode form.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from facepq_core.errors import AlreadyExists, DataError, InvalidRequest, NotFound
from facepq_core.names import check_person, normalise_person
from indexer.commit import commit_change, present_face_ids, rewrite_segment
from indexer.face_id import as_id_array, isin_sorted
from indexer.live import person_live_ids, segment_live_mask, sorted_unique, tombstone_ids
from indexer.manifest import Manifest
from indexer.segment import open_segment
from indexer.store import IndexStore

log = logging.getLogger(__name__)

__all__ = ["RelabelResult", "merge_people", "move_faces", "rename_person"]


@dataclass(frozen=True)
class RelabelResult:
    index_version: int
    faces_changed: int
    segments_rewritten: int


def _store(index) -> IndexStore:
    return index if isinstance(index, IndexStore) else IndexStore(index)


def _unknown(store: IndexStore, person: str) -> NotFound:
    from indexer.people import unknown_person_message

    return NotFound(unknown_person_message(store, person))


def _relabel(store: IndexStore, old: Manifest, new: Manifest, ids: np.ndarray, name: str) -> int:
    """Give the live faces `ids` (sorted unique uint64) the person `name` in `new`; returns segments rewritten."""
    rewritten = 0
    for shard, state in enumerate(new.shards):
        dead = tombstone_ids(state)
        segments = []
        for ref in state.segments:
            view = open_segment(store, ref, verify=True, model=new.model)
            mine = isin_sorted(view.face_ids, ids) & segment_live_mask(view, dead)
            if not mine.any():
                segments.append(ref)
                continue
            persons = np.asarray(view.persons.to_pylist(), dtype=object)
            persons[mine] = name
            segments.append(rewrite_segment(store, ref, new.model, persons=persons.tolist(), view=view))
            rewritten += 1
        state.segments = segments
    return rewritten


def _commit_relabel(store: IndexStore, target: str, find_ids, describe, redis_url, lock_timeout) -> RelabelResult:
    """One commit giving the live faces `find_ids(old manifest)` (sorted unique uint64; it raises when the
    request names faces that are not there) the person `target`; `describe(ids)` is the commit's message."""
    def change(old, new):
        ids = find_ids(old)
        return describe(ids), (ids.size, _relabel(store, old, new, ids, target))

    version, (faces, segments) = commit_change(store, change, redis_url, lock_timeout)
    return RelabelResult(version, int(faces), segments)


def rename_person(index, person: str, new_name: str, redis_url: str | None = None,
                  lock_timeout: float = 60.0) -> RelabelResult:
    """Every live face of `person` becomes `new_name`'s, in one commit.

    Raises:
        NotFound: no live face of `person`.  InvalidRequest: a bad new name, or the same name.
        AlreadyExists: `new_name` has faces already (merge_people joins two people).
    """
    store = _store(index)
    target = check_person(new_name)
    if target == normalise_person(person):
        raise InvalidRequest(f"{person!r} already has that name")

    def find(old):
        ids = sorted_unique(person_live_ids(store, old, person))
        if not ids.size:
            raise _unknown(store, person)
        if person_live_ids(store, old, target).size:
            raise AlreadyExists(f"{target!r} already has faces in {store.uri}; to join the two people, merge "
                                f"{person!r} into {target!r}")
        return ids

    return _commit_relabel(store, target, find, lambda ids: f"rename {person!r} to {target!r} ({ids.size} faces)",
                           redis_url, lock_timeout)


def merge_people(index, people, into: str, redis_url: str | None = None, lock_timeout: float = 60.0) -> RelabelResult:
    """Every live face of each of `people` becomes `into`'s (who may have faces already, or be a new name).

    Raises:
        InvalidRequest: no people to merge, or a bad name.  NotFound: one of `people` has no live face
        (nothing is changed).
    """
    store = _store(index)
    target = check_person(into)
    sources = list(dict.fromkeys(normalise_person(p) for p in people if normalise_person(p) != target))
    if not sources:
        raise InvalidRequest(f"name at least one person other than {target!r} to merge into {target!r}")

    def find(old):
        found = []
        for p in sources:
            ids = person_live_ids(store, old, p)
            if not ids.size:
                raise _unknown(store, p)
            found.append(ids)
        return sorted_unique(np.concatenate(found))

    return _commit_relabel(store, target, find,
                           lambda ids: f"merge {', '.join(map(repr, sources))} into {target!r} ({ids.size} faces)",
                           redis_url, lock_timeout)


def move_faces(index, face_ids, person: str, redis_url: str | None = None, lock_timeout: float = 60.0) -> RelabelResult:
    """The live faces `face_ids` become `person`'s (a new or an existing person).

    Raises:
        InvalidRequest: no face ids, or a bad name.  NotFound: an id that is not a live face (nothing changes).
    """
    store = _store(index)
    target = check_person(person)
    wanted = sorted_unique(as_id_array(face_ids))
    if not wanted.size:
        raise InvalidRequest("face_ids is empty: send at least one face id to move")

    def find(old):
        try:
            present_face_ids(store, old, wanted)
        except DataError as exc:  # its way of saying some id is not live
            raise NotFound(str(exc).replace("nothing deleted", "nothing moved")) from None
        return wanted

    return _commit_relabel(store, target, find, lambda ids: f"move {ids.size} faces to {target!r}", redis_url,
                           lock_timeout)
