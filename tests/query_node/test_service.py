"""CoordinatorService without processes: a real small index, nodes answering in-process from real LiveIndex
views (tests.support.fake_nodes), and a fake model whose tables and codes are plain arithmetic.

Also the edge: the gRPC servicer in-process over the same service, and the one error -> status table.
"""
from __future__ import annotations

import math

import grpc
import numpy as np
import pytest

from facepq_core import errors
from facepq_core.errors import HTTP_STATUS, ConfigError, InvalidRequest, NodeRefused, NoFaceFound, NotFound, Unavailable
from query_node.coordinator import Coordinator
from query_node.service import CoordinatorService, Photo, SearchOptions
from tests.support.fake_model import FACE, K, M, FakeModel
from tests.support.fake_nodes import FakeNodeClients, FakeRegistry, LiveNode, MemoryNode, gallery, record
from tests.support.index import brute_force, build_index, dyadic_lut



@pytest.fixture
def cluster(tmp_path):
    """A 2-shard index of 600 random codes, node a serving shard 0 and node b shard 1, and the service."""
    path = tmp_path / "idx"
    meta, ids, _ = build_index(path, rows=600, shard_count=2)
    clients = FakeNodeClients(nodes={"a": LiveNode(path, [0]), "b": LiveNode(path, [1])})
    coord = Coordinator(FakeRegistry([record("a", [0]), record("b", [1])]), 2, node_clients=clients)
    service = CoordinatorService(coord, FakeModel(meta), str(path))
    yield {"service": service, "clients": clients, "path": path, "ids": ids, "coord": coord}
    coord.close()


def _ids(hits):
    return [(h.face_id, h.score, h.shard) for h in hits]


def _current(path):
    from indexer.store import IndexStore

    return IndexStore(str(path)).current_version()


def test_a_search_by_embedding_is_the_exact_top_k_at_the_current_version(cluster):
    lut = dyadic_lut(np.random.default_rng(1), M, K)
    result = cluster["service"].search(lut.reshape(-1).tolist(), 20)
    assert result.complete and result.index_version == "1" and len(result.hits) == 20
    assert _ids(result.hits) == brute_force(cluster["path"], lut, 20)
    assert {c.index_version for c in cluster["clients"].calls} == {"1"}  # nodes are held to the current version


def test_top_k_zero_means_ten_and_a_top_k_out_of_range_is_refused_before_any_node_is_asked(cluster):
    service, emb = cluster["service"], np.zeros(M * K).tolist()
    assert len(service.search(emb, 0).hits) == 10
    cluster["clients"].calls.clear()
    for k in (1001, 2**32 - 1):
        with pytest.raises(InvalidRequest, match=f"top_k must be in 1..1000, got {k}") as err:
            service.search(emb, k)
        assert err.value.status == "INVALID_ARGUMENT"
    assert not cluster["clients"].calls


def test_a_search_without_a_query_or_with_a_bad_one_says_what_to_send(cluster):
    with pytest.raises(InvalidRequest, match=r"send a photo \(bytes\) or an embedding"):
        cluster["service"].search(None, 5)
    with pytest.raises(ConfigError, match=f"must have {M * K} values"):
        cluster["service"].search([0.1] * 3, 5)
    with pytest.raises(NoFaceFound, match="no face found") as err:
        cluster["service"].search(b"a landscape", 5)
    assert err.value.status == "FAILED_PRECONDITION"


def test_an_enrolled_face_becomes_searchable_delete_hides_it_and_compact_removes_it(cluster):
    service, code = cluster["service"], bytes(range(7, 7 + M))
    enrolled = service.enrol("newcomer", [Photo(FACE + code, "new.png"), Photo(b"junk", "x.png"), Photo(b"")])
    assert len(enrolled.face_ids) == 1 and enrolled.index_version == "2"
    assert enrolled.skipped == ["x.png: not_an_image", "enrol:newcomer:2: not_an_image"]
    found = service.search(FACE + code, 5)
    assert found.complete and found.index_version == "2"
    assert (found.hits[0].person, found.hits[0].source, found.hits[0].score) == ("newcomer", "new.png", M)
    deleted = service.delete(person="newcomer")
    assert (deleted.deleted, deleted.index_version) == (1, "3")
    after = service.search(FACE + code, 50)
    assert after.index_version == "3" and "newcomer" not in {h.person for h in after.hits}
    compacted = service.compact(0)
    assert compacted.rows_removed == 1 and compacted.index_version == "4" and compacted.files_deleted >= 1
    assert service.search(FACE + code, 5).complete


