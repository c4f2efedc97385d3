"""Real query-node processes over loopback: exact distributed top-k, failover, registry, hot reload, bad input."""
import time

import grpc
import numpy as np
import pytest

from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
from query_node.coordinator import Coordinator
from query_node.registry import KEY_PREFIX, RedisRegistry, StaticRegistry
from tests.support.index import brute_force, build_index, dyadic_lut
from tests.support.processes import node

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def index(tmp_path):
    path = tmp_path / "idx"
    build_index(path, rows=3000, shard_count=3)
    return path


def _stub(addr):
    return facepq_pb2_grpc.QueryNodeStub(grpc.insecure_channel(addr))


def _table(lut):
    return facepq_pb2.LookupTable(m=lut.shape[0], k=lut.shape[1], values=lut.reshape(-1).tolist())


def _packed(lut):
    return facepq_pb2.LookupTable(m=lut.shape[0], k=lut.shape[1], values_f32le=lut.astype("<f4").tobytes())


def _ids(hits):
    return [(h.face_id, h.score, h.shard) for h in hits]


def test_distributed_topk_is_exact_and_survives_a_killed_replica(index):
    nodes = [node(index, [0, 1]), node(index, [1, 2]), node(index, [2, 0])]  # every shard on two nodes
    try:
        coord = Coordinator(StaticRegistry([n.address for n in nodes]), shard_count=3)
        rng = np.random.default_rng(0)
        for _ in range(3):
            lut = dyadic_lut(rng, 8, 256)
            res = coord.search_tables(lut[None], 25)
            assert res.complete and res.index_version == "1"
            assert _ids(res.hits[0]) == brute_force(index, lut, 25)
        nodes[0].kill()  # SIGKILL: shards 0 and 1 still have a replica each
        lut = dyadic_lut(rng, 8, 256)
        for _ in range(3):  # round-robin puts the dead node first on some calls
            res = coord.search_tables(lut[None], 25)
            assert res.complete, res.missing_shards
            assert _ids(res.hits[0]) == brute_force(index, lut, 25)
        nodes[1].kill()  # shard 1 now has no replica
        coord.topology_ttl = 0
        res = coord.search_tables(lut[None], 25)
        assert not res.complete and res.missing_shards == [1]
        assert {h.shard for h in res.hits[0]} <= {0, 2}
    finally:
        for n in nodes:
            n.kill()


def test_redis_registry_heartbeat_expiry_and_hot_reload_after_enrolment(index, redis_server):
    import redis

    from indexer.store import IndexStore
    from indexer.writer import IndexWriter

    a = node(index, [0, 1, 2], "--redis", redis_server.url, "--node-id", "a", "--ttl", "1.5", "--poll", "0.2")
    b = node(index, [0, 1, 2], "--redis", redis_server.url, "--node-id", "b", "--ttl", "1.5", "--poll", "0.2")
    try:
        reg = RedisRegistry(redis_server.url)
        assert sorted(n.node_id for n in reg.nodes()) == ["a", "b"]
        b.kill()  # no deregistration: the key must expire within the TTL
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(reg.nodes()) != 1:
            time.sleep(0.2)
        assert [n.node_id for n in reg.nodes()] == ["a"]
        # Redis down: the coordinator keeps the last topology and still answers
        coord = Coordinator(reg, shard_count=3, topology_ttl=0)
        redis_server.stop()
        lut = dyadic_lut(np.random.default_rng(1), 8, 256)
        assert coord.search_tables(lut[None], 5).complete
        redis_server.start()  # the node re-registers on its next beat
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not redis.Redis.from_url(redis_server.url).exists(KEY_PREFIX + "a"):
            time.sleep(0.2)
        assert redis.Redis.from_url(redis_server.url).exists(KEY_PREFIX + "a")
        # enrol a face whose code is the best possible for `lut`: it must become the top hit
        meta = IndexStore(str(index)).load_manifest().model
        best = np.argmax(lut, axis=1).astype(np.uint8)[None]
        w = IndexWriter(str(index), meta)
        w.add(np.array([12345], np.uint64), ["newcomer"], ["enrol"], best)
        w.commit("enrol newcomer")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            res = coord.search_tables(lut[None], 3)
            if res.index_version == "2":
                break
            time.sleep(0.2)
        assert res.index_version == "2" and res.hits[0][0].person == "newcomer"
    finally:
        a.kill()
        b.kill()


