"""Failure class 7 of issue 15: growth without upkeep. Real processes, real file-descriptor limits.

* a node whose open-file limit runs out while a shard grows: that shard goes NOT_SERVING, and the node
  still answers its other shards (it used to refuse the whole request, so a coordinator lost them too);
* a node raises its soft open-file limit to the hard one at start, and warns when its index needs more;
* the coordinator merges the small segments enrolments add, in the background, so the segment count (and
  a node's descriptors) stays bounded while every answer stays exact.
"""
from __future__ import annotations

import os
import resource
import sys
import time

import grpc
import numpy as np
import pytest

from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
from indexer.store import IndexStore
from tests.reliability.test_faults import _wait

pytestmark = pytest.mark.timeout(300)


def _open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def _grow_shard(index, shard, segments, rows=3, seed=0):
    """Commit `segments` new segments into `shard` of a 2-shard index (ids of that parity)."""
    from indexer.commit import commit_segments
    from indexer.segment import write_segment

    store = IndexStore(index)
    man = store.load_manifest()
    rng = np.random.default_rng(seed)
    refs = []
    for _ in range(segments):
        ids = (rng.choice(2**61, rows, replace=False).astype(np.uint64) * np.uint64(2) + np.uint64(shard))
        refs.append(write_segment(store, shard, ids, ["grown"] * rows, ["g"] * rows,
                                  rng.integers(0, 256, (rows, man.model.code_bytes), dtype=np.uint8), man.model))
    return commit_segments(store, {shard: refs}, man.model, man.shard_count, "grow", verify_new=False)


def test_a_shard_out_of_file_descriptors_never_costs_the_nodes_other_shards(tmp_path, procs):
    from query_node.coordinator import Coordinator
    from tests.support.fake_nodes import FakeRegistry, record
    from tests.support.index import build_index, dyadic_lut

    index = tmp_path / "idx"
    build_index(index, rows=400, shard_count=2, segments_per_shard=1)
    node = procs.node(index, [0, 1])
    # A coordinator whose topology still lists both shards on this node (its listing is up to 0.5 s old).
    coord = Coordinator(FakeRegistry([record(node.address, [0, 1])]), shard_count=2)
    lut = dyadic_lut(np.random.default_rng(2), 8, 256)
    try:
        assert coord.search_tables(lut[None], 10).complete  # connections made before the limit drops
        stub = facepq_pb2_grpc.QueryNodeStub(grpc.insecure_channel(node.address))
        stub.Status(facepq_pb2.NodeStatusRequest(), timeout=5)
        limit = _open_fds(node.pid) + 6
        resource.prlimit(node.pid, resource.RLIMIT_NOFILE, (limit, limit))
        version = _grow_shard(index, 0, segments=12)  # 24 more descriptors than the node may open

        # What a client sees: an answer at the new version in which only the grown shard is missing.
        results = []

        def only_shard0_missing():
            results.append(coord.search_tables(lut[None], 10, min_version=version))
            return results[-1].missing_shards == [0]

        deadline = time.monotonic() + 20
        while not only_shard0_missing() and time.monotonic() < deadline:
            time.sleep(0.2)
        last = results[-1]
        assert last.missing_shards == [0], f"missing {last.missing_shards} at version {last.index_version!r}"
        assert last.index_version == str(version) and {h.shard for h in last.hits[0]} == {1}
        shards = {s.shard: s for s in stub.Status(facepq_pb2.NodeStatusRequest(), timeout=5).shards}
        assert shards[0].state == facepq_pb2.SHARD_NOT_SERVING and "Too many open files" in shards[0].reason
        table = facepq_pb2.LookupTable(m=8, k=256, values_f32le=lut.astype("<f4").tobytes())
        reply = stub.Search(facepq_pb2.NodeSearchRequest(tables=[table], top_k=5, shards=[0, 1]), timeout=10)
        assert list(reply.shards_searched) == [1] and {h.shard for h in reply.results[0].hits} == {1}
        assert node.alive()
    finally:
        coord.close()


def test_a_node_raises_its_open_file_limit_and_warns_when_the_index_needs_more(tmp_path, procs):
    from tests.support.index import build_index
    from tests.support.processes import ServerProcess

    index = tmp_path / "idx"
    build_index(index, rows=600, shard_count=2, segments_per_shard=30)
    cli = ("prlimit", "--nofile=256:8192", sys.executable, "-m", "facepq.cli")
    node = ServerProcess(["node", "--index", index, "--shards", "0,1", "--port", "0"], program=cli)
    procs.all.append(node)
    with open(f"/proc/{node.pid}/limits") as f:
        limits = f.read()
    assert any(line.startswith("Max open files") and line.split()[3] == "8192" for line in limits.splitlines())
    tight = ServerProcess(["node", "--index", index, "--shards", "0,1", "--port", "0"],
                          program=("prlimit", "--nofile=300:300", sys.executable, "-m", "facepq.cli"))
    procs.all.append(tight)
    assert "open files but the limit is 300" in tight.text() and tight.alive()


def test_the_coordinator_merges_enrolment_segments_in_the_background(gallery, index, procs):
    import io

    from PIL import Image

    from tests.reliability.test_faults import _live_faces
    from tests.support.requests import embedding_request

    node = procs.node(index, [0, 1], "--view-grace", "0.5")
    coord = procs.coordinator(gallery["model"], index, "--nodes", node.address, "--upkeep-seconds", "0.5")
    stub = facepq_pb2_grpc.CoordinatorStub(grpc.insecure_channel(coord.address))
    person = gallery["enrol_people"][3]
    source = gallery["photos"][person][0]
    store = IndexStore(index)
    segments_at_start = len(store.load_manifest().segments)
    enrolled = {}
    for i in range(24):
        img = Image.open(source).convert("RGB")
        img.putpixel((2, 2), (i, 7, 7))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        reply = stub.Enrol(facepq_pb2.EnrolRequest(person=f"{person}-{i}", photos=[
            facepq_pb2.Photo(content=buf.getvalue(), source=f"e{i}")]), timeout=60)
        enrolled[int(reply.face_ids[0])] = f"{person}-{i}"
    # 24 one-face enrolments added 24 segments; the default policy (fanout 8) keeps fewer than 8 per tier.
    _wait(lambda: len(store.load_manifest().segments) < segments_at_start + 8, 30, "the background merges")
    live = _live_faces(index)
    assert all(live[f] == p for f, p in enrolled.items()) and len(live) == gallery["faces"] + 24
    assert "upkeep: merged" in store.load_manifest().message or any(
        "upkeep" in store.load_manifest(v).message for v in range(1, store.current_version() + 1))
    time.sleep(1.5)  # the node's next polls: merged versions served, replaced views dropped
    reply = stub.Search(embedding_request(gallery, top_k=1000), timeout=30)
    assert reply.complete and len(reply.hits) == len(live)
    fds = _open_fds(node.pid)
    assert fds < 2 * (segments_at_start + 24), f"the node holds {fds} descriptors"
