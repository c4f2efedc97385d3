"""Failure class 8 of issue 15 with real processes: a replica that stops answering (SIGSTOP) while another
replica is healthy. Every search must answer complete (it used to wait out the whole search timeout and
answer complete=false whenever the rotation picked the stopped node, and with a static node list the
coordinator's topology refresh stalled on it too); once it is resumed it serves again."""
from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from facepq_proto.facepq.v1 import facepq_pb2_grpc
from tests.support.requests import embedding_request

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("registry", ["static", "redis"])
def test_searches_stay_complete_while_a_replica_is_stopped(gallery, index, procs, redis_server, registry):
    if registry == "redis":
        reg = ("--redis", redis_server.url, "--ttl", "30")  # the stopped node stays listed: its heartbeat key lives
        a, b = procs.node(index, [0, 1], *reg, "--node-id", "a"), procs.node(index, [0, 1], *reg, "--node-id", "b")
        coord = procs.coordinator(gallery["model"], index, *reg[:2])
    else:
        a, b = procs.node(index, [0, 1]), procs.node(index, [0, 1])
        coord = procs.coordinator(gallery["model"], index, "--nodes", f"{a.address},{b.address}")
    stub = facepq_pb2_grpc.CoordinatorStub(grpc.insecure_channel(coord.address))
    request = embedding_request(gallery, top_k=20)
    reference = [(h.face_id, h.score) for h in stub.Search(request, timeout=30).hits]
    os.kill(a.pid, signal.SIGSTOP)
    try:
        answers = [stub.Search(request, timeout=30) for _ in range(12)]
        incomplete = [r.missing_shards for r in answers if not r.complete]
        assert not incomplete, f"{len(incomplete)} of {len(answers)} answers missed shards {incomplete}"
        assert all([(h.face_id, h.score) for h in r.hits] == reference for r in answers)
    finally:
        os.kill(a.pid, signal.SIGCONT)
    time.sleep(2.5)  # the stopped node's penalty expires; it is probed and serves again
    for _ in range(6):
        assert stub.Search(request, timeout=30).complete
    assert a.alive() and b.alive() and coord.alive()
