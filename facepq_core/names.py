"""Person names: the one normalisation and the one validation every write path applies.

A name is stored in Unicode NFC with surrounding whitespace removed, so "José" typed on a
keyboard (one code point for é) and "José" from a macOS folder name (e + a combining accent)
are one person, and " Ada" is "Ada". Writers (the coordinator's Enrol, the Ray ingest job
through indexer.writer, people operations, imports) store `check_person(name)`; readers
(delete by name, a person's faces, verify against a person) look names up by
`normalise_person(name)`, so a lookup finds what a write stored.

A valid name is 1..MAX_PERSON_CHARS characters after normalisation, with no control
characters, line or paragraph separators or other invisible formatting characters, except
the zero-width joiner and non-joiner that some scripts (Persian, Indic, emoji sequences) need.
"""
from __future__ import annotations

import unicodedata

from facepq_core.errors import InvalidRequest
from facepq_core.limits import MAX_PERSON_CHARS  # one owner of what every write path may store

# Format characters (category Cf) some names need: ZWNJ (Persian, Indic scripts) and ZWJ (emoji sequences).
_ALLOWED_FORMAT = {"\u200c", "\u200d"}


def normalise_person(name: str) -> str:
    """NFC, without surrounding whitespace: how a name is stored and looked up."""
    return unicodedata.normalize("NFC", str(name)).strip()


def person_problem(name: str) -> str | None:
    """None when `name` (already normalised) may be stored, else what is wrong with it, for a person."""
    if not name:
        return "person must be a non-empty name"
    if len(name) > MAX_PERSON_CHARS:
        return (f"person must be at most {MAX_PERSON_CHARS} printable characters, got {len(name)} "
                f"(starting {name[:40]!r})")
    for ch in name:
        category = unicodedata.category(ch)
        if category in ("Zl", "Zp") or (category.startswith("C") and ch not in _ALLOWED_FORMAT):
            return (f"person must be at most {MAX_PERSON_CHARS} printable characters (no control characters or "
                    f"newlines); {name[:40]!r} holds {ch!r} (U+{ord(ch):04X})")
    return None


def check_person(name: str) -> str:
    """The stored form of `name` (`normalise_person`), or InvalidRequest saying what is wrong."""
    if not isinstance(name, str):
        raise InvalidRequest(f"person must be a string, got {type(name).__name__}")
    normal = normalise_person(name)
    problem = person_problem(normal)
    if problem:
        raise InvalidRequest(problem)
    return normal
