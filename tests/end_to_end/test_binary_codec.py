"""A second code type end to end: ITQ binary codes of the dlib embedding (method itq, codec 'binary').

train (`facepq train --method itq`) -> ingest (`facepq ingest`, Ray) -> two query nodes -> coordinator ->
search through gRPC, and the merged answer equals a brute-force Hamming ranking of the same index.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.end_to_end.conftest import Cluster, ingest_embeddings, train_cli
from tests.support.index import brute_force

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def itq(att_faces, orl, tmp_path_factory):
    """An ITQ model of ORL's training people and an index of every photo but each person's 1.pgm."""
    from opqn_model.api import FaceEncoder

    root = tmp_path_factory.mktemp("itq")
    model = train_cli(root / "model", att_faces, "--trunk", "dlib", "--method", "itq", "--bits", "64")
    gallery = orl["names"] != "1.pgm"
    index = root / "index"
    ingest_embeddings(model, index, orl["embeddings"][gallery], orl["persons"][gallery],
                      [r.path for r, g in zip(orl["records"], gallery) if g])
    return dict(model=model, index=index, encoder=FaceEncoder.load(model), queries=~gallery)


def test_itq_checkpoint_records_its_method_and_binary_codec(itq):
    from indexer.store import IndexStore
    from opqn_model.checkpoint import load_checkpoint

    payload = load_checkpoint(itq["model"])  # the folder `facepq train --out` wrote
    assert payload["method"] == "itq" and payload["codec"] == "binary"
    codec = itq["encoder"].codec
    assert codec.name == "binary" and codec.spec.code_bytes == 8 and codec.spec.K == 256
    manifest = IndexStore(str(itq["index"])).load_manifest()
    assert manifest.model.codec == "binary" and manifest.model.fingerprint == payload["fingerprint"]


def test_hamming_search_through_two_nodes_and_a_coordinator_equals_brute_force(itq, orl):
    from facepq_proto.facepq.v1 import facepq_pb2

    codec = itq["encoder"].codec
    cluster = Cluster(itq["model"], itq["index"])
    try:
        status = cluster.stub.Status(facepq_pb2.StatusRequest(), timeout=30)
        assert not status.uncovered_shards
        top1 = 0
        queries = np.flatnonzero(itq["queries"])
        for i in queries:
            emb = orl["embeddings"][i]
            reply = cluster.stub.Search(facepq_pb2.SearchRequest(embedding=facepq_pb2.Embedding(values=emb.tolist()),
                                                                 top_k=30), timeout=30)
            assert reply.complete
            table = codec.query_tables(emb[None])[0]
            assert np.all(table == np.round(table)) and table.min() >= -8  # minus Hamming distances per byte
            got = [(h.face_id, h.score, h.shard) for h in reply.hits]
            assert got == brute_force(itq["index"], table, 30)
            top1 += reply.hits[0].person == orl["persons"][i]
        assert top1 >= 0.9 * len(queries)  # Hamming on 64 ITQ bits still finds most ORL people (float: all)
    finally:
        cluster.close()
