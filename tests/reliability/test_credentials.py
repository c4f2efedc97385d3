"""Failure class 4 of issue 15: credentials and exposure, with real processes.

* A rogue "query node" injected into the (password-less) Redis registry: it used to receive the
  coordinator's admin token (the node token defaulted to it) and could put forged hits first. Now the
  admin token never leaves the coordinator, and hits of a node that cannot prove it holds the node token
  are ignored (another replica answers), so every answer stays exact and complete.
* The node token must differ from the admin token (the coordinator refuses to start otherwise).
* A local Ray started by `facepq ingest` listens on loopback only.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from concurrent import futures

import grpc
import pytest

from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
from indexer.store import IndexStore
from query_node import security
from tests.support.processes import REPO_ROOT, StartFailed
from tests.support.requests import embedding_request

pytestmark = pytest.mark.timeout(300)

ADMIN_TOKEN = "admin-" + "0f1e2d3c" * 4
NODE_TOKEN = "node-" + "4b5a6978" * 4


class RogueNode(facepq_pb2_grpc.QueryNodeServicer):
    """A process that got itself listed as a node: records what it is sent, answers forged hits first."""

    def __init__(self, version: str):
        self.version = version
        self.metadata: list[tuple] = []
        self.calls = 0
        self._lock = threading.Lock()

    def _note(self, context):
        with self._lock:
            self.calls += 1
            self.metadata.extend(context.invocation_metadata() or ())

    def Search(self, request, context):
        self._note(context)
        reply = facepq_pb2.NodeSearchResponse(shards_searched=list(request.shards), index_version=self.version)
        for _ in request.tables:
            reply.results.add(hits=[facepq_pb2.Hit(face_id=666, person="forged", source="rogue", score=1e9,
                                                   shard=request.shards[0])])
        return reply

    def Status(self, request, context):
        self._note(context)
        return facepq_pb2.NodeStatusResponse(node_id="rogue", index_version=self.version)


@pytest.fixture
def rogue(index):
    servicer = RogueNode(str(IndexStore(index).current_version()))
    server = grpc.server(futures.ThreadPoolExecutor(4))
    facepq_pb2_grpc.add_QueryNodeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    server.stop(0)


def test_a_rogue_node_in_the_registry_gets_no_admin_token_and_no_say(gallery, index, procs, redis_server, rogue,
                                                                     tmp_path):
    import redis

    from query_node.registry import KEY_PREFIX, NodeRecord

    admin = tmp_path / "admin.token"
    admin.write_text(ADMIN_TOKEN + "\n")
    node_token = tmp_path / "node.token"
    node_token.write_text(NODE_TOKEN + "\n")
    reg = ("--redis", redis_server.url)
    a = procs.node(index, [0, 1], *reg, "--node-id", "a", "--auth-token-file", node_token)
    b = procs.node(index, [0, 1], *reg, "--node-id", "b", "--auth-token-file", node_token)
    # The rogue announces itself the way nodes do, with a long TTL, serving every shard.
    client = redis.Redis.from_url(redis_server.url)
    client.set(KEY_PREFIX + "rogue", NodeRecord(node_id="rogue", address=rogue.address, shards=[0, 1],
                                               index_version=rogue.version).to_json(), px=600_000)
    coord = procs.coordinator(gallery["model"], index, *reg, "--auth-token-file", admin,
                              "--node-auth-token-file", node_token)
    stub = facepq_pb2_grpc.CoordinatorStub(grpc.insecure_channel(coord.address))
    request = embedding_request(gallery, top_k=10)
    answers = [stub.Search(request, timeout=30) for _ in range(12)]
    assert rogue.calls, "the coordinator never asked the rogue node: the test proves nothing"
    sent = " ".join(str(v) for _, v in rogue.metadata)
    assert ADMIN_TOKEN not in sent and NODE_TOKEN not in sent  # neither secret reaches a node
    for answer in answers:
        assert answer.complete and "forged" not in {h.person for h in answer.hits}
    assert len({tuple((h.face_id, h.score) for h in r.hits) for r in answers}) == 1  # one exact answer
    assert a.alive() and b.alive()
    assert "without a valid proof of the node token" in coord.text()


def test_the_node_token_must_differ_from_the_admin_token(gallery, index, procs, tmp_path):
    same = tmp_path / "same.token"
    same.write_text(ADMIN_TOKEN + "\n")
    node = procs.node(index, [0, 1])
    with pytest.raises(StartFailed) as err:
        procs.coordinator(gallery["model"], index, "--nodes", node.address, "--auth-token-file", same,
                          "--node-auth-token-file", same)
    assert err.value.returncode == 2 and "must differ from the admin token" in err.value.output


def test_node_proofs_bind_the_reply_and_the_nonce():
    key = security.node_reply_key(NODE_TOKEN)
    proof = security.reply_proof(key, "n1", b"reply")
    assert security.proof_matches(key, "n1", b"reply", f"deadbeef, {proof}")  # rotation: any one of them
    assert not security.proof_matches(key, "n2", b"reply", proof)  # a replayed proof of another call
    assert not security.proof_matches(key, "n1", b"reply!", proof)  # an altered reply
    assert not security.proof_matches(security.node_reply_key(security.node_bearer(NODE_TOKEN)), "n1", b"reply",
                                      proof) and security.node_bearer(NODE_TOKEN) != NODE_TOKEN


@pytest.mark.slow
def test_a_local_ray_started_for_an_ingest_listens_on_loopback_only():
    script = textwrap.dedent("""
        import json, time, psutil
        import os
        from indexer.job import init_ray
        assert init_ray(None)
        # single-machine mode was for this Ray's start only: a `ray start` run from here later may join hosts
        assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
        import ray
        ray.get(ray.remote(lambda: 1).remote())  # a worker is up too
        time.sleep(1)
        found = []
        for child in psutil.Process().children(recursive=True):
            try:
                found += [(child.name(), c.laddr.ip) for c in child.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN]
            except psutil.Error:
                pass
        print(json.dumps(found))
        ray.shutdown()
    """)
    env = {"PATH": "/usr/bin:/bin", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
                         env=env, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    listening = json.loads(out.stdout.strip().splitlines()[-1])
    assert listening, "no Ray process listening: the test proves nothing"
    exposed = [(name, ip) for name, ip in listening if ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, f"Ray processes listening beyond loopback: {exposed}"
