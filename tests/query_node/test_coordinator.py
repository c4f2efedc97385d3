"""The coordinator over real node processes with a real trained model: photos, embeddings, enrol, delete, errors, Node.js."""
import json
import shutil
import subprocess

import grpc
import pytest

from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
from tests.support.processes import REPO_ROOT, ServerProcess, node

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    from indexer.face_id import face_id_for_photo
    from indexer.manifest import ModelMeta
    from indexer.writer import IndexWriter
    from opqn_model.api import FaceEncoder
    from query_node.face_model import photo_features

    enc = FaceEncoder.load(tiny_model.path)
    photos = sorted(p for p in tiny_model.data.rglob("*.png"))
    held_out = [p for p in photos if p.parent.name.endswith("00023")]  # one person kept out for enrolment
    gallery = [p for p in photos if p not in held_out]
    contents = [p.read_bytes() for p in gallery]
    feats, kept, _ = photo_features(enc, contents)
    index = tmp_path_factory.mktemp("coord") / "idx"
    w = IndexWriter(str(index), ModelMeta.from_encoder(enc), shard_count=2)
    w.add([face_id_for_photo(contents[i]) for i in kept], [gallery[i].parent.name for i in kept],
          [str(gallery[i]) for i in kept], enc.codec.encode(feats))
    w.commit("gallery")
    nodes = [node(index, [0, 1], "--poll", "0.2"), node(index, [1, 0], "--poll", "0.2")]
    coord = None
    try:
        coord = ServerProcess(["coordinator", "--model", str(tiny_model.path), "--index", str(index),
                               "--nodes", ",".join(n.address for n in nodes), "--port", "0"])
        stub = facepq_pb2_grpc.CoordinatorStub(grpc.insecure_channel(coord.address))
        yield dict(stub=stub, address=coord.address, gallery=gallery, held_out=held_out, enc=enc, index=index)
    finally:
        for p in [coord, *nodes]:
            if p is not None:
                p.kill()


def assert_best(hits, source):
    """The photo's own code maximises every subspace of its lookup table, so it must tie for the top score
    (a small model gives several faces the same code; ties go to the lower shard/row)."""
    mine = [h for h in hits if h.source == source]
    assert mine and mine[0].score == hits[0].score, (source, [(h.source, h.score) for h in hits[:5]])


def test_photo_search_finds_the_same_photo_first_and_is_complete(cluster):
    photo = cluster["gallery"][5]
    reply = cluster["stub"].Search(facepq_pb2.SearchRequest(photo=photo.read_bytes(), top_k=50), timeout=30)
    assert reply.complete and len(reply.hits) == 50
    assert 0 < reply.node_scan_ms < reply.took_ms  # the nodes' kernel time is part of the coordinator's
    assert_best(reply.hits, str(photo))
    assert [h.score for h in reply.hits] == sorted((h.score for h in reply.hits), reverse=True)


def test_bad_inputs_get_actionable_statuses_and_the_server_stays_up(cluster):
    stub, dim = cluster["stub"], cluster["enc"].embedding_dim
    cases = [
        (facepq_pb2.SearchRequest(photo=b"definitely not an image"), "INVALID_ARGUMENT"),
        (facepq_pb2.SearchRequest(embedding=facepq_pb2.Embedding(values=[0.1] * (dim + 1))), "INVALID_ARGUMENT"),
        (facepq_pb2.SearchRequest(embedding=facepq_pb2.Embedding(values=[float("nan")] * dim)), "INVALID_ARGUMENT"),
        (facepq_pb2.SearchRequest(embedding=facepq_pb2.Embedding(values=[0.1] * dim), top_k=1001), "INVALID_ARGUMENT"),
        (facepq_pb2.SearchRequest(), "INVALID_ARGUMENT"),
        (facepq_pb2.SearchRequest(photo=b"\0" * (17 << 20)), "RESOURCE_EXHAUSTED"),
        (facepq_pb2.DeleteRequest(person="nobody-by-this-name"), "NOT_FOUND"),
    ]
    for req, code in cases:
        with pytest.raises(grpc.RpcError) as err:
            (stub.Delete if isinstance(req, facepq_pb2.DeleteRequest) else stub.Search)(req, timeout=30)
        assert err.value.code().name == code, err.value.details()
    ok = stub.Search(facepq_pb2.SearchRequest(embedding=facepq_pb2.Embedding(values=[0.1] * dim)), timeout=30)
    assert ok.complete and len(ok.hits) == 10  # top_k 0 = default 10


def test_enrolled_person_becomes_searchable_and_delete_removes_them(cluster):
    stub, held = cluster["stub"], cluster["held_out"]
    person = held[0].parent.name
    reply = stub.Enrol(facepq_pb2.EnrolRequest(person=person, photos=[
        facepq_pb2.Photo(content=p.read_bytes(), source=str(p)) for p in held[:3]]), timeout=60)
    assert len(reply.face_ids) == 3
    import time

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # nodes hot-reload the new version
        res = stub.Search(facepq_pb2.SearchRequest(photo=held[0].read_bytes(), top_k=50), timeout=30)
        if res.index_version == reply.index_version:
            break
        time.sleep(0.3)
    assert res.index_version == reply.index_version
    assert_best(res.hits, str(held[0]))
    deleted = stub.Delete(facepq_pb2.DeleteRequest(person=person), timeout=30)
    assert deleted.deleted == 3
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        res = stub.Search(facepq_pb2.SearchRequest(photo=held[0].read_bytes(), top_k=50), timeout=30)
        if res.index_version == deleted.index_version:
            break
        time.sleep(0.3)
    assert res.index_version == deleted.index_version and person not in {h.person for h in res.hits}


def test_cli_search_prints_json(cluster):
    import sys

    out = subprocess.run([sys.executable, "-m", "facepq.cli", "search", "--coordinator", cluster["address"],
                          str(cluster["gallery"][0]), "-k", "50", "--json"], capture_output=True, text=True,
                         timeout=60, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["complete"] and len(data["hits"]) == 50
    top = data["hits"][0]["score"]
    assert any(h["source"] == str(cluster["gallery"][0]) and h["score"] == top for h in data["hits"])


def test_nodejs_client_searches_by_embedding(cluster):
    node_bin = shutil.which("node")
    if node_bin is None:
        pytest.skip("the `node` binary is not installed, so the Node.js client cannot run here")
    client = REPO_ROOT / "clients" / "node"
    if not (client / "node_modules").is_dir():
        pytest.fail("clients/node/node_modules is missing: run scripts/install.sh (npm install in clients/node)")
    emb = ",".join(["0.05"] * cluster["enc"].embedding_dim)
    out = subprocess.run([node_bin, "search.js", "--coordinator", cluster["address"], "--embedding", emb, "-k", "4"],
                         capture_output=True, text=True, timeout=60, cwd=client)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["complete"] is True and len(data["hits"]) == 4
