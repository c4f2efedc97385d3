"""A whitened dlib model (`facepq train --trunk dlib --whitening D`) through everything that takes a model from
its checkpoint, with no special case for it: the Ray ingest (plain, DBA, a refinement tier), the coordinator's
face model behind real gRPC query nodes (single-stage, two-stage, αQE), evaluation and calibration.

The model trains with the real `train` on photos whose dlib embeddings are generated into a feature cache
(tests/support/dlib_like.py); the gallery is ingested from an embeddings file.
"""
from __future__ import annotations

import csv
from types import SimpleNamespace

import numpy as np
import pytest

from tests.support.dlib_like import dlib_like_photos, generated_embeddings, train_whitened
from tests.support.index import brute_force, brute_force_two_stage, codes_by_source

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def whitened(tmp_path_factory):
    root = tmp_path_factory.mktemp("whitened")
    with dlib_like_photos(root, people=30, photos=8) as made:
        summary = train_whitened(made, root / "model", "opqn", whitening=48, bits=32)
        yield SimpleNamespace(model=summary["model"], data=made.data, root=root)


def _gallery(root, people=40, photos=5):
    """An embeddings file (X.npy + X.csv) of people the model never saw."""
    emb, persons = generated_embeddings(people, photos, seed=9)
    np.save(root / "gallery.npy", emb)
    with open(root / "gallery.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["person", "source"])
        writer.writerows([p, f"g/{i}"] for i, p in enumerate(persons))
    return emb, root / "gallery.npy"


def test_ingest_and_dba_encode_with_the_whitened_codec(ray_local, whitened, tmp_path):
    from indexer.dba import DBA, augment
    from indexer.job import run_ingest
    from indexer.store import IndexStore
    from opqn_model.api import FaceEncoder

    enc = FaceEncoder.load(whitened.model)
    assert enc.codec.name == "whitened"
    emb, gallery = _gallery(tmp_path)
    s = run_ingest(str(whitened.model), str(gallery), str(tmp_path / "idx"), shards=2, progress=False)
    assert s.faces_added == len(emb)
    codes, expected = codes_by_source(tmp_path / "idx"), enc.codec.encode(emb)
    assert all(codes[f"g/{i}"] == expected[i].tobytes() for i in range(len(emb)))
    assert IndexStore(str(tmp_path / "idx")).load_manifest().model.codec == "whitened"

    s = run_ingest(str(whitened.model), str(gallery), str(tmp_path / "dba"), shards=2, progress=False,
                   dba=(3, 2.0))
    codes, expected = codes_by_source(tmp_path / "dba"), enc.codec.encode(augment(emb, DBA(3, 2.0)))
    assert all(codes[f"g/{i}"] == expected[i].tobytes() for i in range(len(emb)))


def test_search_through_grpc_nodes_single_stage_two_stage_and_expansion(ray_local, whitened, tmp_path):
    from facepq_core.expansion import Expansion, alpha_expand
    from indexer.job import run_ingest
    from opqn_model.api import FaceEncoder
    from query_node.coordinator import Coordinator
    from query_node.face_model import FaceModel
    from query_node.node_server import NodeServer
    from query_node.service import CoordinatorService, SearchOptions
    from tests.support.fake_nodes import FakeRegistry, record

    enc = FaceEncoder.load(whitened.model)
    emb, gallery = _gallery(tmp_path)
    index = tmp_path / "idx"
    run_ingest(str(whitened.model), str(gallery), str(index), shards=2, progress=False, refine="codes:32")
    codes = codes_by_source(index)
    nodes = [NodeServer(str(index), [s]).start() for s in (0, 1)]
    coord = Coordinator(FakeRegistry([record(n.address, [s]) for s, n in enumerate(nodes)]), 2)
    service = CoordinatorService(coord, FaceModel(enc), str(index))
    try:
        for q in (0, 7, 123):
            query = emb[q] + np.float32(0.01) * np.random.default_rng(q).standard_normal(128).astype(np.float32)
            tables = enc.codec.query_tables(query[None])[0]
            plain = service.search(query.tolist(), 10, SearchOptions(refine_candidates=0))
            assert [(h.face_id, h.score, h.shard) for h in plain.hits] == brute_force(index, tables, 10)

            refine = enc.refine_codec("codes:32").query_tables(query[None])[0]
            two = service.search(query.tolist(), 10, SearchOptions(refine_candidates=20))
            assert [(h.face_id, h.score, h.shard) for h in two.hits] == \
                brute_force_two_stage(index, tables, refine, 20, 10)

            first = brute_force(index, tables, 3)
            source_of = {h.face_id: h.source for h in plain.hits}
            stored = np.stack([np.frombuffer(codes[source_of[fid]], np.uint8) for fid, _, _ in first])
            vector = alpha_expand(enc.codec.expansion_vector(query[None])[0], enc.codec.reconstruct(stored), 3.0)
            expanded = service.search(query.tolist(), 10, SearchOptions(refine_candidates=0,
                                                                         expansion=Expansion(3, 3.0)))
            assert [(h.face_id, h.score, h.shard) for h in expanded.hits] == \
                brute_force(index, enc.codec.tables_from_vector(vector[None])[0], 10)
            assert plain.hits[0].person == f"person_{q // 5:03d}"  # its own person first
    finally:
        coord.close()
        for n in nodes:
            n.stop(0)


def test_evaluation_and_calibration_take_the_whitened_codec(whitened, tmp_path):
    """On the people the model held out of training (the checkpoint's split; their embeddings are in the
    module's feature cache)."""
    from opqn_model.calibrate import calibrate_model
    from opqn_model.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(whitened.model, str(whitened.data), "unseen", progress=False, method="opqn")
    assert result["codec"] == "whitened" and result["n_queries"] > 0
    assert 0.0 < result["map"] <= 1.0 and 0.0 < result["map_float_head"] <= 1.0
    cal, path = calibrate_model(whitened.model, str(whitened.data), fars=(1e-2,), out=tmp_path / "cal.json")
    assert cal.codec == "whitened" and path.exists() and cal.operating_points
