"""People operations as index commits (rename, merge, move faces), export/import between indexes, and the one
name rule on every write path (the writer, the Ray job's inputs, the CLI)."""
from __future__ import annotations

import json
import unicodedata

import numpy as np
import pyarrow as pa
import pytest

from facepq_core.codes import CodeSpec
from facepq_core.errors import AlreadyExists, DataError, IndexFormatError, InvalidRequest, NotFound
from indexer.commit import compact, delete_faces
from indexer.inputs import list_inputs
from indexer.manifest import ModelMeta
from indexer.people import list_people, person_faces
from indexer.relabel import merge_people, move_faces, rename_person
from indexer.store import IndexStore
from indexer.transfer import export_people, import_people
from indexer.writer import IndexWriter
from tests.support.index import commit_log, live_row_ids
from tests.support.processes import run_cli


@pytest.fixture
def index(tmp_path, meta, rows):
    """500 faces of 10 people over 3 shards, 4 segments a shard; one face of person_03 deleted."""
    ids, persons, sources, codes = rows
    w = IndexWriter(str(tmp_path / "idx"), meta, shard_count=3, segment_rows=40)
    w.add(ids, persons, sources, codes)
    w.commit("gallery")
    delete_faces(IndexStore(str(tmp_path / "idx")), face_ids=[int(ids[3])])
    return tmp_path / "idx"


def _owners(index) -> dict[int, str]:
    log = commit_log(index)
    live = set().union(*log.versions[max(log.versions)].values())
    return {fid: log.persons[fid] for fid in live}


def test_rename_changes_only_that_persons_faces_and_keeps_ids_codes_and_tombstones(index):
    before = _owners(index)
    store = IndexStore(str(index))
    old = store.load_manifest()
    result = rename_person(index, "person_03", "Ada Lovelace")
    new = store.load_manifest()
    assert result.index_version == old.version + 1 and result.faces_changed == 49  # 50 minus the deleted one
    after = _owners(index)
    assert after.keys() == before.keys()  # no face gained or lost; the deleted one stays deleted
    assert {f for f, p in after.items() if p == "Ada Lovelace"} == {f for f, p in before.items() if p == "person_03"}
    assert all(after[f] == p for f, p in before.items() if p != "person_03")
    assert new.tombstone_count == old.tombstone_count and sorted(live_row_ids(index)) == sorted(before)
    untouched = {s.id for s in old.segments} & {s.id for s in new.segments}
    assert 0 < len(untouched) < len(old.segments)  # only segments holding the person were rewritten
    assert compact(store, grace_seconds=0).rows_removed == 1  # tombstones still name rows present


def test_renaming_onto_a_name_in_use_is_refused_and_merge_joins_them(index):
    with pytest.raises(AlreadyExists, match="merge 'person_01' into 'person_02'") as err:
        rename_person(index, "person_01", "person_02")
    assert err.value.status == "ALREADY_EXISTS"
    version = IndexStore(str(index)).current_version()
    with pytest.raises(NotFound, match="did you mean 'person_01'"):
        merge_people(index, ["Person_01", "person_04"], "person_02")
    assert IndexStore(str(index)).current_version() == version  # a refused change commits nothing
    merged = merge_people(index, ["person_01", "person_04"], "person_02")
    assert merged.faces_changed == 100
    assert [(p.person, p.faces) for p in list_people(index) if p.person in ("person_01", "person_02", "person_04")] \
        == [("person_02", 150)]


def test_moved_faces_change_person_and_unknown_ids_move_nothing(index, rows):
    ids = [int(i) for i in rows[0][:3]]
    with pytest.raises(NotFound, match="not live"):
        move_faces(index, ids + [1], "Grace")
    moved = move_faces(index, ids[:3], "Grace")  # ids[3] is the deleted face; 0..2 are live
    assert moved.faces_changed == 3
    assert sorted(f.face_id for f in person_faces(index, "Grace")) == sorted(ids)


def test_names_are_stored_in_nfc_and_looked_up_in_any_form(index):
    rename_person(index, "person_05", unicodedata.normalize("NFD", " José "))
    assert "José" in [p.person for p in list_people(index)]
    assert len(person_faces(index, unicodedata.normalize("NFD", "José"))) == 50
    assert delete_faces(IndexStore(str(index)), person="José")[1] == 50


@pytest.mark.parametrize("bad, message", [("", "non-empty"), ("two\nlines", "printable"),
                                          ("x" * 100_000, "at most 256"), ("\u0000nul", "printable")])
