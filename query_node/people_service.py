"""The coordinator's people calls, transport-free: list people (paged), a person's faces, rename, merge, move.

A mixin of query_node.service.CoordinatorService (it uses the service's `store` and `redis_url`):
reads are indexer.people's, on the version current when the call runs; changes are
indexer.relabel's, each one commit through the commit protocol (so a search that starts after the
reply sees the change, as after an enrolment or a delete).

Pages: people are sorted by name (case-insensitively, then exactly); a page token is the last
name of the previous page (base64url, opaque to callers), so a page stays correct while people
are added or removed between calls (a name added before the token's is not shown).
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from facepq_core.errors import InvalidRequest

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass
class PeoplePage:
    people: list                    # indexer.people.PersonCount
    next_page_token: str = ""       # "" on the last page
    total: int = 0                  # people matching (every page)


@dataclass
class PeopleChange:
    faces_changed: int
    index_version: str
    segments_rewritten: int = 0


@dataclass
class PersonFaces:
    person: str
    faces: list = field(default_factory=list)   # indexer.people.FaceRecord


def _sort_key(name: str) -> tuple[str, str]:
    return name.casefold(), name


def _token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode("utf-8")).decode("ascii")


def _after(token: str) -> tuple[str, str] | None:
    if not token:
        return None
    try:
        return _sort_key(base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8"))
    except (binascii.Error, UnicodeError, ValueError):
        raise InvalidRequest("page_token is not one this service returned: send the next_page_token of the "
                             "previous page, or none for the first") from None


class PeopleOperations:
    """People of the index the service commits to (`self.store`, `self.redis_url`)."""

    def list_people(self, page_size: int = 0, page_token: str = "", contains: str | None = None) -> PeoplePage:
        """One page of the people with live faces, with their face counts.

        Raises:
            InvalidRequest: page_size above MAX_PAGE_SIZE, or a page token this service did not give.
        """
        from indexer.people import list_people

        size = page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise InvalidRequest(f"page_size must be in 1..{MAX_PAGE_SIZE} (0 = {DEFAULT_PAGE_SIZE}), got {page_size}")
        after = _after(page_token)
        people = list_people(self.store, contains=contains or None)
        rest = people if after is None else [p for p in people if _sort_key(p.person) > after]
        page = rest[:size]
        more = len(rest) > size
        return PeoplePage(page, _token(page[-1].person) if more else "", len(people))

    def person_faces(self, person: str) -> PersonFaces:
        """The live faces of `person` (NotFound with suggestions when there are none)."""
        from indexer.people import person_faces

        faces = person_faces(self.store, person)
        return PersonFaces(faces[0].person, faces)

    def rename_person(self, person: str, new_name: str) -> PeopleChange:
        """Every face of `person` becomes `new_name`'s (NotFound; AlreadyExists when `new_name` has faces)."""
        from indexer.relabel import rename_person

        return self._change(rename_person, person, new_name)

    def merge_people(self, people, into: str) -> PeopleChange:
        """Every face of each of `people` becomes `into`'s (an existing or a new person)."""
        from indexer.relabel import merge_people

        return self._change(merge_people, list(people), into)

    def move_faces(self, face_ids, person: str) -> PeopleChange:
        """The live faces `face_ids` become `person`'s (NotFound for an id that is not live: nothing moves)."""
        from indexer.relabel import move_faces

        return self._change(move_faces, list(face_ids), person)

    def _change(self, operation, *args) -> PeopleChange:
        from query_node.service import _index_errors

        with _index_errors():
            result = operation(self.store, *args, redis_url=self.redis_url)
        return PeopleChange(result.faces_changed, str(result.index_version), result.segments_rewritten)
