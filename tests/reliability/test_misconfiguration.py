"""Failure class 10 of issue 15: misconfiguration and storage faults get a documented status and one CLI
line, and leave no temporary file behind.

* a coordinator given a Redis password the server refuses: it used to start healthy, log nothing and answer
  every search with every shard missing; now it refuses to start (exit 2, one line, password masked);
* a full disk (a real tmpfs, filled): RESOURCE_EXHAUSTED / one CLI line, nothing committed, no `.tmp-` file;
* a read-only index (the same tmpfs remounted read-only): FAILED_PRECONDITION / one line; searches go on;
* Redis down for the commit lock: UNAVAILABLE (it was INVALID_ARGUMENT).

The file-system tests mount a small tmpfs (root only); they skip with the reason where mounting is impossible.
"""
from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest

from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
from indexer.store import IndexStore
from tests.support.processes import StartFailed, run_cli
from tests.support.requests import embedding_request

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def small_fs(tmp_path):
    """A 24 MiB tmpfs at tmp_path/fs (unmounted afterwards); `.remount(ro=True)`."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {done.stderr.strip()}")

    class Fs:
        path = mount

        @staticmethod
        def remount(ro: bool):
            subprocess.run(["mount", "-o", f"remount,{'ro' if ro else 'rw'}", str(mount)], check=True)

    try:
        yield Fs
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def _fill(path):
    """Write a filler file until the file system is full; returns it (delete it to free the space)."""
    filler = path / "filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    return filler


def _tmp_files(index):
    return [p for p in index.rglob("*") if p.name.startswith(".tmp-")]


def _one_line(out, *words):
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    for w in words:
        assert w in out.stderr, out.stderr


def _enrol(stub, gallery, person, i=0):
    photo = gallery["photos"][person][i]
    return stub.Enrol(facepq_pb2.EnrolRequest(person=person, photos=[facepq_pb2.Photo(content=photo.read_bytes(),
                                                                                      source=str(photo))]),
                      timeout=60)


def test_a_coordinator_with_a_refused_redis_password_does_not_start(gallery, index, procs, tmp_path):
    from tests.conftest import RedisServer

    server = RedisServer(tmp_path, password="right-password-1")
    server.start()
    try:
        wrong = f"redis://:wrong-password-2@127.0.0.1:{server.port}/0"
        with pytest.raises(StartFailed) as err:
            procs.coordinator(gallery["model"], index, "--redis", wrong)
        assert err.value.returncode == 2
        text = err.value.output
        assert "refused the credentials" in text and "wrong-password-2" not in text and "Traceback" not in text
        lines = [ln for ln in text.splitlines() if "error" in ln]
        assert len(lines) == 1, text
    finally:
        server.stop()


def _served_copy(gallery, index, procs, small_fs):
    """A copy of the index on the small file system, served by a node and a coordinator: (path, stub)."""
    idx = small_fs.path / "idx"
    shutil.copytree(index, idx)
    node = procs.node(idx, [0, 1])
    coord = procs.coordinator(gallery["model"], idx, "--nodes", node.address)
    return idx, facepq_pb2_grpc.CoordinatorStub(grpc.insecure_channel(coord.address))


def test_a_full_disk_is_resource_exhausted_and_leaves_nothing_behind(gallery, index, procs, small_fs):
    idx, stub = _served_copy(gallery, index, procs, small_fs)
    version = IndexStore(idx).current_version()
    files = sorted(p for p in idx.rglob("*") if p.is_file())
    filler = _fill(small_fs.path)

    person = gallery["enrol_people"][0]
    with pytest.raises(grpc.RpcError) as err:
        _enrol(stub, gallery, person)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
    assert "no space left" in err.value.details()
    some = next(p for p in gallery["photos"] if p not in gallery["enrol_people"])
    _one_line(run_cli("delete", "--index", idx, "--person", some), "no space left")
    assert IndexStore(idx).current_version() == version
    assert not _tmp_files(idx) and sorted(p for p in idx.rglob("*") if p.is_file() and "writers" not in p.parts) \
        == files
    reply = stub.Search(embedding_request(gallery), timeout=30)
    assert reply.complete  # reading goes on

    filler.unlink()  # space again: the same request now succeeds
    assert int(_enrol(stub, gallery, person).index_version) == version + 1


def test_a_read_only_index_is_failed_precondition_and_still_served(gallery, index, procs, small_fs):
    idx, stub = _served_copy(gallery, index, procs, small_fs)
    small_fs.remount(ro=True)
    try:
        with pytest.raises(grpc.RpcError) as err:
            _enrol(stub, gallery, gallery["enrol_people"][0])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
        assert "Read-only file system" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Compact(facepq_pb2.CompactRequest(grace_seconds=0), timeout=60)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        some = next(p for p in gallery["photos"] if p not in gallery["enrol_people"])
        _one_line(run_cli("delete", "--index", idx, "--person", some), "Read-only file system")
        assert stub.Search(embedding_request(gallery), timeout=30).complete
    finally:
        small_fs.remount(ro=False)


def test_redis_down_for_the_commit_lock_is_unavailable(gallery, index, procs, redis_server):
    node = procs.node(index, [0, 1], "--redis", redis_server.url)
    coord = procs.coordinator(gallery["model"], index, "--redis", redis_server.url)
    stub = facepq_pb2_grpc.CoordinatorStub(grpc.insecure_channel(coord.address))
    assert node.alive()
    redis_server.stop()
    with pytest.raises(grpc.RpcError) as err:
        _enrol(stub, gallery, gallery["enrol_people"][1])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    assert "unreachable" in err.value.details()
    _one_line(run_cli("delete", "--index", index, "--person", "x", "--redis", redis_server.url), "unreachable")
    assert not _tmp_files(index)
