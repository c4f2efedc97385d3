"""The on-disk contract: segments, manifests, store (docs/index-format.md)."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from facepq_core.errors import IndexFormatError
from indexer.errors import SegmentCorrupt
from indexer.manifest import FORMAT_VERSION, Manifest
from indexer.segment import open_segment, write_segment
from indexer.store import IndexStore


def test_segment_round_trip_gives_zero_copy_views_of_the_file(tmp_path, meta, rows):
    ids, persons, sources, codes = rows
    store = IndexStore(tmp_path / "idx")
    ref = write_segment(store, 2, ids, persons, sources, codes, meta)
    assert ref.path.startswith("shards/0002/") and ref.rows == len(ids)
    assert ref.bytes == os.path.getsize(store.local_path(ref.path))

    view = open_segment(store, ref, model=meta)
    assert view.codes.dtype == np.uint8 and view.codes.shape == (len(ids), 8)
    np.testing.assert_array_equal(view.codes, codes)
    np.testing.assert_array_equal(view.face_ids, ids)
    assert view.person_at(13) == persons[13] and view.source_at(13) == sources[13]
    # Zero copy: the arrays do not own their memory, they view the memory-mapped Arrow buffers.
    assert not view.codes.flags.owndata and not view.face_ids.flags.owndata
    code_buf = view.batch.column(3).buffers()[1]
    assert view.codes.ctypes.data == code_buf.address
    assert not view.codes.flags.writeable
    schema_meta = view.batch.schema.metadata
    assert schema_meta[b"facepq.model_fingerprint"] == meta.fingerprint.encode()
    assert view.batch.schema.field("code").type == pa.binary(8)


def test_open_segment_honours_a_sliced_column_offset(tmp_path, meta, rows):
    ids, persons, sources, codes = rows
    store = IndexStore(tmp_path / "idx")
    ref = write_segment(store, 0, ids, persons, sources, codes, meta)
    view = open_segment(store, ref)
    from indexer.segment import column_view

    sliced = view.batch.slice(100, 50)
    np.testing.assert_array_equal(column_view(sliced.column(3), np.uint8, 8), codes[100:150])
    np.testing.assert_array_equal(column_view(sliced.column(0), np.uint64, 1), ids[100:150])


def test_checksum_detects_truncation_and_a_flipped_byte(tmp_path, meta, rows):
    ids, persons, sources, codes = rows
    store = IndexStore(tmp_path / "idx")
    ref = write_segment(store, 0, ids, persons, sources, codes, meta)
    path = store.local_path(ref.path)
    data = open(path, "rb").read()

    with open(path, "r+b") as f:  # flip one bit in the middle of the code column
        f.seek(len(data) // 2)
        byte = f.read(1)
        f.seek(len(data) // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(SegmentCorrupt, match="sha256"):
        open_segment(store, ref)

    with open(path, "wb") as f:
        f.write(data[:-100])
    with pytest.raises(SegmentCorrupt, match="truncated"):
        open_segment(store, ref)
    with pytest.raises(SegmentCorrupt):  # even unverified, a truncated file is not readable Arrow
        open_segment(store, ref, verify=False)

    with open(path, "wb") as f:
        f.write(data)
    assert open_segment(store, ref).rows == len(ids)


def test_segment_of_another_code_width_is_refused(tmp_path, meta, rows):
    ids, persons, sources, codes = rows
    store = IndexStore(tmp_path / "idx")
    ref = write_segment(store, 0, ids, persons, sources, codes, meta)
    from dataclasses import replace

    with pytest.raises(SegmentCorrupt, match="8-byte codes"):
        open_segment(store, ref, model=replace(meta, M=16, code_bytes=16))
    with pytest.raises(SegmentCorrupt, match="written by model"):
        open_segment(store, ref, model=replace(meta, fingerprint="0" * 16))


def _manifest_with(store, meta, rows) -> Manifest:
    ids, persons, sources, codes = rows
    manifest = Manifest.empty(meta, 2).successor("test")
    manifest.shards[1].segments.append(write_segment(store, 1, ids, persons, sources, codes, meta))
    manifest.shards[1].tombstones.add(int(ids[0]))
    return manifest


def _publish_edited(tmp_path, meta, rows, edit) -> IndexStore:
    """An index whose version-1 manifest is the test manifest as a dict after `edit(d)`, written as is."""
    store = IndexStore(tmp_path / "idx")
    d = _manifest_with(store, meta, rows).to_dict()
    edit(d)
    store.write_bytes("manifests/00000001.json", json.dumps(d).encode())
    store.set_current(1)
    return store


def test_manifest_round_trips_through_json(tmp_path, meta, rows):
    store = IndexStore(tmp_path / "idx")
    manifest = _manifest_with(store, meta, rows)
    store.write_manifest(manifest)
    store.set_current(manifest.version)
    loaded = store.load_manifest()
    assert loaded == manifest
    assert loaded.live_faces == len(rows[0]) - 1 and loaded.version == 1 and store.current_version() == 1


@pytest.mark.parametrize("bad_path", ["../../etc/passwd", "/etc/passwd", "shards/../../x.arrow",
                                      "shards/0000/../../../x.arrow", "file:///etc/passwd", "other/0000/x.arrow"])
def test_manifest_pointing_outside_the_index_is_refused(tmp_path, meta, rows, bad_path):
    store = _publish_edited(tmp_path, meta, rows, lambda d: d["shards"][1]["segments"][0].update(path=bad_path))
    with pytest.raises(IndexFormatError, match="segment path"):
        store.load_manifest()


def test_a_format_1_manifest_is_read_as_opqn_codes_and_the_next_commit_writes_format_2(tmp_path, meta, rows):
    """Indexes written before codecs existed: `packed` in the model section, no `codec`."""
    from indexer.writer import IndexWriter

    def format_1(d):
        d["format_version"] = 1
        del d["model"]["codec"]
        d["model"]["packed"] = False

    store = _publish_edited(tmp_path, meta, rows, format_1)
    loaded = store.load_manifest()
    assert loaded.format_version == 1 and loaded.model.codec == "opqn" and loaded.model == meta
    ids, persons, sources, codes = rows
    writer = IndexWriter(store, meta)
    writer.add(ids[:3] + np.uint64(1), persons[:3], sources[:3], codes[:3])
    version = writer.commit("after the upgrade")
    on_disk = json.loads(store.read_bytes(f"manifests/{version:08d}.json"))
    assert on_disk["format_version"] == 2 and FORMAT_VERSION == 4  # 3 only with a refinement tier, 4 with cells
    assert on_disk["model"]["codec"] == "opqn" and "packed" not in on_disk["model"]


def test_a_model_section_whose_layout_does_not_add_up_is_refused(tmp_path, meta, rows):
    store = _publish_edited(tmp_path, meta, rows, lambda d: d["model"].update(code_bytes=4))  # M=8, K=256: 8 bytes
    with pytest.raises(IndexFormatError, match="8 bytes"):
        store.load_manifest()


def test_a_node_refuses_an_index_of_a_codec_it_does_not_know(tmp_path, meta, rows):
    from query_node.index_view import load_view

    store = _publish_edited(tmp_path, meta, rows, lambda d: d["model"].update(codec="from-the-future"))
    with pytest.raises(IndexFormatError, match="unknown codec 'from-the-future'"):
        load_view(store, [0, 1])


def test_newer_format_version_is_refused_with_upgrade_hint(tmp_path, meta, rows):
    store = _publish_edited(tmp_path, meta, rows, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(IndexFormatError, match="upgrade facepq"):
        store.load_manifest()


def test_missing_index_and_corrupt_manifest_give_clear_errors(tmp_path, meta, rows):
    store = IndexStore(tmp_path / "nothing-here")
    assert not store.exists() and store.current_version() is None
    with pytest.raises(IndexFormatError, match="no facepq index"):
        store.load_manifest()
    store = IndexStore(tmp_path / "idx")
    store.write_bytes("manifests/00000001.json", b'{"format_version": 1, "version": 1, "shard')
    store.set_current(1)
    with pytest.raises(IndexFormatError, match="not valid JSON"):
        store.load_manifest()
    store.write_bytes("CURRENT", b"garbage")
    with pytest.raises(IndexFormatError, match="CURRENT is corrupt"):
        store.current_version()


def test_atomic_write_leaves_old_content_when_the_writer_fails(tmp_path):
    store = IndexStore(tmp_path / "idx")
    store.write_bytes("CURRENT", b"1\n")
    with pytest.raises(RuntimeError):
        with store.open_atomic("CURRENT") as f:
            f.write(b"2")
            raise RuntimeError("killed mid-write")
    assert store.read_bytes("CURRENT") == b"1\n"
    assert sorted(os.listdir(tmp_path / "idx")) == ["CURRENT"]  # no temp file left behind


def test_face_ids_are_stable_and_distinguish_faces():
    from indexer.face_id import face_id_for_embedding, face_id_for_photo

    a = face_id_for_photo(b"photo bytes", 0)
    assert a == face_id_for_photo(b"photo bytes", 0)
    # The documented construction, so other languages can reproduce ids.
    import hashlib

    assert a == int.from_bytes(hashlib.sha256(b"photo bytes\0\0\0\0\0").digest()[:8], "big")
    assert a != face_id_for_photo(b"photo bytes", 1) != face_id_for_photo(b"photo bytez", 0)
    assert 0 <= a < 2**64
    row = np.arange(4, dtype=np.float32).tobytes()
    assert face_id_for_embedding(row, "x.npy#0") == face_id_for_embedding(row, "x.npy#0")
    assert face_id_for_embedding(row, "x.npy#0") != face_id_for_embedding(row, "x.npy#1")
