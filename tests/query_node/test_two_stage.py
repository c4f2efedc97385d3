"""Two-stage search: each shard's first-pass candidates re-scored by the index's refinement tier.

Answers through the coordinator's fan-out and merge (nodes answering from real LiveIndex views) equal a
brute-force re-scoring of the same candidates (tests.support.index.brute_force_two_stage), for both
kinds of tier, across segments, shards and tombstones; the first pass alone is unchanged by a tier.
"""
from __future__ import annotations

import numpy as np
import pytest

from facepq_core.errors import InvalidRequest
from facepq_core.refine import DEFAULT_CANDIDATES, MAX_CANDIDATES
from query_node.coordinator import Coordinator
from tests.support.fake_nodes import FakeNodeClients, FakeRegistry, LiveNode, record
from tests.support.index import (
    brute_force,
    brute_force_two_stage,
    build_index,
    dyadic_lut,
    make_tier,
    random_refine_tables,
)

M, K = 8, 256


def _cluster(path, shard_count):
    clients = FakeNodeClients(nodes={"a": LiveNode(path, range(0, shard_count, 2)),
                                     "b": LiveNode(path, range(1, shard_count, 2))})
    registry = FakeRegistry([record("a", range(0, shard_count, 2)), record("b", range(1, shard_count, 2))])
    return Coordinator(registry, shard_count, node_clients=clients)


def _hits(hits):
    return [(h.face_id, h.score, h.shard) for h in hits]


@pytest.mark.parametrize("kind", ["codes:64", "float16"])
@pytest.mark.parametrize("candidates, k", [(50, 10), (7, 10), (300, 25)])
def test_two_stage_answers_equal_a_brute_force_rescoring_of_the_same_candidates(tmp_path, kind, candidates, k):
    tier = make_tier(kind)
    build_index(tmp_path / "idx", rows=2400, shard_count=3, refine=tier)
    from indexer.commit import delete_faces
    from indexer.store import IndexStore

    store = IndexStore(str(tmp_path / "idx"))
    deleted = []
    rng = np.random.default_rng(3)
    coord = _cluster(tmp_path / "idx", 3)
    try:
        for round_ in range(2):
            luts = np.stack([dyadic_lut(rng, M, K) for _ in range(3)])
            refine = random_refine_tables(rng, tier, 3)
            result = coord.search_tables(luts, k, refine=(refine, candidates))
            assert result.complete
            for q in range(3):
                expected = brute_force_two_stage(tmp_path / "idx", luts[q], refine[q], candidates, k)
                assert _hits(result.hits[q]) == expected
            if round_ == 0:  # tombstoned faces are never candidates
                first = [fid for fid, _, _ in brute_force_two_stage(tmp_path / "idx", luts[0], refine[0],
                                                                     candidates, k)]
                deleted = first[:3]
                delete_faces(store, face_ids=deleted)
                for node in coord.node_clients.nodes.values():
                    node.live.reload_if_changed()
        assert not set(deleted) & {h.face_id for hits in result.hits for h in hits}
    finally:
        coord.close()


def test_the_first_pass_alone_is_unchanged_by_a_refinement_tier(tmp_path):
    """Same codes with and without a tier beside them: identical single-stage answers (the brute force)."""
    plain, tiered = tmp_path / "plain", tmp_path / "tiered"
    build_index(plain, rows=1500, shard_count=2)
    build_index(tiered, rows=1500, shard_count=2, refine=make_tier("float16"))
    lut = dyadic_lut(np.random.default_rng(5), M, K)
    answers = []
    for path in (plain, tiered):
        coord = _cluster(path, 2)
        try:
            answers.append(_hits(coord.search_tables(lut[None], 30).hits[0]))
        finally:
            coord.close()
    assert answers[0] == answers[1] == brute_force(plain, lut, 30)


def test_more_candidates_than_rows_rescore_every_live_row(tmp_path):
    """R beyond a shard's size: every live row is a candidate, so the answer is the refinement tier's own
    exact top-k over the whole index."""
    tier = make_tier("float16")
    build_index(tmp_path / "idx", rows=300, shard_count=2, refine=tier)
    rng = np.random.default_rng(9)
    lut, refine = dyadic_lut(rng, M, K), random_refine_tables(rng, tier, 1)
    coord = _cluster(tmp_path / "idx", 2)
    try:
        hits = coord.search_tables(lut[None], 20, refine=(refine, 1000)).hits[0]
    finally:
        coord.close()
    # the lut plays no part: any table gives the same answer
    assert _hits(hits) == brute_force_two_stage(tmp_path / "idx", np.zeros((M, K), np.float32), refine[0], 1000, 20)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


