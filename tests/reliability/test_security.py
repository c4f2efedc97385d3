"""Security with real processes: TLS and mutual TLS on every hop, bearer tokens on mutating calls (and on
Search with --auth-search), Redis with a password, an ACL user and TLS, and privacy of the index files."""
from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import time

import grpc
import numpy as np
import pytest

from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
from indexer.store import IndexStore
from query_node import security
from tests.support.processes import REPO_ROOT, run_cli
from tests.support.requests import embedding_request

pytestmark = pytest.mark.timeout(240)

ADMIN_TOKEN = "admin-" + "a1b2c3d4" * 4
NODE_TOKEN = "node-" + "e5f6a7b8" * 4


def _tls_channel(address, certs, ca=None, client=False):
    creds = grpc.ssl_channel_credentials(
        root_certificates=open(ca or certs.ca, "rb").read(),
        private_key=open(certs.client_key, "rb").read() if client else None,
        certificate_chain=open(certs.client_cert, "rb").read() if client else None)
    return grpc.secure_channel(address, creds)


def _code(fn, *args, **kw):
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, timeout=20, **kw)
    return err.value.code().name, err.value.details() or ""


def _snapshot(index):
    return IndexStore(index).current_version(), sorted(
        (str(p.relative_to(index)), p.stat().st_size) for p in index.rglob("*") if p.is_file() and p.name != "_lock")


