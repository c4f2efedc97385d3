"""`facepq search|enrol|status` and the Node.js client against real node and coordinator processes.

One JSON schema for both clients, batches of photos and embeddings over one connection, the exit
codes (0 complete, 1 some queries of a batch failed, 2 errors, 3 incomplete answers), enrolment
through the coordinator, listing what the index holds, and the client's retries.
"""
from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest

from facepq.client import CoordinatorClient
from facepq_core.errors import NotFound, Unavailable
from tests.conftest import free_port
from tests.support.processes import REPO_ROOT, Procs, run_cli

pytestmark = pytest.mark.timeout(300)

SCHEMA = {"query", "hits", "complete", "missing_shards", "index_version", "took_ms", "node_scan_ms"}
HIT_SCHEMA = {"rank", "face_id", "person", "score", "source", "shard"}
TIMINGS = ("took_ms", "node_scan_ms")


@pytest.fixture(scope="module")
def cluster(gallery, tmp_path_factory):
    """Two nodes (one shard each) and a coordinator over a private copy of the gallery index."""
    index = tmp_path_factory.mktemp("cli") / "idx"
    shutil.copytree(gallery["template"], index)
    procs = Procs()
    try:
        nodes = [procs.node(index, [0]), procs.node(index, [1])]
        coord = procs.coordinator(gallery["model"], index, "--nodes", ",".join(n.address for n in nodes))
        yield dict(index=index, nodes=nodes, coord=coord, address=coord.address, procs=procs)
    finally:
        procs.kill_all()


def _photo(gallery, i=0):
    person = sorted(gallery["photos"])[i]
    return gallery["photos"][person][0]


def _node_client(*args):
    node_bin = shutil.which("node")
    if node_bin is None:
        pytest.skip("the `node` binary is not installed, so the Node.js client cannot run here")
    if not (REPO_ROOT / "clients/node/node_modules").is_dir():
        pytest.fail("clients/node/node_modules is missing: run scripts/install.sh (npm install in clients/node)")
    import subprocess

    return subprocess.run([node_bin, "search.js", *map(str, args)], capture_output=True, text=True, timeout=60,
                          cwd=REPO_ROOT / "clients/node")


def _without_timings(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k not in TIMINGS}


def test_python_and_node_clients_print_the_same_json(cluster, gallery):
    photo = _photo(gallery)
    py = run_cli("search", photo, "--coordinator", cluster["address"], "-k", "5", "--json")
    assert py.returncode == 0, py.stderr
    node = _node_client("--photo", photo, "--coordinator", cluster["address"], "-k", "5")
    assert node.returncode == 0, node.stderr
    a, b = json.loads(py.stdout), json.loads(node.stdout)
    assert set(a) == set(b) == SCHEMA
    assert all(set(h) == HIT_SCHEMA for h in a["hits"] + b["hits"])
    assert _without_timings(a) == _without_timings(b)  # every key, every value, the same float digits
    assert a["complete"] is True and a["missing_shards"] == [] and len(a["hits"]) == 5
    assert all(isinstance(h["face_id"], str) and int(h["face_id"]) >= 0 for h in a["hits"])  # uint64 as text
    assert [h["rank"] for h in a["hits"]] == [1, 2, 3, 4, 5]
    assert a["query"] == str(photo) and 0 < a["node_scan_ms"] < a["took_ms"]
    # one JSON object per line, byte for byte the same apart from the timings
    assert py.stdout.count("\n") == node.stdout.count("\n") == 1


def test_a_folder_is_searched_in_one_run_and_each_photo_reported(cluster, gallery, tmp_path):
    folder = tmp_path / "queries"
    (folder / "sub").mkdir(parents=True)
    photos = [_photo(gallery, i) for i in range(3)]
    for i, p in enumerate(photos):
        shutil.copy(p, (folder if i < 2 else folder / "sub") / f"q{i}.png")
    (folder / "broken.png").write_bytes(b"not an image at all")
    out = run_cli("search", folder, "--coordinator", cluster["address"], "-k", "2", "--json")
    assert out.returncode == 1, out.stderr  # one query failed: reported, the others answered
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [pathlib_name(r["query"]) for r in lines] == ["broken.png", "q0.png", "q1.png", "q2.png"]
    assert lines[0]["error"]["status"] == "INVALID_ARGUMENT" and "not_an_image" in lines[0]["error"]["message"]
    assert all(set(r) == SCHEMA and r["complete"] and len(r["hits"]) == 2 for r in lines[1:])
    table = run_cli("search", folder, "--coordinator", cluster["address"], "-k", "1")
    assert table.returncode == 1
    assert table.stdout.splitlines()[0].split()[:2] == ["query", "rank"]
    assert "4 queries: 3 answered (0 incomplete), 1 failed" in table.stdout


