"""Live faces (`indexer.live`): present in a shard's segments minus its tombstones, and every user agrees."""
from __future__ import annotations

import numpy as np
import pytest

from facepq_core.errors import DataError
from indexer.commit import delete_faces
from indexer.info import index_info
from indexer.live import live_mask, person_live_ids, segment_live_mask, shard_live_ids, sorted_unique, tombstone_ids
from indexer.segment import open_segment
from indexer.store import IndexStore
from indexer.writer import IndexWriter
from tests.support.index import live_row_ids

PEOPLE = 12


@pytest.fixture
def deleted_index(tmp_path, meta):
    """3 shards (the modulo route), several segments each, ids on both sides of 2**63; person p0 deleted
    by name and every 10th face by id. Returns (store, ids, persons, codes, set of deleted ids)."""
    rng = np.random.default_rng(3)
    ids = np.concatenate([rng.integers(1, 2**63, 150, dtype=np.uint64),
                          rng.integers(2**63, 2**64 - 1, 150, dtype=np.uint64)])
    persons = np.array([f"p{i % PEOPLE}" for i in range(ids.size)])
    codes = rng.integers(0, 256, (ids.size, meta.code_bytes), dtype=np.uint8)
    store = IndexStore(tmp_path / "idx")
    writer = IndexWriter(store, meta, shard_count=3, segment_rows=40)
    writer.add(ids, persons, [f"s{i}" for i in range(ids.size)], codes)
    writer.commit("v1")
    by_name = {int(i) for i in ids[persons == "p0"]}
    assert delete_faces(store, person="p0") == (2, len(by_name))
    by_id = ids[1::10][persons[1::10] != "p0"]
    assert delete_faces(store, face_ids=by_id) == (3, by_id.size)
    return store, ids, persons, codes, by_name | {int(i) for i in by_id}


def test_live_ids_of_a_shard_are_its_present_ids_minus_its_tombstones(deleted_index):
    store, ids, persons, _, deleted = deleted_index
    manifest = store.load_manifest()
    assert manifest.tombstone_count == len(deleted)
    everything = set()
    for state in manifest.shards:
        assert len(state.segments) > 1
        present = {int(i) for ref in state.segments for i in open_segment(store, ref).face_ids}
        live = shard_live_ids(store, state)
        assert live.dtype == np.uint64 and np.all(live[1:] > live[:-1])  # sorted, unique
        assert set(live.tolist()) == present - state.tombstones
        # Only some of the segments: their present ids, the whole shard's tombstones.
        first = state.segments[:1]
        assert set(shard_live_ids(store, state, first).tolist()) == (
            {int(i) for i in open_segment(store, first[0]).face_ids} - state.tombstones)
        dead = tombstone_ids(state)
        assert dead.tolist() == sorted(state.tombstones)
        for ref in state.segments:
            seg = open_segment(store, ref)
            expected = [int(i) not in state.tombstones for i in seg.face_ids]
            assert segment_live_mask(seg, dead).tolist() == expected
            assert live_mask(seg.face_ids, dead).tolist() == expected
        everything |= set(live.tolist())
    assert everything == {int(i) for i in ids} - deleted
    for name in ("p0", "p1", "p5"):
        expected = {int(i) for i in ids[persons == name]} - deleted
        got = person_live_ids(store, manifest, name)
        assert got.dtype == np.uint64 and sorted(got.tolist()) == sorted(expected)
    assert person_live_ids(store, manifest, "P1").size == 0  # names are case-sensitive


def test_no_tombstones_means_every_row_is_live():
    ids = np.array([3, 2**63 + 1, 3], np.uint64)
    assert live_mask(ids, np.empty(0, np.uint64)).tolist() == [True, True, True]
    assert live_mask(ids, sorted_unique([3])).tolist() == [False, True, False]
    assert sorted_unique([5, 2**64 - 1, 5, 0]).tolist() == [0, 5, 2**64 - 1]


def test_writer_delete_and_info_agree_on_which_faces_are_live(deleted_index, meta):
    store, ids, persons, codes, deleted = deleted_index
    info = index_info(store)
    assert info["faces"] == ids.size - len(deleted)
    assert info["people"] == PEOPLE - 1  # p0 has no live face left
    with pytest.raises(DataError, match="no live faces"):
        delete_faces(store, person="p0")
    with pytest.raises(DataError, match="not live"):
        delete_faces(store, face_ids=[next(iter(deleted))])
    # A deleted face counts as absent to a writer: adding everything again takes exactly those.
    writer = IndexWriter(store, meta)
    assert writer.add(ids, persons, [f"again{i}" for i in range(ids.size)], codes) == len(deleted)
    assert writer.commit("re-enrol") == 4
    assert store.load_manifest().tombstone_count == 0
    rows = live_row_ids(store)
    assert rows.size == np.unique(rows).size == ids.size
    assert index_info(store)["people"] == PEOPLE
