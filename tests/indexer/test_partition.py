"""Cell partitions (facepq_core.partition): written by the real IndexWriter, served by the real IndexView."""
from __future__ import annotations

import numpy as np
import pytest

from facepq_core.codes import CodeSpec
from facepq_core.errors import ConfigError, IndexFormatError
from indexer.commit import compact, delete_faces
from indexer.manifest import ModelMeta
from indexer.partition_store import load_partition
from indexer.segment import open_segment
from indexer.store import IndexStore
from indexer.writer import IndexWriter
from query_node.index_view import load_view
from tests.support.index import clustered_codes, dyadic_lut

M, K, CELLS = 8, 256, 16


def write_index(path, rng, rows=4000, cells=CELLS, spec=CodeSpec(M, K), shards=2, segment_rows=900, codewords=None):
    meta = ModelMeta.from_code_spec(spec, fingerprint="f" * 16, trunk="test")
    ids = rng.choice(2**62, size=rows, replace=False).astype(np.uint64)
    codes = clustered_codes(rng, rows, spec)
    writer = IndexWriter(str(path), meta, shard_count=shards, segment_rows=segment_rows, cells=cells,
                         codewords=codewords)
    writer.add(ids, [f"p{i % 40}" for i in range(rows)], [f"s{i}" for i in range(rows)], codes)
    writer.commit("test")
    return meta, ids, codes


def hits_of(view, luts, k, nprobe, stats=None):
    return [[(h.face_id, h.score, h.shard) for h in q]
            for q in view.search(luts, k, view.serving_shards(), stats, nprobe=nprobe)]


def same_answer_up_to_ties(a, b) -> bool:
    """Two top-k lists of (face_id, score, shard) that may number rows differently (a merge regroups them):
    the same scores, and the same faces above the k-th score; which of the faces tied at the k-th score made
    the list follows row order, so those may differ."""
    scores = sorted(s for _, s, _ in a)
    if scores != sorted(s for _, s, _ in b):
        return False
    last = scores[0] if scores else None
    return {h for h in a if h[1] > last} == {h for h in b if h[1] > last}


def assert_grouped(store):
    """Every segment's rows are grouped by the cell the partition assigns their codes, offsets exact."""
    manifest = store.load_manifest()
    partition = load_partition(store, manifest.model)
    checked = 0
    for ref in manifest.segments:
        seg = open_segment(store, ref, model=manifest.model)
        cells = partition.assign(seg.codes)
        assert seg.cell_offsets is not None
        assert (np.diff(cells) >= 0).all()
        assert np.array_equal(seg.cell_offsets, np.concatenate(([0], np.cumsum(np.bincount(cells, minlength=partition.cells)))))
        checked += seg.rows
    return checked


def test_nprobe_all_is_exhaustive_and_fewer_cells_a_subset_scored_identically(tmp_path):
    rng = np.random.default_rng(1)
    write_index(tmp_path / "idx", rng)
    store = IndexStore(str(tmp_path / "idx"))
    manifest = store.load_manifest()
    assert manifest.model.partition.cells == CELLS and manifest.format_version == 4
    assert assert_grouped(store) == 4000
    view = load_view(store, [0, 1])
    luts = np.stack([dyadic_lut(rng, M, K) for _ in range(6)])
    k = 50
    exhaustive = hits_of(view, luts, k, 0)
    assert hits_of(view, luts, k, CELLS) == exhaustive
    assert hits_of(view, luts, k, CELLS + 5) == exhaustive
    for q in range(len(luts)):  # one query at a time: exactly its nprobe cells
        full = dict((fid, score) for fid, score, _ in hits_of(view, luts[q:q + 1], 4000, 0)[0])
        for nprobe in (1, 4):
            part = hits_of(view, luts[q:q + 1], k, nprobe)[0]
            assert part and all(full[fid] == score for fid, score, _ in part)  # same rows, same scores
            # and they are the best of the rows in the scanned cells: the exhaustive order restricted to them
            scanned = set(view.probe_cells(luts[q:q + 1], nprobe)[0].tolist())
            expected = [fid for fid, _, _ in hits_of(view, luts[q:q + 1], 4000, 0)[0]
                        if _cell_of(view, store, fid) in scanned][:k]
            assert [fid for fid, _, _ in part] == expected


