"""Malformed requests and files: each gets its documented gRPC status or CLI exit code and an actionable
message, and the servers stay up through all of them (table-driven + hypothesis fuzzing)."""
from __future__ import annotations

import json
import math
from concurrent import futures

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from facepq_proto.facepq.v1 import facepq_pb2 as pb
from facepq_proto.facepq.v1 import facepq_pb2_grpc
from indexer.store import IndexStore
from tests.support.processes import Procs, run_cli

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def cluster(gallery, tmp_path_factory):
    import shutil

    index = tmp_path_factory.mktemp("badinput") / "idx"
    shutil.copytree(gallery["template"], index)
    procs = Procs()
    try:
        node = procs.node(index, [0, 1])
        coord = procs.coordinator(gallery["model"], index, "--nodes", node.address)
        yield dict(index=index, node=node, coord=coord,
                   stub=facepq_pb2_grpc.CoordinatorStub(grpc.insecure_channel(
                       coord.address, options=[("grpc.max_send_message_length", 64 << 20)])),
                   node_stub=facepq_pb2_grpc.QueryNodeStub(grpc.insecure_channel(
                       node.address, options=[("grpc.max_send_message_length", 64 << 20)])),
                   faces=gallery["faces"], dim=gallery["enc"].embedding_dim, M=gallery["enc"].codec.spec.M, K=gallery["enc"].codec.spec.K)
    finally:
        procs.kill_all()


def _png_bytes(gallery):
    return next(iter(gallery["photos"].values()))[0].read_bytes()


def _table(m, k, fill=0.5):
    return pb.LookupTable(m=m, k=k, values=[fill] * (m * k))


def rpc_cases(c, gallery):
    """(name, method, request, expected status, text in the message)."""
    dim, M, K = c["dim"], c["M"], c["K"]
    emb = pb.Embedding
    good_table = _table(M, K)
    return [
        ("photo is not an image", "Search", pb.SearchRequest(photo=b"definitely not an image"), "INVALID_ARGUMENT",
         "cannot be used: not_an_image"),
        ("empty photo", "Search", pb.SearchRequest(photo=b""), "INVALID_ARGUMENT", "not_an_image"),
        ("truncated PNG", "Search", pb.SearchRequest(photo=_png_bytes(gallery)[:200]), "INVALID_ARGUMENT",
         "cannot be used"),
        ("embedding too long", "Search", pb.SearchRequest(embedding=emb(values=[0.1] * (dim + 1))),
         "INVALID_ARGUMENT", f"must have {dim} values"),
        ("embedding empty", "Search", pb.SearchRequest(embedding=emb(values=[])), "INVALID_ARGUMENT",
         f"must have {dim} values"),
        ("embedding NaN", "Search", pb.SearchRequest(embedding=emb(values=[math.nan] * dim)), "INVALID_ARGUMENT",
         "NaN"),
        ("embedding inf", "Search", pb.SearchRequest(embedding=emb(values=[0.0] * (dim - 1) + [math.inf])),
         "INVALID_ARGUMENT", "infinite"),
        ("top_k 1001", "Search", pb.SearchRequest(embedding=emb(values=[0.1] * dim), top_k=1001), "INVALID_ARGUMENT",
         "top_k must be in 1..1000"),
        ("huge top_k", "Search", pb.SearchRequest(embedding=emb(values=[0.1] * dim), top_k=2**32 - 1),
         "INVALID_ARGUMENT", "top_k"),
        ("no query", "Search", pb.SearchRequest(top_k=5), "INVALID_ARGUMENT", "send a photo"),
        ("oversized message", "Search", pb.SearchRequest(photo=b"\0" * (17 << 20)), "RESOURCE_EXHAUSTED", ""),
        ("enrol without a name", "Enrol", pb.EnrolRequest(person="  ", photos=[pb.Photo(content=b"x")]),
         "INVALID_ARGUMENT", "non-empty name"),
        ("enrol name with a newline", "Enrol", pb.EnrolRequest(person="a\nb", photos=[pb.Photo(content=b"x")]),
         "INVALID_ARGUMENT", "printable"),
        ("enrol name too long", "Enrol", pb.EnrolRequest(person="x" * 300, photos=[pb.Photo(content=b"x")]),
         "INVALID_ARGUMENT", "at most 256"),
        ("enrol without photos", "Enrol", pb.EnrolRequest(person="someone"), "INVALID_ARGUMENT", "at least one photo"),
        ("enrol of non-image bytes", "Enrol", pb.EnrolRequest(person="someone", photos=[
            pb.Photo(content=b"\x89PNG broken", source="a.png"), pb.Photo(content=b"", source="b.png")]),
         "FAILED_PRECONDITION", "no usable face in any photo (a.png: not_an_image; b.png: not_an_image)"),
        ("delete unknown person", "Delete", pb.DeleteRequest(person="nobody-by-this-name"), "NOT_FOUND",
         "no live faces of person 'nobody-by-this-name'"),
        ("delete unknown face ids", "Delete", pb.DeleteRequest(face_ids=pb.FaceIds(ids=[1, 2, 3])), "NOT_FOUND",
         "not live"),
        ("delete empty face id list", "Delete", pb.DeleteRequest(face_ids=pb.FaceIds(ids=[])), "INVALID_ARGUMENT",
         "face_ids is empty"),
        ("delete without target", "Delete", pb.DeleteRequest(), "INVALID_ARGUMENT", "send a person or face_ids"),
        ("compact negative grace", "Compact", pb.CompactRequest(grace_seconds=-1), "INVALID_ARGUMENT", ">= 0"),
        ("compact NaN grace", "Compact", pb.CompactRequest(grace_seconds=math.nan), "INVALID_ARGUMENT", ">= 0"),
        ("node: unknown shard", "node.Search", pb.NodeSearchRequest(tables=[good_table], top_k=3, shards=[7]),
         "NOT_FOUND", "not served by this node"),
        ("node: wrong table shape", "node.Search", pb.NodeSearchRequest(tables=[_table(M, K * 2)], top_k=3),
         "INVALID_ARGUMENT", f"needs [M={M}, K={K}]"),
        ("node: NaN table", "node.Search", pb.NodeSearchRequest(tables=[_table(M, K, math.nan)], top_k=3),
         "INVALID_ARGUMENT", "NaN"),
        ("node: too many tables", "node.Search", pb.NodeSearchRequest(tables=[good_table] * 65, top_k=3),
         "INVALID_ARGUMENT", "at most 64"),
        ("node: top_k 0", "node.Search", pb.NodeSearchRequest(tables=[good_table], top_k=0), "INVALID_ARGUMENT",
         "top_k"),
    ]


