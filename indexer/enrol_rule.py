"""The enrol rule: a face belongs to one person. Every write path (the Ray ingest, the Enrol RPC, any
IndexWriter user and the commit that publishes them) applies it through this module.

A face id is a hash of the photo's content (indexer.face_id), so "the same face" means the same photo:
* enrolled again under the SAME person: nothing changes, and the write is acknowledged (idempotent);
* under ANOTHER person while the face is live: refused. `AlreadyEnrolled` (ALREADY_EXISTS) names the
  person it is enrolled as. An Enrol commits nothing of such a request; an ingest (`on_conflict="skip"`)
  commits the rest and reports each refused photo (reason `enrolled_as_other`), so nothing is
  acknowledged that did not happen;
* relabelling is explicit: delete the face (or the person), then enrol the photo under the new name
  (a tombstoned face is absent, so enrolling it again is a new enrolment);
* two writers enrolling one photo under two names at once: the first commit wins, the other is refused
  at its commit (the check runs again under the commit lock).

Person names are compared through 64-bit keys (blake2b of the UTF-8 name): a writer that meets faces
already in the index (a re-run of an interrupted ingest meets millions) compares arrays, not strings.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facepq_core.errors import AlreadyEnrolled

__all__ = ["ON_CONFLICT", "Conflict", "PersonKeys", "check_on_conflict", "conflict_error", "person_keys",
           "repeat_conflicts"]

ON_CONFLICT = ("raise", "skip")


@dataclass(frozen=True)
class Conflict:
    """A photo refused by the enrol rule: its face id, the person asked for, the person it is enrolled as."""

    face_id: int
    person: str
    enrolled_as: str
    source: str = ""


def check_on_conflict(on_conflict: str) -> str:
    if on_conflict not in ON_CONFLICT:
        raise ValueError(f"on_conflict must be one of {ON_CONFLICT}, got {on_conflict!r}")
    return on_conflict


def conflict_error(conflicts: list[Conflict]) -> AlreadyEnrolled:
    """The error an Enrol answers with: every refused photo and the person it is enrolled as."""
    shown = "; ".join(f"{c.source or c.face_id} is already enrolled as {c.enrolled_as!r}" for c in conflicts[:5])
    more = f" (and {len(conflicts) - 5} more)" if len(conflicts) > 5 else ""
    wanted = conflicts[0].person
    return AlreadyEnrolled(f"{shown}{more}; nothing was enrolled as {wanted!r}. A face belongs to one person: "
                           f"to move it, delete it (or that person) first, then enrol it again")


def person_keys(persons: pa.Array) -> tuple[np.ndarray, dict[int, str]]:
    """(uint64 [n] key per row, {key: name}) for a string array: one hash per distinct name."""
    if isinstance(persons, pa.ChunkedArray):
        persons = persons.combine_chunks()
    encoded = pc.dictionary_encode(persons)
    names = encoded.dictionary.to_pylist()
    table = np.array([_key(name) for name in names], dtype=np.uint64)
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    return (table[codes] if len(names) else np.empty(0, np.uint64)), dict(zip(table.tolist(), names))


def _key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


class PersonKeys:
    """face id -> person for a set of faces (sorted ids, aligned person keys), built from arrays.

    Args:
        ids: uint64 [n] face ids (any order, unique).
        persons: string array [n], the person of each.
    """

    def __init__(self, ids: np.ndarray, persons: pa.Array):
        keys, self.names = person_keys(persons)
        order = np.argsort(ids, kind="stable")
        self.ids, self.keys = np.asarray(ids, np.uint64)[order], keys[order]

    def extend(self, ids: np.ndarray, persons: pa.Array) -> None:
        """Add faces (ids not already present) to the lookup."""
        if not len(ids):
            return
        keys, names = person_keys(persons)
        self.names.update(names)
        ids = np.concatenate([self.ids, np.asarray(ids, np.uint64)])
        keys = np.concatenate([self.keys, keys])
        order = np.argsort(ids, kind="stable")
        self.ids, self.keys = ids[order], keys[order]

    def conflicts(self, ids: np.ndarray, persons: pa.Array) -> dict[int, str]:
        """{row: the person it is enrolled as} for rows whose id is here under another person."""
        ids = np.asarray(ids, np.uint64)
        if not self.ids.size or not ids.size:
            return {}
        pos = np.minimum(np.searchsorted(self.ids, ids), self.ids.size - 1)
        known = self.ids[pos] == ids
        if not known.any():
            return {}
        keys, _ = person_keys(persons)
        rows = np.flatnonzero(known & (self.keys[pos] != keys))
        return {int(r): self.names[int(self.keys[pos[r]])] for r in rows}


def repeat_conflicts(ids: np.ndarray, persons: pa.Array) -> dict[int, str]:
    """Among the rows of one write: {row: the earlier row's person} for rows repeating an earlier row's id
    under another person (the first row of an id is the one kept)."""
    ids = np.asarray(ids, np.uint64)
    if ids.size < 2:
        return {}
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    later = np.zeros(ids.size, bool)
    later[1:] = ordered[1:] == ordered[:-1]
    if not later.any():
        return {}
    keys, names = person_keys(persons)
    first = np.maximum.accumulate(np.where(~later, np.arange(ids.size), 0))  # sorted position of each id's first row
    rows, first_rows = order[later], order[first[later]]
    differ = keys[rows] != keys[first_rows]
    return {int(r): names[int(keys[f])] for r, f in zip(rows[differ], first_rows[differ])}