# ---------------------------------------------------------------- request checks on a node
class _Msg:
    def __init__(self, m, k, values):
        self.m, self.k, self.values, self.values_f32le = m, k, list(values), b""


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    from indexer.store import IndexStore
    from query_node.index_view import load_view

    root = tmp_path_factory.mktemp("views")
    build_index(root / "plain", rows=200, shard_count=1)
    build_index(root / "tiered", rows=200, shard_count=1, refine=make_tier("codes:64"))
    return {name: load_view(IndexStore(str(root / name)), [0]) for name in ("plain", "tiered")}


def test_validate_refine_accepts_one_table_per_query_and_defaults_the_candidates(views):
    from query_node.two_stage import validate_refine

    table = np.arange(8 * 256, dtype=np.float32) / 1024
    refine = validate_refine([_Msg(8, 256, table), _Msg(8, 256, table)], 0, views["tiered"], 2)
    assert refine.candidates == DEFAULT_CANDIDATES and refine.kernel == "lut" and refine.tables.shape == (2, 8, 256)
    assert validate_refine([], 0, views["tiered"], 2) is None
    assert validate_refine([], 0, views["plain"], 1) is None


@pytest.mark.parametrize("view, msgs, candidates, queries, message", [
    ("plain", [_Msg(8, 256, np.zeros(2048))], 10, 1, "no refinement tier"),
    ("tiered", [_Msg(8, 256, np.zeros(2048))], 0, 2, "1 refinement tables for 2 lookup tables"),
    ("tiered", [_Msg(1, 16, np.zeros(16))], 0, 1, r"needs \[8, 256\]"),
    ("tiered", [_Msg(8, 256, [np.nan] * 2048)], 0, 1, "NaN or infinite"),
    ("tiered", [_Msg(8, 256, np.zeros(2048))], MAX_CANDIDATES + 1, 1, f"at most {MAX_CANDIDATES}"),
    ("tiered", [], 10, 1, "refine_candidates without refine_tables"),
])
def test_validate_refine_refuses_what_does_not_fit_the_index(views, view, msgs, candidates, queries, message):
    from query_node.two_stage import validate_refine

    with pytest.raises(InvalidRequest, match=message) as err:
        validate_refine(msgs, candidates, views[view], queries)
    assert err.value.status == "INVALID_ARGUMENT"


# ---------------------------------------------------------------- the coordinator service
class TieredFakeModel:
    """FaceModel's interface without a model. An embedding is M*K lookup-table values followed by the
    refinement table's values; a photo is FACE + its M-byte code + its refinement row (a face's own photo
    then scores 1 per matching sub-code in both passes)."""

    FACE = b"face:"

    def __init__(self, meta):
        self.meta, self.fingerprint = meta, meta.fingerprint

    def model_meta(self, refine=None):
        from indexer.manifest import ModelMeta

        return ModelMeta.from_code_spec(self.meta.code_spec(), self.meta.fingerprint, self.meta.trunk,
                                        self.meta.codec, refine)

    def _split(self, query, tier):
        if isinstance(query, bytes):
            body = query[len(self.FACE):]
            lut = np.zeros((M, K), np.float32)
            lut[np.arange(M), np.frombuffer(body[:M], np.uint8)] = 1
            a, b = tier.query_shape if tier else (0, 0)
            table = np.zeros((a, b), np.float32)
            if tier:
                table[np.arange(a), np.frombuffer(body[M:], np.uint8)] = 1
            return lut[None], table[None]
        values = np.asarray(query, np.float32)
        return values[:M * K].reshape(1, M, K), values[M * K:].reshape(1, *tier.query_shape) if tier else None

    def tables_for(self, query):
        return self._split(query, None)[0]

    def refined_tables_for(self, query, tier):
        return self._split(query, tier)

    def encode_photos(self, contents):
        codes = np.array([np.frombuffer(c[len(self.FACE):][:M], np.uint8) for c in contents], np.uint8)
        return codes, list(range(len(contents))), {}

    def encode_photos_refined(self, contents, tier):
        codes, kept, skipped = self.encode_photos(contents)
        rows = np.array([np.frombuffer(c[len(self.FACE) + M:], np.uint8) for c in contents], np.uint8)
        return codes, rows, kept, skipped


@pytest.fixture
def tiered_service(tmp_path):
    from query_node.service import CoordinatorService

    tier = make_tier("codes:64")
    meta, _, _ = build_index(tmp_path / "idx", rows=900, shard_count=2, refine=tier)
    coord = _cluster(tmp_path / "idx", 2)
    yield CoordinatorService(coord, TieredFakeModel(meta), str(tmp_path / "idx")), tmp_path / "idx", tier, coord
    coord.close()