def _call(c, method, request):
    if method.startswith("node."):
        return getattr(c["node_stub"], method[5:])(request, timeout=30)
    return getattr(c["stub"], method)(request, timeout=30)


def _assert_up(c):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for proc in (c["node"], c["coord"]):
        assert proc.alive(), proc.text()[-2000:]
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(proc.address))
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == 1


def test_malformed_requests_get_their_status_and_message(cluster, gallery):
    version = IndexStore(cluster["index"]).current_version()
    cases = rpc_cases(cluster, gallery)
    assert len(cases) >= 20
    failures = []
    for name, method, request, code, text in cases:
        try:
            _call(cluster, method, request)
            failures.append(f"{name}: succeeded, expected {code}")
        except grpc.RpcError as exc:
            if exc.code().name != code or text not in (exc.details() or ""):
                failures.append(f"{name}: got {exc.code().name} {exc.details()!r}, expected {code} with {text!r}")
    assert not failures, "\n".join(failures)
    assert IndexStore(cluster["index"]).current_version() == version  # nothing was committed
    _assert_up(cluster)
    ok = cluster["stub"].Search(pb.SearchRequest(embedding=pb.Embedding(values=[0.1] * cluster["dim"])), timeout=30)
    assert ok.complete and len(ok.hits) == 10


def _copy_index(gallery, path):
    import shutil

    shutil.copytree(gallery["template"], path)
    return path


def _edit_manifest(index, fn):
    store = IndexStore(index)
    rel = f"manifests/{store.current_version():08d}.json"
    d = json.loads((index / rel).read_text())
    fn(d)
    (index / rel).write_text(json.dumps(d))


