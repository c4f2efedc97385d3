"""Helpers for query_node tests: small random-code indexes and real server subprocesses."""
from __future__ import annotations

import numpy as np

from facepq.server_process import REPO_ROOT, ServerProcess  # noqa: F401 (REPO_ROOT re-exported)


def build_index(path, rows=3000, shard_count=3, M=8, K=256, seed=0, segments_per_shard=2):
    """An index of random codes written by the real IndexWriter; returns (ModelMeta, face_ids, codes)."""
    from indexer.manifest import ModelMeta
    from indexer.writer import IndexWriter
    from opqn_model.codes import CodeSpec, pack_codes

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


class Proc(ServerProcess):
    """A `facepq ...` subprocess that printed its 'listening on ADDR' line (see facepq.server_process)."""

    def __init__(self, args, timeout=60):
        super().__init__(args, timeout=timeout)


def node(index, shards, *extra):
    return Proc(["node", "--index", str(index), "--shards", ",".join(map(str, shards)), "--port", "0", *extra])


def brute_force(index_path, lut, k):
    """Reference: score every live row of every shard with opqn_model.codes.score_codes, global order."""
    from indexer.segment import open_segment
    from indexer.store import IndexStore
    from opqn_model.codes import score_codes

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
