"""Replica choice, failover, version realignment and missing shards of a search, with fake nodes (no processes).

The Coordinator runs its real fan-out loop (thread pool, last node on the calling thread)
over tests.support.fake_nodes; FanOut and replicas_by_shard are also checked on their own.
"""
import threading

import numpy as np
import pytest

from facepq_core.errors import NodeRefused, VersionConflict
from query_node.coordinator import Coordinator
from query_node.fanout import MAX_VERSION_ROUNDS, FanOut, NodeCallError, NodeReply, replicas_by_shard
from tests.support.fake_nodes import FakeNodeClients, FakeRegistry, MemoryNode, exact_top_k, gallery, record

TABLES = np.zeros((1, 8, 256), np.float32)  # fake nodes ignore the tables; one query


@pytest.fixture
def make():
    """make(records, nodes) -> (Coordinator over fake nodes, its FakeNodeClients); closed after the test."""
    made = []

    def build(records, nodes, shard_count):
        clients = FakeNodeClients(nodes=nodes)
        coord = Coordinator(FakeRegistry(records), shard_count, node_clients=clients)
        made.append(coord)
        return coord, clients

    yield build
    for coord in made:
        coord.close()


def _ids(hits):
    return [(h.face_id, h.score, h.shard) for h in hits]


def test_every_shard_is_asked_of_exactly_one_replica_and_the_merge_is_the_exact_top_k(make):
    g = gallery(range(3))
    coord, clients = make([record("a", [0, 1]), record("b", [1, 2]), record("c", [2, 0])],
                          {n: MemoryNode({1: g}) for n in "abc"}, 3)
    for _ in range(3):  # the replica rotation changes who is asked, never the answer
        clients.calls.clear()
        res = coord.search_tables(TABLES, 10)
        assert res.complete and res.index_version == "1" and res.node_scan_ms == 1.0
        assert _ids(res.hits[0]) == _ids(exact_top_k(g, 10))
        asked = sorted(s for c in clients.calls for s in c.shards)
        assert asked == [0, 1, 2]


@pytest.mark.parametrize("code", ["UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND"])
def test_a_node_failing_with_a_retryable_code_has_its_shards_asked_of_another_replica(make, code):
    g = gallery(range(2))
    coord, clients = make([record("a", [0, 1]), record("b", [0, 1])],
                          {"a": MemoryNode({1: g}, fail=code), "b": MemoryNode({1: g})}, 2)
    for _ in range(2):  # a is first on one of the two rotations
        clients.calls.clear()
        res = coord.search_tables(TABLES, 8)
        assert res.complete and _ids(res.hits[0]) == _ids(exact_top_k(g, 8))
        assert sorted(s for c in clients.asked("b") for s in c.shards) == [0, 1]


def test_a_reply_older_than_the_required_version_counts_as_failed_and_another_replica_is_asked(make):
    old, new = gallery(range(2), version=1), gallery(range(2), version=2)
    coord, clients = make([record("a", [0, 1]), record("b", [0, 1])],
                          {"a": MemoryNode({1: old}), "b": MemoryNode({1: old, 2: new}, current=2)}, 2)
    for _ in range(2):
        clients.calls.clear()
        res = coord.search_tables(TABLES, 8, min_version=2)
        assert res.complete and res.index_version == "2"
        assert _ids(res.hits[0]) == _ids(exact_top_k(new, 8))
        assert {c.index_version for c in clients.calls} == {"2"}  # the required version is asked for by name


def test_answers_of_two_versions_are_realigned_to_the_newest_and_the_straggler_asked_again(make):
    old, new = gallery(range(2), version=1), gallery(range(2), version=2)
    # b still serves version 1 but can load version 2 when asked for it by name (LiveIndex.view_at)
    coord, clients = make([record("a", [0]), record("b", [1])],
                          {"a": MemoryNode({2: new}, current=2), "b": MemoryNode({1: old, 2: new}, current=1)}, 2)
    res = coord.search_tables(TABLES, 8)
    assert res.complete and res.index_version == "2"
    assert _ids(res.hits[0]) == _ids(exact_top_k(new, 8))
    assert [c.index_version for c in clients.asked("b")] == ["", "2"]
    assert [c.index_version for c in clients.asked("a")] == [""]


def test_a_search_gives_up_with_version_conflict_when_the_index_keeps_moving(make):
    g = gallery(range(2))
    versions = iter(range(1, 100))

    def commit_before_answering(node):  # every call sees a newer committed version than the last one
        v = next(versions)
        node.versions[v], node.current = g, v

    nodes = {n: MemoryNode({}, on_call=commit_before_answering) for n in "ab"}
    coord, clients = make([record("a", [0]), record("b", [1])], nodes, 2)
    with pytest.raises(VersionConflict, match="changed 4 times") as err:
        coord.search_tables(TABLES, 8)
    assert err.value.status == "ABORTED"
    assert len(clients.calls) == 2 + MAX_VERSION_ROUNDS  # both, then one re-ask per realignment