def test_the_service_searches_in_two_stages_by_default_and_in_one_when_asked(tiered_service):
    from query_node.service import SearchOptions

    service, path, tier, coord = tiered_service
    rng = np.random.default_rng(21)
    lut, refine = dyadic_lut(rng, M, K), random_refine_tables(rng, tier, 1)[0]
    query = np.concatenate([lut.ravel(), refine.ravel()]).tolist()
    result = service.search(query, 15)
    assert result.refine_candidates == DEFAULT_CANDIDATES and result.complete
    assert _hits(result.hits) == brute_force_two_stage(path, lut, refine, DEFAULT_CANDIDATES, 15)
    few = service.search(query, 15, SearchOptions(refine_candidates=20))
    assert _hits(few.hits) == brute_force_two_stage(path, lut, refine, 20, 15)
    single = service.search(query, 15, SearchOptions(refine_candidates=0))
    assert single.refine_candidates == 0 and _hits(single.hits) == brute_force(path, lut, 15)
    coord.node_clients.calls.clear()
    with pytest.raises(InvalidRequest, match=f"refine_candidates must be in 0..{MAX_CANDIDATES}"):
        service.search(query, 15, SearchOptions(refine_candidates=MAX_CANDIDATES + 1))
    assert not coord.node_clients.calls


def test_enrolment_into_a_tiered_index_stores_the_refinement_row(tiered_service):
    from indexer.segment import open_segment
    from indexer.store import IndexStore
    from query_node.service import Photo

    service, path, tier, _ = tiered_service
    code, row = bytes(range(40, 48)), bytes(range(200, 208))
    enrolled = service.enrol("newcomer", [Photo(TieredFakeModel.FACE + code + row, "new.png")])
    store = IndexStore(str(path))
    manifest = store.load_manifest()
    stored = {int(f): (seg.codes[i].tobytes(), seg.refine[i].tobytes()) for ref in manifest.segments
              for seg in [open_segment(store, ref, model=manifest.model)] for i, f in enumerate(seg.face_ids)}
    assert stored[enrolled.face_ids[0]] == (code, row)
    found = service.search(TieredFakeModel.FACE + code + row, 3)
    assert (found.hits[0].person, found.hits[0].score) == ("newcomer", tier.query_shape[0])


def test_an_index_without_a_tier_ignores_the_candidates_option(tmp_path):
    from query_node.service import CoordinatorService, SearchOptions

    meta, _, _ = build_index(tmp_path / "idx", rows=500, shard_count=2)
    coord = _cluster(tmp_path / "idx", 2)
    try:
        service = CoordinatorService(coord, TieredFakeModel(meta), str(tmp_path / "idx"))
        lut = dyadic_lut(np.random.default_rng(2), M, K)
        result = service.search(lut.ravel().tolist(), 10, SearchOptions(refine_candidates=300))
        assert result.refine_candidates == 0 and _hits(result.hits) == brute_force(tmp_path / "idx", lut, 10)
    finally:
        coord.close()


def test_a_false_accept_rate_answers_from_the_first_pass_whose_scores_the_calibration_measured(tiered_service):
    from facepq_core.calibration import fit_calibration
    from query_node.service import SearchOptions

    service, path, tier, coord = tiered_service
    rng = np.random.default_rng(5)
    service.model.calibration = fit_calibration(rng.integers(6, 9, 5000), rng.integers(0, 4, 20000),
                                                service.model.fingerprint, "opqn")
    lut, refine = dyadic_lut(rng, M, K), random_refine_tables(rng, tier, 1)[0]
    query = np.concatenate([lut.ravel(), refine.ravel()]).tolist()
    at_far = service.search(query, 15, SearchOptions(far=1e-2))
    assert at_far.refine_candidates == 0 and at_far.calibrated
    threshold = at_far.threshold
    assert _hits(at_far.hits) == [h for h in brute_force(path, lut, 15) if h[1] >= threshold]
    coord.node_clients.calls.clear()
    with pytest.raises(InvalidRequest, match="far needs the first pass's scores"):
        service.search(query, 15, SearchOptions(far=1e-2, refine_candidates=50))
    assert not coord.node_clients.calls
    # a raw threshold is on the scores the answer has: the re-scored ones, and they carry no similarity
    raw = service.search(query, 15, SearchOptions(threshold=-1e9))
    assert raw.refine_candidates == DEFAULT_CANDIDATES and not raw.calibrated
    assert all(h.similarity is None for h in raw.hits)
    assert _hits(raw.hits) == brute_force_two_stage(path, lut, refine, DEFAULT_CANDIDATES, 15)
