"""Failure class 2 of issue 15: an acknowledged write must have happened. The rule (indexer.enrol_rule):
a face belongs to one person; enrolling a photo already live as another person is refused with
ALREADY_EXISTS naming that person and commits nothing; the same person again is acknowledged and changes
nothing; relabelling is explicit (delete, then enrol). Every write path follows it: Enrol (also two at
once), the IndexWriter, and the Ray ingest (which skips and reports such photos)."""
from __future__ import annotations

import io
import shutil
import threading

import grpc
import pytest
from PIL import Image

from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
from indexer.store import IndexStore
from tests.support.processes import run_cli

pytestmark = pytest.mark.timeout(300)


def _stub(address):
    return facepq_pb2_grpc.CoordinatorStub(grpc.insecure_channel(address))


def _variant(path, i):
    """A photo of the same face with distinct bytes (a new face id)."""
    img = Image.open(path).convert("RGB")
    img.putpixel((0, 0), (i % 256, (i // 256) % 256, 99))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _files(index):
    return sorted(str(p.relative_to(index)) for p in (index / "shards").rglob("*") if p.is_file())


def _person_of(index, photo):
    """The person the index holds the photo's face as (None: not live)."""
    from indexer.face_id import face_id_for_photo
    from tests.reliability.test_faults import _live_faces

    return _live_faces(index).get(face_id_for_photo(photo))


def test_enrol_refuses_a_photo_enrolled_as_another_person(gallery, index, procs):
    node = procs.node(index, [0, 1])
    coord = procs.coordinator(gallery["model"], index, "--nodes", node.address)
    stub = _stub(coord.address)
    owner = next(p for p in gallery["photos"] if p not in gallery["enrol_people"])
    taken = gallery["photos"][owner][0].read_bytes()
    version = IndexStore(index).current_version()
    files_before = _files(index)

    with pytest.raises(grpc.RpcError) as err:
        stub.Enrol(facepq_pb2.EnrolRequest(person="impostor", photos=[facepq_pb2.Photo(content=taken, source="t.png")]),
                   timeout=60)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert repr(owner) in err.value.details() and "t.png" in err.value.details()
    # With a new photo beside it: all or nothing.
    fresh = _variant(gallery["photos"][gallery["enrol_people"][0]][0], 1)
    with pytest.raises(grpc.RpcError) as err:
        stub.Enrol(facepq_pb2.EnrolRequest(person="impostor", photos=[facepq_pb2.Photo(content=fresh, source="new"),
                                                                      facepq_pb2.Photo(content=taken, source="t")]),
                   timeout=60)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert IndexStore(index).current_version() == version
    assert _files(index) == files_before  # no segment of the refused enrolments stays behind
    # Nothing was acknowledged, and nothing changed: the name "impostor" does not exist.
    with pytest.raises(grpc.RpcError) as err:
        stub.Delete(facepq_pb2.DeleteRequest(person="impostor"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert _person_of(index, taken) == owner

    # The same photo under its own person: acknowledged, nothing changes.
    same = stub.Enrol(facepq_pb2.EnrolRequest(person=owner, photos=[facepq_pb2.Photo(content=taken)]), timeout=60)
    assert len(same.face_ids) == 1 and IndexStore(index).current_version() == version

    # Explicit relabel: delete the face, then enrol it under the new name.
    stub.Delete(facepq_pb2.DeleteRequest(face_ids=facepq_pb2.FaceIds(ids=list(same.face_ids))), timeout=30)
    moved = stub.Enrol(facepq_pb2.EnrolRequest(person="relabelled", photos=[facepq_pb2.Photo(content=taken)]),
                       timeout=60)
    assert list(moved.face_ids) == list(same.face_ids)
    assert _person_of(index, taken) == "relabelled"


def test_two_concurrent_enrolments_of_one_photo_under_two_names_one_wins(gallery, index, procs):
    node = procs.node(index, [0, 1])
    coords = [procs.coordinator(gallery["model"], index, "--nodes", node.address) for _ in range(2)]
    stubs = [_stub(c.address) for c in coords]
    source = gallery["photos"][gallery["enrol_people"][1]][0]
    for round_ in range(4):
        photo = _variant(source, 1000 + round_)
        names = [f"left-{round_}", f"right-{round_}"]
        outcomes = [None, None]
        start = threading.Barrier(2)

        def enrol(i, start=start, names=names, photo=photo, outcomes=outcomes):
            start.wait()
            try:
                outcomes[i] = stubs[i].Enrol(facepq_pb2.EnrolRequest(person=names[i], photos=[
                    facepq_pb2.Photo(content=photo, source=names[i])]), timeout=120)
            except grpc.RpcError as exc:
                outcomes[i] = exc

        threads = [threading.Thread(target=enrol, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = [i for i in range(2) if not isinstance(outcomes[i], grpc.RpcError)]
        assert len(ok) == 1, f"round {round_}: both enrolments were acknowledged: {outcomes}"
        loser = outcomes[1 - ok[0]]
        assert loser.code() == grpc.StatusCode.ALREADY_EXISTS and repr(names[ok[0]]) in loser.details()
        # The index holds the winner's name for that face, once.
        from tests.reliability.test_faults import _live_faces

        live = _live_faces(index)
        assert live[int(outcomes[ok[0]].face_ids[0])] == names[ok[0]]


def test_the_writer_applies_the_rule_within_one_write_and_across_writers(tmp_path):
    import numpy as np

    from facepq_core.errors import AlreadyEnrolled
    from indexer.writer import IndexWriter
    from tests.support.index import build_index

    meta, ids, _ = build_index(tmp_path / "idx", rows=300, shard_count=3)
    code = np.zeros((1, meta.code_bytes), np.uint8)
    w = IndexWriter(str(tmp_path / "idx"), meta)
    with pytest.raises(AlreadyEnrolled, match="already enrolled as 'p7'"):
        w.add(ids[7:8], ["someone else"], ["x"], code)  # live in the index as p7
    assert w.add(ids[7:8], ["p7"], ["x"], code) == 0  # same person: nothing to add, no error
    with pytest.raises(AlreadyEnrolled, match="already enrolled as 'a'"):
        w.add(np.array([5, 5], np.uint64), ["a", "b"], ["1", "2"], np.zeros((2, meta.code_bytes), np.uint8))
    w.add(np.array([6], np.uint64), ["a"], ["1"], code)  # buffered...
    with pytest.raises(AlreadyEnrolled):
        w.add(np.array([6], np.uint64), ["b"], ["2"], code)
        w.commit()  # ...and refused when the segment is written at the latest
    # Two writers, one face, two names: the second commit is refused (nothing committed) or reported.
    a = IndexWriter(str(tmp_path / "idx"), meta)
    b = IndexWriter(str(tmp_path / "idx"), meta, on_conflict="skip")
    c = IndexWriter(str(tmp_path / "idx"), meta)
    for writer, name in ((a, "first"), (b, "second"), (c, "third")):
        writer.add(np.array([9, 10], np.uint64) if writer is b else np.array([9], np.uint64), [name] * (
            2 if writer is b else 1), ["s"] * (2 if writer is b else 1),
            np.zeros((2 if writer is b else 1, meta.code_bytes), np.uint8))
    v = a.commit("first")
    with pytest.raises(AlreadyEnrolled, match="'first'"):
        c.commit("third")
    assert IndexStore(tmp_path / "idx").current_version() == v
    assert b.commit("second") == v + 1  # face 10 is committed, face 9 is reported
    assert [(x.face_id, x.person, x.enrolled_as) for x in b.conflicts] == [(9, "second", "first")]


@pytest.mark.slow
def test_ingest_skips_and_reports_photos_enrolled_as_another_person(gallery, index, tmp_path):
    owner = next(p for p in gallery["photos"] if p not in gallery["enrol_people"])
    newcomer = gallery["enrol_people"][2]
    folder = tmp_path / "gallery"
    (folder / "wrong-name").mkdir(parents=True)
    shutil.copy(gallery["photos"][owner][0], folder / "wrong-name" / "copy.png")
    (folder / newcomer).mkdir()
    for p in gallery["photos"][newcomer][:2]:
        shutil.copy(p, folder / newcomer / p.name)
    out = run_cli("ingest", "--model", gallery["model"], "--gallery", folder, "--index", index, "--no-progress",
                  "--actors", "1", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "enrolled_as_other: 1" in out.stdout and "faces added: 2" in out.stdout, out.stdout
    from tests.reliability.test_faults import _live_faces

    people = set(_live_faces(index).values())
    assert newcomer in people and "wrong-name" not in people


def test_a_rerun_meeting_many_enrolled_faces_compares_them_all(tmp_path):
    """An ingest re-run meets every face again: the writer reads the shard's persons once (FULL_PERSON_LOOKUP)
    and still refuses each face given another name, and takes each given the same name as already there."""
    from indexer.writer import FULL_PERSON_LOOKUP, IndexWriter
    from tests.support.index import build_index

    n = FULL_PERSON_LOOKUP + 1000
    meta, ids, codes = build_index(tmp_path / "idx", rows=n, shard_count=1, segments_per_shard=2)
    persons = [f"p{i % 50}" for i in range(n)]  # build_index's names
    renamed = [p if i % 3 else "someone else" for i, p in enumerate(persons)]
    w = IndexWriter(str(tmp_path / "idx"), meta, on_conflict="skip")
    assert w.add(ids, renamed, ["s"] * n, codes) == 0
    assert len(w.conflicts) == len(range(0, n, 3)) and {c.enrolled_as for c in w.conflicts} <= set(persons)
    assert 0 in w._persons  # read once and kept, not once per face
