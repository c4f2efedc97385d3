"""Searches with nprobe on a partitioned index, through the coordinator's fan-out and a real node over gRPC.

nprobe 0 (all) answers exactly as brute force; fewer cells answer the exhaustive scores of the rows in
the probed cells (a subset). Their recall against the exhaustive answer is measured by `facepq bench
scale`, not assumed here.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
from indexer.commit import delete_faces
from indexer.store import IndexStore
from query_node.coordinator import Coordinator
from query_node.index_view import load_view
from query_node.registry import StaticRegistry
from query_node.shard_search import ScanStats
from tests.support.fake_nodes import FakeNodeClients, FakeRegistry, LiveNode, record
from tests.support.index import brute_force, build_index, dyadic_lut
from tests.support.processes import node

pytestmark = pytest.mark.timeout(180)
M, K, CELLS = 8, 256, 12


def _hits(hits):
    return [(h.face_id, h.score, h.shard) for h in hits]


def test_coordinator_nprobe_all_is_brute_force_and_fewer_cells_a_scored_subset(tmp_path):
    path = tmp_path / "idx"
    _, ids, _ = build_index(path, rows=3000, shard_count=3, cells=CELLS)
    delete_faces(IndexStore(str(path)), face_ids=[int(i) for i in ids[::11]])
    clients = FakeNodeClients(nodes={"a": LiveNode(path, [0, 2]), "b": LiveNode(path, [1])})
    coord = Coordinator(FakeRegistry([record("a", [0, 2]), record("b", [1])]), 3, node_clients=clients)
    view = load_view(IndexStore(str(path)), [0, 1, 2])
    rng = np.random.default_rng(5)
    for _ in range(4):
        lut = dyadic_lut(rng, M, K)
        exhaustive = brute_force(path, lut, 3000)
        assert _hits(coord.search_tables(lut[None], 30).hits[0]) == exhaustive[:30]
        assert _hits(coord.search_tables(lut[None], 30, nprobe=CELLS).hits[0]) == exhaustive[:30]
        part = _hits(coord.search_tables(lut[None], 30, nprobe=3).hits[0])
        score_of = {fid: score for fid, score, _ in exhaustive}
        assert part and all(score_of[fid] == score for fid, score, _ in part)
        # the same as the node-side view limited to the same cells
        stats = ScanStats()
        assert part == _hits(view.search(lut[None], 30, [0, 1, 2], stats, nprobe=3)[0])
        assert 0 < stats.rows < 3000  # only the probed cells were scanned


def test_a_real_node_scans_the_cells_asked_over_grpc(tmp_path):
    path = tmp_path / "idx"
    build_index(path, rows=4000, shard_count=2, cells=CELLS)
    view = load_view(IndexStore(str(path)), [0, 1])
    rng = np.random.default_rng(6)
    n = node(path, [0, 1])
    try:
        with grpc.insecure_channel(n.address) as channel:  # operators see the partition in the node's Status
            status = facepq_pb2_grpc.QueryNodeStub(channel).Status(facepq_pb2.NodeStatusRequest(), timeout=10)
        assert status.cells == CELLS
        coord = Coordinator(StaticRegistry([n.address]), shard_count=2)
        for nprobe in (0, 1, 4, CELLS):
            luts = np.stack([dyadic_lut(rng, M, K) for _ in range(2)])
            res = coord.search_tables(luts, 20, timeout=60, nprobe=nprobe)
            assert res.complete
            want = view.search(luts, 20, [0, 1], nprobe=nprobe)
            assert [_hits(h) for h in res.hits] == [_hits(h) for h in want]
            if nprobe in (0, CELLS):
                assert _hits(res.hits[0]) == brute_force(path, luts[0], 20)
    finally:
        n.kill()


def test_search_cli_refuses_a_bad_nprobe_in_one_line():
    from tests.support.processes import run_cli

    proc = run_cli("search", "--coordinator", "127.0.0.1:1", "--nprobe", "some", "face.jpg")
    assert proc.returncode == 2 and "--nprobe takes a whole number of cells or 'all'" in proc.stderr
    assert "Traceback" not in proc.stderr
