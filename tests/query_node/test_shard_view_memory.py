"""A node's resident memory holds its codes, not the segment metadata (face_id, person, source).

The metadata columns are advised random-access, and a node reads them with positional reads
(hit lookups, tombstone masks), never through the map: measured per page with
/proc/self/pagemap in-process, and with /proc/PID/smaps for a real node process.
"""
import os
import sys

import numpy as np
import pytest

from tests.support.index import build_index
from tests.support.memory import node_holds_code_blocks, smaps_mapped_kb
from tests.support.memory import smaps_rss as _smaps_rss

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="residency is read from /proc"),
              pytest.mark.timeout(180)]


def _segment_vmas(paths):
    """[(VmFlags words, size kB)] of this process's mappings of the given files, from /proc/self/smaps."""
    out, current, size = [], None, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and ":" not in parts[0]:
                current = parts[5] if len(parts) > 5 and parts[5] in paths else None
            elif current and parts[0] == "Size:":
                size = int(parts[1])
            elif current and parts[0] == "VmFlags:":
                out.append((set(parts[1:]), size))
    return out


def test_metadata_is_advised_random_and_codes_keep_readahead(tmp_path):
    """Codes read through the map (row-major: what a node scans unless it keeps `CodeBlocks`, whose map pages
    are released instead, tests/query_node/test_code_blocks.py) keep the default readahead."""
    from indexer.store import IndexStore
    from query_node.index_view import load_view

    index = tmp_path / "idx"
    build_index(index, rows=60_000, shard_count=1, segments_per_shard=1)  # ~0.5 MB of codes, more metadata
    store = IndexStore(str(index))
    view = load_view(store, [0], code_blocks=False)
    seg = view.shards[0].segments[0]
    path = str(store.local_path(seg.ref.path))
    vmas = _segment_vmas({path})
    assert vmas, f"{path} is not memory-mapped"
    random = sum(size for flags, size in vmas if "rr" in flags)
    sequential = sum(size for flags, size in vmas if "rr" not in flags)
    # face_ids alone are 8 bytes a row; the codes (8 bytes a row) stay with the default readahead
    assert random * 1024 >= seg.face_ids.nbytes
    assert sequential * 1024 >= seg.codes.nbytes - 4096


# ---------------------------------------------------------------- metadata stays out of the node's RSS
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _resident_pages(address: int, size: int) -> int:
    """Pages of [address, address + size) mapped into this process: the present bit of /proc/self/pagemap.

    Not mincore: for a file map it reports the page cache, which positional reads fill too and
    which is not the process's RSS; a page table entry is.
    """
    if size <= 0:
        return 0
    first, last = address // _PAGE, (address + size - 1) // _PAGE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read(8 * (last - first + 1)), dtype="<u8")
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum())