def file_cases(gallery, tmp):
    """(name, facepq CLI args, expected exit code, text in stderr) over malformed files and flags."""
    model = gallery["model"]
    newer = _copy_index(gallery, tmp / "newer")
    _edit_manifest(newer, lambda d: d.update(format_version=99))
    escape = _copy_index(gallery, tmp / "escape")
    _edit_manifest(escape, lambda d: d["shards"][0]["segments"][0].update(path="../../../etc/passwd"))
    absolute = _copy_index(gallery, tmp / "absolute")
    _edit_manifest(absolute, lambda d: d["shards"][1]["segments"][0].update(path="/etc/passwd"))
    bad_current = _copy_index(gallery, tmp / "badcurrent")
    (bad_current / "CURRENT").write_text("seven\n")
    not_json = _copy_index(gallery, tmp / "notjson")
    (not_json / "manifests/00000001.json").write_text("{ not json")
    dim = gallery["enc"].embedding_dim
    garbage = tmp / "garbage.npy"
    garbage.write_bytes(b"this is not numpy")
    (tmp / "garbage.csv").write_text("person\nx\n")
    f64 = tmp / "f64.npy"
    np.save(f64, np.zeros((2, dim)))
    (tmp / "f64.csv").write_text("person\na\nb\n")
    wrong_dim = tmp / "wrongdim.npy"
    np.save(wrong_dim, np.zeros((2, dim + 3), np.float32))
    (tmp / "wrongdim.csv").write_text("person\na\nb\n")
    no_sidecar = tmp / "nosidecar.npy"
    np.save(no_sidecar, np.zeros((2, dim), np.float32))
    short_sidecar = tmp / "short.npy"
    np.save(short_sidecar, np.zeros((3, dim), np.float32))
    (tmp / "short.csv").write_text("person\na\n")
    not_pem = tmp / "not.pem"
    not_pem.write_text("hello")
    ingest = ["ingest", "--model", model, "--index", tmp / "new-idx", "--no-progress", "--gallery"]
    index = gallery["template"]
    return [
        ("node: manifest of a newer format", ["node", "--index", newer, "--shards", "0"], 2, "upgrade facepq"),
        ("node: segment path outside the root", ["node", "--index", escape, "--shards", "0"], 2,
         "leaves the index root"),
        ("node: absolute segment path", ["node", "--index", absolute, "--shards", "1"], 2, "must be relative"),
        ("node: corrupt CURRENT", ["node", "--index", bad_current, "--shards", "0"], 2, "CURRENT is corrupt"),
        ("node: manifest not JSON", ["node", "--index", not_json, "--shards", "0"], 2, "00000001.json"),
        ("node: no index there", ["node", "--index", tmp / "nothing", "--shards", "0"], 2, "no facepq index"),
        ("node: unknown shard", ["node", "--index", index, "--shards", "5"], 2, "do not exist"),
        ("node: TLS cert without key", ["node", "--index", index, "--shards", "0", "--tls-cert", not_pem], 2,
         "both --tls-cert and --tls-key"),
        ("node: certificate not PEM", ["node", "--index", index, "--shards", "0", "--tls-cert", not_pem,
                                       "--tls-key", not_pem], 2, "not a PEM file"),
        ("ingest: not a .npy file", [*ingest, garbage], 2, "cannot read embeddings"),
        ("ingest: float64 embeddings", [*ingest, f64], 2, "must hold float32"),
        ("ingest: wrong embedding width", [*ingest, wrong_dim], 2, f"this model's trunk gives {dim}-d"),
        ("ingest: embeddings without sidecar", [*ingest, no_sidecar], 2, "needs a sidecar"),
        ("ingest: sidecar row count", [*ingest, short_sidecar], 2, "3 rows"),
        ("search: unreadable photo", ["search", tmp / "missing.jpg", "--coordinator", "127.0.0.1:1"], 2,
         "missing.jpg does not exist"),
    ]


@pytest.mark.slow  # 17 facepq processes, each importing its component (~18 s of CPU)
def test_malformed_files_and_flags_exit_2_with_one_line(gallery, tmp_path):
    cases = file_cases(gallery, tmp_path)
    with futures.ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda case: run_cli(*case[1], timeout=120), cases))
    failures = []
    for (name, args, code, text), out in zip(cases, outs):
        err = out.stderr
        if out.returncode != code or text not in err or "Traceback" in err:
            failures.append(f"{name}: exit {out.returncode}, stderr {err[-600:]!r}; expected {code} with {text!r}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "new-idx").exists()  # a refused ingest creates nothing


def test_cli_search_top_k_out_of_range_is_one_line(cluster, gallery):
    photo = next(iter(gallery["photos"].values()))[0]
    for k in ("5000", "0"):  # refused before any call (0 once meant the default 10, silently)
        out = run_cli("search", photo, "--coordinator", cluster["coord"].address, "-k", k)
        assert out.returncode == 2 and "-k must be in 1..1000" in out.stderr
        assert "Traceback" not in out.stderr


floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, -0.0, 1e38, -1e38, 1e-45]))


