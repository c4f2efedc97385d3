"""A column of person names, normalised and validated by the one rule (facepq_core.names).

Every row that reaches a segment passes through `checked_persons` (indexer.writer's `add`:
the Ray ingest job, the coordinator's Enrol, imports; indexer.relabel for people
operations). The rule runs once per distinct name, not per row, and names of printable ASCII
without surrounding spaces (their own stored form) are recognised by one vectorised match:
2M rows of 400k distinct such names take ~0.1 s, where the rule name by name took 2 s.
A column whose names are all already in their stored form is returned as it is.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facepq_core.errors import InvalidRequest
from facepq_core.names import MAX_PERSON_CHARS, check_person, normalise_person

__all__ = ["checked_persons", "person_mask"]

_PLAIN_ASCII = r"^[\x21-\x7e](?:[\x20-\x7e]{0,%d}[\x21-\x7e])?$" % (MAX_PERSON_CHARS - 2)


def checked_persons(persons: pa.Array, where: str = "") -> pa.Array:
    """The stored form of every name in `persons` (string array), or InvalidRequest naming a bad one.

    Args:
        persons: pyarrow string array; a null is refused like an empty name.
        where: what the names are (e.g. "gallery photos/"), for the message.
    """
    if persons.null_count:
        raise InvalidRequest(f"person must be a non-empty name{_at(where)}: {persons.null_count} row(s) have none")
    distinct = pc.unique(persons)
    # Printable ASCII without surrounding spaces is its own stored form: only other names need the rule.
    plain = pc.match_substring_regex(distinct, _PLAIN_ASCII).to_numpy(zero_copy_only=False)
    if plain.all():
        return persons
    names = distinct.to_pylist()
    stored = list(names)
    for i in np.flatnonzero(~plain).tolist():
        try:
            stored[i] = check_person(names[i])
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
    target = normalise_person(person)
    distinct = pc.unique(persons).to_pylist()
    same = [n for n in distinct if n is not None and (n == target or normalise_person(n) == target)]
    if not same:
        return np.zeros(len(persons), dtype=bool)
    return pc.is_in(persons, value_set=pa.array(same, type=pa.string())).to_numpy(zero_copy_only=False)
