"""The coordinator's HTTP/JSON API with real processes: the bad-input table of the gRPC tests through HTTP
(same statuses through facepq_core.errors.HTTP_STATUS), the same answers as gRPC, bearer tokens, the OpenAPI
document, and Prometheus metrics on both servers moving with the searches."""
from __future__ import annotations

import math
import re
import shutil

import grpc
import numpy as np
import pytest
import requests

from facepq_core.errors import HTTP_STATUS
from facepq_proto.facepq.v1 import facepq_pb2 as pb
from facepq_proto.facepq.v1 import facepq_pb2_grpc
from indexer.store import IndexStore
from tests.reliability.test_bad_input import _png_bytes, rpc_cases
from tests.support.processes import Procs

pytestmark = pytest.mark.timeout(240)
TOKEN = "http-" + "0f1e2d3c" * 4
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _url(proc, what: str) -> str:
    match = re.search(rf"facepq {what} on (http://\S+?)(/metrics)?[\s(]", proc.text())
    assert match, proc.text()[-2000:]
    return match.group(1)


@pytest.fixture(scope="module")
def cluster(gallery, tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    index = root / "idx"
    shutil.copytree(gallery["template"], index)
    (root / "token").write_text(TOKEN + "\n")
    procs = Procs()
    try:
        node = procs.node(index, [0, 1], "--metrics-port", "0")
        coord = procs.coordinator(gallery["model"], index, "--nodes", node.address, "--http-port", "0",
                                  "--metrics-port", "0", "--auth-token-file", root / "token")
        yield dict(index=index, node=node, coord=coord, http=_url(coord, "http serving"),
                   coord_metrics=_url(coord, "metrics"), node_metrics=_url(node, "metrics"),
                   stub=facepq_pb2_grpc.CoordinatorStub(grpc.insecure_channel(coord.address)),
                   dim=gallery["enc"].embedding_dim, M=gallery["enc"].codec.spec.M, K=gallery["enc"].codec.spec.K)
    finally:
        procs.kill_all()


def http_cases(c, gallery):
    """The coordinator rows of the gRPC bad-input table (tests/reliability/test_bad_input.py), as HTTP requests:
    name -> (method, path, requests keyword arguments)."""
    dim, png = c["dim"], _png_bytes(gallery)

    def photo(data, **form):
        return "post", "/v1/search", {"files": {"photo": ("q.png", data)}, "data": form}

    def embedding(values, **more):
        return "post", "/v1/search/embedding", {"data": _json({"embedding": values, **more}),
                                                "headers": {"Content-Type": "application/json"}}

    def enrol(person, photos):
        return "post", "/v1/enrol", {"data": {"person": person}, "headers": AUTH,
                                     "files": [("photos", (name, data)) for name, data in photos]}

    def post(path, body):
        return "post", path, {"data": _json(body), "headers": {**AUTH, "Content-Type": "application/json"}}

    return {
        "photo is not an image": photo(b"definitely not an image"),
        "empty photo": photo(b""),
        "truncated PNG": photo(png[:200]),
        "embedding too long": embedding([0.1] * (dim + 1)),
        "embedding empty": embedding([]),
        "embedding NaN": embedding([math.nan] * dim),
        "embedding inf": embedding([0.0] * (dim - 1) + [math.inf]),
        "top_k 1001": embedding([0.1] * dim, k=1001),
        "huge top_k": embedding([0.1] * dim, k=2**32 - 1),
        "no query": ("post", "/v1/search/embedding", {"json": {"k": 5}}),
        "oversized message": photo(b"\0" * (17 << 20)),
        "enrol without a name": enrol("  ", [("x.png", b"x")]),
        "enrol name with a newline": enrol("a\nb", [("x.png", b"x")]),
        "enrol name too long": enrol("x" * 300, [("x.png", b"x")]),
        "enrol without photos": ("post", "/v1/enrol", {"data": {"person": "someone"}, "headers": AUTH}),
        "enrol of non-image bytes": enrol("someone", [("a.png", b"\x89PNG broken"), ("b.png", b"")]),
        "delete unknown person": post("/v1/delete", {"person": "nobody-by-this-name"}),
        "delete unknown face ids": post("/v1/delete", {"face_ids": ["1", "2", "3"]}),
        "delete empty face id list": post("/v1/delete", {"face_ids": []}),
        "delete without target": post("/v1/delete", {}),
        "compact negative grace": post("/v1/compact", {"grace_seconds": -1}),
        "compact NaN grace": post("/v1/compact", {"grace_seconds": math.nan}),
    }


def _json(value) -> str:
    import json

    return json.dumps(value)  # NaN and Infinity as JavaScript writes them: the server must refuse them itself


def test_the_grpc_bad_input_table_gets_the_same_statuses_through_http(cluster, gallery):
    version = IndexStore(cluster["index"]).current_version()
    grpc_rows = {name: (code, text) for name, method, _, code, text in rpc_cases(cluster, gallery)
                 if not method.startswith("node.")}
    cases = http_cases(cluster, gallery)
    assert set(cases) == set(grpc_rows), "every coordinator row of the gRPC table has an HTTP twin"
    failures = []
    for name, (method, path, kwargs) in cases.items():
        code, text = grpc_rows[name]
        reply = requests.request(method, cluster["http"] + path, timeout=60, **kwargs)
        expected = 413 if code == "RESOURCE_EXHAUSTED" else HTTP_STATUS[code]  # a body too large is 413 in HTTP
        body = reply.json()
        if reply.status_code != expected or body["error"]["status"] != code or text not in body["error"]["message"]:
            failures.append(f"{name}: got {reply.status_code} {body}, expected {expected} {code} with {text!r}")
    assert not failures, "\n".join(failures)
    assert IndexStore(cluster["index"]).current_version() == version  # nothing was committed
    ok = requests.post(cluster["http"] + "/v1/search/embedding", json={"embedding": [0.1] * cluster["dim"]}, timeout=60)
    assert ok.status_code == 200 and ok.json()["complete"] and len(ok.json()["hits"]) == 10


def test_http_and_grpc_give_the_same_answer(cluster, gallery):
    emb = next(iter(gallery["embeddings"].values()))
    grpc_reply = cluster["stub"].Search(pb.SearchRequest(embedding=pb.Embedding(values=emb.tolist()), top_k=7),
                                        timeout=30)
    http_reply = requests.post(cluster["http"] + "/v1/search/embedding", json={"embedding": emb.tolist(), "k": 7},
                               timeout=30).json()
    assert [(h["face_id"], h["person"], h["source"], h["score"], h["shard"]) for h in http_reply["hits"]] == \
        [(str(h.face_id), h.person, h.source, float(str(np.float32(h.score))), h.shard) for h in grpc_reply.hits]
    photo = gallery["photos"][gallery["enrol_people"][0]][0].read_bytes()
    by_person = requests.post(cluster["http"] + "/v1/search", files={"photo": ("p.png", photo)},
                              data={"k": "3", "group_by": "person"}, timeout=30).json()
    assert len(by_person["people"]) == 3 and len({p["person"] for p in by_person["people"]}) == 3


def test_changes_need_the_token_and_a_refused_call_changes_nothing(cluster, gallery):
    person = gallery["enrol_people"][1]
    photos = [("photos", (p.name, p.read_bytes())) for p in gallery["photos"][person][:2]]
    version = IndexStore(cluster["index"]).current_version()
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}):
        refused = requests.post(cluster["http"] + "/v1/enrol", data={"person": person}, files=photos, headers=headers,
                                timeout=30)
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        assert refused.json()["error"]["status"] == "UNAUTHENTICATED"
    assert IndexStore(cluster["index"]).current_version() == version
    enrolled = requests.post(cluster["http"] + "/v1/enrol", data={"person": person}, files=photos, headers=AUTH,
                             timeout=60)
    assert enrolled.status_code == 200 and len(enrolled.json()["face_ids"]) == 2
    faces = requests.get(cluster["http"] + "/v1/people/faces", params={"person": person}, timeout=30).json()
    assert sorted(f["face_id"] for f in faces["faces"]) == sorted(enrolled.json()["face_ids"])
    deleted = requests.post(cluster["http"] + "/v1/delete", json={"person": person}, headers=AUTH, timeout=30)
    assert deleted.json()["deleted"] == 2
    assert requests.get(cluster["http"] + "/v1/people/faces", params={"person": person}, timeout=30).status_code == 404