@pytest.mark.parametrize("person, photos, error, message", [
    ("  ", [Photo(b"x")], InvalidRequest, "non-empty name"),
    ("a\nb", [Photo(b"x")], InvalidRequest, "printable"),
    ("x" * 300, [Photo(b"x")], InvalidRequest, "at most 256"),
    ("someone", [], InvalidRequest, "at least one photo"),
    ("someone", [Photo(b"\x89PNG broken", "a.png"), Photo(b"", "b.png")], NoFaceFound,
     "no usable face in any photo (a.png: not_an_image; b.png: not_an_image)"),
])
def test_a_refused_enrolment_commits_nothing(cluster, person, photos, error, message):
    with pytest.raises(error) as err:
        cluster["service"].enrol(person, photos)
    assert message in str(err.value)
    assert _current(cluster["path"]) == 1


def test_a_refused_delete_says_why_and_commits_nothing(cluster):
    service = cluster["service"]
    cases = [({}, InvalidRequest, "send a person or face_ids"),
             ({"face_ids": []}, InvalidRequest, "face_ids is empty"),
             ({"person": "p1", "face_ids": [1]}, InvalidRequest, "not both"),
             ({"person": "nobody-by-this-name"}, NotFound, "no live faces of person 'nobody-by-this-name'"),
             ({"face_ids": [1, 2, 3]}, NotFound, "not live")]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message) as err:
            service.delete(**kwargs)
        assert err.value.status == ("NOT_FOUND" if error is NotFound else "INVALID_ARGUMENT")
    assert _current(cluster["path"]) == 1
    assert service.delete(face_ids=[int(cluster["ids"][0])]).deleted == 1


@pytest.mark.parametrize("grace", [-1.0, math.inf, math.nan])
def test_compact_refuses_a_grace_that_is_negative_infinite_or_nan(cluster, grace):
    with pytest.raises(InvalidRequest, match="grace_seconds must be a finite number >= 0"):
        cluster["service"].compact(grace)


def test_a_commit_lock_held_too_long_is_unavailable_so_the_caller_retries(cluster, monkeypatch):
    import indexer.commit
    from indexer.errors import IndexLockTimeout

    def held(*args, **kwargs):
        raise IndexLockTimeout("another writer holds the commit lock; retry")

    monkeypatch.setattr(indexer.commit, "delete_faces", held)
    monkeypatch.setattr(indexer.commit, "compact", held)
    for call in (lambda s: s.delete(person="p1"), lambda s: s.compact(0)):
        with pytest.raises(Unavailable, match="holds the commit lock") as err:
            call(cluster["service"])
        assert err.value.status == "UNAVAILABLE"


def test_an_unreadable_index_version_makes_a_search_unavailable(cluster):
    (cluster["path"] / "CURRENT").write_text("seven\n")
    with pytest.raises(Unavailable, match="cannot read the index version: .*CURRENT is corrupt"):
        cluster["service"].search(np.zeros(M * K).tolist(), 5)


def test_a_node_refusing_the_search_is_an_internal_error_naming_the_likely_cause(tmp_path):
    path = tmp_path / "idx"
    meta, _, _ = build_index(path, rows=50, shard_count=1)
    clients = FakeNodeClients(nodes={"a": MemoryNode({1: gallery([0])}, fail="UNAUTHENTICATED")})
    coord = Coordinator(FakeRegistry([record("a", [0])]), 1, node_clients=clients)
    try:
        with pytest.raises(NodeRefused, match="UNAUTHENTICATED.*share the node token") as err:
            CoordinatorService(coord, FakeModel(meta), str(path)).search(np.zeros(M * K).tolist(), 5)
        assert err.value.status == "INTERNAL"
    finally:
        coord.close()


