"""A node's memory after two-stage searches: the refinement tier is read for candidates, never held.

Measured as tests/query_node/test_shard_view_memory.py does: /proc/PID/smaps of a real `facepq node`
process, the resident kilobytes of its mappings of the segment file.
"""
import os
import sys

import numpy as np
import pytest

from tests.support.index import brute_force_two_stage, build_index, dyadic_lut, make_tier, random_refine_tables
from tests.support.memory import node_holds_code_blocks, smaps_mapped_kb, smaps_rss

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="residency is read from /proc"),
              pytest.mark.timeout(300)]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def test_a_node_holds_its_codes_not_its_refinement_rows_after_1000_two_stage_searches(tmp_path):
    """120k rows, 8-byte codes and 32-byte float16 refinement rows (4x the codes): after 1,000 two-stage
    searches of 500 candidates each (~400k candidate reads) the node's map of the segment holds the codes and
    a few pages; answers equal a brute-force re-scoring of the same candidates."""
    from indexer.store import IndexStore
    from query_node.coordinator import Coordinator
    from query_node.registry import StaticRegistry
    from tests.support.processes import node

    path = tmp_path / "idx"
    tier = make_tier("float16", dim=16)
    build_index(path, rows=120_000, shard_count=1, segments_per_shard=1, refine=tier)
    store = IndexStore(str(path))
    ref = store.load_manifest().shards[0].segments[0]
    seg_path = os.path.realpath(store.local_path(ref.path))
    code_bytes, refine_bytes = ref.rows * 8, ref.rows * tier.code_bytes
    rng = np.random.default_rng(13)
    n = node(path, [0])
    try:
        coord = Coordinator(StaticRegistry([n.address]), shard_count=1)
        for i in range(100):
            luts = np.stack([dyadic_lut(rng, 8, 256) for _ in range(10)])
            refine = random_refine_tables(rng, tier, 10)
            res = coord.search_tables(luts, 10, timeout=30, refine=(refine, 500))
            assert res.complete
            if i % 50 == 0:
                hits = [(h.face_id, h.score, h.shard) for h in res.hits[0]]
                assert hits == brute_force_two_stage(path, luts[0], refine[0], 500, 10)
        _, rss_kb = smaps_rss(n.pid, seg_path)
        mapped_kb = smaps_mapped_kb(n.pid, seg_path)
    finally:
        n.kill()
    assert mapped_kb * 1024 >= code_bytes + refine_bytes  # the measurement sees the map
    if node_holds_code_blocks(packed=False):   # AVX2: the codes are the node's blocks, their map pages released
        codes_in_map = 0
    else:
        codes_in_map = code_bytes
        assert rss_kb * 1024 >= 0.9 * code_bytes  # the codes are there
    # codes (if the map holds them) + the header, footer and boundary pages; a resident refinement column
    # would add 3.75 MiB
    assert rss_kb * 1024 <= codes_in_map + 8 * _PAGE < codes_in_map + refine_bytes / 10
