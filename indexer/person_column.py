"""A column of person names, normalised and validated by the one rule (facepq_core.names).

Every row that reaches a segment passes through `checked_persons` (indexer.writer's `add`:
the Ray ingest job, the coordinator's Enrol, imports; indexer.relabel for people
operations). The rule runs once per distinct name, not per row: a gallery of millions of
faces has thousands of people, and a column whose names are all already in their stored
form (the usual case) is returned as it is.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from facepq_core.errors import InvalidRequest
from facepq_core.names import check_person, normalise_person

__all__ = ["checked_persons", "person_mask"]


def checked_persons(persons: pa.Array, where: str = "") -> pa.Array:
    """The stored form of every name in `persons` (string array), or InvalidRequest naming a bad one.

    Args:
        persons: pyarrow string array; a null is refused like an empty name.
        where: what the names are (e.g. "gallery photos/"), for the message.
    """
    if persons.null_count:
        raise InvalidRequest(f"person must be a non-empty name{_at(where)}: {persons.null_count} row(s) have none")
    distinct = pc.unique(persons)
    names = distinct.to_pylist()
    stored = []
    for name in names:
        try:
            stored.append(check_person(name))
        except InvalidRequest as exc:
            raise InvalidRequest(f"{exc}{_at(where)}") from None
    if stored == names:
        return persons
    return pa.array(stored, type=pa.string()).take(pc.index_in(persons, value_set=distinct))


def _at(where: str) -> str:
    return f" (in {where})" if where else ""


def person_mask(persons: pa.Array, person: str):
    """bool numpy [rows]: rows of `persons` naming `person`, compared in stored form (NFC, trimmed).

    Names written before names were normalised (an index may hold "Jose\\u0301") match their
    normal form too, so a delete by the visible name finds them.
    """
    import numpy as np

    target = normalise_person(person)
    distinct = pc.unique(persons).to_pylist()
    same = [n for n in distinct if n is not None and (n == target or normalise_person(n) == target)]
    if not same:
        return np.zeros(len(persons), dtype=bool)
    return pc.is_in(persons, value_set=pa.array(same, type=pa.string())).to_numpy(zero_copy_only=False)
