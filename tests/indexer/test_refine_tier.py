"""A refinement tier on disk: a `refine` column beside the codes (format 3), written by the writer, read for
candidates by positional reads, compacted and physically erased with the codes, reported by `index info`."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.fs as pafs
import pytest

from facepq.cli import main as facepq_main
from facepq_core.errors import ConfigError, IndexFormatError
from indexer.commit import compact, delete_faces
from indexer.info import index_info
from indexer.manifest import ModelMeta
from indexer.segment import open_segment
from indexer.store import IndexStore
from indexer.writer import IndexWriter
from tests.support.index import make_tier


@pytest.fixture
def tier():
    return make_tier("codes:128")  # 16 bytes a face


@pytest.fixture
def tiered(meta, tier) -> ModelMeta:
    return ModelMeta.from_code_spec(meta.code_spec(), meta.fingerprint, meta.trunk, meta.codec, tier)


@pytest.fixture
def refine_rows(rows, tier):
    """Distinct 16-byte refinement rows, one per face of `rows` (findable in the files' bytes)."""
    rng = np.random.default_rng(11)
    return rng.integers(0, 256, size=(len(rows[0]), tier.code_bytes), dtype=np.uint8)


def _write(path, tiered, rows, refine_rows, shard_count=2, segment_rows=120):
    ids, persons, sources, codes = rows
    writer = IndexWriter(str(path), tiered, shard_count=shard_count, segment_rows=segment_rows)
    writer.add(ids, persons, sources, codes, refine_rows)
    return writer.commit("tiered")


def _rows_by_id(store) -> dict[int, tuple[bytes, bytes]]:
    out = {}
    manifest = store.load_manifest()
    for ref in manifest.segments:
        seg = open_segment(store, ref, model=manifest.model)
        for i in range(seg.rows):
            out[int(seg.face_ids[i])] = (seg.codes[i].tobytes(), seg.refine[i].tobytes())
    return out


def test_a_tiered_index_writes_format_3_and_every_face_keeps_its_refinement_row(tmp_path, tiered, rows, refine_rows):
    ids, _, _, codes = rows
    _write(tmp_path / "idx", tiered, rows, refine_rows)
    store = IndexStore(str(tmp_path / "idx"))
    on_disk = json.loads(store.read_bytes("manifests/00000001.json"))
    assert on_disk["format_version"] == 3
    assert on_disk["model"]["refine"] == {"kind": "codes:128", "codec": "pq", "code_bytes": 16, "query_shape": [16, 256]}
    assert store.load_manifest().model == tiered
    got = _rows_by_id(store)
    assert got == {int(f): (codes[i].tobytes(), refine_rows[i].tobytes()) for i, f in enumerate(ids)}


def test_refinement_rows_read_by_position_local_and_remote_equal_the_column(tmp_path, tiered, rows, refine_rows):
    _write(tmp_path / "idx", tiered, rows, refine_rows, shard_count=1, segment_rows=1000)
    local = IndexStore(str(tmp_path / "idx"))
    remote = IndexStore("idx", filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()))
    ref = local.load_manifest().segments[0]
    picks = np.array([499, 0, 17, 17, 250])
    for store, pread in ((local, True), (remote, False)):
        seg = open_segment(store, ref, model=tiered)
        assert (seg.reader is not None) == pread
        np.testing.assert_array_equal(seg.refine_rows(picks), seg.refine[picks])
        assert seg.refine_rows(picks[:0]).shape == (0, 16)
        with pytest.raises(IndexError):
            seg.refine_rows([500])


def test_the_writer_takes_refinement_rows_exactly_when_the_index_has_a_tier(tmp_path, meta, tiered, rows, refine_rows):
    ids, persons, sources, codes = rows
    with pytest.raises(ConfigError, match="stores refinement tier codes:128: add uint8 \\[500, 16\\]"):
        IndexWriter(str(tmp_path / "a"), tiered).add(ids, persons, sources, codes)
    with pytest.raises(ConfigError, match="stores refinement tier codes:128"):
        IndexWriter(str(tmp_path / "a"), tiered).add(ids, persons, sources, codes, refine_rows[:, :8])
    with pytest.raises(ConfigError, match="this index has no refinement tier"):
        IndexWriter(str(tmp_path / "b"), meta).add(ids, persons, sources, codes, refine_rows)