def test_the_fan_out_ends_before_the_callers_deadline(cluster):
    service, clients, emb = cluster["service"], cluster["clients"], np.zeros(M * K).tolist()
    service.search(emb, 5, SearchOptions(time_remaining=1.0))
    assert all(0 < c.timeout <= 0.95 for c in clients.calls)
    clients.calls.clear()
    service.search(emb, 5)
    assert all(0.95 < c.timeout <= service.search_timeout for c in clients.calls)
    clients.calls.clear()
    late = service.search(emb, 5, SearchOptions(time_remaining=0.01))  # nothing left for the nodes
    assert not clients.calls and late.missing_shards == [0, 1] and not late.complete


def test_status_lists_the_nodes_the_shards_no_healthy_node_serves_and_the_model(tmp_path):
    path = tmp_path / "idx"
    meta, _, _ = build_index(path, rows=50, shard_count=3)
    records = [record("a", [0], version=""), record("b", [1], healthy=False, version="1"), record("c", [0, 2])]
    coord = Coordinator(FakeRegistry(records), 3, node_clients=FakeNodeClients())
    try:
        status = CoordinatorService(coord, FakeModel(meta), str(path)).status()
    finally:
        coord.close()
    assert (status.shard_count, status.model_fingerprint, status.uncovered_shards) == (3, meta.fingerprint, [1])
    assert [n.address for n in status.nodes] == ["a", "b", "c"] and status.index_version == "1"


# ---------------------------------------------------------------- the edge


def test_the_grpc_servicer_answers_through_the_service_with_each_errors_status(cluster):
    from facepq_proto.facepq.v1 import facepq_pb2 as pb
    from facepq_proto.facepq.v1 import facepq_pb2_grpc
    from query_node.coordinator_server import SERVICE_NAME, CoordinatorServicer
    from query_node.grpc_server import GrpcServer

    server = GrpcServer(SERVICE_NAME, workers=2).start(
        lambda s: facepq_pb2_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(cluster["service"]), s))
    try:
        stub = facepq_pb2_grpc.CoordinatorStub(grpc.insecure_channel(server.address))
        lut = dyadic_lut(np.random.default_rng(2), M, K)
        reply = stub.Search(pb.SearchRequest(embedding=pb.Embedding(values=lut.reshape(-1).tolist()), top_k=7),
                            timeout=30)
        assert reply.complete and reply.index_version == "1" and reply.took_ms > 0
        assert [(h.face_id, h.score, h.shard) for h in reply.hits] == brute_force(cluster["path"], lut, 7)
        cases = [(stub.Search, pb.SearchRequest(top_k=5), "INVALID_ARGUMENT", "send a photo"),
                 (stub.Search, pb.SearchRequest(photo=b"sky", top_k=5), "FAILED_PRECONDITION", "no face found"),
                 (stub.Search, pb.SearchRequest(photo=b"sky", top_k=1001), "INVALID_ARGUMENT", "top_k must be"),
                 (stub.Delete, pb.DeleteRequest(person="nobody"), "NOT_FOUND", "no live faces of person 'nobody'"),
                 (stub.Delete, pb.DeleteRequest(), "INVALID_ARGUMENT", "send a person or face_ids"),
                 (stub.Delete, pb.DeleteRequest(face_ids=pb.FaceIds(ids=[])), "INVALID_ARGUMENT", "face_ids is empty"),
                 (stub.Compact, pb.CompactRequest(grace_seconds=-1), "INVALID_ARGUMENT", ">= 0"),
                 (stub.Enrol, pb.EnrolRequest(person="x"), "INVALID_ARGUMENT", "at least one photo")]
        for method, request, code, text in cases:
            with pytest.raises(grpc.RpcError) as err:
                method(request, timeout=30)
            assert (err.value.code().name, text in err.value.details()) == (code, True), err.value.details()
        enrolled = stub.Enrol(pb.EnrolRequest(person="new", photos=[pb.Photo(content=FACE + bytes(M))]), timeout=30)
        assert len(enrolled.face_ids) == 1 and enrolled.index_version == "2"
        assert stub.Compact(pb.CompactRequest(), timeout=30).index_version == "2"  # default grace: nothing to drop
        status = stub.Status(pb.StatusRequest(), timeout=30)
        assert status.shard_count == 2 and [n.address for n in status.nodes] == ["a", "b"]
    finally:
        server.stop(0)