def test_the_writer_refuses_names_enrol_refuses(tmp_path, meta, bad, message):
    w = IndexWriter(str(tmp_path / "idx"), meta, shard_count=2)
    with pytest.raises(InvalidRequest, match=message):
        w.add(np.array([1, 2], np.uint64), ["fine", bad], ["a", "b"], np.zeros((2, 8), np.uint8))
    assert w.pending_rows == 0 and IndexStore(str(tmp_path / "idx")).current_version() is None


def test_ingest_inputs_with_bad_names_are_refused_before_any_work(tmp_path):
    np.save(tmp_path / "e.npy", np.zeros((3, 4), np.float32))
    (tmp_path / "e.csv").write_text('person\nok\n"multi\nline"\nfine\n')
    with pytest.raises(DataError, match="printable.*e.csv"):
        list_inputs(str(tmp_path / "e.npy"), embedding_dim=4)
    (tmp_path / "e.csv").write_text("person\n" + "x" * 100_000 + "\nb\nc\n")
    with pytest.raises(DataError, match="at most 256"):
        list_inputs(str(tmp_path / "e.npy"), embedding_dim=4)
    (tmp_path / "e.csv").write_text(f"person\n{unicodedata.normalize('NFD', 'José')}\nJosé\n  José\n")
    assert set(list_inputs(str(tmp_path / "e.npy"), embedding_dim=4).persons.to_pylist()) == {"José"}


def test_people_export_and_import_between_indexes_of_one_model(index, tmp_path, meta):
    out = tmp_path / "people.arrow"
    assert export_people(index, out, ["person_03", "person_07"]) == (99, 2)
    faces, imported = person_faces(index, "person_07"), tmp_path / "other"
    result = import_people(imported, out, shard_count=2)
    assert (result.faces_added, result.faces_skipped, result.people) == (99, 0, 2)
    assert {(f.face_id, f.source) for f in person_faces(imported, "person_07")} == {(f.face_id, f.source) for f in faces}
    assert import_people(imported, out).faces_added == 0  # face ids are content hashes: nothing twice
    with pa.memory_map(str(out)) as src:  # codes and metadata, never a photo
        assert pa.ipc.open_file(src).schema.names == ["face_id", "person", "source", "code"]
    other = ModelMeta.from_code_spec(CodeSpec(8, 256), fingerprint="0123456789abcdef", trunk="resnet20")
    w = IndexWriter(str(tmp_path / "third"), other, shard_count=1)
    w.add(np.array([5], np.uint64), ["x"], ["y"], np.zeros((1, 8), np.uint8))
    w.commit()
    with pytest.raises(IndexFormatError, match=f"{meta.fingerprint}.*0123456789abcdef|0123456789abcdef.*"
                                               f"{meta.fingerprint}"):
        import_people(tmp_path / "third", out)
    with pytest.raises(NotFound, match="nothing exported"):
        export_people(index, tmp_path / "none.arrow", ["nobody"])


def test_index_commands_rename_merge_move_export_import(index, tmp_path, rows):
    out = run_cli("index", "rename", "--index", index, "--person", "person_00", "--to", "Ada", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["faces_changed"] == 50
    out = run_cli("index", "rename", "--index", index, "--person", "Ada", "--to", "person_01")
    assert out.returncode == 2 and "merge" in out.stderr and "Traceback" not in out.stderr
    assert run_cli("index", "merge", "--index", index, "--people", "Ada", "--into", "person_01").returncode == 0
    assert run_cli("index", "move", "--index", index, str(int(rows[0][1])), "--to", "Bob").returncode == 0
    assert run_cli("index", "export", "--index", index, "--out", tmp_path / "p.arrow", "--person", "Bob").returncode == 0
    out = run_cli("index", "import", "--index", tmp_path / "new", tmp_path / "p.arrow", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["faces_added"] == 1


def test_export_and_import_carry_the_refinement_rows_of_a_tiered_index(tmp_path):
    from indexer.segment import open_segment
    from tests.support.index import build_index, make_tier

    tier = make_tier("codes:64")
    meta, _, _ = build_index(tmp_path / "src", rows=300, shard_count=2, refine=tier)

    def rows_by_face(path):
        store = IndexStore(str(path))
        manifest = store.load_manifest()
        return {int(f): (v.codes[i].tobytes(), v.refine[i].tobytes()) for ref in manifest.segments
                for v in [open_segment(store, ref, model=manifest.model)] for i, f in enumerate(v.face_ids)}

    out = tmp_path / "people.arrow"
    faces, _ = export_people(tmp_path / "src", out)
    result = import_people(tmp_path / "dst", out, shard_count=3)
    assert result.faces_added == faces == 300
    assert IndexStore(str(tmp_path / "dst")).load_manifest().model.refine == tier
    assert rows_by_face(tmp_path / "dst") == rows_by_face(tmp_path / "src")
