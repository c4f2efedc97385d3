"""A real query node serving 4-bit codes (two sub-codes per byte) answers exactly like brute force.

On an x86-64 CPU with AVX2 the node scans packed codes with the native kernel (the
extension query_node._fastscan); this checks that path end to end over gRPC, with tombstones.
"""
import numpy as np
import pytest

from indexer.store import IndexStore
from query_node.coordinator import Coordinator
from query_node.index_view import load_view
from query_node.registry import StaticRegistry
from tests.support.index import brute_force, build_index, dyadic_lut
from tests.support.processes import node

pytestmark = pytest.mark.timeout(180)


def _ids(hits):
    return [(h.face_id, h.score, h.shard) for h in hits]


def test_node_on_4bit_codes_matches_brute_force_with_tombstones(tmp_path):
    from indexer.commit import delete_faces

    path = tmp_path / "idx"
    _, ids, _ = build_index(path, rows=6000, shard_count=2, M=15, K=16)  # odd M: 8 bytes, last high nibble unused
    delete_faces(IndexStore(str(path)), face_ids=[int(i) for i in ids[::7]])
    rng = np.random.default_rng(4)
    n = node(path, [0, 1])
    try:
        coord = Coordinator(StaticRegistry([n.address]), shard_count=2)
        for _ in range(3):
            lut = dyadic_lut(rng, 15, 16)
            res = coord.search_tables(lut[None], 40)
            assert res.complete and res.index_version == "2"
            assert _ids(res.hits[0]) == brute_force(path, lut, 40)
            assert not {h.face_id for h in res.hits[0]} & {int(i) for i in ids[::7]}
    finally:
        n.kill()


def test_in_process_view_uses_the_kernel_tables_for_packed_codes(tmp_path):
    path = tmp_path / "idx"
    build_index(path, rows=2000, shard_count=2, M=16, K=16)
    view = load_view(IndexStore(str(path)), [0, 1])
    lut = np.random.default_rng(5).standard_normal((16, 16)).astype(np.float32)
    hits = view.search(lut[None], 30, [0, 1])[0]
    ref = brute_force(path, lut, 30)
    assert [h.face_id for h in hits] == [r[0] for r in ref]
    np.testing.assert_allclose([h.score for h in hits], [r[1] for r in ref], rtol=1e-5, atol=1e-5)