def test_shards_no_replica_answers_are_missing_and_the_rest_is_still_answered(make):
    g = gallery(range(3))
    coord, clients = make([record("a", [0]), record("b", [1]), record("c", [2], healthy=False)],
                          {"a": MemoryNode({1: g}), "b": MemoryNode({1: g}, fail="UNAVAILABLE"),
                           "c": MemoryNode({1: g})}, 3)
    res = coord.search_tables(TABLES, 10)
    assert not res.complete and res.missing_shards == [1, 2]
    assert _ids(res.hits[0]) == _ids(exact_top_k(g, 10, shards=[0]))
    assert not clients.asked("c")  # an unhealthy node is never asked
    assert len(clients.asked("b")) == 1  # and a failed replica not twice


@pytest.mark.parametrize("code", ["INVALID_ARGUMENT", "UNAUTHENTICATED"])
def test_a_node_refusing_the_request_itself_raises_node_refused_without_trying_other_replicas(make, code):
    g = gallery(range(1))
    coord, clients = make([record("a", [0]), record("b", [0])],
                          {"a": MemoryNode({1: g}, fail=code), "b": MemoryNode({1: g}, fail=code)}, 1)
    with pytest.raises(NodeRefused, match=f"a query node refused the search \\({code}: ") as err:
        coord.search_tables(TABLES, 5)
    assert err.value.status == "INTERNAL" and "share the node token" in str(err.value)
    assert len(clients.calls) == 1


def test_all_nodes_but_the_last_are_called_on_pool_threads_the_last_on_the_calling_thread(make):
    g = gallery(range(3))
    coord, clients = make([record("a", [0]), record("b", [1]), record("c", [2])],
                          {n: MemoryNode({1: g}) for n in "abc"}, 3)
    coord.search_tables(TABLES, 5)
    threads = {c.address: c.thread for c in clients.calls}  # the plan is a: [0], b: [1], c: [2]
    assert threads["c"] == threading.current_thread().name
    assert threads["a"].startswith("facepq-node-call") and threads["b"].startswith("facepq-node-call")


def test_a_search_out_of_time_asks_no_node_and_names_every_shard_missing(make):
    g = gallery(range(2))
    coord, clients = make([record("a", [0, 1])], {"a": MemoryNode({1: g})}, 2)
    res = coord.search_tables(TABLES, 5, timeout=0)
    assert res.missing_shards == [0, 1] and res.hits == [[]] and res.index_version == ""
    assert not clients.calls
    coord.search_tables(TABLES, 5, timeout=3.0)
    assert 0 < clients.calls[0].timeout <= 3.0  # nodes get what is left of the search's time


def test_replicas_are_the_healthy_nodes_of_each_shard_rotated_per_turn():
    nodes = [record("a", [0, 1]), record("b", [1, 7]), record("c", [1], healthy=False), record("d", [0, 1])]
    by_turn = [replicas_by_shard(nodes, 3, turn) for turn in range(3)]
    assert [[n.address for n in r[1]] for r in by_turn] == [["a", "b", "d"], ["b", "d", "a"], ["d", "a", "b"]]
    assert [[n.address for n in r[0]] for r in by_turn] == [["a", "d"], ["d", "a"], ["a", "d"]]
    assert all(r[2] == [] for r in by_turn) and all(7 not in r for r in by_turn)  # shard 7 is not in the index


def test_fan_out_tries_each_replica_of_a_shard_once_then_reports_it_missing():
    fan = FanOut({0: ["a", "b"], 1: ["b"]}, 2)
    assert fan.next_round() == {"a": [0], "b": [1]}
    fan.failed("a", NodeCallError("UNAVAILABLE"))
    fan.answered("b", NodeReply(version=1, shards=[1], results=[[]]))
    fan.end_round()
    assert fan.next_round() == {"b": [0]}
    fan.failed("b", NodeCallError("DEADLINE_EXCEEDED"))
    fan.end_round()
    assert fan.next_round() == {}
    res = fan.result(1, 5)
    assert res.missing_shards == [0] and res.index_version == "1"


def test_fan_out_ignores_shards_a_node_answers_twice_and_keeps_the_first_answer():
    g = gallery(range(2))
    fan = FanOut({0: ["a"], 1: ["b"]}, 2)
    fan.next_round()
    fan.answered("a", NodeReply(version=1, shards=[0, 1], results=[exact_top_k(g, 4)]))  # b's shard too
    fan.answered("b", NodeReply(version=1, shards=[1], results=[exact_top_k(g, 4, shards=[1])]))
    fan.end_round()
    res = fan.result(1, 4)
    assert res.complete and _ids(res.hits[0]) == _ids(exact_top_k(g, 4))  # no hit of shard 1 counted twice