def test_a_batch_of_queries_with_nprobe_answers_each_query_as_it_would_alone(tmp_path):
    """Each query of a batch scans its own cells: scanning the union of the batch's cells answered a query
    with rows of its neighbours' cells (so its answer depended on the batch) and multiplied the work."""
    from query_node.shard_search import ScanStats

    rng = np.random.default_rng(3)
    write_index(tmp_path / "idx", rng)
    view = load_view(IndexStore(str(tmp_path / "idx")), [0, 1])
    luts = np.stack([dyadic_lut(rng, M, K) for _ in range(8)])
    assert view.probes(1) and not view.probes(0) and not view.probes(CELLS)
    for nprobe in (1, 4):
        alone, rows_alone = [], 0
        for q in range(len(luts)):
            stats = ScanStats()
            alone += hits_of(view, luts[q:q + 1], 30, nprobe, stats)
            rows_alone += stats.rows
        stats = ScanStats()
        assert hits_of(view, luts, 30, nprobe, stats) == alone
        assert stats.rows == rows_alone   # the same rows as the queries alone: no union scanned for all


def _cell_of(view, store, fid):
    for data in view.shards.values():
        for seg in data.segments:
            rows = np.flatnonzero(seg.face_ids == np.uint64(fid))
            if rows.size:
                return int(np.searchsorted(seg.cell_offsets, rows[0], side="right") - 1)
    raise AssertionError(fid)


def test_enrol_into_a_partitioned_index_lands_in_its_cell(tmp_path):
    rng = np.random.default_rng(2)
    meta, _, _ = write_index(tmp_path / "idx", rng)
    store = IndexStore(str(tmp_path / "idx"))
    partition = load_partition(store, store.load_manifest().model)
    writer = IndexWriter(str(tmp_path / "idx"), meta)  # a model from a checkpoint names no partition: adopted
    new_codes = clustered_codes(rng, 30, CodeSpec(M, K))
    new_ids = np.arange(1, 31, dtype=np.uint64)
    writer.add(new_ids, ["new"] * 30, [f"n{i}" for i in range(30)], new_codes)
    writer.commit("enrol")
    assert assert_grouped(store) == 4030
    want = dict(zip(new_ids.tolist(), partition.assign(new_codes).tolist()))
    view = load_view(store, [0, 1])
    assert {fid: _cell_of(view, store, fid) for fid in want} == want
    with pytest.raises(ConfigError, match="cells are chosen when an index is created"):
        IndexWriter(str(tmp_path / "idx"), meta, cells=CELLS * 2)


def test_delete_and_compaction_keep_cells_valid(tmp_path):
    rng = np.random.default_rng(3)
    _, ids, _ = write_index(tmp_path / "idx", rng)
    store = IndexStore(str(tmp_path / "idx"))
    luts = np.stack([dyadic_lut(rng, M, K) for _ in range(4)])
    gone = ids[::7]
    delete_faces(store, face_ids=gone)
    before = hits_of(load_view(store, [0, 1]), luts, 30, 3)
    assert not {fid for q in before for fid, _, _ in q} & set(gone.tolist())
    stats = compact(store, grace_seconds=0)
    assert stats.rows_removed == len(gone)
    assert assert_grouped(store) == len(ids) - len(gone)
    view = load_view(store, [0, 1])
    assert hits_of(view, luts, 30, CELLS) == hits_of(view, luts, 30, 0)
    # same scores and faces as before compaction (row numbers, hence tie order, may differ)
    after = hits_of(view, luts, 30, 3)
    assert [same_answer_up_to_ties(a, b) for a, b in zip(after, before)] == [True] * len(before)


def test_index_info_reports_how_evenly_the_cells_are_filled(tmp_path):
    """`facepq index info` counts each cell's rows over every segment: what the partition assigns the codes."""
    from indexer.info import index_info
    from tests.support.processes import run_cli

    rng = np.random.default_rng(11)
    _, _, codes = write_index(tmp_path / "idx", rng)
    store = IndexStore(str(tmp_path / "idx"))
    sizes = np.bincount(load_partition(store, store.load_manifest().model).assign(codes), minlength=CELLS)
    cells = index_info(str(tmp_path / "idx"))["cells"]
    assert cells == {"cells": CELLS, "largest_rows": int(sizes.max()), "mean_rows": 4000 / CELLS,
                     "largest_over_mean": sizes.max() / (4000 / CELLS), "empty": int((sizes == 0).sum())}
    proc = run_cli("index", "info", "--index", tmp_path / "idx")
    assert proc.returncode == 0, proc.stderr
    assert f"rows per cell: mean 250.0, largest {sizes.max()} ({sizes.max() / 250:.1f}x the mean)" in proc.stdout
    assert "cells" not in index_info(str(write_unpartitioned(tmp_path / "plain", rng)))


