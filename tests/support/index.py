"""Test indexes: small random-code indexes written by the real IndexWriter, and a brute-force reference."""
from __future__ import annotations

import numpy as np


def build_index(path, rows=3000, shard_count=3, M=8, K=256, seed=0, segments_per_shard=2):
    """An index of random codes written by the real IndexWriter; returns (ModelMeta, face_ids, codes)."""
    from facepq_core.codes import CodeSpec, pack_codes
    from indexer.manifest import ModelMeta
    from indexer.writer import IndexWriter

    spec = CodeSpec(M, K)
    meta = ModelMeta.from_code_spec(spec, fingerprint="f" * 16, trunk="test")
    rng = np.random.default_rng(seed)
    ids = rng.choice(2**62, size=rows, replace=False).astype(np.uint64)
    codes = pack_codes(rng.integers(0, K, size=(rows, M), dtype=np.uint8), spec)
    per = max(1, rows // (shard_count * segments_per_shard) + 1)
    writer = IndexWriter(str(path), meta, shard_count=shard_count, segment_rows=per)
    writer.add(ids, [f"p{i % 50}" for i in range(rows)], [f"src{i}" for i in range(rows)], codes)
    writer.commit("test index")
    return meta, ids, codes


def live_row_ids(index) -> np.ndarray:
    """uint64: the face id of every live row of the current version, repeats KEPT (so a test can
    assert there are none). Liveness is `indexer.live`'s, the one definition; segments are verified."""
    from indexer.live import segment_live_mask, tombstone_ids
    from indexer.segment import open_segment
    from indexer.store import IndexStore

    store = index if isinstance(index, IndexStore) else IndexStore(str(index))
    manifest = store.load_manifest()
    out = [np.empty(0, np.uint64)]
    for state in manifest.shards:
        dead = tombstone_ids(state)
        for ref in state.segments:
            seg = open_segment(store, ref, model=manifest.model)
            out.append(seg.face_ids[segment_live_mask(seg, dead)])
    return np.concatenate(out)


def brute_force(index_path, lut, k):
    """Reference: score every live row of every shard with facepq_core.codes.score_codes, global order."""
    from facepq_core.codes import score_codes
    from indexer.segment import open_segment
    from indexer.store import IndexStore

    store = IndexStore(str(index_path))
    man = store.load_manifest()
    spec = man.model.code_spec()
    rows = []
    for shard, state in enumerate(man.shards):
        pos = 0
        for ref in state.segments:
            seg = open_segment(store, ref)
            scores = score_codes(lut, seg.codes, spec)
            for i in range(seg.rows):
                fid = int(seg.face_ids[i])
                if fid not in state.tombstones:
                    rows.append((-float(scores[i]), shard, pos, fid))
                pos += 1
    rows.sort()
    return [(r[3], -r[0], r[1]) for r in rows[:k]]


def dyadic_lut(rng, M, K):
    """Table values on a 1/64 grid: every float32 sum is exact, so scores compare bit for bit."""
    return (rng.integers(0, 64, size=(M, K)) / 64).astype(np.float32)


def commit_log(index):
    """Every committed version of an index, as tests.support.history_check.CommitLog: version -> shard ->
    frozenset of live face ids, and face id -> person (liveness is `indexer.live`'s definition)."""
    from facepq_core.errors import FacepqError
    from indexer.live import live_mask, tombstone_ids
    from indexer.segment import open_segment
    from indexer.store import IndexStore
    from tests.support.history_check import CommitLog

    store = IndexStore(str(index))
    versions, persons, segment_ids, pruned = {}, {}, {}, set()
    current = store.load_manifest()
    for version in range(1, current.version + 1):
        try:
            manifest = store.load_manifest(version)
            shards = {}
            for shard, state in enumerate(manifest.shards):
                dead, live = tombstone_ids(state), set()
                for ref in state.segments:
                    if ref.id not in segment_ids:  # segments are immutable: each is read once
                        seg = open_segment(store, ref, verify=False, model=manifest.model)
                        segment_ids[ref.id] = seg.face_ids.copy()
                        persons.update(zip(seg.face_ids.tolist(), seg.persons.to_pylist(), strict=True))
                    ids = segment_ids[ref.id]
                    live.update(ids[live_mask(ids, dead)].tolist())
                shards[shard] = frozenset(live)
        except (FacepqError, OSError):  # garbage-collected since: committed, but no longer readable
            pruned.add(version)
            continue
        versions[version] = shards
    return CommitLog(versions=versions, persons=persons, shard_count=current.shard_count, pruned=frozenset(pruned))