def test_the_openapi_document_describes_every_route_and_the_photo_upload(cluster):
    doc = requests.get(cluster["http"] + "/openapi.json", timeout=30).json()
    assert {"/v1/search", "/v1/search/embedding", "/v1/verify", "/v1/enrol", "/v1/people", "/v1/people/faces",
            "/v1/people/rename", "/v1/people/merge", "/v1/people/move", "/v1/delete", "/v1/compact", "/v1/status",
            "/v1/thumbnail"} <= set(doc["paths"])
    assert "multipart/form-data" in doc["paths"]["/v1/search"]["post"]["requestBody"]["content"]
    page = requests.get(cluster["http"] + "/", timeout=30)
    assert page.status_code == 200 and "<title>facepq</title>" in page.text


def _scrape(url: str) -> dict:
    """{'name{labels}': value} of a Prometheus text page."""
    out = {}
    for line in requests.get(url + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def _sum(metrics: dict, name: str, **labels) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in metrics.items()
               if (k == name or k.startswith(name + "{")) and all(w in k for w in want))


def test_metrics_of_both_servers_move_with_the_searches(cluster, gallery):
    before_c, before_n = _scrape(cluster["coord_metrics"]), _scrape(cluster["node_metrics"])
    emb = next(iter(gallery["embeddings"].values())).tolist()
    for _ in range(3):
        cluster["stub"].Search(pb.SearchRequest(embedding=pb.Embedding(values=emb), top_k=5), timeout=30)
    for _ in range(2):
        requests.post(cluster["http"] + "/v1/search/embedding", json={"embedding": emb}, timeout=30)
    with pytest.raises(grpc.RpcError):
        cluster["stub"].Search(pb.SearchRequest(top_k=5), timeout=30)  # INVALID_ARGUMENT, counted as such
    after_c, after_n = _scrape(cluster["coord_metrics"]), _scrape(cluster["node_metrics"])

    def moved(after, before, name, **labels):
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    assert moved(after_c, before_c, "facepq_requests_total", transport="grpc", method="Search", code="OK") == 3
    assert moved(after_c, before_c, "facepq_requests_total", method="Search", code="INVALID_ARGUMENT") == 1
    assert moved(after_c, before_c, "facepq_requests_total", transport="http", method="/v1/search/embedding",
                 code="200") == 2
    assert moved(after_c, before_c, "facepq_request_seconds_count", transport="grpc", method="Search") == 4
    assert moved(after_c, before_c, "facepq_search_answers_total", answer="complete") == 5
    assert moved(after_n, before_n, "facepq_requests_total", method="Search", code="OK") == 5
    assert moved(after_n, before_n, "facepq_node_queries_total") == 5
    faces = gallery["faces"]
    assert moved(after_n, before_n, "facepq_node_codes_scanned_total") >= 5 * faces  # rows incl. tombstoned
    assert moved(after_n, before_n, "facepq_node_scan_seconds_count") == 5
    version = IndexStore(cluster["index"]).current_version()
    assert _sum(after_n, "facepq_index_version") == version
    assert _sum(after_c, "facepq_index_version") == version
    assert _sum(after_n, "facepq_shard_faces") == _sum(after_c, "facepq_shard_faces") == \
        IndexStore(cluster["index"]).load_manifest().live_faces
    assert _sum(after_c, "facepq_shard_healthy_replicas", shard="0") == 1
    assert _sum(after_n, "facepq_shard_serving") == 2 and _sum(after_c, "facepq_nodes", healthy="true") == 1


def test_servers_log_one_json_object_per_line_when_asked(gallery, index, procs):
    import json

    node = procs.start("--log-format", "json", "node", "--index", index, "--shards", "0,1", "--port", "0")
    child = procs.node(index, [0], env={"FACEPQ_LOG_FORMAT": "json"})  # the environment does the same (children)
    for proc in (node, child):
        proc.terminate()
        lines = [ln for ln in proc.text().splitlines() if ln.strip() and not ln.startswith("facepq ")]
        records = [json.loads(ln) for ln in lines]  # every log line is one JSON object
        assert records and {"time", "level", "logger", "message", "pid"} <= set(records[0])
        assert any(r["logger"] == "query_node.node_server" and "serving shards" in r["message"] for r in records)
