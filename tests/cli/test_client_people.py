"""facepq.client's people, verification and open-set calls, and their commands, against real node and coordinator
processes serving a calibrated copy of the tiny model."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from facepq.client import Client, Photo
from facepq_core.errors import AlreadyExists, InvalidRequest, NotFound
from tests.support.processes import REPO_ROOT, Procs, run_cli

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster(gallery, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("people")
    index, model = root / "idx", root / "model.pt"
    shutil.copytree(gallery["template"], index)
    shutil.copy(tiny_model.path, model)
    assert run_cli("calibrate", "--model", model, "--data", tiny_model.data, "--no-progress").returncode == 0
    procs = Procs()
    try:
        node = procs.node(index, [0, 1])
        coord = procs.coordinator(model, index, "--nodes", node.address)
        with Client(coord.address, timeout=30) as client:
            yield dict(index=index, coord=coord, client=client)
    finally:
        procs.kill_all()


def _photo(gallery, person, i=0) -> bytes:
    return gallery["photos"][person][i].read_bytes()


def test_search_answers_per_person_with_similarities_and_unknown_past_the_operating_point(cluster, gallery):
    client, person = cluster["client"], sorted(gallery["photos"])[0]
    status = client.status()
    assert status.calibrated and [p["far"] for p in status.operating_points][:1] == [0.01]
    faces = client.search(photo=_photo(gallery, person), k=10)
    assert faces.calibrated and all(0 <= h.similarity <= 1 for h in faces.hits) and faces.people == []
    people = client.search(photo=_photo(gallery, person), k=4, group_by="person", faces_per_person=2)
    assert len(people.people) == 4 and len({p.person for p in people.people}) == 4
    assert all(1 <= len(p.faces) <= 2 and p.faces[0].score == p.score for p in people.people)
    nobody = client.search(photo=_photo(gallery, person), k=5, threshold=faces.hits[0].score + 1)
    assert nobody.unknown and nobody.hits == [] and nobody.threshold == faces.hits[0].score + 1
    answer = nobody.to_json()
    assert answer["unknown"] is True and answer["hits"] == [] and "people" not in answer
    with pytest.raises(InvalidRequest, match="group_by must be one of"):
        client.search(photo=_photo(gallery, person), group_by="family")


def test_verify_against_a_photo_and_an_enrolled_person(cluster, gallery):
    client, person = cluster["client"], sorted(gallery["photos"])[1]
    same = client.verify(photo_a=_photo(gallery, person), photo_b=_photo(gallery, person), threshold=-1e9)
    assert same.same and same.similarity is not None and same.far is None
    assert not client.verify(photo_a=_photo(gallery, person), photo_b=_photo(gallery, person), threshold=1e9).same
    against = client.verify(photo_a=_photo(gallery, person), person=person)
    assert against.far == 1e-3 and against.faces_compared == len(client.person(person).faces)
    assert against.best_face_id in {f.face_id for f in client.person(person).faces}
    with pytest.raises(NotFound, match="no live faces of person"):
        client.verify(photo_a=_photo(gallery, person), person="nobody-at-all")


def test_people_pages_rename_merge_and_move_through_the_client(cluster, gallery):
    client = cluster["client"]
    everyone = client.people(page_size=7)
    assert len(everyone) == len(gallery["photos"]) - 4 and client.people_page(7).total == len(everyone)
    a, b, c = [p.person for p in everyone[:3]]
    renamed = client.rename_person(a, "Ada Lovelace")
    assert renamed.faces_changed == everyone[0].faces
    assert {f.person for f in client.person("Ada Lovelace").faces} == {"Ada Lovelace"}
    with pytest.raises(AlreadyExists, match="merge"):
        client.rename_person(b, "Ada Lovelace")
    client.merge_people([b], "Ada Lovelace")
    moved_face = client.person(c).faces[0].face_id
    client.move_faces([moved_face], "Ada Lovelace")
    ada = client.person("Ada Lovelace").faces
    assert len(ada) == everyone[0].faces + everyone[1].faces + 1 and moved_face in {f.face_id for f in ada}
    hit = client.search(photo=_photo(gallery, a), k=1).hits[0]  # searches answer with the new names at once
    assert hit.person != a
    with pytest.raises(NotFound):
        client.person(a)


def test_commands_verify_and_search_per_person_and_the_node_client_prints_similarities(cluster, gallery):
    person = sorted(gallery["photos"])[5]
    photo = gallery["photos"][person][0]
    out = run_cli("search", photo, "--coordinator", cluster["coord"].address, "--group-by", "person", "-k", "3",
                  "--json")
    answer = json.loads(out.stdout)
    assert out.returncode == 0 and len(answer["people"]) == 3 and "similarity" in answer["hits"][0]
    out = run_cli("verify", photo, photo, "--threshold=-1e9", "--coordinator", cluster["coord"].address)
    assert out.returncode == 0 and out.stdout.startswith("same person")
    out = run_cli("verify", photo, photo, "--threshold", "1e9", "--coordinator", cluster["coord"].address)
    assert out.returncode == 1 and out.stdout.startswith("different people")
    node = shutil.which("node")
    if node is None or not (REPO_ROOT / "clients/node/node_modules").is_dir():
        pytest.skip("the Node.js client cannot run here (node or clients/node/node_modules missing)")
    js = subprocess.run([node, "search.js", "--photo", str(photo), "--coordinator", cluster["coord"].address],
                        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT / "clients/node")
    py = run_cli("search", photo, "--coordinator", cluster["coord"].address, "--json")
    strip = lambda a: {k: v for k, v in a.items() if k not in ("took_ms", "node_scan_ms", "query")}  # noqa: E731
    assert js.returncode == 0, js.stderr
    assert strip(json.loads(js.stdout)) == strip(json.loads(py.stdout))
    assert "similarity" in json.loads(js.stdout)["hits"][0]


def test_enrol_every_face_of_photos_returns_one_box_per_face(cluster, gallery):
    person = gallery["enrol_people"][2]
    result = cluster["client"].enrol(person, [Photo(p.read_bytes(), p.name) for p in gallery["photos"][person][:2]],
                                     faces="all")
    assert len(result.face_ids) == 2 and len(result.boxes) == 2  # mode 'none' photos: one face, the whole photo
    assert all(b[:2] == (0, 0) for b in result.boxes)
