"""What the coordinator service answers besides the top faces: open-set answers at an operating point,
results per person, 1:1 verification, faces of a photo, and people as first-class objects (list, faces,
rename, merge, move) — on a real index with nodes answering in-process from real LiveIndex views
(tests.support.fake_nodes) and a fake model (tests.support.fake_model)."""
from __future__ import annotations

import unicodedata

import numpy as np
import pytest

from facepq_core.calibration import fit_calibration
from facepq_core.errors import AlreadyExists, InvalidRequest, NotCalibrated, NotFound
from indexer.people import list_people
from query_node.coordinator import Coordinator
from query_node.service import CoordinatorService, Photo, SearchOptions
from tests.support.fake_model import FACE, FACES, FakeModel, K, M
from tests.support.fake_nodes import FakeNodeClients, FakeRegistry, LiveNode, record
from tests.support.index import brute_force, build_index, dyadic_lut


def _calibration(meta):
    """Genuine pairs share 6-8 of the 8 sub-codes, impostors 0-3 (the fake model's scores)."""
    rng = np.random.default_rng(0)
    return fit_calibration(rng.integers(6, 9, 5000), rng.choice([0, 1, 2, 3], 20000, p=[0.6, 0.3, 0.09, 0.01]),
                           meta.fingerprint, "opqn")


@pytest.fixture
def cluster(tmp_path):
    path = tmp_path / "idx"
    meta, ids, codes = build_index(path, rows=600, shard_count=2)
    clients = FakeNodeClients(nodes={"a": LiveNode(path, [0]), "b": LiveNode(path, [1])})
    coord = Coordinator(FakeRegistry([record("a", [0]), record("b", [1])]), 2, node_clients=clients)
    model = FakeModel(meta)
    service = CoordinatorService(coord, model, str(path))
    yield {"service": service, "model": model, "meta": meta, "path": path, "ids": ids, "codes": codes}
    coord.close()


def _code(rng) -> bytes:
    return rng.integers(0, K, M, dtype=np.uint8).tobytes()


# ---------------------------------------------------------------- open-set answers


def test_a_stranger_is_unknown_and_an_enrolled_person_is_found_at_the_operating_point(cluster):
    service, rng = cluster["service"], np.random.default_rng(5)
    ada = _code(rng)
    service.enrol("Ada", [Photo(FACE + ada, "ada.png")])
    found = service.search(FACE + ada, 5, SearchOptions(threshold=6))
    assert not found.unknown and found.threshold == 6
    assert [h.person for h in found.hits] == ["Ada"] and found.hits[0].score == M
    stranger = service.search(FACE + _code(rng), 5, SearchOptions(threshold=6))
    assert stranger.unknown and stranger.hits == [] and stranger.index_version == found.index_version
    everyone = service.search(FACE + _code(rng), 5)  # no operating point: the closest faces, never unknown
    assert not everyone.unknown and len(everyone.hits) == 5 and everyone.threshold is None


def test_far_needs_a_calibration_and_then_maps_to_its_threshold_with_similarities(cluster):
    service, rng = cluster["service"], np.random.default_rng(6)
    with pytest.raises(NotCalibrated, match="facepq calibrate") as err:
        service.search(FACE + _code(rng), 5, SearchOptions(far=1e-2))
    assert err.value.status == "FAILED_PRECONDITION"
    with pytest.raises(InvalidRequest, match="not both"):
        service.search(FACE + _code(rng), 5, SearchOptions(far=1e-2, threshold=3))
    cal = cluster["model"].calibration = _calibration(cluster["meta"])
    ada = _code(rng)
    service.enrol("Ada", [Photo(FACE + ada, "ada.png")])
    result = service.search(FACE + ada, 20, SearchOptions(far=1e-2))
    assert result.calibrated and result.threshold == cal.threshold_for(1e-2)
    assert 3 < result.threshold <= 4  # above every impostor score but 1% of them (the 3s)
    assert [h.person for h in result.hits] == ["Ada"]
    plain = service.search(FACE + ada, 20)
    sims = [h.similarity for h in plain.hits]
    assert all(0 <= s <= 1 for s in sims) and sims == sorted(sims, reverse=True) and sims[0] > 0.99
    with pytest.raises(InvalidRequest, match="below what this model's calibration measured"):
        service.search(FACE + ada, 5, SearchOptions(far=1e-7))