@st.composite
def search_requests(draw, dim):
    kind = draw(st.sampled_from(["photo", "embedding", "embedding_right_len", "none"]))
    top_k = draw(st.one_of(st.integers(0, 1100), st.integers(0, 2**32 - 1)))
    if kind == "photo":
        return pb.SearchRequest(photo=draw(st.binary(max_size=512)), top_k=top_k)
    if kind == "embedding":
        return pb.SearchRequest(embedding=pb.Embedding(values=draw(st.lists(floats, max_size=2 * dim))), top_k=top_k)
    if kind == "embedding_right_len":
        return pb.SearchRequest(embedding=pb.Embedding(values=draw(st.lists(floats, min_size=dim, max_size=dim))),
                                top_k=top_k)
    return pb.SearchRequest(top_k=top_k)


def test_fuzzed_search_requests_get_an_answer_or_a_client_error(cluster):
    dim = cluster["dim"]
    seen = {}

    extreme = [3.4e38, -3.4e38] + [0.0] * (dim - 2)  # finite, but its squares overflow float32

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(search_requests(dim))
    @example(pb.SearchRequest(embedding=pb.Embedding(values=extreme), top_k=3))
    @example(pb.SearchRequest(embedding=pb.Embedding(values=[-3.4e38] * dim)))
    @example(pb.SearchRequest(embedding=pb.Embedding(values=[1e-45] * dim), top_k=1000))
    def check(request):
        try:
            reply = cluster["stub"].Search(request, timeout=30)
        except grpc.RpcError as exc:
            assert exc.code().name in ("INVALID_ARGUMENT", "FAILED_PRECONDITION"), (exc.code(), exc.details())
            assert exc.details()
            seen[exc.code().name] = seen.get(exc.code().name, 0) + 1
            return
        k = request.top_k or 10
        assert 1 <= k <= 1000 and reply.complete and len(reply.hits) == min(k, cluster["faces"])
        scores = [h.score for h in reply.hits]
        assert scores == sorted(scores, reverse=True) and all(math.isfinite(s) for s in scores)
        seen["OK"] = seen.get("OK", 0) + 1

    check()
    assert seen.get("OK") and seen.get("INVALID_ARGUMENT"), seen
    _assert_up(cluster)


def test_fuzzed_node_and_delete_requests_never_crash(cluster):
    M, K = cluster["M"], cluster["K"]

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(m=st.integers(0, 2 * M), k=st.sampled_from([0, 1, K // 2, K, K + 1]),
           fill=floats, top_k=st.integers(0, 2**32 - 1), n_tables=st.integers(0, 3),
           shards=st.lists(st.integers(0, 2**32 - 1), max_size=3), version=st.text(max_size=12),
           ids=st.lists(st.integers(0, 2**64 - 1), max_size=5))
    @example(m=M, k=K, fill=0.5, top_k=3, n_tables=1, shards=[], version="\u00b2", ids=[])  # '²'.isdigit()
    @example(m=M, k=K, fill=0.5, top_k=3, n_tables=1, shards=[], version="99999999999", ids=[1])
    def check(m, k, fill, top_k, n_tables, shards, version, ids):
        req = pb.NodeSearchRequest(tables=[_table(m, k, fill)] * n_tables, top_k=top_k, shards=shards,
                                   index_version=version)
        try:
            reply = cluster["node_stub"].Search(req, timeout=30)
            assert len(reply.results) == n_tables
        except grpc.RpcError as exc:
            assert exc.code().name in ("INVALID_ARGUMENT", "NOT_FOUND"), (exc.code(), exc.details())
        try:
            cluster["stub"].Delete(pb.DeleteRequest(face_ids=pb.FaceIds(ids=ids)), timeout=30)
            pytest.fail("random face ids were deleted")
        except grpc.RpcError as exc:
            assert exc.code().name in ("INVALID_ARGUMENT", "NOT_FOUND"), (exc.code(), exc.details())

    check()
    _assert_up(cluster)
