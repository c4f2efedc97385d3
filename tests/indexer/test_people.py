"""indexer.people: who is in an index, their faces, face id lookups; names that miss get suggestions."""
from __future__ import annotations

import numpy as np
import pytest

from facepq_core.codes import CodeSpec, pack_codes
from facepq_core.errors import DataError, NotFound
from indexer.commit import delete_faces
from indexer.manifest import ModelMeta
from indexer.people import find_faces, list_people, person_faces, suggest_people
from indexer.store import IndexStore
from indexer.writer import IndexWriter


@pytest.fixture
def index(tmp_path):
    """Three people over 2 shards and two commits: Alice 3 faces, Bob 2, Ana 1."""
    spec = CodeSpec(8, 256)
    meta = ModelMeta.from_code_spec(spec, fingerprint="f" * 16, trunk="test")
    rng = np.random.default_rng(3)
    people = ["Alice", "Alice", "Bob", "Alice", "Bob", "Ana"]
    ids = np.arange(101, 101 + len(people), dtype=np.uint64) * np.uint64(7919)
    codes = pack_codes(rng.integers(0, 256, (len(people), 8), dtype=np.uint8), spec)
    for lo, hi in ((0, 3), (3, 6)):  # two versions, so segments of both commits are read
        w = IndexWriter(str(tmp_path / "idx"), meta, shard_count=2)
        w.add(ids[lo:hi], people[lo:hi], [f"photos/{i}.jpg" for i in range(lo, hi)], codes[lo:hi])
        w.commit(f"rows {lo}..{hi}")
    return dict(path=tmp_path / "idx", ids=ids.tolist(), people=people)


def test_people_are_listed_with_their_live_faces_and_shards(index):
    listed = list_people(index["path"])
    assert [(p.person, p.faces) for p in listed] == [("Alice", 3), ("Ana", 1), ("Bob", 2)]
    assert all(set(p.shards) <= {0, 1} and p.shards for p in listed)
    assert [p.person for p in list_people(index["path"], contains="a")] == ["Alice", "Ana"]  # case-insensitive


def test_a_persons_faces_and_face_lookup_agree_with_what_was_written(index):
    faces = person_faces(index["path"], "Bob")
    expected = {i for i, p in zip(index["ids"], index["people"]) if p == "Bob"}
    assert {f.face_id for f in faces} == expected and {f.person for f in faces} == {"Bob"}
    assert {f.source for f in faces} == {"photos/2.jpg", "photos/4.jpg"}
    wanted = [index["ids"][5], index["ids"][0], index["ids"][5]]
    found = find_faces(index["path"], wanted)
    assert [f.face_id for f in found] == [index["ids"][5], index["ids"][0]]  # asked order, repeats once
    assert [f.person for f in found] == ["Ana", "Alice"]
    assert found[0].to_json()["face_id"] == str(index["ids"][5])  # uint64 as text in JSON


def test_deleted_faces_are_gone_from_every_listing(index):
    store = IndexStore(str(index["path"]))
    delete_faces(store, person="Bob")
    assert [p.person for p in list_people(store)] == ["Alice", "Ana"]
    with pytest.raises(NotFound, match="no live faces of person 'Bob'"):
        person_faces(store, "Bob")
    bob = index["ids"][2]
    with pytest.raises(NotFound, match=f"1 face id\\(s\\) are not live.*{bob}"):
        find_faces(store, [index["ids"][0], bob])


def test_a_name_in_the_wrong_case_gets_the_right_one_suggested(index):
    with pytest.raises(NotFound) as err:
        person_faces(index["path"], "alice")
    assert "did you mean 'Alice'?" in str(err.value) and "facepq index people" in str(err.value)
    with pytest.raises(DataError) as err:  # the delete command's refusal names the same hint
        delete_faces(IndexStore(str(index["path"])), person="BOB")
    assert "did you mean 'Bob'?" in str(err.value) and "nothing deleted" in str(err.value)
    assert suggest_people(["Alice", "Ana", "Bob"], "Alicia") == ["Alice"]
    assert suggest_people(["Alice", "Ana", "Bob"], "Zed") == []
