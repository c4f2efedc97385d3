"""Two-stage search end to end on real faces: `facepq train` (dlib, 64-bit OPQN + its 32-byte refinement
codes) -> `facepq ingest --refine codes:256` (Ray) -> two query nodes -> coordinator -> gRPC searches whose
answers equal a brute-force re-scoring of each shard's first-pass candidates; Enrol stores the tier too."""
from __future__ import annotations

import numpy as np
import pytest

from tests.end_to_end.conftest import Cluster, ingest_embeddings, train_cli
from tests.support.index import brute_force, brute_force_two_stage
from tests.support.processes import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def tiered(att_faces, orl, tmp_path_factory):
    from opqn_model.api import FaceEncoder

    root = tmp_path_factory.mktemp("two_stage")
    model = train_cli(root / "model", att_faces, "--trunk", "dlib", "--bits", "64")
    gallery = orl["names"] != "1.pgm"
    index = root / "index"
    ingest_embeddings(model, index, orl["embeddings"][gallery], orl["persons"][gallery],
                      [r.path for r, g in zip(orl["records"], gallery) if g], 2, "--refine", "codes:256")
    return {"model": model, "index": index, "encoder": FaceEncoder.load(model), "queries": np.flatnonzero(~gallery)}


def test_two_stage_answers_through_nodes_and_coordinator_equal_the_brute_force(tiered, orl):
    from facepq_proto.facepq.v1 import facepq_pb2

    enc = tiered["encoder"]
    refine = enc.refine_codec("codes:256")
    info = run_cli("index", "info", "--index", tiered["index"])
    assert "refine codes:256 32 B/face (read for candidates only)" in info.stdout
    cluster = Cluster(tiered["model"], tiered["index"])
    try:
        found = 0
        for i in tiered["queries"][:15]:
            emb = orl["embeddings"][i]
            lut, table = enc.codec.query_tables(emb[None])[0], refine.query_tables(emb[None])[0]
            query = facepq_pb2.Embedding(values=emb.tolist())
            reply = cluster.stub.Search(facepq_pb2.SearchRequest(embedding=query, top_k=20), timeout=30)
            assert reply.complete and reply.refine_candidates == 100
            got = [(h.face_id, h.score, h.shard) for h in reply.hits]
            assert got == brute_force_two_stage(tiered["index"], lut, table, 100, 20)
            found += reply.hits[0].person == orl["persons"][i]
            narrow = cluster.stub.Search(facepq_pb2.SearchRequest(embedding=query, top_k=20, refine_candidates=25),
                                         timeout=30)
            assert [(h.face_id, h.score, h.shard) for h in narrow.hits] == \
                brute_force_two_stage(tiered["index"], lut, table, 25, 20)
            single = cluster.stub.Search(facepq_pb2.SearchRequest(embedding=query, top_k=20, refine_candidates=0),
                                         timeout=30)
            assert single.refine_candidates == 0
            assert [(h.face_id, h.score, h.shard) for h in single.hits] == brute_force(tiered["index"], lut, 20)
        assert found >= 14
    finally:
        cluster.close()


def test_an_enrolled_face_gets_its_refinement_row_and_is_found_first(tiered, orl):
    from facepq_proto.facepq.v1 import facepq_pb2
    from indexer.segment import open_segment
    from indexer.store import IndexStore

    enc = tiered["encoder"]
    i = tiered["queries"][3]
    with open(orl["records"][i].path, "rb") as f:
        photo = f.read()
    cluster = Cluster(tiered["model"], tiered["index"])
    try:
        enrolled = cluster.stub.Enrol(facepq_pb2.EnrolRequest(person="newcomer", photos=[
            facepq_pb2.Photo(content=photo, source="new.pgm")]), timeout=60)
        assert len(enrolled.face_ids) == 1
        store = IndexStore(str(tiered["index"]))
        manifest = store.load_manifest()
        rows = {int(f): seg.refine[j].tobytes() for ref in manifest.segments
                for seg in [open_segment(store, ref, model=manifest.model)] for j, f in enumerate(seg.face_ids)}
        expected = enc.refine_codec("codes:256").encode(orl["embeddings"][i][None])[0].tobytes()
        assert rows[enrolled.face_ids[0]] == expected
        import time

        deadline = time.monotonic() + 30
        while True:  # the nodes pick the new version up on their next poll
            reply = cluster.stub.Search(facepq_pb2.SearchRequest(photo=photo, top_k=5), timeout=30)
            if reply.index_version == enrolled.index_version or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert reply.hits[0].person == "newcomer" and reply.refine_candidates == 100
    finally:
        cluster.close()