def pathlib_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def test_embedding_files_are_searched_row_by_row(cluster, gallery, tmp_path):
    sources = sorted(gallery["embeddings"])[:2]
    emb = np.stack([gallery["embeddings"][s] for s in sources]).astype(np.float32)
    np.save(tmp_path / "two.npy", emb)
    out = run_cli("search", "--embedding", tmp_path / "two.npy", "--coordinator", cluster["address"], "-k", "50",
                  "--json")
    assert out.returncode == 0, out.stderr
    answers = [json.loads(line) for line in out.stdout.splitlines()]
    assert [a["query"] for a in answers] == [f"{tmp_path / 'two.npy'}:0", f"{tmp_path / 'two.npy'}:1"]
    for source, answer in zip(sources, answers):
        # a face's own code maximises every subspace of its embedding's table: it ties for the top score
        mine = [h for h in answer["hits"] if h["source"] == source]
        assert mine and mine[0]["score"] == answer["hits"][0]["score"]
    (tmp_path / "one.txt").write_text(", ".join(str(float(v)) for v in emb[0]) + "\n")
    text = run_cli("search", "--embedding", tmp_path / "one.txt", "--coordinator", cluster["address"], "-k", "50",
                   "--json")
    assert text.returncode == 0, text.stderr
    one = json.loads(text.stdout)
    assert one["query"] == str(tmp_path / "one.txt") and one["hits"] == answers[0]["hits"]
    (tmp_path / "ragged.txt").write_text("1 2 3\n1 2\n")
    bad = run_cli("search", "--embedding", tmp_path / "ragged.txt", "--coordinator", cluster["address"])
    assert bad.returncode == 2 and "different numbers of values" in bad.stderr and "Traceback" not in bad.stderr