def write_unpartitioned(path, rng):
    write_index(path, rng, rows=500, cells=None)
    return path


def test_index_without_cells_serves_every_nprobe_exhaustively(tmp_path):
    rng = np.random.default_rng(4)
    write_index(tmp_path / "idx", rng, cells=None)
    store = IndexStore(str(tmp_path / "idx"))
    manifest = store.load_manifest()
    assert manifest.model.partition is None and manifest.format_version == 2
    view = load_view(store, [0, 1])
    luts = np.stack([dyadic_lut(rng, M, K) for _ in range(3)])
    assert not view.probes(2)
    assert hits_of(view, luts, 20, 2) == hits_of(view, luts, 20, 0)


def test_four_bit_codes_partition_too(tmp_path):
    rng = np.random.default_rng(5)
    spec = CodeSpec(16, 16)
    write_index(tmp_path / "idx", rng, spec=spec, cells=8)
    store = IndexStore(str(tmp_path / "idx"))
    assert assert_grouped(store) == 4000
    view = load_view(store, [0, 1])
    luts = np.stack([dyadic_lut(rng, 16, 16) for _ in range(2)])
    assert hits_of(view, luts, 20, 8) == hits_of(view, luts, 20, 0)
    full = {fid: s for fid, s, _ in hits_of(view, luts[:1], 4000, 0)[0]}
    assert all(full[fid] == s for fid, s, _ in hits_of(view, luts[:1], 20, 2)[0])


def test_a_partition_of_another_model_or_altered_is_refused(tmp_path):
    rng = np.random.default_rng(6)
    write_index(tmp_path / "idx", rng)
    store = IndexStore(str(tmp_path / "idx"))
    model = store.load_manifest().model
    from dataclasses import replace

    from indexer import partition_store

    partition_store._CACHE.clear()
    with pytest.raises(IndexFormatError, match="another model|partitions codes of model"):
        load_partition(store, replace(model, fingerprint="e" * 16))
    path = tmp_path / "idx" / model.partition.path
    path.write_bytes(path.read_bytes()[:-10])
    partition_store._CACHE.clear()  # a process that never read it: a node starting on the altered file
    partition_store._PROBES.clear()
    with pytest.raises(IndexFormatError, match="sha256"):
        load_view(store, [0, 1])


def test_too_few_faces_for_the_cells_is_a_config_error(tmp_path):
    rng = np.random.default_rng(7)
    with pytest.raises(ConfigError, match="need at least"):
        write_index(tmp_path / "idx", rng, rows=10, cells=32)
    assert not IndexStore(str(tmp_path / "idx")).exists()