def test_tls_mutual_tls_and_tokens_end_to_end(gallery, index, procs, certs, tmp_path):
    admin = tmp_path / "admin.token"
    admin.write_text(f"# coordinator clients\n{ADMIN_TOKEN}\n")
    node_tok = tmp_path / "node.token"
    node_tok.write_text(NODE_TOKEN + "\n")
    # One node configured by flags, one by environment: both serve TLS, require client certificates and a token.
    n1 = procs.node(index, [0, 1], "--tls-cert", certs.server_cert, "--tls-key", certs.server_key,
                    "--tls-client-ca", certs.ca, "--auth-token-file", str(node_tok))
    n2 = procs.node(index, [0, 1], env={"FACEPQ_TLS_CERT": certs.server_cert, "FACEPQ_TLS_KEY": certs.server_key,
                                        "FACEPQ_TLS_CLIENT_CA": certs.ca, "FACEPQ_AUTH_TOKEN": NODE_TOKEN})
    coord = procs.coordinator(gallery["model"], index, "--nodes", f"{n1.address},{n2.address}",
                              "--tls-cert", certs.server_cert, "--tls-key", certs.server_key,
                              "--auth-token-file", str(admin), "--auth-search",
                              "--node-tls-ca", certs.ca, "--node-auth-token-file", str(node_tok))
    auth = security.bearer_metadata(ADMIN_TOKEN)
    request = embedding_request(gallery, top_k=5)

    # Plaintext, or TLS that trusts another CA: no connection at all.
    plain = facepq_pb2_grpc.CoordinatorStub(grpc.insecure_channel(coord.address))
    assert _code(plain.Search, request, metadata=auth)[0] == "UNAVAILABLE"
    wrong_ca = facepq_pb2_grpc.CoordinatorStub(_tls_channel(coord.address, certs, ca=certs.other_ca))
    assert _code(wrong_ca.Search, request, metadata=auth)[0] == "UNAVAILABLE"

    stub = facepq_pb2_grpc.CoordinatorStub(_tls_channel(coord.address, certs))
    code, msg = _code(stub.Search, request)
    assert code == "UNAUTHENTICATED" and "Bearer" in msg
    assert _code(stub.Search, request, metadata=security.bearer_metadata("x" * 32))[0] == "UNAUTHENTICATED"
    reply = stub.Search(request, timeout=20, metadata=auth)  # coordinator -> nodes: mutual TLS + node token
    assert reply.complete and len(reply.hits) == 5
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(_tls_channel(coord.address, certs))
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == 1  # probes need no token

    # Mutating calls without a valid token are refused and change nothing on disk.
    person = gallery["enrol_people"][0]
    enrol = facepq_pb2.EnrolRequest(person=person, photos=[
        facepq_pb2.Photo(content=p.read_bytes(), source=str(p)) for p in gallery["photos"][person][:2]])
    some_person = next(iter(gallery["photos"]))
    before = _snapshot(index)
    for md in ((), security.bearer_metadata("not-the-token-" * 3), (("authorization", ADMIN_TOKEN),)):
        assert _code(stub.Enrol, enrol, metadata=md)[0] == "UNAUTHENTICATED"
        assert _code(stub.Delete, facepq_pb2.DeleteRequest(person=some_person), metadata=md)[0] == "UNAUTHENTICATED"
        assert _code(stub.Compact, facepq_pb2.CompactRequest(grace_seconds=0), metadata=md)[0] == "UNAUTHENTICATED"
    assert _snapshot(index) == before
    enrolled = stub.Enrol(enrol, timeout=60, metadata=auth)
    assert len(enrolled.face_ids) == 2 and int(enrolled.index_version) == before[0] + 1

    # Nodes: TLS without a client certificate fails the handshake; a certificate without the token is refused.
    lut = np.zeros((gallery["enc"].codec.spec.M, gallery["enc"].codec.spec.K), np.float32)
    node_req = facepq_pb2.NodeSearchRequest(tables=[facepq_pb2.LookupTable(
        m=lut.shape[0], k=lut.shape[1], values=lut.reshape(-1).tolist())], top_k=3)
    no_cert = facepq_pb2_grpc.QueryNodeStub(_tls_channel(n1.address, certs))
    assert _code(no_cert.Search, node_req)[0] == "UNAVAILABLE"
    with_cert = facepq_pb2_grpc.QueryNodeStub(_tls_channel(n2.address, certs, client=True))
    assert _code(with_cert.Search, node_req)[0] == "UNAUTHENTICATED"
    assert _code(with_cert.Search, node_req, metadata=auth)[0] == "UNAUTHENTICATED"  # the admin token is not a node token
    assert len(with_cert.Search(node_req, timeout=10, metadata=security.bearer_metadata(NODE_TOKEN)).results) == 1

    # The CLI and the Node.js client, with TLS and the token from a file.
    photo = gallery["photos"][some_person][0]
    ok = run_cli("search", photo, "--coordinator", coord.address, "--tls-ca", certs.ca, "--auth-token-file", admin,
                 "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["complete"]
    refused = run_cli("search", photo, "--coordinator", coord.address, "--tls-ca", certs.ca)
    assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr and "Traceback" not in refused.stderr
    node_bin = shutil.which("node")
    if node_bin and (REPO_ROOT / "clients/node/node_modules").is_dir():
        emb = ",".join(str(float(x)) for x in list(gallery["embeddings"].values())[0])
        out = subprocess.run([node_bin, "search.js", "--coordinator", coord.address, "--embedding", emb, "-k", "3",
                              "--tls-ca", certs.ca, "--token-file", str(admin)], capture_output=True, text=True,
                             timeout=60, cwd=REPO_ROOT / "clients/node")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["complete"] is True
        out = subprocess.run([node_bin, "search.js", "--coordinator", coord.address, "--embedding", emb,
                              "--tls-ca", certs.ca], capture_output=True, text=True, timeout=60,
                             cwd=REPO_ROOT / "clients/node")
        assert out.returncode == 2 and "UNAUTHENTICATED" in out.stderr


def test_token_checks_and_plaintext_warning(tmp_path, caplog):
    assert security.token_matches("Bearer " + ADMIN_TOKEN, [NODE_TOKEN, ADMIN_TOKEN])
    for header in ("", ADMIN_TOKEN, "Bearer", "Bearer " + ADMIN_TOKEN[:-1], "bearer " + ADMIN_TOKEN,
                   "Basic " + ADMIN_TOKEN):
        assert not security.token_matches(header, [ADMIN_TOKEN]), header
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    from facepq_core.errors import ConfigError

    with pytest.raises(ConfigError, match="holds no token"):
        security.load_tokens(str(empty))
    with pytest.raises(ConfigError, match="at least 16"):
        security.load_tokens(value="short")
    with pytest.raises(ConfigError, match="cannot read the token file"):
        security.load_tokens(str(tmp_path / "missing"))
    from concurrent import futures

    for host, warned in (("127.0.0.1", False), ("0.0.0.0", True)):
        caplog.clear()
        server = grpc.server(futures.ThreadPoolExecutor(1))
        with caplog.at_level(logging.WARNING, logger="query_node.security"):
            assert security.add_port(server, host, 0, None) > 0
        server.stop(0)
        assert any("WITHOUT TLS" in r.message for r in caplog.records) == warned, host


def _redis_binary():
    path = shutil.which("redis-server")
    if not path:
        pytest.fail("redis-server is not installed; scripts/install.sh installs it")
    return path


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port, proc):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            assert proc.poll() is None, "redis-server exited"
            time.sleep(0.05)
    pytest.fail("redis-server did not start")