def test_an_index_keeps_the_tier_it_was_created_with(tmp_path, meta, tiered, rows, refine_rows):
    _write(tmp_path / "idx", tiered, rows, refine_rows)
    with pytest.raises(IndexFormatError, match="stores refinement tier codes:128 beside its codes, this writer none"):
        IndexWriter(str(tmp_path / "idx"), meta)
    float16 = ModelMeta.from_code_spec(meta.code_spec(), meta.fingerprint, meta.trunk, meta.codec,
                                       make_tier("float16"))
    with pytest.raises(IndexFormatError, match="this writer float16"):
        IndexWriter(str(tmp_path / "idx"), float16)
    plain = tmp_path / "plain"
    IndexWriter(str(plain), meta).add(*rows)
    IndexWriter(str(plain), meta).commit("x")


def test_an_index_without_a_tier_still_writes_format_2(tmp_path, meta, rows):
    writer = IndexWriter(str(tmp_path / "idx"), meta)
    writer.add(*rows)
    writer.commit("plain")
    store = IndexStore(str(tmp_path / "idx"))
    on_disk = json.loads(store.read_bytes("manifests/00000001.json"))
    assert on_disk["format_version"] == 2 and "refine" not in on_disk["model"]


def test_a_malformed_tier_in_a_manifest_is_a_corrupt_index(tmp_path, tiered, rows, refine_rows):
    _write(tmp_path / "idx", tiered, rows, refine_rows)
    store = IndexStore(str(tmp_path / "idx"))
    d = json.loads(store.read_bytes("manifests/00000001.json"))
    d["model"]["refine"]["query_shape"] = [16]
    store.write_bytes("manifests/00000001.json", json.dumps(d).encode())
    with pytest.raises(IndexFormatError, match="model' section is incomplete or malformed"):
        store.load_manifest()


def test_delete_then_compact_erases_the_refinement_rows_from_every_file(tmp_path, tiered, rows, refine_rows):
    ids, persons, _, _ = rows
    _write(tmp_path / "idx", tiered, rows, refine_rows)
    store = IndexStore(str(tmp_path / "idx"))
    gone = [i for i, p in enumerate(persons) if p == "person_03"]
    delete_faces(store, person="person_03")
    stats = compact(store, grace_seconds=0)
    assert stats.rows_removed == len(gone)
    blob = b""
    for root, _, files in os.walk(tmp_path / "idx" / "shards"):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                blob += f.read()
    assert not [i for i in gone if refine_rows[i].tobytes() in blob]
    kept = [i for i in range(len(ids)) if i not in set(gone)]
    assert all(refine_rows[i].tobytes() in blob for i in kept)
    assert set(_rows_by_id(store)) == {int(ids[i]) for i in kept}
    assert _rows_by_id(store)[int(ids[kept[0]])][1] == refine_rows[kept[0]].tobytes()


def test_index_info_reports_the_bytes_per_face_of_each_tier(tmp_path, tiered, rows, refine_rows, capsys):
    _write(tmp_path / "idx", tiered, rows, refine_rows)
    info = index_info(str(tmp_path / "idx"))
    assert info["format_version"] == 3
    assert info["tiers"] == [
        {"tier": "codes", "codec": "opqn", "bytes_per_face": 8, "resident": True},
        {"tier": "refine", "kind": "codes:128", "codec": "pq", "bytes_per_face": 16, "resident": False}]
    assert facepq_main(["index", "info", "--index", str(tmp_path / "idx")]) == 0
    out = capsys.readouterr().out
    assert "bytes per face: codes opqn 8 B/face (in memory), refine codes:128 16 B/face (read for candidates only)" \
        in out
