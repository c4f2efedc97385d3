"""Failure class 8 of issue 15, without processes: a replica that stops answering must not hold a search.

Fake nodes that hang until their call's deadline (tests.support.fake_nodes.HangingNode), the real
Coordinator and its pure parts (FanOut.reassign, NodeHealth): a hung replica's shards are hedged to a
second replica and the answer is complete; calls to it are cut at the per-node timeout, below the search's
deadline; later searches route around it until its penalty expires."""
from __future__ import annotations

import numpy as np
import pytest

from query_node.coordinator import Coordinator
from query_node.fanout import FanOut, NodeReply
from query_node.node_health import BASE_PENALTY_S, MAX_PENALTY_S, NodeHealth
from tests.support.fake_nodes import (
    FakeNodeClients,
    FakeRegistry,
    HangingNode,
    MemoryNode,
    exact_top_k,
    gallery,
    record,
)

pytestmark = pytest.mark.timeout(120)

TABLES = np.zeros((1, 4, 16), np.float32)


@pytest.fixture
def make():
    made, hanging = [], []

    def build(nodes, records, shard_count=2, node_timeout=0.5):
        hanging.extend(n for n in nodes.values() if isinstance(n, HangingNode))
        clients = FakeNodeClients(nodes=nodes)
        coord = Coordinator(FakeRegistry(records), shard_count, node_clients=clients, node_timeout=node_timeout)
        made.append(coord)
        return coord, clients

    yield build
    for node in hanging:
        node.release.set()
    for coord in made:
        coord.close()


def test_a_hung_replica_is_hedged_and_every_answer_is_complete(make):
    g = gallery(range(2))
    coord, clients = make({"hung": HangingNode(MemoryNode({1: g})), "ok": MemoryNode({1: g})},
                          [record("hung", [0, 1]), record("ok", [0, 1])])
    for _ in range(6):  # the rotation puts the hung node first in some of them
        res = coord.search_tables(TABLES, 5, timeout=3.0)
        assert res.complete and [h.face_id for h in res.hits[0]] == [h.face_id for h in exact_top_k(g, 5)]
    asked = clients.asked("hung")
    assert asked, "the rotation never asked the hung node: the test proves nothing"
    assert all(c.timeout <= 0.5 + 1e-9 for c in asked)  # cut at the per-node timeout, not the 3 s deadline
    assert len(asked) == 1  # after its first timeout it is routed around (penalised for 2 s)


def test_a_lone_replica_keeps_the_whole_deadline(make):
    g = gallery(range(1))
    slow = HangingNode(MemoryNode({1: g}))
    coord, clients = make({"only": slow}, [record("only", [0])], shard_count=1)
    res = coord.search_tables(TABLES, 5, timeout=0.8)
    assert not res.complete and res.missing_shards == [0]
    assert clients.calls[0].timeout > 0.5  # no other replica: no reason to cut its time short


def test_health_penalises_failures_doubling_and_an_answer_clears_it():
    health = NodeHealth(node_timeout=1.0)
    assert health.order(["a", "b", "c"], 0.0) == ["a", "b", "c"]
    health.failed("a", 10.0)
    assert health.penalised("a", 10.0 + BASE_PENALTY_S - 0.01) and not health.penalised("a", 10.0 + BASE_PENALTY_S)
    assert health.order(["a", "b", "c"], 11.0) == ["b", "c", "a"]  # stable for the others
    health.failed("a", 20.0)
    health.failed("a", 20.0)
    assert health.penalised("a", 20.0 + 4 * BASE_PENALTY_S - 0.01)
    for _ in range(10):
        health.failed("a", 30.0)
    assert not health.penalised("a", 30.0 + MAX_PENALTY_S)  # capped
    health.answered("a", 0.01)
    assert not health.penalised("a", 30.5)
    assert 0.05 <= health.hedge_after("a") <= 1.0 and health.hedge_after("new") >= 0.05


def test_fanout_reassign_moves_only_pending_shards_and_a_late_twin_is_ignored():
    fan = FanOut({0: ["a", "b", "c"], 1: ["a", "b"]}, 2, min_version=1)
    assert fan.next_round() == {"a": [0, 1]}
    assert fan.reassign("a") == {"b": [0, 1]}  # hedge: the next untried replica of each
    fan.answered("b", NodeReply(version=2, shards=[0, 1], results=[[]]))
    assert not fan.pending and fan.reassign("a") == {}
    fan.answered("a", NodeReply(version=1, shards=[0, 1], results=[[]]))  # the slow twin, from another version
    fan.end_round()
    assert fan.version_rounds == 0 and not fan.pending  # ignored: no realignment, nothing re-asked
    assert fan.result(1, 5).index_version == "2"
