"""Bounds on what one request or one row may carry: every string field, photos per enrolment.

One place for the limits every write path and every server edge checks, so a request cannot make a
server do unbounded work or store values that later break other requests (four 5 MB photo sources made
every search near that person exceed the 16 MiB reply limit). The writer refuses rows beyond them
(whatever path wrote them); the servers refuse such requests first, with INVALID_ARGUMENT.
"""
from __future__ import annotations

MAX_PERSON_CHARS = 256     # a person's name
MAX_SOURCE_CHARS = 4096    # where a face came from (a path: Linux's PATH_MAX)
MAX_ENROL_PHOTOS = 128     # photos in one Enrol request (a larger batch is an ingest: `facepq ingest`)
MAX_DELETE_FACE_IDS = 100_000  # face ids in one Delete request
