"""Shard routing: `facepq_core.routing` is the documented rule, and the writer and deletes follow it."""
from __future__ import annotations

import numpy as np
import pytest

from facepq_core.errors import ConfigError
from facepq_core.routing import shard_of, shard_of_id
from indexer.commit import delete_faces
from indexer.segment import open_segment
from indexer.store import IndexStore
from indexer.writer import IndexWriter

# Ids at the edges of uint64, above 2**63 (where a signed or float conversion goes wrong) and random.
EDGE_IDS = [0, 1, 2, 3, 255, 256, 257, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**63 + 1, 2**63 + 12345,
            2**64 - 2, 2**64 - 1]
SHARD_COUNTS = [1, 2, 3, 4, 7, 8, 10, 64, 255, 256, 257, 1000, 4096, 65536, 65537, 2**32 + 15]


def _ids() -> np.ndarray:
    rng = np.random.default_rng(11)
    random = rng.integers(0, 2**64 - 1, 2000, dtype=np.uint64, endpoint=True)
    return np.concatenate([np.array(EDGE_IDS, dtype=np.uint64), random, random | np.uint64(2**63)])


@pytest.mark.parametrize("shard_count", SHARD_COUNTS)
def test_shard_of_is_the_documented_face_id_mod_shard_count(shard_count):
    ids = _ids()
    expected = [int(i) % shard_count for i in ids.tolist()]  # the contract, in Python's exact integers
    got = shard_of(ids, shard_count)
    assert got.tolist() == expected
    assert [shard_of_id(i, shard_count) for i in ids.tolist()] == expected
    assert shard_of(ids.tolist(), shard_count).tolist() == expected  # plain ints are taken too
    # The smallest unsigned type that holds every shard number (what the writer's radix sort wants).
    assert got.dtype.kind == "u" and np.iinfo(got.dtype).max >= shard_count - 1
    assert got.dtype == np.min_scalar_type(shard_count - 1)
    if shard_count <= 256:
        assert got.dtype == np.uint8


def test_shard_of_refuses_what_is_not_a_shard_count_or_a_face_id():
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="shard count"):
            shard_of(np.array([1], np.uint64), bad)
        with pytest.raises(ConfigError, match="shard count"):
            shard_of_id(1, bad)
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match="unsigned 64-bit"):
            shard_of_id(bad, 4)
    assert shard_of(np.empty(0, np.uint64), 3).shape == (0,)


@pytest.mark.parametrize("shard_count", [4, 3])  # the writer's mask path and its modulo path
def test_a_face_written_by_the_writer_lands_in_the_shard_shard_of_names(tmp_path, meta, shard_count):
    rng = np.random.default_rng(5)
    ids = np.unique(np.concatenate([np.array(EDGE_IDS[1:], np.uint64),
                                    rng.integers(1, 2**64 - 1, 400, dtype=np.uint64)]))
    n = ids.size
    store = IndexStore(tmp_path / "idx")
    writer = IndexWriter(store, meta, shard_count=shard_count, segment_rows=50)
    assert writer.add(ids, [f"p{i % 7}" for i in range(n)], [f"s{i}" for i in range(n)],
                      rng.integers(0, 256, (n, meta.code_bytes), dtype=np.uint8)) == n
    assert writer.commit("routing") == 1
    manifest = store.load_manifest()
    assert manifest.shard_count == shard_count
    found = []
    for shard, state in enumerate(manifest.shards):
        assert state.segments, f"shard {shard} got no rows"
        for ref in state.segments:
            assert ref.path.startswith(f"shards/{shard:04d}/")
            seg_ids = open_segment(store, ref).face_ids
            assert (shard_of(seg_ids, shard_count) == shard).all()
            found.append(seg_ids)
    assert np.array_equal(np.sort(np.concatenate(found)), ids)

    # A delete puts each tombstone in the shard holding the face (the commit routes by the same rule).
    victims = ids[::9]
    assert delete_faces(store, face_ids=victims)[1] == victims.size
    manifest = store.load_manifest()
    for shard, state in enumerate(manifest.shards):
        assert state.tombstones == {int(i) for i in victims if shard_of_id(i, shard_count) == shard}
