"""A node's view marks segment metadata (face_id, person, source) as random-access, the codes not."""
import sys

import pytest

from tests.query_node.helpers import build_index

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise flags are read from /proc")


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
    from indexer.store import IndexStore
    from query_node.shard_view import load_view

    index = tmp_path / "idx"
    build_index(index, rows=60_000, shard_count=1, segments_per_shard=1)  # ~0.5 MB of codes, more metadata
    store = IndexStore(str(index))
    view = load_view(store, [0])
    seg = view.shards[0].segments[0]
    path = str(store.local_path(seg.ref.path))
    vmas = _segment_vmas({path})
    assert vmas, f"{path} is not memory-mapped"
    random = sum(size for flags, size in vmas if "rr" in flags)
    sequential = sum(size for flags, size in vmas if "rr" not in flags)
    # face_ids alone are 8 bytes a row; the codes (8 bytes a row) stay with the default readahead
    assert random * 1024 >= seg.face_ids.nbytes
    assert sequential * 1024 >= seg.codes.nbytes - 4096