def test_cells_are_fitted_where_codes_decode_to():
    """With codewords, sub-codes that decode to the same point are one place: faces whose codes differ only
    among such sub-codes share a cell; one-hot (no codewords) cannot see that."""
    from facepq_core.partition import CellPartition

    rng = np.random.default_rng(9)
    spec = CodeSpec(4, 256)
    groups = rng.standard_normal((4, 16, 2)).astype(np.float32) * 10  # 16 far-apart points per subspace
    codewords = groups[:, np.arange(256) // 16]  # sub-code k decodes to point k // 16 of its subspace
    centre = rng.integers(0, 16, size=(8, 4))  # 8 clusters of decoded points
    which = rng.integers(0, 8, size=4000)
    sub = (centre[which] * 16 + rng.integers(0, 16, size=(4000, 4))).astype(np.uint8)  # any code of the point
    part = CellPartition.fit(sub, spec, 8, "f" * 16, codewords)
    cells = part.assign(sub)
    for c in range(8):  # each cluster lands in exactly one cell
        assert len(set(cells[which == c].tolist())) == 1
    assert len(set(cells.tolist())) == 8
    # the probe ranks first the cell whose faces a query scores best
    table = np.zeros((4, 256), np.float32)
    table[np.arange(4)[:, None], centre[3][:, None] * 16 + np.arange(16)] = 1.0  # high on cluster 3's sub-codes
    assert part.probe(table[None], 1)[0].tolist() == [int(cells[which == 3][0])]


def test_assignment_is_the_nearest_centroid_and_seeds_are_spread():
    """`assign` (one matrix product per block, constants folded in) is the brute-force nearest centroid, across
    block boundaries; and the k-means++ seeds, drawn from a subsample when the sample is large, still give every
    one of many well-separated clusters its own cell."""
    from facepq_core.codes import pack_codes, unpack_codes
    from facepq_core.partition import SEED_SAMPLE_PER_CELL, CellPartition

    rng = np.random.default_rng(21)
    spec = CodeSpec(4, 16)
    codewords = (rng.standard_normal((4, 16, 2)) * 10).astype(np.float32)
    centre = rng.integers(0, 16, size=(64, 4))  # 64 clusters of one code each, 40 faces each
    assert len({tuple(c) for c in centre.tolist()}) == 64
    which = np.repeat(np.arange(64), 40)
    assert len(which) > SEED_SAMPLE_PER_CELL * 64  # seeded on a subsample
    codes = pack_codes(centre[which].astype(np.uint8), spec)
    part = CellPartition.fit(codes, spec, 64, "f" * 16, codewords)
    cells = part.assign(codes)
    assert len(set(cells.tolist())) == 64 and all(len(set(cells[which == c].tolist())) == 1 for c in range(64))

    other = pack_codes(rng.integers(0, 16, size=(10000, 4), dtype=np.uint8), spec)  # > one assignment block
    x = part.decode(unpack_codes(other, spec).astype(np.intp))
    dist = np.square(x[:, None, :] - part.centroids[None]).sum(-1)
    best = np.sort(dist, axis=1)
    clear = best[:, 1] - best[:, 0] > 1e-3 * best[:, 1]  # the formulations may round differently on near-ties
    assert clear.mean() > 0.9
    assert np.array_equal(part.assign(other)[clear], np.argmin(dist, axis=1)[clear])


def test_codec_codewords_decode_to_their_head_space():
    """Each codec's codewords are the points its sub-codes stand for: encoding a codeword gives its own code."""
    from facepq_core.codecs.binary import BinaryCodec
    from facepq_core.codecs.pq import PQCodec

    rng = np.random.default_rng(10)
    pq = PQCodec(np.eye(16, dtype=np.float32), np.zeros(16, np.float32), rng.standard_normal((4, 16, 4)))
    words = pq.codewords()
    assert words.shape == (4, 16, 4)
    x = rng.standard_normal((20, 16)).astype(np.float32)
    z = pq.rotated(x)  # the space the codes quantize: each sub-code is its nearest codeword there
    nearest = np.argmin(((z[:, :, None, :] - words[None]) ** 2).sum(-1), axis=2)
    assert (pq._sub_codes(x) == nearest).all()
    binary = BinaryCodec(np.eye(16, dtype=np.float32), np.zeros(16, np.float32), normalize=False)
    assert binary.codewords().shape == (2, 256, 8)
    signs = binary.codewords()[np.arange(2), binary.encode(rng.standard_normal((1, 16)))[0]].reshape(-1)
    assert (signs == np.sign(binary.project(np.asarray(signs[None], np.float32))[0])).all()


@pytest.mark.parametrize("kind", ["pq-ip", "l2", "onehot"])
def test_probe_ranks_cells_by_their_faces_mean_score(kind):
    """The probe's fast form (tables fitted on codeword features) equals the mean score over the histograms
    for tables affine in those features: inner products, L2 distances, and any table when sub-codes are
    one-hot."""
    from facepq_core.partition import CellPartition

    rng = np.random.default_rng(11)
    spec = CodeSpec(8, 256)
    words = None if kind == "onehot" else rng.standard_normal((8, 256, 4)).astype(np.float32)
    codes = clustered_codes(rng, 3000, spec)
    part = CellPartition.fit(codes, spec, 32, "f" * 16, words)
    q = rng.standard_normal((5, 8, 4)).astype(np.float32)
    if kind == "pq-ip":
        tables = np.einsum("qmd,mkd->qmk", q, words)
    elif kind == "l2":
        tables = -np.square(q[:, :, None, :] - words[None]).sum(-1)
    else:
        tables = rng.standard_normal((5, 8, 256)).astype(np.float32)
    exact = part.mean_scores(tables)
    prober = part.prober()
    assert (prober.phi_pinv is None) == (kind == "onehot")  # features only where they are the cheaper form
    fast = prober.scores(tables)
    np.testing.assert_allclose(fast, exact, rtol=1e-3, atol=1e-3 * np.abs(exact).max())
    for qi in range(5):  # the probed cells are the best by the exact mean score (up to float ties)
        got = part.probe(tables[qi:qi + 1], 4)[0]
        assert exact[qi, got].min() >= np.sort(exact[qi])[-4] - 1e-3 * np.abs(exact).max()


def test_a_node_keeps_only_the_probe(tmp_path):
    """The view holds the probe (a few floats per cell), not the partition's histograms or centroids."""
    from indexer import partition_store

    rng = np.random.default_rng(12)
    write_index(tmp_path / "idx", rng, codewords=rng.standard_normal((M, K, 4)).astype(np.float32))
    store = IndexStore(str(tmp_path / "idx"))
    partition_store._CACHE.clear()
    partition_store._PROBES.clear()
    view = load_view(store, [0, 1])
    assert not partition_store._CACHE  # read, turned into a probe, dropped
    partition = load_partition(store, store.load_manifest().model)
    assert view.cell_probe.cells == CELLS and view.cell_probe.nbytes < partition.histograms.nbytes
    luts = np.stack([dyadic_lut(rng, M, K) for _ in range(3)])
    assert np.array_equal(view.cell_probe.probe(luts, 3), partition.probe(luts, 3))


def test_wide_codewords_are_fitted_on_their_leading_directions():
    """Codewords wider than MAX_CODEWORD_DIMS are projected per subspace: faces are grouped as before when the
    codewords' spread lies in a few directions (here 3 of 64)."""
    from facepq_core.partition import MAX_CODEWORD_DIMS, CellPartition

    rng = np.random.default_rng(13)
    spec = CodeSpec(4, 256)
    basis = np.linalg.qr(rng.standard_normal((64, 64)))[0][:, :3].T  # 3 directions in 64 dims
    groups = (rng.standard_normal((4, 16, 3)) * 10) @ basis  # 16 far-apart points per subspace, 64-d
    codewords = (groups[:, np.arange(256) // 16] + 0.01 * rng.standard_normal((4, 256, 64))).astype(np.float32)
    centre = rng.integers(0, 16, size=(8, 4))
    which = rng.integers(0, 8, size=4000)
    sub = (centre[which] * 16 + rng.integers(0, 16, size=(4000, 4))).astype(np.uint8)
    part = CellPartition.fit(sub, spec, 8, "f" * 16, codewords)
    assert part.codewords.shape == (4, 256, MAX_CODEWORD_DIMS)
    cells = part.assign(sub)
    assert all(len(set(cells[which == c].tolist())) == 1 for c in range(8)) and len(set(cells.tolist())) == 8


def test_merging_small_segments_keeps_cells_valid(tmp_path):
    from indexer.upkeep import MergePolicy, merge_small_segments

    rng = np.random.default_rng(14)
    write_index(tmp_path / "idx", rng, rows=3000, segment_rows=200)  # 8 segments per shard
    store = IndexStore(str(tmp_path / "idx"))
    luts = np.stack([dyadic_lut(rng, M, K) for _ in range(3)])
    before = hits_of(load_view(store, [0, 1]), luts, 25, 0)
    segments = len(store.load_manifest().segments)
    stats = merge_small_segments(store, MergePolicy(fanout=2))
    assert stats.merges and len(store.load_manifest().segments) < segments
    assert assert_grouped(store) == 3000
    view = load_view(store, [0, 1])
    assert [same_answer_up_to_ties(a, b) for a, b in zip(hits_of(view, luts, 25, 0), before)] == [True] * 3
    assert hits_of(view, luts, 25, CELLS) == hits_of(view, luts, 25, 0)
