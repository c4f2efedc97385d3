"""Test indexes: small random-code indexes written by the real IndexWriter, and a brute-force reference."""
from __future__ import annotations

import numpy as np


def build_index(path, rows=3000, shard_count=3, M=8, K=256, seed=0, segments_per_shard=2, refine=None,
                cells=None, codec="opqn"):
    """An index of random codes written by the real IndexWriter; returns (ModelMeta, face_ids, codes).

    `refine`: a refinement tier (facepq_core.refine.RefineTier, e.g. `make_tier(...)`) whose random rows
    are stored beside the codes (read them back with `refine_rows`).
    `cells`: a cell partition of that many cells (facepq_core.partition); the codes are then clustered
    (`clustered_codes`), as codes of faces are, so that cells mean something.
    `codec`: the codec name the manifest records (the codes stay random bytes of the layout).
    """
    from facepq_core.codes import CodeSpec, pack_codes
    from indexer.manifest import ModelMeta
    from indexer.writer import IndexWriter

    spec = CodeSpec(M, K)
    meta = ModelMeta.from_code_spec(spec, fingerprint="f" * 16, trunk="test", codec=codec, refine=refine)
    rng = np.random.default_rng(seed)
    ids = rng.choice(2**62, size=rows, replace=False).astype(np.uint64)
    if cells:
        codes = clustered_codes(rng, rows, spec)
    else:
        codes = pack_codes(rng.integers(0, K, size=(rows, M), dtype=np.uint8), spec)
    per = max(1, rows // (shard_count * segments_per_shard) + 1)
    writer = IndexWriter(str(path), meta, shard_count=shard_count, segment_rows=per, cells=cells)
    writer.add(ids, [f"p{i % 50}" for i in range(rows)], [f"src{i}" for i in range(rows)], codes,
               None if refine is None else random_refine_rows(rng, refine, rows))
    writer.commit("test index")
    return meta, ids, codes


def clustered_codes(rng, n: int, spec, centers: int = 24, keep: float = 0.75) -> np.ndarray:
    """Stored codes uint8 [n, code_bytes] of `n` faces around `centers` random codes (each sub-code of a face
    is its center's with probability `keep`, else random)."""
    from facepq_core.codes import pack_codes

    center = rng.integers(0, spec.K, size=(centers, spec.M), dtype=np.uint8)
    sub = center[rng.integers(0, centers, size=n)]
    noise = rng.random((n, spec.M)) > keep
    sub[noise] = rng.integers(0, spec.K, size=int(noise.sum()), dtype=np.uint8)
    return pack_codes(sub, spec)


def make_tier(kind: str = "codes:64", dim: int = 16):
    """A refinement tier for tests: 'codes:BITS' (codec pq, BITS / 8 byte sub-codes, [BITS / 8, 256] tables)
    or 'float16' of `dim`-d embeddings."""
    from facepq_core.codecs.float16 import Float16Codec
    from facepq_core.refine import RefineTier, refine_bits

    if kind == "float16":
        return RefineTier.of(kind, Float16Codec(dim))
    m = refine_bits(kind) // 8
    return RefineTier(kind=kind, codec="pq", code_bytes=m, query_shape=(m, 256))


def random_refine_rows(rng, tier, n: int) -> np.ndarray:
    """uint8 [n, tier bytes]: random sub-codes, or random unit vectors as float16."""
    if tier.codec == "float16":
        from facepq_core.codecs.float16 import Float16Codec

        return Float16Codec(tier.query_shape[1]).encode(rng.standard_normal((n, tier.query_shape[1])))
    return rng.integers(0, 256, size=(n, tier.code_bytes), dtype=np.uint8)


def random_refine_tables(rng, tier, queries: int) -> np.ndarray:
    """float32 [Q, a, b] refinement tables of `tier`: dyadic sub-code tables, or unit query vectors."""
    if tier.codec == "float16":
        v = rng.standard_normal((queries, tier.query_shape[1])).astype(np.float32)
        return (v / np.linalg.norm(v, axis=1, keepdims=True))[:, None, :]
    return np.stack([dyadic_lut(rng, *tier.query_shape) for _ in range(queries)])


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


def codes_by_source(index, column: str = "codes") -> dict[str, bytes]:
    """source -> the bytes of that face's row in `column` ('codes' or 'refine') of every segment of the index."""
    from indexer.segment import open_segment
    from indexer.store import IndexStore

    store = IndexStore(str(index))
    out = {}
    for ref in store.load_manifest().segments:
        view = open_segment(store, ref)
        for i in range(view.rows):
            out[view.source_at(i)] = getattr(view, column)[i].tobytes()
    return out


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


def brute_force_two_stage(index_path, lut, refine_table, candidates, k):
    """Reference two-stage search: per shard, the exact top-`candidates` live rows by first-pass score
    (score_codes; ties by the lower row in scan order), re-scored with facepq_core.refine.rescore, the
    shard's top k by that score (ties by the lower row); then the global order (score, shard, that order).
    Returns [(face_id, refined score, shard)]."""
    from facepq_core.codes import score_codes
    from facepq_core.refine import rescore
    from indexer.segment import open_segment
    from indexer.store import IndexStore

    store = IndexStore(str(index_path))
    man = store.load_manifest()
    spec, tier = man.model.code_spec(), man.model.refine
    out = []
    for shard, state in enumerate(man.shards):
        rows, pos = [], 0
        for ref in state.segments:
            seg = open_segment(store, ref)
            scores = score_codes(lut, seg.codes, spec)
            for i in range(seg.rows):
                if int(seg.face_ids[i]) not in state.tombstones:
                    rows.append((-float(scores[i]), pos, int(seg.face_ids[i]), seg.refine[i]))
                pos += 1
        rows.sort(key=lambda r: r[:2])
        cand = rows[:max(candidates, k)]
        if not cand:
            continue
        refined = rescore(tier.kernel, refine_table, np.stack([r[3] for r in cand]))
        ranked = sorted(zip((-float(v) for v in refined), (r[1] for r in cand), (r[2] for r in cand)))[:k]
        out.extend((score, shard, pos, fid) for score, pos, fid in ranked)
    out.sort()
    return [(fid, -score, shard) for score, shard, _, fid in out[:k]]


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