def test_enrol_through_the_coordinator_then_find_list_and_status(cluster, gallery):
    person = gallery["enrol_people"][0]
    photos = gallery["photos"][person][:3]
    out = run_cli("enrol", "--person", person, *photos, "--coordinator", cluster["address"], "--json")
    assert out.returncode == 0, out.stderr
    enrolled = json.loads(out.stdout)
    assert enrolled["person"] == person and len(enrolled["face_ids"]) == 3 and enrolled["index_version"]
    with CoordinatorClient(cluster["address"]) as client:
        deadline = time.monotonic() + 30
        while True:  # the nodes pick the new version up within their poll interval
            reply = client.search(photo=photos[0].read_bytes(), k=50)
            if reply.index_version == enrolled["index_version"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert reply.index_version == enrolled["index_version"]
        # the photo's own code ties for the top score (the tiny model gives some faces the same code)
        mine = [h for h in reply.hits if str(h.face_id) in enrolled["face_ids"] and h.source == str(photos[0])]
        assert mine and mine[0].score == reply.hits[0].score and mine[0].person == person
    people = run_cli("index", "people", "--index", cluster["index"], "--contains", person.upper(), "--json")
    assert people.returncode == 0, people.stderr
    assert json.loads(people.stdout) == {"person": person, "faces": 3, "shards": json.loads(people.stdout)["shards"]}
    faces = run_cli("index", "faces", "--index", cluster["index"], "--person", person, "--json")
    assert sorted(json.loads(line)["face_id"] for line in faces.stdout.splitlines()) == sorted(enrolled["face_ids"])
    lookup = run_cli("index", "face", enrolled["face_ids"][0], "--index", cluster["index"], "--json")
    assert json.loads(lookup.stdout)["person"] == person and json.loads(lookup.stdout)["source"] == str(photos[0])
    wrong_case = run_cli("index", "faces", "--index", cluster["index"], "--person", person.upper())
    assert wrong_case.returncode == 2 and f"did you mean {person!r}" in wrong_case.stderr
    status = run_cli("status", "--coordinator", cluster["address"], "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["shard_count"] == 2 and info["uncovered_shards"] == [] and len(info["nodes"]) == 2


def test_incomplete_answers_exit_3_with_a_warning(cluster, gallery):
    photo = _photo(gallery)
    procs = cluster["procs"]
    # A coordinator that knows only the node of shard 0: every answer misses shard 1.
    half = procs.coordinator(gallery["model"], cluster["index"], "--nodes", cluster["nodes"][0].address)
    out = run_cli("search", photo, "--coordinator", half.address, "--json")
    assert out.returncode == 3, out.stderr
    answer = json.loads(out.stdout)
    assert answer["complete"] is False and answer["missing_shards"] == [1]
    assert "INCOMPLETE" in out.stderr and "[1]" in out.stderr
    assert {h["shard"] for h in answer["hits"]} == {0}
    table = run_cli("search", photo, "--coordinator", half.address)
    assert table.returncode == 3 and "INCOMPLETE" in table.stdout and "INCOMPLETE" in table.stderr
    node = _node_client("--photo", photo, "--coordinator", half.address)
    assert node.returncode == 3 and json.loads(node.stdout)["missing_shards"] == [1] and "INCOMPLETE" in node.stderr
    status = run_cli("status", "--coordinator", half.address)
    assert status.returncode == 3 and "shards [1] have no live node" in status.stdout
    # No node answering at all: an empty answer is still an answer, and still exit 3, never 0.
    none = procs.coordinator(gallery["model"], cluster["index"], "--nodes", f"127.0.0.1:{free_port()}")
    empty = run_cli("search", photo, "--coordinator", none.address)
    assert empty.returncode == 3 and "no hits" in empty.stdout and "shards [0, 1]" in empty.stderr


def test_client_retries_an_unreachable_coordinator_until_its_deadline(cluster, gallery):
    port = free_port()
    emb = next(iter(gallery["embeddings"].values()))
    with CoordinatorClient(f"127.0.0.1:{port}", timeout=1.0, retry_unavailable=False) as client:
        with pytest.raises(Unavailable) as refused:
            client.search(embedding=emb)
    assert refused.value.status == "UNAVAILABLE" and "is a coordinator running there" in str(refused.value)
    procs = Procs()
    result = {}

    def search():
        with CoordinatorClient(f"127.0.0.1:{port}", timeout=180.0) as client:
            result["reply"] = client.search(embedding=emb, k=3)

    thread = threading.Thread(target=search)
    thread.start()
    try:
        time.sleep(1.0)  # the client is retrying by now: nothing listens on the port yet
        procs.start("coordinator", "--model", gallery["model"], "--index", cluster["index"], "--port", port,
                    "--nodes", ",".join(n.address for n in cluster["nodes"]))
        thread.join(180)
    finally:
        procs.kill_all()
    assert result["reply"].complete and len(result["reply"].hits) == 3


def test_client_errors_carry_their_status_and_default_port():
    assert CoordinatorClient("localhost").address == "localhost:50050"
    assert CoordinatorClient("10.1.2.3:7000").address == "10.1.2.3:7000"


def test_delete_of_an_unknown_person_is_not_found(cluster):
    with CoordinatorClient(cluster["address"]) as client, pytest.raises(NotFound) as err:
        client.delete(person="nobody by that name")
    assert err.value.status == "NOT_FOUND" and "facepq index people" in str(err.value)


def test_search_with_query_expansion_sends_the_options_and_prints_their_echo(cluster, gallery, tmp_path):
    source = sorted(gallery["embeddings"])[0]
    np.save(tmp_path / "q.npy", np.asarray(gallery["embeddings"][source], np.float32))
    out = run_cli("search", "--embedding", tmp_path / "q.npy", "--coordinator", cluster["address"], "-k", "20",
                  "--qe-n", "3", "--qe-alpha", "2", "--json")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["expansion"] == {"n": 3, "alpha": 2.0} and answer["complete"] and len(answer["hits"]) == 20
    assert set(answer) == SCHEMA | {"expansion"}
    plain = json.loads(run_cli("search", "--embedding", tmp_path / "q.npy", "--coordinator", cluster["address"],
                               "-k", "20", "--json").stdout)
    assert "expansion" not in plain
    for flags, text in [(("--qe-n", "-1"), "expansion n"), (("--qe-n", "101"), "expansion n"),
                        (("--qe-n", "2", "--qe-alpha", "-1"), "expansion alpha")]:
        bad = run_cli("search", "--embedding", tmp_path / "q.npy", "--coordinator", cluster["address"], *flags)
        assert bad.returncode == 2 and text in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    with CoordinatorClient(cluster["address"]) as client:  # the Python client: the same echo
        reply = client.search(embedding=gallery["embeddings"][source], k=5, expansion=(4, 0.0))
        assert reply.expansion == (4, 0.0) and len(reply.hits) == 5
