"""What an index holds, by person: the people with their face counts, a person's faces, face id lookups.

Pure functions of an index's current version (no transport, no CLI): `facepq index people|faces|face`
print them, and a coordinator's people calls can return them as they are. Live faces are
`indexer.live`'s (a segment's rows minus its shard's tombstones), so these lists always agree
with what a search can return and what a delete can remove.

Names are exact and case-sensitive, as stored; a name that is not there gets a NotFound whose
message suggests the names it may have meant (same name in another case first, then close spellings).
"""
from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facepq_core.errors import NotFound
from indexer.face_id import as_id_array, isin_sorted
from indexer.live import segment_live_mask, sorted_unique, tombstone_ids
from indexer.person_column import person_mask
from indexer.segment import open_segment
from indexer.store import IndexStore

__all__ = ["FaceRecord", "PersonCount", "find_faces", "list_people", "person_codes", "person_faces",
           "suggest_people", "unknown_person_message"]


@dataclass(frozen=True)
class PersonCount:
    person: str
    faces: int           # live faces
    shards: list[int]    # shards holding them


@dataclass(frozen=True)
class FaceRecord:
    face_id: int
    person: str
    source: str          # where the photo came from (recorded at ingest / enrol)
    shard: int
    segment: str         # the segment file's id

    def to_json(self) -> dict:
        """face_id as a decimal string (uint64), as in every facepq JSON output."""
        return {"face_id": str(self.face_id), "person": self.person, "source": self.source, "shard": self.shard,
                "segment": self.segment}


def _store(index) -> IndexStore:
    return index if isinstance(index, IndexStore) else IndexStore(index)


def _live_segments(store: IndexStore):
    """(shard, segment view, bool [rows] live mask) of every segment of the current version."""
    manifest = store.load_manifest()
    for shard, state in enumerate(manifest.shards):
        dead = tombstone_ids(state)
        for ref in state.segments:
            view = open_segment(store, ref, verify=False, model=manifest.model)
            yield shard, view, segment_live_mask(view, dead)


def list_people(index, contains: str | None = None) -> list[PersonCount]:
    """Every person with at least one live face, sorted by name (case-insensitively, then exactly).

    Args:
        contains: only names containing this text, compared case-insensitively.
    """
    counts: Counter = Counter()
    shards: dict[str, set[int]] = {}
    for shard, view, live in _live_segments(_store(index)):
        persons = view.persons if live.all() else view.persons.filter(pa.array(live))
        for entry in pc.value_counts(persons).to_pylist():
            name, n = entry["values"], entry["counts"]
            counts[name] += n
            shards.setdefault(name, set()).add(shard)
    needle = contains.casefold() if contains else None
    names = sorted((p for p in counts if needle is None or needle in p.casefold()), key=lambda p: (p.casefold(), p))
    return [PersonCount(p, counts[p], sorted(shards[p])) for p in names]


def person_faces(index, person: str) -> list[FaceRecord]:
    """The live faces of `person` (exact name), by shard and row.

    Raises:
        NotFound: no live face of that name; the message suggests names it may have meant.
    """
    store = _store(index)
    found = []
    for shard, view, live in _live_segments(store):
        mine = person_mask(view.persons, person) & live
        for row in np.flatnonzero(mine):
            found.append(FaceRecord(int(view.face_ids[row]), view.person_at(row), view.source_at(row), shard,
                                    view.ref.id))
    if not found:
        raise NotFound(unknown_person_message(store, person))
    return found


def person_codes(index, person: str) -> tuple[np.ndarray, np.ndarray]:
    """(face ids uint64 [n], codes uint8 [n, code_bytes]) of the live faces of `person` (verification).

    Raises:
        NotFound: no live face of that name (with suggestions).
    """
    store = _store(index)
    ids, codes = [], []
    for _, view, live in _live_segments(store):
        mine = person_mask(view.persons, person) & live
        if mine.any():
            ids.append(view.face_ids[mine])
            codes.append(view.codes[mine])
    if not ids:
        raise NotFound(unknown_person_message(store, person))
    return np.concatenate(ids), np.concatenate(codes)


def find_faces(index, face_ids) -> list[FaceRecord]:
    """The live faces with these ids, in the order asked (repeats once).

    Raises:
        NotFound: some id is not a live face (deleted, or never there); the message lists them.
    """
    store = _store(index)
    wanted = sorted_unique(as_id_array(face_ids))
    by_id: dict[int, FaceRecord] = {}
    for shard, view, live in _live_segments(store):
        hit = isin_sorted(view.face_ids, wanted) & live
        for row in np.flatnonzero(hit):
            fid = int(view.face_ids[row])
            by_id[fid] = FaceRecord(fid, view.person_at(row), view.source_at(row), shard, view.ref.id)
    order = list(dict.fromkeys(int(i) for i in as_id_array(face_ids)))
    missing = [i for i in order if i not in by_id]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise NotFound(f"{len(missing)} face id(s) are not live faces of {store.uri}: {shown} "
                       f"(deleted, or never there; list a person's faces with `facepq index faces`)")
    return [by_id[i] for i in order]


def suggest_people(names, person: str, limit: int = 3) -> list[str]:
    """Names `person` may have meant: the same name in another case first, then close spellings."""
    names = list(dict.fromkeys(names))
    folded = person.casefold()
    same = [n for n in names if n.casefold() == folded and n != person]
    by_fold = {n.casefold(): n for n in names}
    close = [by_fold[f] for f in difflib.get_close_matches(folded, list(by_fold), n=limit, cutoff=0.6)]
    return list(dict.fromkeys(same + [n for n in close if n != person]))[:limit]


def unknown_person_message(index, person: str) -> str:
    """"no live faces of person X in INDEX", with suggestions and where to list names."""
    store = _store(index)
    hints = suggest_people((p.person for p in list_people(store)), person)
    hint = f"; did you mean {' or '.join(repr(h) for h in hints)}?" if hints else ""
    return (f"no live faces of person {person!r} in {store.uri}{hint} (names are exact and case-sensitive; "
            f"list them with `facepq index people --index {store.uri}`)")