# ---------------------------------------------------------------- results per person


def test_group_by_person_gives_the_exact_best_k_people_each_with_their_best_faces(cluster):
    """The people and their order are exact; each person's faces are their best, best first (a prefix of
    their faces in the global order: a face below the faces fetched may be missing, never a worse one shown)."""
    service = cluster["service"]
    rng = np.random.default_rng(7)
    person_of = dict(zip(cluster["ids"].tolist(), [f"p{i % 50}" for i in range(600)]))
    for _ in range(5):
        lut = dyadic_lut(rng, M, K)
        result = service.search(lut.reshape(-1).tolist(), 7, SearchOptions(group_by="person", faces_per_person=2))
        by_person: dict[str, list] = {}
        for fid, score, _ in brute_force(cluster["path"], lut, 10_000):  # every face, in the global order
            by_person.setdefault(person_of[fid], []).append((fid, score))
        assert [m.person for m in result.people] == list(by_person)[:7]
        for m in result.people:
            faces = [(f.face_id, f.score) for f in m.faces]
            assert 1 <= len(faces) <= 2 and faces == by_person[m.person][:len(faces)]
            assert (m.score, m.faces[0].face_id) == (by_person[m.person][0][1], by_person[m.person][0][0])
        assert [h.face_id for h in result.hits] == [f.face_id for m in result.people for f in m.faces]


def test_a_person_with_many_near_identical_faces_no_longer_fills_the_top_k(cluster):
    service, rng = cluster["service"], np.random.default_rng(8)
    code = np.frombuffer(_code(rng), np.uint8)
    for i in range(12):  # 12 photos of one person, each differing from the query in one sub-code
        variant = code.copy()
        variant[i % M] = (int(variant[i % M]) + 1 + i) % K
        service.enrol("Twelve", [Photo(FACE + variant.tobytes(), f"t{i}.png")])
    faces = service.search(FACE + code.tobytes(), 10)
    assert {h.person for h in faces.hits} == {"Twelve"}
    people = service.search(FACE + code.tobytes(), 10, SearchOptions(group_by="person"))
    assert len(people.people) == 10 and people.people[0].person == "Twelve" and len(people.people[0].faces) == 3
    assert len({m.person for m in people.people}) == 10


# ---------------------------------------------------------------- verification


def test_verify_a_photo_against_a_photo_and_against_an_enrolled_person(cluster):
    service, rng = cluster["service"], np.random.default_rng(9)
    ada, other = _code(rng), _code(rng)
    with pytest.raises(NotCalibrated, match="threshold"):
        service.verify(FACE + ada, FACE + ada)
    same = service.verify(FACE + ada, FACE + ada, threshold=6)
    assert same.same and same.score == M and same.similarity is None
    assert not service.verify(FACE + ada, FACE + other, threshold=6).same
    enrolled = service.enrol("Ada", [Photo(FACE + other, "a1.png"), Photo(FACE + ada, "a2.png")])
    cluster["model"].calibration = _calibration(cluster["meta"])
    vs_person = service.verify(FACE + ada, None, person_b="Ada")  # default far 1e-3
    assert vs_person.same and vs_person.far == 1e-3 and vs_person.faces_compared == 2
    assert vs_person.best_face_id == enrolled.face_ids[1] and vs_person.similarity > 0.99
    assert not service.verify(FACE + _code(rng), None, person_b="Ada").same
    with pytest.raises(NotFound, match="no live faces of person 'Eve'"):
        service.verify(FACE + ada, None, person_b="Eve")
    with pytest.raises(InvalidRequest, match="exactly one of photo_b"):
        service.verify(FACE + ada, FACE + ada, person_b="Ada")


# ---------------------------------------------------------------- faces of a photo


