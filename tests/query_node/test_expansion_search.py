"""αQE in the coordinator: a search whose first round's top-n hits (their stored codes, fetched through the
nodes' Search) expand the query, and whose answer is the expanded query's exact top-k.

Real index on disk, nodes answering in-process from real LiveIndex views, the real FaceModel over a real
codec (opqn and binary) with the same layout as the random test index (8 sub-codes of 256 values).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from facepq_core.codecs.binary import BinaryCodec
from facepq_core.codecs.opqn import OPQNCodec
from facepq_core.errors import InvalidRequest
from facepq_core.expansion import MAX_EXPANSION_N, Expansion, alpha_expand
from query_node.coordinator import Coordinator
from query_node.face_model import FaceModel
from query_node.service import CoordinatorService, SearchOptions
from tests.support.fake_nodes import FakeNodeClients, FakeRegistry, LiveNode, record
from tests.support.index import brute_force, build_index

M, K, E = 8, 256, 16


def _codec(name, rng):
    if name == "opqn":
        return OPQNCodec(rng.normal(size=(M * 4, E)), rng.normal(size=M * 4) * 0.1, rng.normal(size=(M, 4, K)) * 3,
                         M, K, 4)
    return BinaryCodec(rng.normal(size=(E, 8 * M)), np.zeros(E), True, "hamming")


@pytest.fixture(params=["opqn", "binary"])
def cluster(tmp_path, request):
    path = tmp_path / "idx"
    meta, ids, codes = build_index(path, rows=900, shard_count=2)
    codec = _codec(request.param, np.random.default_rng(7))
    model = FaceModel(SimpleNamespace(codec=codec, fingerprint=meta.fingerprint))
    clients = FakeNodeClients(nodes={"a": LiveNode(path, [0]), "b": LiveNode(path, [1])})
    coord = Coordinator(FakeRegistry([record("a", [0]), record("b", [1])]), 2, node_clients=clients)
    service = CoordinatorService(coord, model, str(path))
    yield SimpleNamespace(service=service, codec=codec, path=path, code_of=dict(zip(ids.tolist(), codes)),
                          clients=clients)
    coord.close()


def _brute_force_expansion(c, query, n, alpha, k):
    """The expected answer, computed without the service: brute-force first round, reconstruction of the
    same stored codes, expansion, brute-force second round."""
    codec = c.codec
    first = brute_force(c.path, codec.query_tables(query[None])[0], n)
    codes = np.stack([c.code_of[fid] for fid, _, _ in first])
    expanded = alpha_expand(codec.expansion_vector(query[None])[0], codec.reconstruct(codes), alpha)
    return brute_force(c.path, codec.tables_from_vector(expanded[None])[0], k), first


@pytest.mark.parametrize("n, alpha", [(1, 3.0), (5, 3.0), (10, 0.0)])
def test_the_answer_is_the_brute_force_expansion_of_the_same_codes(cluster, n, alpha):
    rng = np.random.default_rng(11)
    for _ in range(3):
        query = rng.normal(size=E).astype(np.float32)
        result = cluster.service.search(query.tolist(), 15, SearchOptions(expansion=Expansion(n, alpha)))
        expected, first = _brute_force_expansion(cluster, query, n, alpha, 15)
        assert result.complete and result.expansion == Expansion(n, alpha) and result.refine_candidates == 0
        assert [(h.face_id, h.score, h.shard) for h in result.hits] == expected
        assert all(h.code == b"" for h in result.hits)  # codes are the coordinator's business only
        # the first round asked the nodes for codes, the second did not
        plain = cluster.service.search(query.tolist(), 15)
        assert plain.expansion.n == 0
        assert [(h.face_id, h.score, h.shard) for h in plain.hits][:n] == first


def test_no_expansion_is_one_round_and_n_zero_is_no_expansion(cluster):
    query = np.random.default_rng(3).normal(size=E).astype(np.float32)
    before = len(cluster.clients.calls)
    result = cluster.service.search(query.tolist(), 10, SearchOptions(expansion=Expansion(0, 3.0)))
    assert len(cluster.clients.calls) - before == 2  # one round: one call per node
    assert result.expansion.n == 0
    assert [(h.face_id, h.score) for h in result.hits] == \
        [(f, s) for f, s, _ in brute_force(cluster.path, cluster.codec.query_tables(query[None])[0], 10)]
    cluster.service.search(query.tolist(), 10, SearchOptions(expansion=Expansion(3, 3.0)))
    assert len(cluster.clients.calls) - before == 6  # two rounds


@pytest.mark.parametrize("n, alpha", [(-1, 3.0), (MAX_EXPANSION_N + 1, 3.0), (3, -1.0), (3, float("nan"))])
def test_bad_expansion_options_are_refused_before_any_node_is_asked(cluster, n, alpha):
    with pytest.raises(InvalidRequest, match="expansion"):
        cluster.service.search([0.5] * E, 10, SearchOptions(expansion=Expansion(n, alpha)))
    assert not cluster.clients.calls


def test_through_grpc_nodes_and_the_coordinator_edge_the_options_are_echoed_and_bad_ones_refused(tmp_path):
    """Real gRPC all the way: two in-process query nodes (codes travel in their Search replies) and the
    coordinator's servicer; the answer equals the brute-force expansion."""
    import grpc

    from facepq_proto.facepq.v1 import facepq_pb2 as pb
    from facepq_proto.facepq.v1 import facepq_pb2_grpc
    from query_node.coordinator_server import SERVICE_NAME, CoordinatorServicer
    from query_node.grpc_server import GrpcServer
    from query_node.node_server import NodeServer

    path = tmp_path / "idx"
    meta, ids, codes = build_index(path, rows=900, shard_count=2)
    codec = _codec("opqn", np.random.default_rng(7))
    nodes = [NodeServer(str(path), [s]).start() for s in (0, 1)]
    coord = Coordinator(FakeRegistry([record(n.address, [s]) for s, n in enumerate(nodes)]), 2)
    service = CoordinatorService(coord, FaceModel(SimpleNamespace(codec=codec, fingerprint=meta.fingerprint)),
                                 str(path))
    server = GrpcServer(SERVICE_NAME, workers=2).start(
        lambda s: facepq_pb2_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(service), s))
    channel = grpc.insecure_channel(server.address)
    try:
        stub = facepq_pb2_grpc.CoordinatorStub(channel)
        query = np.random.default_rng(5).normal(size=E).astype(np.float32)
        reply = stub.Search(pb.SearchRequest(embedding=pb.Embedding(values=query.tolist()), top_k=12,
                                             expansion=pb.QueryExpansion(n=4, alpha=2.0)), timeout=30)
        assert reply.complete and (reply.expansion.n, reply.expansion.alpha) == (4, 2.0)
        c = SimpleNamespace(codec=codec, path=path, code_of=dict(zip(ids.tolist(), codes)))
        expected, _ = _brute_force_expansion(c, query, 4, 2.0, 12)
        assert [(h.face_id, h.score, h.shard) for h in reply.hits] == expected
        assert not any(h.code for h in reply.hits)
        plain = stub.Search(pb.SearchRequest(embedding=pb.Embedding(values=query.tolist()), top_k=12), timeout=30)
        assert not plain.HasField("expansion")
        for n, alpha in [(-1, 3.0), (MAX_EXPANSION_N + 1, 3.0), (2, -0.5)]:
            with pytest.raises(grpc.RpcError) as err:
                stub.Search(pb.SearchRequest(embedding=pb.Embedding(values=query.tolist()), top_k=5,
                                             expansion=pb.QueryExpansion(n=n, alpha=alpha)), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "expansion" in err.value.details()
    finally:
        channel.close()
        server.stop(0)
        coord.close()
        for n in nodes:
            n.stop(0)
