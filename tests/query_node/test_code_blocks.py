"""Codes held as 32-row blocks (query_node.code_blocks): the layout, and a node that scans them.

Where the 4-bit kernel runs AVX2, a node keeps an unpartitioned 4-bit index's codes as `CodeBlocks` in
place of the map's code pages; where no AVX-512 kernel scans 8-bit codes, their index's codes too. These
tests force the AVX2 kernels (`use_simd("avx2")`, or FACEPQ_SIMD=avx2 for a node process) so they run the
block path on AVX-512 CPUs too, and check answers against brute force, the map's pages against /proc, and
reuse across index versions.
"""
import os
import sys

import numpy as np
import pytest

from indexer.store import IndexStore
from query_node import fastscan
from query_node.code_blocks import CodeBlocks
from query_node.index_view import load_view
from tests.query_node.test_fastscan import _why_no_native
from tests.support.index import brute_force, build_index, dyadic_lut

pytestmark = pytest.mark.timeout(180)
native_only = pytest.mark.skipif(_why_no_native() is not None, reason=str(_why_no_native()))



@pytest.mark.parametrize("rows", [0, 1, 31, 32, 33, 1000, 70_000])
@pytest.mark.parametrize("width", [1, 3, 8, 16])
def test_blocks_hold_the_rows_column_by_column_and_give_them_back(rows, width):
    codes = np.random.default_rng(rows + width).integers(0, 256, size=(rows, width), dtype=np.uint8)
    blocks = CodeBlocks.of(codes)
    assert blocks.shape == (rows, width)
    assert blocks.blocks.shape == (-(-rows // 32), width, 32)
    np.testing.assert_array_equal(blocks.codes(), codes)
    if rows > 40:   # byte v of column c of block j is byte c of row 32j + v
        assert blocks.blocks[1, width - 1, 7] == codes[39, width - 1]
    if rows % 32:   # the padding rows of the last block are zero
        assert not blocks.blocks[-1, :, rows % 32:].any()


@pytest.mark.parametrize("chunk_rows", [32, 96, 1 << 20])
def test_blocks_are_built_chunk_by_chunk_and_report_each_chunk_once_in_order(chunk_rows):
    codes = np.random.default_rng(1).integers(0, 256, size=(1000, 8), dtype=np.uint8)
    calls = []
    blocks = CodeBlocks.of(codes, on_chunk=lambda first, stop: calls.append((first, stop)), chunk_rows=chunk_rows)
    np.testing.assert_array_equal(blocks.codes(), codes)
    edges = list(range(0, 1000, chunk_rows)) + [1000]
    assert calls == list(zip(edges[:-1], edges[1:]))


def test_blocks_refuse_what_is_not_a_code_matrix():
    with pytest.raises(ValueError, match="uint8"):
        CodeBlocks.of(np.zeros((4, 8), dtype=np.int32))
    with pytest.raises(ValueError, match="uint8"):
        CodeBlocks.of(np.zeros(8, dtype=np.uint8))
    with pytest.raises(ValueError, match="multiple of 32"):
        CodeBlocks.of(np.zeros((4, 8), dtype=np.uint8), chunk_rows=100)


@native_only
def test_the_block_kernel_checks_its_buffer_against_the_rows():
    from query_node import _fastscan

    blocks = np.zeros((2 * 32, 8), dtype=np.uint8)   # two blocks: 33..64 rows
    heap_s, heap_r = np.full((1, 5), -np.inf, np.float32), np.full((1, 5), np.iinfo(np.int64).max)
    args = (np.zeros((1, 8 * 256), np.float32), np.zeros((1, 8, 2, 32), np.uint8), np.zeros(1), np.ones(1),
            np.zeros(1, np.int32), np.zeros(1, np.uint8), False, 0, heap_s, heap_r, 5)
    with pytest.raises(ValueError, match="hold 512 bytes, expected 256 for 20 rows"):
        _fastscan.fs4_scan_blocks(blocks, 20, 8, *args)
    with pytest.raises(ValueError, match="rows must be >= 0"):
        _fastscan.fs4_scan_blocks(blocks, -1, 8, *args)
    _fastscan.fs4_scan_blocks(blocks, 64, 8, *args)   # the right row count scans


@native_only
def test_split_scans_of_blocks_equal_one_thread_with_tombstones(avx2):
    """Rows split over native threads at block boundaries, a partial last block, tombstones: same heaps."""
    from query_node.scan import TopKHeap, byte_tables, scan_tables

    rng = np.random.default_rng(3)
    codes = rng.integers(0, 256, size=(300_017, 8), dtype=np.uint8)
    skip = rng.random(len(codes)) < 0.1
    luts = rng.standard_normal((3, 16, 16)).astype(np.float32)
    blocks = CodeBlocks.of(codes)
    reference = TopKHeap(3, 50, native=False)
    reference.scan(codes, byte_tables(luts, True, 8), skip)
    for threads in (1, 2, 3):
        heap = TopKHeap(3, 50, threads=threads)
        heap.scan(blocks, scan_tables(luts, True, 8), skip)
        for got, want in zip(heap.result(), reference.result()):
            np.testing.assert_array_equal(got, want)


@native_only
@pytest.mark.parametrize("m, kk", [(16, 16), (8, 256)], ids=["4-bit", "8-bit"])
def test_prefetching_ahead_leaves_every_answer_as_it_was(avx2, m, kk):
    """A block kernel told its codes stream from memory prefetches ahead (the counter says it did): same heaps,
    threads and tombstones included, a partial last block."""
    from facepq_core.codes import CodeSpec, pack_codes
    from query_node.scan import TopKHeap, byte_tables, scan_tables

    rng = np.random.default_rng(5)
    spec = CodeSpec(M=m, K=kk)
    codes = pack_codes(rng.integers(0, kk, size=(200_017, m), dtype=np.uint8), spec)
    skip = rng.random(len(codes)) < 0.1
    lut = dyadic_lut(rng, m, kk)[None]
    reference = TopKHeap(1, 100, native=False)
    reference.scan(codes, byte_tables(lut, spec.packed, codes.shape[1]), skip)
    for threads in (1, 2):
        before = fastscan.streamed_calls()
        heap = TopKHeap(1, 100, threads=threads, stream=True)
        heap.scan(CodeBlocks.of(codes), scan_tables(lut, spec.packed, codes.shape[1]), skip)
        assert fastscan.streamed_calls() == before + threads   # one kernel run per thread's share, each streamed
        for got, want in zip(heap.result(), reference.result()):
            np.testing.assert_array_equal(got, want)


@native_only
def test_a_scan_streams_by_the_bytes_of_all_its_segments_for_one_query(avx2, monkeypatch):
    """Segments each smaller than the cache but together larger stream (the rule counts them all); a batch, or
    what the cache holds, does not. The cache size is set small here so that small segments show the rule."""
    from query_node.scan import scan_segments, scan_tables

    monkeypatch.setattr(fastscan, "last_level_cache_bytes", lambda: 1 << 20)
    rng = np.random.default_rng(7)
    segments = [(CodeBlocks.of(rng.integers(0, 256, size=(50_000, 8), dtype=np.uint8)), None) for _ in range(3)]
    luts = np.stack([dyadic_lut(rng, 16, 16) for _ in range(2)])

    def streamed(pieces, queries):
        before = fastscan.streamed_calls()
        scan_segments(pieces, scan_tables(luts[:queries], True, 8), 10)
        return fastscan.streamed_calls() - before

    assert streamed(segments, 1) == 3           # 1.2 MB in all: each segment's call streams
    assert streamed(segments, 2) == 0           # a batch never does
    assert streamed(segments[:2], 1) == 0       # 0.8 MB: the cache holds it


def test_only_one_query_over_more_codes_than_the_cache_holds_prefetches_unless_it_learned_to(monkeypatch):
    cache = fastscan.last_level_cache_bytes()
    assert cache >= 1 << 20   # read from /sys, or the 32 MiB default
    assert fastscan.streams(1, cache + 1)
    assert not fastscan.streams(1, cache)
    assert not fastscan.streams(2, 100 * cache)   # a batch's lookups bound the loop, not memory
    learner = fastscan.StreamLearner()
    monkeypatch.setattr(fastscan, "stream_learner", learner)
    between = (fastscan.LEARN_MIN_BYTES + cache) // 2
    assert fastscan.LEARN_MIN_BYTES < between <= cache
    learner.record("4-bit blocks", between, True, 1e-3)      # prefetching measured faster for this kernel and size
    learner.record("4-bit blocks", between, False, 2e-3)
    assert fastscan.streams(1, between, "4-bit blocks")
    assert not fastscan.streams(1, between)                   # no kernel named: the cache rule alone
    assert not fastscan.streams(1, fastscan.LEARN_MIN_BYTES, "4-bit blocks")   # small scans never prefetch
    assert not fastscan.streams(2, between, "4-bit blocks")
    assert not fastscan.streams(1, between, "8-bit blocks")   # another kernel learns on its own: untimed, off first


def test_the_stream_learner_times_both_choices_takes_the_faster_and_keeps_checking():
    learner = fastscan.StreamLearner(explore_every=4, weight=0.5)
    size = 8 << 20
    assert learner.choose("k", size) is False                 # untimed: the call without prefetches first
    learner.record("k", size, False, 4e-3)
    assert learner.choose("k", size) is True                  # then one with them
    learner.record("k", size, True, 2e-3)
    picks = [learner.choose("k", size) for _ in range(8)]     # calls 3..10: the faster (with), the other every 4th
    assert picks == [True, False, True, True, True, False, True, True]
    assert learner.choose("k", size + (1 << 20)) is True      # same power of two: the same class
    assert learner.choose("k", 2 * size) is False             # the next class is timed on its own
    for _ in range(3):                                        # the phase changes: prefetching turns slow
        learner.record("k", size, True, 8e-3)
    without, with_ = learner.costs()[("k", size.bit_length())]
    assert with_ > without
    assert [learner.choose("k", size) for _ in range(4)] == [True, False, False, False]   # calls 12..15: 12 explores
    with pytest.raises(ValueError, match="explore_every must be >= 2"):
        fastscan.StreamLearner(explore_every=1)


@native_only
def test_a_scan_in_the_learned_range_times_itself_and_answers_alike_either_way(avx2, monkeypatch):
    """A one-query scan of blocks between LEARN_MIN_BYTES and the cache takes the learner's choice and records its
    time under its kernel; its first call runs without prefetches, the second with, and both answer alike."""
    from query_node.scan import scan_segments, scan_tables

    learner = fastscan.StreamLearner()
    monkeypatch.setattr(fastscan, "stream_learner", learner)
    monkeypatch.setattr(fastscan, "LEARN_MIN_BYTES", 100_000)
    rng = np.random.default_rng(8)
    segments = [(CodeBlocks.of(rng.integers(0, 256, size=(50_000, 8), dtype=np.uint8)), None) for _ in range(2)]
    tables = scan_tables(dyadic_lut(rng, 16, 16)[None], True, 8)
    answers, streamed = [], []
    for _ in range(2):
        before = fastscan.streamed_calls()
        answers.append(scan_segments(segments, tables, 20))
        streamed.append(fastscan.streamed_calls() - before)
    assert streamed == [0, 2]   # off, then on (one streamed call a segment)
    without, with_ = learner.costs()[("4-bit blocks on 1 thread", (800_000).bit_length())]
    assert without > 0 and with_ > 0
    for got, want in zip(answers[1], answers[0]):
        np.testing.assert_array_equal(got, want)


def _resident_pages(address: int, size: int) -> int:
    from tests.query_node.test_shard_view_memory import _resident_pages as resident

    return resident(address, size)


def _view_of_blocks_answering_exactly(tmp_path, m: int, kk: int, rows: int, delete_every: int, seed: int):
    """An index of two shards with every `delete_every`-th face deleted, its view holding each segment's
    codes as blocks, and three searches of it equal to brute force, their codes read from the blocks.
    Returns (store, view, rng)."""
    from indexer.commit import delete_faces

    path = tmp_path / "idx"
    _, ids, codes = build_index(path, rows=rows, shard_count=2, M=m, K=kk)
    store = IndexStore(str(path))
    delete_faces(store, face_ids=[int(i) for i in ids[::delete_every]])
    stored = dict(zip(ids.tolist(), map(bytes, codes)))
    view = load_view(store, [0, 1])
    assert view.holds_blocks
    assert all(len(s.blocks) == len(s.segments) and all(b is not None for b in s.blocks) for s in view.shards.values())
    rng = np.random.default_rng(seed)
    for _ in range(3):
        lut = dyadic_lut(rng, m, kk)
        hits = view.search(lut[None], 40, [0, 1], with_codes=True)[0]
        assert [(h.face_id, h.score) for h in hits] == [r[:2] for r in brute_force(path, lut, 40)]
        assert all(h.code == stored[h.face_id] for h in hits)   # read from the blocks
    return store, view, rng


@native_only
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="residency is read from /proc")
def test_a_view_scans_blocks_with_the_maps_code_pages_released_and_answers_exactly(tmp_path, avx2):
    from tests.query_node.test_shard_view_memory import _code_pages

    store, view, rng = _view_of_blocks_answering_exactly(tmp_path, 15, 16, rows=60_000, delete_every=9, seed=4)
    pages = [_code_pages(seg) for shard in view.shards.values() for seg in shard.segments]
    assert sum(max(size, 0) for _, size in pages) > 80 * 4096   # the check spans the codes, not a sliver
    assert sum(_resident_pages(at, size) for at, size in pages) == 0   # the scans read the blocks, not the map
    for shard in view.shards.values():   # (reading the map faults its pages back in: after the check above)
        for seg, blocks in zip(shard.segments, shard.blocks):
            np.testing.assert_array_equal(blocks.codes(), seg.codes)
    row_major = load_view(store, [0, 1], code_blocks=False)
    assert not row_major.shards[0].blocks
    lut = dyadic_lut(rng, 15, 16)
    assert [h.face_id for h in row_major.search(lut[None], 40, [0, 1])[0]] == \
        [h.face_id for h in view.search(lut[None], 40, [0, 1])[0]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="residency is read from /proc")
def test_building_a_segments_blocks_holds_at_most_about_one_chunk_of_its_map(tmp_path):
    """Each chunk's map pages are released once copied: while the blocks of a 6.4 MB segment are built in
    128 KiB chunks, the map never holds more than a chunk and what one fault maps around it (a folio of
    the page cache, up to 2 MiB; 237 pages at most measured here), not the segment (1,562 pages)."""
    from tests.query_node.test_shard_view_memory import _code_pages

    path = tmp_path / "idx"
    build_index(path, rows=800_000, shard_count=1, M=16, K=16, segments_per_shard=1)
    seg = load_view(IndexStore(str(path)), [0], code_blocks=False).shards[0].segments[0]
    code_at, code_size = _code_pages(seg)
    assert code_size >= 1500 * 4096
    most = []

    def release(first, stop):
        seg.release_code_pages(first, stop)
        most.append(_resident_pages(code_at, code_size))

    blocks = CodeBlocks.of(seg.codes, on_chunk=release, chunk_rows=16_384)
    assert len(most) == 49 and max(most) <= 32 + 512, most   # 32 pages a chunk; a fault maps <= 512 more
    assert _resident_pages(code_at, code_size) == 0
    np.testing.assert_array_equal(blocks.codes(), seg.codes)


@native_only
def test_a_new_version_reuses_the_blocks_of_unchanged_segments(tmp_path, avx2):
    from indexer.commit import delete_faces

    path = tmp_path / "idx"
    _, ids, _ = build_index(path, rows=4000, shard_count=1, M=16, K=16)
    store = IndexStore(str(path))
    first = load_view(store, [0])
    delete_faces(store, face_ids=[int(ids[0])])   # new version, same segment files
    second = load_view(store, [0], previous=first)
    assert len(second.shards[0].blocks) == 2
    assert all(a is b for a, b in zip(first.shards[0].blocks, second.shards[0].blocks))


@native_only
def test_a_partitioned_index_keeps_row_major_codes_for_its_cell_gather(tmp_path, avx2):
    path = tmp_path / "idx"
    build_index(path, rows=4000, shard_count=1, M=16, K=16, cells=8)
    view = load_view(IndexStore(str(path)), [0])
    assert view.cell_probe is not None and not view.shards[0].blocks and not view.holds_blocks


@native_only
def test_an_8bit_index_on_avx2_is_held_as_blocks_and_answers_exactly(tmp_path, avx2):
    """The AVX2 8-bit kernel (nibble bounds, query_node.fastscan.bound8_tables) reads blocks too."""
    _view_of_blocks_answering_exactly(tmp_path, 8, 256, rows=5000, delete_every=7, seed=6)


@native_only
def test_8bit_codes_are_blocks_only_where_the_block_kernel_is_the_8bit_kernel(tmp_path):
    """Without a cap, this CPU's own choice: AVX-512 scans 8-bit codes row-major (q8_scan), AVX2 as blocks."""
    path = tmp_path / "idx"
    build_index(path, rows=2000, shard_count=1, M=8, K=256)
    blocks = load_view(IndexStore(str(path)), [0]).shards[0].blocks
    assert bool(blocks) == fastscan.blocks8_preferred() == (not fastscan.quantized8_available())


@native_only
def test_an_index_of_hamming_codes_keeps_row_major_codes_for_the_popcount_kernel(tmp_path, avx2):
    path = tmp_path / "idx"
    build_index(path, rows=2000, shard_count=1, M=8, K=256, codec="binary")
    assert not load_view(IndexStore(str(path)), [0]).shards[0].blocks


@native_only
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="residency is read from /proc")
@pytest.mark.parametrize("m, kk", [(16, 16), (8, 256)], ids=["4-bit", "8-bit"])
def test_a_node_process_on_avx2_holds_blocks_not_the_maps_code_pages(tmp_path, m, kk):
    """A real `facepq node` with FACEPQ_SIMD=avx2 over gRPC: exact answers, its start-up log names the block
    kernels, and after the searches the segment file's map holds a few pages (header, footer, pages shared
    with other columns), not the codes."""
    from query_node.coordinator import Coordinator
    from query_node.registry import StaticRegistry
    from tests.support.memory import smaps_mapped_kb, smaps_rss
    from tests.support.processes import ServerProcess

    path = tmp_path / "idx"
    build_index(path, rows=200_000, shard_count=1, M=m, K=kk, segments_per_shard=1)
    store = IndexStore(str(path))
    ref = store.load_manifest().shards[0].segments[0]
    seg_path = os.path.realpath(store.local_path(ref.path))
    rng = np.random.default_rng(11)
    node = ServerProcess(["node", "--index", str(path), "--shards", "0", "--port", "0"],
                         env={"FACEPQ_SIMD": "avx2"})
    try:
        coord = Coordinator(StaticRegistry([node.address]), shard_count=1)
        for _ in range(5):
            lut = dyadic_lut(rng, m, kk)
            res = coord.search_tables(lut[None], 30, timeout=30)
            assert res.complete
            assert [(h.face_id, h.score) for h in res.hits[0]] == [r[:2] for r in brute_force(path, lut, 30)]
        _, total_kb = smaps_rss(node.pid, seg_path)
        mapped_kb = smaps_mapped_kb(node.pid, seg_path)
    finally:
        node.kill()
    code_bytes = ref.rows * 8
    assert mapped_kb * 1024 >= code_bytes   # the measurement sees the map
    assert total_kb * 1024 <= 0.1 * code_bytes, f"{total_kb} kB of the file mapped for {code_bytes} code bytes"
    log = node.text()
    assert "unpartitioned indexes as 32-row blocks" in log, log[-2000:]
    assert "8-bit codes with avx2 (nibble bounds" in log, log[-2000:]