def _error_classes():
    from indexer import errors as index_errors

    seen, todo = [], [errors.FacepqError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    assert index_errors.IndexLockTimeout in seen
    return seen


def test_every_error_names_a_status_that_grpc_and_http_both_know():
    for cls in _error_classes():
        assert cls.status in HTTP_STATUS, cls
        assert grpc.StatusCode[cls.status].name == cls.status, cls


def test_the_status_of_each_kind_of_refusal():
    assert {cls.__name__: cls.status for cls in _error_classes() if cls.__module__ == "facepq_core.errors"} == {
        "FacepqError": "FAILED_PRECONDITION", "ConfigError": "INVALID_ARGUMENT", "InvalidRequest": "INVALID_ARGUMENT",
        "CheckpointError": "FAILED_PRECONDITION", "DataError": "FAILED_PRECONDITION",
        "IndexFormatError": "FAILED_PRECONDITION", "PhotoSkipped": "FAILED_PRECONDITION",
        "NoFaceFound": "FAILED_PRECONDITION", "BadImage": "INVALID_ARGUMENT",
        "NotFound": "NOT_FOUND", "AlreadyEnrolled": "ALREADY_EXISTS", "StorageFull": "RESOURCE_EXHAUSTED",
        "StorageReadOnly": "FAILED_PRECONDITION", "Misconfigured": "FAILED_PRECONDITION",
        "Overloaded": "RESOURCE_EXHAUSTED", "Unavailable": "UNAVAILABLE", "VersionConflict": "ABORTED", "NodeRefused": "INTERNAL",
        "AlreadyExists": "ALREADY_EXISTS", "NotCalibrated": "FAILED_PRECONDITION"}


# ---------------------------------------------------------------- the model's side of a query


class _FaceEncoder:
    """Just enough of opqn_model.api.FaceEncoder for FaceModel: no face in any photo; tables = zeros."""

    embedding_dim, trunk_name, fingerprint = 4, "fake", "f" * 16

    class codec:  # noqa: N801 - stands in for a facepq_core.codecs.Codec: tables = zeros
        embedding_dim = 4

        @staticmethod
        def query_tables(embeddings):
            return np.zeros((len(embeddings), 2, 4), np.float32)

    class pipeline:  # noqa: N801 - a face pipeline that finds no face in any decodable photo
        size = 8

        def __call__(self, image):
            raise NoFaceFound("no face")

    def prepare_photos(self, images):
        from opqn_model.photos import align_photos

        aligned = align_photos(images, self.pipeline())  # real decoding: not-an-image is told apart
        return aligned.crops, aligned.kept, aligned.skipped


def test_face_model_tells_a_photo_without_a_face_from_one_that_is_not_an_image():
    import io

    from PIL import Image

    from query_node.face_model import FaceModel

    model = FaceModel(_FaceEncoder())
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 140, 200)).save(png, format="PNG")
    with pytest.raises(NoFaceFound, match="no face found in the photo; send a photo with a visible, frontal face"):
        model.tables_for(png.getvalue())
    with pytest.raises(InvalidRequest, match="the photo cannot be used: not_an_image "
                                             r"\(send JPEG/PNG/PGM bytes of a face photo\)"):
        model.tables_for(b"definitely not an image")
    assert model.tables_for([0.5, 0.5, 0.5, 0.5]).shape == (1, 2, 4)
    with pytest.raises(ConfigError, match="must have 4 values"):
        model.tables_for([0.5] * 5)