def test_every_face_of_a_photo_is_searched_and_enrolled_with_its_box(cluster):
    service, rng = cluster["service"], np.random.default_rng(10)
    a, b = _code(rng), _code(rng)
    enrolled = service.enrol("Group", [Photo(FACES + a + b, "group.png")], faces="all")
    assert len(enrolled.face_ids) == 2 and len(set(enrolled.face_ids)) == 2 and len(enrolled.boxes) == 2
    largest_only = service.search(FACES + a + b, 3)  # by default the largest face only (the fake's first)
    assert largest_only.faces == [] and largest_only.hits[0].face_id == enrolled.face_ids[0]
    result = service.search(FACES + b + a, 1, SearchOptions(faces="all", threshold=6))
    assert [f.hits[0].face_id for f in result.faces] == [enrolled.face_ids[1], enrolled.face_ids[0]]
    assert result.hits == result.faces[0].hits and all(f.box is not None for f in result.faces)
    with pytest.raises(InvalidRequest, match="faces must be one of"):
        service.search(FACE + a, 1, SearchOptions(faces="some"))


# ---------------------------------------------------------------- people


def test_people_come_in_pages_that_add_up_to_the_whole_list(cluster):
    service = cluster["service"]
    pages, token = [], ""
    while True:
        page = service.list_people(7, token)
        assert page.total == 50 and len(page.people) <= 7
        pages += page.people
        token = page.next_page_token
        if not token:
            break
    assert pages == list_people(cluster["path"]) and len(pages) == 50
    assert service.list_people(3, contains="P1").total == 11  # p1, p10..p19
    with pytest.raises(InvalidRequest, match="page_token"):
        service.list_people(5, "not a token!")
    with pytest.raises(InvalidRequest, match="page_size"):
        service.list_people(5000)


def test_rename_merge_and_move_change_what_searches_answer(cluster):
    service, rng = cluster["service"], np.random.default_rng(11)
    a1, a2, b1 = _code(rng), _code(rng), _code(rng)
    service.enrol("Ada", [Photo(FACE + a1, "a1.png")])
    service.enrol("Ada L.", [Photo(FACE + a2, "a2.png")])
    bob = service.enrol("Bob", [Photo(FACE + b1, "b1.png")])
    renamed = service.rename_person("Ada", "Ada Lovelace")
    assert renamed.faces_changed == 1
    assert service.search(FACE + a1, 1).hits[0].person == "Ada Lovelace"
    with pytest.raises(AlreadyExists, match="merge"):
        service.rename_person("Ada L.", "Ada Lovelace")
    merged = service.merge_people(["Ada L."], "Ada Lovelace")
    assert merged.faces_changed == 1 and int(merged.index_version) > int(renamed.index_version)
    assert service.search(FACE + a2, 1).hits[0].person == "Ada Lovelace"
    assert {f.source for f in service.person_faces("Ada Lovelace").faces} == {"a1.png", "a2.png"}
    moved = service.move_faces(bob.face_ids, "Ada Lovelace")
    assert moved.faces_changed == 1 and service.search(FACE + b1, 1).hits[0].person == "Ada Lovelace"
    with pytest.raises(NotFound):
        service.person_faces("Bob")
    with pytest.raises(NotFound, match="not live"):
        service.move_faces([12345], "Ada Lovelace")


def test_a_name_is_stored_in_one_unicode_form_whatever_form_it_is_written_or_looked_up_in(cluster):
    service, rng = cluster["service"], np.random.default_rng(12)
    decomposed = unicodedata.normalize("NFD", "José")
    service.enrol(f"  {decomposed} ", [Photo(FACE + _code(rng), "j.png")])
    assert [p.person for p in list_people(cluster["path"], contains="jos")] == ["José"]
    assert service.person_faces(decomposed).person == "José"
    assert service.delete(person="José").deleted == 1
    for bad, message in (("", "non-empty"), ("a\nb", "printable"), ("x" * 257, "at most 256"), ("a\u2028b", r"U\+2028")):
        with pytest.raises(InvalidRequest, match=message):
            service.enrol(bad, [Photo(FACE + _code(rng))])
        with pytest.raises(InvalidRequest, match=message):
            service.rename_person("p1", bad)
