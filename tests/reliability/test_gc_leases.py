"""Failure class 9 of issue 15: garbage collection must never delete the files of a writer that has not
committed yet, whatever the grace. Writers hold a lease (indexer.lease) from before their first file until
their commit or abort; a dead writer's lease is stale at once (its flock is gone) and its files age out
under the grace as before."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import grpc
import numpy as np
import pytest

from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
from indexer.store import IndexStore
from tests.support.processes import REPO_ROOT, run_cli

pytestmark = pytest.mark.timeout(300)


def test_compact_with_grace_0_keeps_a_running_writers_segments(tmp_path):
    """A long ingest's shape: segments written long before the commit, a `facepq compact --grace 0` (another
    process) in between. The commit used to fail (its segments were deleted); now it succeeds."""
    from indexer.writer import IndexWriter
    from tests.support.index import build_index, live_row_ids

    index = tmp_path / "idx"
    meta, ids, _ = build_index(index, rows=100, shard_count=2)
    rng = np.random.default_rng(1)
    new_ids = rng.choice(2**62, 300, replace=False).astype(np.uint64) + np.uint64(2**62)
    writer = IndexWriter(str(index), meta, segment_rows=50)
    writer.add(new_ids, ["new"] * 300, [f"n{i}" for i in range(300)],
               rng.integers(0, 256, (300, meta.code_bytes), dtype=np.uint8))
    written = [p for p in (index / "shards").rglob("*.arrow")]
    assert len(written) > 2  # segments of this writer are on disk, uncommitted
    time.sleep(1.5)  # older than any grace below
    out = run_cli("compact", "--index", index, "--grace", "0")
    assert out.returncode == 0, out.stderr
    version = writer.commit("long ingest")
    assert sorted(live_row_ids(index).tolist()) == sorted(ids.tolist() + new_ids.tolist())
    assert version == 2 and not list((index / "writers").glob("*.lease"))  # released at commit


def test_a_dead_writers_files_are_collected_and_its_lease_removed(tmp_path):
    from tests.support.index import build_index

    index = tmp_path / "idx"
    build_index(index, rows=100, shard_count=2)
    script = textwrap.dedent(f"""
        import sys, time, numpy as np
        from indexer.store import IndexStore
        from indexer.writer import IndexWriter
        store = IndexStore({str(index)!r})
        meta = store.load_manifest().model
        w = IndexWriter(store, meta, segment_rows=10)
        w.add(np.arange(1, 41, dtype=np.uint64), ["x"] * 40, ["s"] * 40, np.zeros((40, meta.code_bytes), np.uint8))
        print("written", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
        leases = list((index / "writers").glob("*.lease"))
        assert len(leases) == 1
        before = {p for p in (index / "shards").rglob("*.arrow")}
        assert run_cli("compact", "--index", index, "--grace", "0").returncode == 0
        assert {p for p in (index / "shards").rglob("*.arrow")} == before  # alive: kept
        proc.kill()
        proc.wait(10)
        out = run_cli("compact", "--index", index, "--grace", "0")
        assert out.returncode == 0, out.stderr
        committed = {index / r.path for r in IndexStore(index).load_manifest().segments}
        assert {p for p in (index / "shards").rglob("*.arrow")} == committed
        assert not list((index / "writers").glob("*.lease"))
    finally:
        proc.kill()
        proc.wait(10)


def test_concurrent_enrolments_survive_compaction_with_grace_0(gallery, index, procs):
    """The issue's probe: Enrols racing Compact(grace=0). Every Enrol must succeed and be live."""
    import io

    from PIL import Image

    from tests.reliability.test_faults import _live_faces

    node = procs.node(index, [0, 1])
    # Every enrolment admitted at once (load shedding is not what this test is about).
    coord = procs.coordinator(gallery["model"], index, "--nodes", node.address, "--max-inflight-photos", "16")
    stub = facepq_pb2_grpc.CoordinatorStub(grpc.insecure_channel(coord.address))
    person = gallery["enrol_people"][0]
    source = gallery["photos"][person][0]

    def photo(i):
        img = Image.open(source).convert("RGB")
        img.putpixel((1, 1), (i % 256, i // 256, 3))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    stop = threading.Event()
    compactions = []

    def compact_loop():
        while not stop.is_set():
            try:
                compactions.append(stub.Compact(facepq_pb2.CompactRequest(grace_seconds=0), timeout=60))
            except grpc.RpcError as exc:
                compactions.append(exc)

    results = [None] * 16

    def enrol(i):
        try:
            results[i] = stub.Enrol(facepq_pb2.EnrolRequest(person=f"{person}-{i}", photos=[
                facepq_pb2.Photo(content=photo(i), source=f"p{i}")]), timeout=120)
        except grpc.RpcError as exc:
            results[i] = exc

    compactor = threading.Thread(target=compact_loop)
    compactor.start()
    try:
        threads = [threading.Thread(target=enrol, args=(i,)) for i in range(len(results))]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
    finally:
        stop.set()
        compactor.join(60)
    failed = [f"{r.code().name}: {r.details()}" for r in results if isinstance(r, grpc.RpcError)]
    assert not failed, f"{len(failed)} of {len(results)} enrolments failed: {failed[:3]}"
    assert len(compactions) >= 2 and not [c for c in compactions if isinstance(c, grpc.RpcError)]
    live = _live_faces(index)
    for i, r in enumerate(results):
        assert live[int(r.face_ids[0])] == f"{person}-{i}"
