"""Failure class 3 of issue 15: one bad manifest must not silence a node or surface as a raw error.

A current manifest that is valid JSON but has a wrongly typed field (or is nested thousands deep) used to
escape the format checks as TypeError / AttributeError / OverflowError / RecursionError: the CLI printed
tracebacks, Enrol answered UNKNOWN, and a serving node's watcher thread died for good, after which it kept
serving a segment altered on disk. Now a format error is `IndexFormatError` everywhere (one CLI line,
FAILED_PRECONDITION), and the watcher keeps the last good view, keeps checking served files, reports its
trouble through health (`facepq.index`) and recovers when a good version appears.
"""
from __future__ import annotations

import json
import time

import grpc
import pytest

from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
from indexer.store import IndexStore, manifest_path
from tests.support.processes import run_cli

pytestmark = pytest.mark.timeout(240)


def _bad_variants(good: dict) -> dict[str, str]:
    """name -> manifest text that is valid JSON (or nearly) but not a valid manifest."""
    def variant(**changes):
        d = json.loads(json.dumps(good))
        for path, value in changes.items():
            *parents, last = path.split(".")
            node = d
            for p in parents:
                node = node[int(p)] if p.isdigit() else node[p]
            node[int(last) if last.isdigit() else last] = value
        return json.dumps(d)

    return {
        "segments is a number": variant(**{"shards.0.segments": 5}),
        "model is a list": variant(model=["fingerprint"]),
        "codec is a list": variant(**{"model.codec": ["opqn"]}),
        "rows overflow": variant(**{"shards.0.segments.0.rows": 1e400}),
        "parent is an object": variant(parent_version={"v": 1}),
        "tombstones nested": variant(**{"shards.0.tombstones": [[1]]}),
        "deeply nested": json.dumps(good)[:-2] + ', "message": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
    }


def _publish_raw(index, text: str) -> int:
    """Write `text` as the next manifest and make it current (what a broken writer or a bad restore does)."""
    store = IndexStore(index)
    version = store.current_version() + 1
    store.write_bytes(manifest_path(version), text.encode())
    store.set_current(version)
    return version


def test_every_bad_manifest_is_one_cli_line_and_a_format_error(tmp_path):
    from facepq_core.errors import IndexFormatError
    from tests.support.index import build_index

    index = tmp_path / "idx"
    build_index(index, rows=60, shard_count=2)
    store = IndexStore(index)
    good_version = store.current_version()
    good = json.loads(store.read_bytes(manifest_path(good_version)))
    for name, text in _bad_variants(good).items():
        store.write_bytes(manifest_path(good_version + 1), text.encode())
        store.set_current(good_version + 1)
        with pytest.raises(IndexFormatError):
            store.load_manifest()
        out = run_cli("index", "info", "--index", index)
        assert out.returncode == 2 and "Traceback" not in out.stderr, (name, out.stderr[-2000:])
        assert len(out.stderr.strip().splitlines()) == 1 and "manifest" in out.stderr, (name, out.stderr)
    store.set_current(good_version)


def test_enrol_on_a_bad_manifest_is_failed_precondition(gallery, index, procs):
    node = procs.node(index, [0, 1])
    coord = procs.coordinator(gallery["model"], index, "--nodes", node.address)
    good = json.loads(IndexStore(index).read_bytes(manifest_path(IndexStore(index).current_version())))
    _publish_raw(index, _bad_variants(good)["segments is a number"])
    person = gallery["enrol_people"][0]
    stub = facepq_pb2_grpc.CoordinatorStub(grpc.insecure_channel(coord.address))
    with pytest.raises(grpc.RpcError) as err:
        stub.Enrol(facepq_pb2.EnrolRequest(person=person, photos=[
            facepq_pb2.Photo(content=gallery["photos"][person][0].read_bytes(), source="a.png")]), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
    assert "manifest" in err.value.details()


def test_a_bad_manifest_never_kills_the_node_watcher(gallery, index, procs):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.reliability.test_faults import _flip_bytes

    node = procs.node(index, [0, 1])
    stub = facepq_pb2_grpc.QueryNodeStub(grpc.insecure_channel(node.address))
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(node.address))
    store = IndexStore(index)
    good_version = store.current_version()
    good = json.loads(store.read_bytes(manifest_path(good_version)))

    def check(service):
        return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def wait(predicate, what, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}; node output:\n{node.text()[-3000:]}")

    assert check("facepq.index") == health_pb2.HealthCheckResponse.SERVING
    for text in _bad_variants(good).values():  # every kind, one after the other, while the node runs
        _publish_raw(index, text)
        time.sleep(0.5)
    wait(lambda: check("facepq.index") == health_pb2.HealthCheckResponse.NOT_SERVING, "health to report it")
    reply = stub.Status(facepq_pb2.NodeStatusRequest(), timeout=5)
    assert reply.index_version == str(good_version)  # the last good view is still served
    assert node.alive() and "Traceback" not in node.text()

    # The watcher still checks served files: an altered segment goes NOT_SERVING within a few polls.
    seg = index / good["shards"][0]["segments"][0]["path"]
    _flip_bytes(seg)
    wait(lambda: {s.shard: s.state for s in stub.Status(facepq_pb2.NodeStatusRequest(), timeout=5).shards}[0]
         == facepq_pb2.SHARD_NOT_SERVING, "the altered segment's shard to stop serving")
    _flip_bytes(seg)  # flipped back: the original bytes

    # A good version again: served, and health recovers.
    good["version"] = store.current_version() + 1
    good["parent_version"] = good["version"] - 1
    _publish_raw(index, json.dumps(good))
    wait(lambda: check("facepq.index") == health_pb2.HealthCheckResponse.SERVING, "health to recover")
    wait(lambda: stub.Status(facepq_pb2.NodeStatusRequest(), timeout=5).index_version == str(good["version"]),
         "the good version to be served")