def test_sigterm_exits_cleanly_and_bad_requests_get_the_right_status(index):
    n = node(index, [0, 2])
    try:
        stub = _stub(n.address)
        good = _table(np.ones((8, 256), np.float32))
        cases = [
            (facepq_pb2.NodeSearchRequest(tables=[_table(np.ones((8, 16), np.float32))], top_k=5), "INVALID_ARGUMENT", "M=8, K=256"),
            (facepq_pb2.NodeSearchRequest(tables=[_table(np.full((8, 256), np.nan, np.float32))], top_k=5), "INVALID_ARGUMENT", "NaN"),
            (facepq_pb2.NodeSearchRequest(tables=[_table(np.full((8, 256), np.inf, np.float32))], top_k=5), "INVALID_ARGUMENT", "infinite"),
            (facepq_pb2.NodeSearchRequest(tables=[good], top_k=0), "INVALID_ARGUMENT", "top_k"),
            (facepq_pb2.NodeSearchRequest(tables=[good], top_k=1001), "INVALID_ARGUMENT", "top_k"),
            (facepq_pb2.NodeSearchRequest(tables=[], top_k=5), "INVALID_ARGUMENT", "no lookup tables"),
            (facepq_pb2.NodeSearchRequest(tables=[good], top_k=5, shards=[1]), "NOT_FOUND", "serves [0, 2]"),
            (facepq_pb2.NodeSearchRequest(tables=[facepq_pb2.LookupTable(m=8, k=256, values=np.zeros(5_000_000, np.float32))],
                                          top_k=5), "RESOURCE_EXHAUSTED", ""),  # 20 MB > the 16 MiB limit
            # the same checks for tables sent as packed float32 bytes
            (facepq_pb2.NodeSearchRequest(tables=[_packed(np.ones((8, 16), np.float32))], top_k=5), "INVALID_ARGUMENT", "M=8, K=256"),
            (facepq_pb2.NodeSearchRequest(tables=[_packed(np.full((8, 256), np.nan, np.float32))], top_k=5), "INVALID_ARGUMENT", "NaN"),
            (facepq_pb2.NodeSearchRequest(tables=[facepq_pb2.LookupTable(m=8, k=256, values_f32le=b"\0" * 8191)], top_k=5),
             "INVALID_ARGUMENT", "whole number of float32"),
            (facepq_pb2.NodeSearchRequest(tables=[facepq_pb2.LookupTable(m=8, k=256, values=[1.0] * 2048,
                                                                        values_f32le=b"\0" * 8192)], top_k=5),
             "INVALID_ARGUMENT", "both values and values_f32le"),
        ]
        for req, code, text in cases:
            with pytest.raises(grpc.RpcError) as err:
                stub.Search(req, timeout=10)
            assert err.value.code().name == code, err.value.details()
            assert text in (err.value.details() or "")
        reply = stub.Search(facepq_pb2.NodeSearchRequest(tables=[good], top_k=5), timeout=10)  # still up
        assert list(reply.shards_searched) == [0, 2] and len(reply.results[0].hits) == 5
        # a table as repeated floats and the same table as packed bytes give the same answer
        lut = dyadic_lut(np.random.default_rng(3), 8, 256)
        as_floats = stub.Search(facepq_pb2.NodeSearchRequest(tables=[_table(lut)], top_k=20), timeout=10)
        as_bytes = stub.Search(facepq_pb2.NodeSearchRequest(tables=[_packed(lut)], top_k=20), timeout=10)
        assert _ids(as_bytes.results[0].hits) == _ids(as_floats.results[0].hits)
        assert [(f, sc) for f, sc, _ in _ids(as_bytes.results[0].hits)] == \
            [(f, sc) for f, sc, sh in brute_force(index, lut, 3000) if sh in (0, 2)][:20]
        # the node reports where its time went: the kernel's share is part of the handler's
        assert 0 < as_bytes.scan_ms <= as_bytes.took_ms
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(n.address))
        assert health.Check(health_pb2.HealthCheckRequest(service="facepq.shard.2"), timeout=5).status == 1
        assert n.terminate() == 0
    finally:
        n.kill()


def test_corrupt_segment_marks_only_that_shard_not_serving(index):
    from indexer.store import IndexStore

    man = IndexStore(str(index)).load_manifest()
    seg = index / man.shards[1].segments[0].path
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    n = node(index, [0, 1])
    try:
        stub = _stub(n.address)
        status = stub.Status(facepq_pb2.NodeStatusRequest(), timeout=5)
        assert status.cells == 0  # no cell partition: every search scans every code
        states = {s.shard: (s.state, s.reason) for s in status.shards}
        assert states[0][0] == facepq_pb2.SHARD_SERVING
        assert states[1][0] == facepq_pb2.SHARD_NOT_SERVING and "sha256" in states[1][1]
        with pytest.raises(grpc.RpcError) as err:
            stub.Search(facepq_pb2.NodeSearchRequest(tables=[_table(np.ones((8, 256), np.float32))], top_k=3,
                                                     shards=[1]), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        n.kill()