def _metadata_pages(seg) -> tuple[int, int]:
    """(address, size) of the whole pages holding only face_id, person and source bytes: the pages at
    either end are shared with the IPC message header and the first codes, which a scan touches."""
    bufs = [seg.batch.column(0).buffers()[1]] + [b for col in (seg.persons, seg.sources)
                                                 for b in col.buffers() if b is not None]
    lo = min(b.address for b in bufs)
    hi = max(b.address + b.size for b in bufs)
    assert hi <= seg.codes.ctypes.data, "expected the code column after the metadata in the file"
    start = -(-lo // _PAGE) * _PAGE
    return start, hi // _PAGE * _PAGE - start


def _code_pages(seg) -> tuple[int, int]:
    start = -(-seg.codes.ctypes.data // _PAGE) * _PAGE
    return start, (seg.codes.ctypes.data + seg.codes.nbytes) // _PAGE * _PAGE - start


def _expected(ids):
    """face_id -> (person, source) as build_index wrote them."""
    return {int(f): (f"p{i % 50}", f"src{i}") for i, f in enumerate(ids)}


@pytest.fixture(scope="module")
def big_index(tmp_path_factory):
    """One shard, one segment of 120k rows: 0.9 MiB of codes, ~3 MiB of ids, names and sources."""
    path = tmp_path_factory.mktemp("mem") / "idx"
    _, ids, _ = build_index(path, rows=120_000, shard_count=1, segments_per_shard=1)
    return path, ids


@pytest.mark.parametrize("code_blocks", [False, True], ids=["row-major", "blocks"])
def test_hit_lookups_leave_no_metadata_pages_resident(big_index, code_blocks):
    """300 searches whose top-100 hits land on ~27k different rows: not one whole page of face ids, names or
    sources is mapped into the process. Row-major codes are resident (the scan reads them through the map);
    codes kept as `CodeBlocks` are not (their map pages were released and the scan reads the blocks)."""
    from indexer.store import IndexStore
    from query_node.index_view import load_view

    path, ids = big_index
    view = load_view(IndexStore(str(path)), [0], code_blocks=code_blocks)
    seg = view.shards[0].segments[0]
    meta_at, meta_size = _metadata_pages(seg)
    assert meta_size >= 500 * _PAGE  # the check below spans the file's metadata, not a sliver of it
    assert _resident_pages(meta_at, meta_size) == 0, "opening the view already touched metadata"
    rng = np.random.default_rng(7)
    expected, seen = _expected(ids), set()
    for _ in range(30):
        luts = rng.standard_normal((10, 8, 256)).astype(np.float32)
        for hits in view.search(luts, 100, [0]):
            assert len(hits) == 100
            for h in hits:
                assert (h.person, h.source) == expected[h.face_id]
                seen.add(h.face_id)
    assert len(seen) > 20_000
    code_at, code_size = _code_pages(seg)
    if code_blocks:
        assert _resident_pages(code_at, code_size) == 0
    else:
        assert _resident_pages(code_at, code_size) * _PAGE >= 0.9 * code_size  # the measurement sees the map
    assert _resident_pages(meta_at, meta_size) == 0


def test_tombstone_masks_are_computed_without_mapping_the_face_id_column(tmp_path):
    from indexer.commit import delete_faces
    from indexer.store import IndexStore
    from query_node.index_view import load_view

    path = tmp_path / "idx"
    _, ids, _ = build_index(path, rows=60_000, shard_count=1, segments_per_shard=1)
    store = IndexStore(str(path))
    dead = ids[::3]
    delete_faces(store, face_ids=[int(i) for i in dead])
    view = load_view(store, [0])
    data = view.shards[0]
    seg, skip = data.segments[0], data.skips[0]
    expected = np.isin(np.asarray(ids), dead)  # build_index writes rows in insertion order
    id_order = {int(f): i for i, f in enumerate(ids)}
    rows = np.arange(seg.rows)
    fids, _, _ = seg.hit_metadata(rows)
    np.testing.assert_array_equal(skip, expected[[id_order[int(f)] for f in fids]])
    assert data.live_rows == len(ids) - len(dead)
    ids_at = -(-seg.face_ids.ctypes.data // _PAGE) * _PAGE
    ids_size = (seg.face_ids.ctypes.data + seg.face_ids.nbytes) // _PAGE * _PAGE - ids_at
    assert ids_size >= 100 * _PAGE
    assert _resident_pages(ids_at, ids_size) == 0


def test_hit_metadata_reads_the_same_rows_as_the_arrays_local_and_remote(tmp_path):
    """Positional reads (local file) and the in-memory arrays (a pyarrow filesystem that is not local)
    agree with what was written, names outside ASCII included, in any row order with repeats."""
    import pyarrow.fs as pafs

    from facepq_core.codes import CodeSpec
    from indexer.manifest import ModelMeta
    from indexer.segment import open_segment, write_segment
    from indexer.store import IndexStore

    meta = ModelMeta.from_code_spec(CodeSpec(8, 256), fingerprint="f" * 16, trunk="test")
    n = 5000
    rng = np.random.default_rng(3)
    ids = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # distinct (odd factor), high bits set
    persons = [f"Zoë Ångström-{i % 97}" if i % 5 else "" for i in range(n)]
    sources = [f"/photos/日本/{i}.jpg" for i in range(n)]
    codes = rng.integers(0, 256, size=(n, 8), dtype=np.uint8)
    local = IndexStore(str(tmp_path / "idx"))
    ref = write_segment(local, 0, ids, persons, sources, codes, meta)
    remote = IndexStore("idx", filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()))
    rows = np.concatenate([rng.integers(0, n, size=300), [0, n - 1, 0]])
    for store, pread in ((local, True), (remote, False)):
        seg = open_segment(store, ref, model=meta)
        assert (seg.reader is not None) == pread
        for some in (rows, rows[:1], rows[:0]):
            got_ids, got_persons, got_sources = seg.hit_metadata(some)
            assert got_ids.dtype == np.uint64
            np.testing.assert_array_equal(got_ids, ids[some])
            assert got_persons == [persons[r] for r in some] and got_sources == [sources[r] for r in some]
        np.testing.assert_array_equal(seg.tombstone_mask(ids[rows], chunk_rows=777), np.isin(ids, ids[rows]))
        assert not seg.tombstone_mask(set()).any()
        with pytest.raises(IndexError):
            seg.hit_metadata([n])


def _page_cached_fraction(path: str) -> float:
    """Fraction of a file's pages in the page cache: mincore over a fresh map that touches none of them."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    pages = -(-size // _PAGE)
    libc = ctypes.CDLL(None, use_errno=True)
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = np.frombuffer(m, dtype=np.uint8)
        rc = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec)
        del view
    assert rc == 0, os.strerror(ctypes.get_errno())
    return sum(b & 1 for b in vec) / pages


def test_a_verified_segment_stays_in_the_page_cache_for_hit_lookups(tmp_path):
    """Opening a segment reads it whole for its checksum; those pages stay in the page cache (not in the
    node's memory), so hit lookups (positional reads) do not each wait for the disk."""
    from indexer.store import IndexStore
    from query_node.index_view import load_view

    path = tmp_path / "idx"
    build_index(path, rows=300_000, shard_count=1, segments_per_shard=1)
    store = IndexStore(str(path))
    seg_path = store.local_path(store.load_manifest().shards[0].segments[0].path)
    with open(seg_path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # as after a reboot
    assert _page_cached_fraction(seg_path) < 0.5
    load_view(store, [0], verify=True)
    assert _page_cached_fraction(seg_path) > 0.95


def test_a_segment_truncated_in_place_while_served_fails_hit_lookups_with_segment_corrupt(tmp_path):
    from indexer.errors import SegmentCorrupt
    from indexer.store import IndexStore
    from query_node.index_view import load_view

    path = tmp_path / "idx"
    build_index(path, rows=20_000, shard_count=1, segments_per_shard=1)
    store = IndexStore(str(path))
    seg = load_view(store, [0]).shards[0].segments[0]
    fid, _, _ = seg.hit_metadata([0])
    os.truncate(store.local_path(seg.ref.path), 64)  # an operator's mistake: writers rename new files in
    with pytest.raises(SegmentCorrupt, match="truncated"):
        seg.hit_metadata([seg.rows - 1])


def test_a_string_offset_altered_in_place_fails_hit_lookups_with_segment_corrupt(tmp_path):
    """Each string's offsets are checked against its column before the string is read."""
    from indexer.errors import SegmentCorrupt
    from indexer.store import IndexStore
    from query_node.index_view import load_view

    path = tmp_path / "idx"
    build_index(path, rows=2000, shard_count=1, segments_per_shard=1)
    store = IndexStore(str(path))
    seg = load_view(store, [0]).shards[0].segments[0]
    first, _, data_len = seg.reader._strings[0]  # the person column: row 5's end offset
    with open(store.local_path(seg.ref.path), "r+b") as f:
        f.seek(first + 4 * 6)
        f.write(np.int32(data_len + 1).tobytes())
    seg.hit_metadata([4])  # the rows around it still read
    with pytest.raises(SegmentCorrupt, match="bad string offset"):
        seg.hit_metadata([5])


def test_a_node_process_keeps_codes_resident_and_metadata_not_after_many_searches(big_index):
    """A real `facepq node` over gRPC: after 300 top-100 searches the segment file's map holds the
    codes and a few pages (IPC header, footer, the pages shared with the code column), no metadata."""
    from indexer.store import IndexStore
    from query_node.coordinator import Coordinator
    from query_node.registry import StaticRegistry
    from tests.support.processes import node

    path, ids = big_index
    store = IndexStore(str(path))
    ref = store.load_manifest().shards[0].segments[0]
    seg_path = os.path.realpath(store.local_path(ref.path))
    code_bytes = ref.rows * 8
    expected = _expected(ids)
    rng = np.random.default_rng(11)
    n = node(path, [0])
    try:
        coord = Coordinator(StaticRegistry([n.address]), shard_count=1)
        for _ in range(30):
            res = coord.search_tables(rng.standard_normal((10, 8, 256)).astype(np.float32), 100, timeout=30)
            assert res.complete
            assert all((h.person, h.source) == expected[h.face_id] for hits in res.hits for h in hits)
        meta_kb, total_kb = _smaps_rss(n.pid, seg_path)
        mapped_kb = smaps_mapped_kb(n.pid, seg_path)
    finally:
        n.kill()
    assert mapped_kb * 1024 >= code_bytes  # the measurement sees the map
    if node_holds_code_blocks(packed=False):   # AVX2: the codes are the node's blocks, their map pages released
        codes_in_map = 0
    else:
        codes_in_map = code_bytes
        assert total_kb * 1024 >= 0.9 * code_bytes  # the codes are there
    assert meta_kb * 1024 <= 2 * _PAGE  # the two pages shared with the header and the first codes
    assert total_kb * 1024 <= codes_in_map + 8 * _PAGE