def _registered(url, node_id, timeout=8):
    from query_node.registry import RedisRegistry

    reg = RedisRegistry(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(n.node_id == node_id for n in reg.nodes()):
            return True
        time.sleep(0.2)
    return False


def test_redis_password_acl_user_and_tls(gallery, index, procs, certs, tmp_path):
    import redis

    port, tls_port = _free_port(), _free_port()
    proc = subprocess.Popen([_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path), "--requirepass", "adminpw-123",
                             "--tls-port", str(tls_port), "--tls-cert-file", certs.server_cert,
                             "--tls-key-file", certs.server_key, "--tls-ca-cert-file", certs.ca,
                             "--tls-auth-clients", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        admin = redis.Redis(port=port, password="adminpw-123")
        # A least-privilege ACL user for facepq: only its own keys.
        admin.execute_command("ACL", "SETUSER", "facepq", "on", ">userpw-456", "~facepq:*", "+@all", "-@dangerous",
                              "+info")
        ok = procs.node(index, [0, 1], "--redis", f"redis://facepq:userpw-456@127.0.0.1:{port}/0", "--node-id", "acl",
                        "--ttl", "2")
        assert _registered(f"redis://facepq:userpw-456@127.0.0.1:{port}/0", "acl")
        assert _registered(f"redis://:adminpw-123@127.0.0.1:{port}/0", "acl")  # password-only (default user)

        bad = procs.node(index, [0, 1], "--redis", f"redis://facepq:wrong-pw-789@127.0.0.1:{port}/0",
                         "--node-id", "intruder", "--ttl", "2")
        time.sleep(1.5)
        assert not admin.exists("facepq:node:intruder") and bad.alive()
        assert "wrong-pw-789" not in bad.text() and "unreachable" in bad.text()  # logged, password masked

        ca = certs.ca
        tls_url = f"rediss://facepq:userpw-456@127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}"
        procs.node(index, [0], "--redis", tls_url, "--node-id", "over-tls", "--ttl", "2")
        assert _registered(tls_url, "over-tls")
        assert admin.exists("facepq:node:over-tls") and ok.alive()
        # The commit lock goes through the same URL forms.
        from indexer.commit import delete_faces

        person = next(iter(gallery["photos"]))  # a gallery person
        version, n = delete_faces(IndexStore(index), person=person, redis_url=tls_url)
        assert (version, n) == (2, len(gallery["photos"][person]))  # every face of theirs, one commit
    finally:
        proc.kill()
        proc.wait(10)


def _all_files(index):
    return {p: p.read_bytes() for p in index.rglob("*") if p.is_file()}


def test_index_holds_codes_only_and_compact_after_delete_leaves_no_trace(gallery, index, procs):
    """Photos and float embeddings never reach the index; after Delete + Compact(grace 0) no segment file holds
    the person's name, face ids, sources or rows."""
    from indexer.segment import open_segment
    from query_node.face_model import photo_features

    node = procs.node(index, [0, 1], "--view-grace", "0.5")
    coord = procs.coordinator(gallery["model"], index, "--nodes", node.address)
    stub = facepq_pb2_grpc.CoordinatorStub(grpc.insecure_channel(coord.address))
    person = gallery["enrol_people"][1]
    paths = gallery["photos"][person]
    contents = [p.read_bytes() for p in paths]
    reply = stub.Enrol(facepq_pb2.EnrolRequest(person=person, photos=[
        facepq_pb2.Photo(content=c, source=f"private/{person}/{i}.png") for i, c in enumerate(contents)]), timeout=60)
    ids = list(reply.face_ids)
    assert len(ids) == len(paths)

    feats, kept, _ = photo_features(gallery["enc"], contents)
    files = _all_files(index)
    blob = b"".join(files.values())
    for c in contents:
        assert c[len(c) // 2:len(c) // 2 + 48] not in blob  # no photo bytes
    for f in feats:
        assert np.asarray(f, np.float32)[:8].tobytes() not in blob  # no float embeddings
    store = IndexStore(index)
    man = store.load_manifest()
    for ref in man.segments:
        assert open_segment(store, ref).batch.schema.names == ["face_id", "person", "source", "code"]
    assert person.encode() in blob  # the scan below can see what it looks for

    deleted = stub.Delete(facepq_pb2.DeleteRequest(person=person), timeout=60)
    assert deleted.deleted == len(ids)
    stats = stub.Compact(facepq_pb2.CompactRequest(grace_seconds=0), timeout=120)
    assert stats.rows_removed == len(ids) and stats.files_deleted >= 1
    traces = [person.encode(), f"private/{person}".encode()]
    traces += [int(i).to_bytes(8, "little") for i in ids] + [int(i).to_bytes(8, "big") for i in ids]
    for path, data in _all_files(index).items():
        if "shards" in path.parts:
            found = [t for t in traces if t in data]
            assert not found, f"{path} still holds {found[:2]}"
    man = IndexStore(index).load_manifest()
    assert man.tombstone_count == 0 and man.live_faces == gallery["faces"]
    # Searches keep working on the compacted version.
    res = stub.Search(embedding_request(gallery, top_k=1000), timeout=30)
    assert res.complete and person not in {h.person for h in res.hits} and len(res.hits) == gallery["faces"]
    assert res.index_version == stats.index_version

    # The deleted files' pages are not kept alive by memory maps either (node or coordinator).
    shards_dir = str(index / "shards")

    def deleted_maps():
        return [line for proc in (node, coord) for line in open(f"/proc/{proc.pid}/maps")
                if shards_dir in line and "(deleted)" in line]

    deadline = time.monotonic() + 15
    while deleted_maps() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not deleted_maps(), deleted_maps()[:3]
