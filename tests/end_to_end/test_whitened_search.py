"""A whitened dlib model end to end (`facepq train --trunk dlib --whitening 64`, codec 'whitened' around 'opqn').

train (real dlib embeddings of ORL, one trained epoch after the data start) -> ingest (`facepq ingest`, Ray)
-> two query nodes -> coordinator -> search through gRPC, with and without αQE: the merged answers equal
brute-force rankings of the same index by the checkpoint's codec, which the coordinator loaded on its own.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.end_to_end.conftest import Cluster, ingest_embeddings, train_cli
from tests.support.index import brute_force, codes_by_source

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def whitened(att_faces, orl, tmp_path_factory):
    """A whitened OPQN model of ORL's training people and an index of every photo but each person's 1.pgm."""
    from opqn_model.api import FaceEncoder

    root = tmp_path_factory.mktemp("whitened")
    model = train_cli(root / "model", att_faces, "--trunk", "dlib", "--whitening", "64", "--bits", "64",
                      "--epochs", "1")
    gallery = orl["names"] != "1.pgm"
    index = root / "index"
    sources = [r.path for r, g in zip(orl["records"], gallery) if g]
    ingest_embeddings(model, index, orl["embeddings"][gallery], orl["persons"][gallery], sources)
    return dict(model=model, index=index, encoder=FaceEncoder.load(model), queries=~gallery, sources=sources)


def test_the_checkpoint_and_the_index_record_the_whitened_codec(whitened, orl):
    from indexer.store import IndexStore
    from opqn_model.checkpoint import load_checkpoint

    payload = load_checkpoint(whitened["model"], "opqn")
    assert payload["codec"] == "whitened" and payload["model_config"].whitening == 64
    codec = whitened["encoder"].codec
    assert codec.name == "whitened" and codec.inner.name == "opqn" and codec.projection.shape == (64, 128)
    manifest = IndexStore(str(whitened["index"])).load_manifest()
    assert manifest.model.codec == "whitened" and manifest.model.fingerprint == payload["fingerprint"]
    stored = codes_by_source(whitened["index"])
    gallery = ~whitened["queries"]
    expected = codec.encode(orl["embeddings"][gallery])
    assert all(stored[s] == expected[i].tobytes() for i, s in enumerate(whitened["sources"]))


def test_search_with_and_without_expansion_through_two_nodes_and_a_coordinator(whitened, orl):
    from facepq_core.expansion import alpha_expand
    from facepq_proto.facepq.v1 import facepq_pb2 as pb

    codec = whitened["encoder"].codec
    stored = codes_by_source(whitened["index"])
    cluster = Cluster(whitened["model"], whitened["index"])
    try:
        top1, queries = 0, np.flatnonzero(whitened["queries"])
        for i in queries:
            emb = orl["embeddings"][i]
            reply = cluster.stub.Search(pb.SearchRequest(embedding=pb.Embedding(values=emb.tolist()), top_k=20),
                                        timeout=30)
            assert reply.complete
            table = codec.query_tables(emb[None])[0]
            assert [(h.face_id, h.score, h.shard) for h in reply.hits] == brute_force(whitened["index"], table, 20)
            top1 += reply.hits[0].person == orl["persons"][i]
            if i in queries[:5]:
                expanded = cluster.stub.Search(pb.SearchRequest(embedding=pb.Embedding(values=emb.tolist()), top_k=20,
                                                                expansion=pb.QueryExpansion(n=3, alpha=3.0)),
                                               timeout=30)
                hits = np.stack([np.frombuffer(stored[h.source], np.uint8) for h in reply.hits[:3]])
                vector = alpha_expand(codec.expansion_vector(emb[None])[0], codec.reconstruct(hits), 3.0)
                assert [(h.face_id, h.score, h.shard) for h in expanded.hits] == \
                    brute_force(whitened["index"], codec.tables_from_vector(vector[None])[0], 20)
        print(f"whitened 64-bit codes, ORL 1.pgm queries: top-1 person {top1}/{len(queries)}")
        assert top1 >= 0.8 * len(queries)  # a working model finds most ORL people (float dlib: all)
    finally:
        cluster.close()
