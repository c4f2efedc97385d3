"""DMH and DAGH end to end on generated faces: `facepq train --method dmh|dagh` (DenseNet trunks trained from
scratch) -> `facepq ingest` (Ray) -> two query nodes -> coordinator -> search through gRPC; the merged answer
equals a brute-force Hamming ranking of the same index (64-bit codes: the nodes' popcount kernel)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.end_to_end.conftest import Cluster, ingest_embeddings, train_cli
from tests.support.index import brute_force

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    from opqn_model.datasets import list_photos
    from opqn_model.synthetic import write_faces

    root = write_faces(tmp_path_factory.mktemp("faces") / "faces", 16, 6, size=64, seed=4)
    return root, list_photos(root)


@pytest.fixture(scope="module", params=[("dmh", "densenet", "binary"), ("dagh", "densenet_attention", "binary_gated")],
                ids=["dmh", "dagh"])
def served(request, faces, tmp_path_factory):
    from opqn_model.api import FaceEncoder

    method, trunk, codec = request.param
    root = tmp_path_factory.mktemp(method)
    data, records = faces
    model = train_cli(root / "model", data, "--method", method, "--trunk", trunk, "--bits", "64", "--align", "none",
                      "--input-size", "32", "--width", "16", "--epochs", "2", "--batch-size", "32")
    encoder = FaceEncoder.load(model)
    crops, kept, skipped = encoder.prepare_photos([r.path for r in records])
    assert not skipped
    embeddings = encoder.trunk_features(crops)
    persons = np.array([r.person for r in records])
    index = root / "index"
    ingest_embeddings(model, index, embeddings, persons, [r.path for r in records])
    return dict(method=method, codec=codec, model=model, index=index, encoder=encoder, embeddings=embeddings,
                persons=persons)


def test_checkpoint_and_index_record_the_method_and_its_binary_codec(served):
    from indexer.store import IndexStore
    from opqn_model.checkpoint import load_checkpoint

    payload = load_checkpoint(served["model"], served["method"])
    assert payload["codec"] == served["codec"] == served["encoder"].codec.name
    manifest = IndexStore(str(served["index"])).load_manifest()
    assert manifest.model.codec == served["codec"] and manifest.model.fingerprint == payload["fingerprint"]
    assert manifest.model.code_spec().code_bytes == 8


def test_hamming_search_through_two_nodes_and_a_coordinator_equals_brute_force(served):
    from facepq_proto.facepq.v1 import facepq_pb2

    codec = served["encoder"].codec
    cluster = Cluster(served["model"], served["index"])
    try:
        assert not cluster.stub.Status(facepq_pb2.StatusRequest(), timeout=30).uncovered_shards
        top1 = 0
        for i in range(0, len(served["embeddings"]), 6):
            emb = served["embeddings"][i]
            reply = cluster.stub.Search(facepq_pb2.SearchRequest(embedding=facepq_pb2.Embedding(values=emb.tolist()),
                                                                 top_k=20), timeout=30)
            assert reply.complete
            table = codec.query_tables(emb[None])[0]
            assert np.all(table == np.round(table)) and table.max() == 0 and table.min() >= -8  # -Hamming per byte
            got = [(h.face_id, h.score, h.shard) for h in reply.hits]
            assert got == brute_force(served["index"], table, 20)
            assert reply.hits[0].score == 0.0  # the query's own photo is in the gallery: distance 0
            top1 += reply.hits[0].person == served["persons"][i]
        assert top1 >= 1  # the photo itself (or a same-code photo) ranks first
    finally:
        cluster.close()


@pytest.mark.parametrize("method", ["dmh", "dagh"])
def test_a_head_on_the_dlib_embedding_trains_and_evaluates_on_orl(method, att_faces, orl, tmp_path):
    """The frozen-trunk path: `facepq train --trunk dlib --method M` on ORL, then `facepq eval --method M`."""
    import json

    from tests.support.processes import run_cli

    model = train_cli(tmp_path / "model", att_faces, "--trunk", "dlib", "--method", method, "--bits", "32",
                      "--epochs", "5")
    done = run_cli("eval", "--model", model, "--data", att_faces, "--method", method, "--json", "--no-progress",
                   timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    # 32-bit Hamming codes of unseen ORL people: well above chance (~0.1 with 10 test people)
    assert result["method"] == method
    assert result["map"] > 0.5, result
