"""Small-segment merging (indexer.upkeep): the size-tiered plan on manifests alone, and a merge that keeps
every live face, every tombstone and every score exactly."""
from __future__ import annotations

import numpy as np

from indexer.manifest import Manifest, ModelMeta, SegmentRef
from indexer.store import IndexStore
from indexer.upkeep import MergePolicy, merge_small_segments, plan_merges


def _ref(i, rows):
    return SegmentRef(id=f"s{i:04d}", path=f"shards/0000/s{i:04d}.arrow", rows=rows, bytes=rows * 8, sha256="0" * 64)


def _manifest(rows_per_segment):
    meta = ModelMeta(fingerprint="f" * 16, trunk="t", M=8, K=256, bits=64, code_bytes=8)
    m = Manifest.empty(meta, 1)
    m.shards[0].segments = [_ref(i, r) for i, r in enumerate(rows_per_segment)]
    return m


def test_plan_merges_fanout_segments_of_one_tier_and_never_large_ones():
    policy = MergePolicy(small_rows=1000, fanout=4, max_merge_rows=10_000)
    assert plan_merges(_manifest([1, 2, 3]), policy) == {}  # fewer than fanout in a tier
    plan = plan_merges(_manifest([3, 1, 2, 1, 2, 50]), policy)  # tier 0 (1..3 rows): five segments
    assert [r.rows for r in plan[0]] == [1, 1, 2, 2]  # the smallest fanout of them
    assert plan_merges(_manifest([5000] * 10), policy) == {}  # full-size segments are never rewritten
    # The lowest tier that is due goes first; one merge per shard per round.
    assert [r.rows for r in plan_merges(_manifest([20, 20, 20, 20, 1, 1, 1, 1]), policy)[0]] == [1, 1, 1, 1]
    # A merge stops at max_merge_rows (but merges at least two).
    capped = MergePolicy(small_rows=1000, fanout=4, max_merge_rows=45)
    assert [r.rows for r in plan_merges(_manifest([20, 21, 22, 23]), capped)[0]] == [20, 21]


def test_rounds_bound_the_segments_per_shard_and_keep_every_face_and_score(tmp_path):
    from indexer.commit import delete_faces
    from indexer.writer import IndexWriter
    from tests.support.index import brute_force, build_index, dyadic_lut, live_row_ids

    index = tmp_path / "idx"
    meta, _, _ = build_index(index, rows=200, shard_count=2, segments_per_shard=1)
    rng = np.random.default_rng(5)
    added = []
    for i in range(40):  # forty small enrolments: up to two segments each
        n = int(rng.integers(1, 4))
        new = rng.choice(2**62, n, replace=False).astype(np.uint64) + np.uint64(2**62)
        w = IndexWriter(str(index), meta)
        w.add(new, [f"e{i}"] * n, [f"src{i}"] * n, rng.integers(0, 256, (n, 8), dtype=np.uint8))
        w.commit(f"enrol {i}")
        added += new.tolist()
    delete_faces(IndexStore(index), face_ids=added[::7])  # tombstones in segments about to be merged
    store = IndexStore(index)
    before_segments = len(store.load_manifest().segments)
    lut = dyadic_lut(rng, 8, 256)
    def ranking():  # every live face with its exact score (tie order depends on row positions: ignored)
        return sorted(brute_force(index, lut, 10**9), key=lambda h: (-h[1], h[0]))

    reference = ranking()
    live = sorted(live_row_ids(index).tolist())
    tombstones = store.load_manifest().tombstone_count

    policy = MergePolicy(small_rows=1000, fanout=4)
    rounds = 0
    while merge_small_segments(store, policy).merges:
        rounds += 1
        assert ranking() == reference
    manifest = store.load_manifest()
    assert rounds >= 2 and len(manifest.segments) < before_segments / 3
    for state in manifest.shards:
        tiers = [policy.tier(r.rows) for r in state.segments if r.rows < policy.small_rows]
        assert all(tiers.count(t) < policy.fanout for t in set(tiers))
    assert sorted(live_row_ids(index).tolist()) == live and manifest.tombstone_count == tombstones
    assert merge_small_segments(store, policy).version is None  # nothing due: no new version


def test_merging_keeps_each_faces_refinement_row(tmp_path):
    """An index with a refinement tier: the merged segment carries every face's row beside its code."""
    from indexer.segment import open_segment
    from indexer.writer import IndexWriter
    from tests.support.index import build_index, make_tier, random_refine_rows

    index, tier = tmp_path / "idx", make_tier("codes:64")
    meta, _, _ = build_index(index, rows=40, shard_count=1, segments_per_shard=1, refine=tier)
    rng = np.random.default_rng(9)
    for i in range(8):  # eight one-face enrolments: eight small segments
        w = IndexWriter(str(index), meta)
        w.add(np.array([2**62 + i], np.uint64), [f"e{i}"], [f"s{i}"], rng.integers(0, 256, (1, 8), dtype=np.uint8),
              random_refine_rows(rng, tier, 1))
        w.commit(f"enrol {i}")
    store = IndexStore(index)

    def rows_by_face():
        manifest = store.load_manifest()
        return {int(f): (v.codes[i].tobytes(), v.refine[i].tobytes()) for ref in manifest.segments
                for v in [open_segment(store, ref, model=manifest.model)] for i, f in enumerate(v.face_ids)}

    before, segments = rows_by_face(), len(store.load_manifest().segments)
    assert merge_small_segments(store, MergePolicy(small_rows=1000, fanout=4)).merges
    assert len(store.load_manifest().segments) < segments and rows_by_face() == before
