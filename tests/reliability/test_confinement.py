"""Failure class 1 of issue 15: every path the index reads, writes or deletes stays inside the index root.

Real symbolic links under `shards/` and `manifests/` point at a folder outside the index holding old
files. Garbage collection (the CLI's `facepq compact` and the Compact RPC, with the default grace) used
to follow them and delete those files; a query node used to serve a segment read through a link. Now
every command refuses to run on an index holding a link (one line naming it, exit 2 / FAILED_PRECONDITION)
and nothing outside the root is touched.
"""
from __future__ import annotations

import os
import time

import grpc
import pytest

from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
from indexer.store import IndexStore
from tests.support.processes import StartFailed, run_cli

pytestmark = pytest.mark.timeout(240)


def _outside_folder(tmp_path, name="outside"):
    """A folder outside the index with an 'old' file (mtime 2 h ago): what GC would delete if it reached it."""
    outside = tmp_path / name
    outside.mkdir()
    victim = outside / "precious.txt"
    victim.write_text("not part of any index\n")
    old = time.time() - 7200
    os.utime(victim, (old, old))
    return victim


@pytest.mark.parametrize("where", ["shards/0099", "manifests/evil", "shards/0000/linked.arrow"])
def test_cli_compact_refuses_a_link_and_deletes_nothing_outside(tmp_path, where):
    from tests.support.index import build_index

    index = tmp_path / "idx"
    build_index(index, rows=200, shard_count=2)
    victim = _outside_folder(tmp_path)
    target = victim if where.endswith(".arrow") else victim.parent
    os.symlink(target, index / where)
    before = sorted(p.name for p in (index / "shards" / "0000").iterdir())

    out = run_cli("compact", "--index", index)  # default grace (3600 s): the victim is older than that
    assert victim.exists(), "garbage collection deleted a file outside the index root"
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and "symbolic link" in lines[0] and where.split("/")[0] in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert sorted(p.name for p in (index / "shards" / "0000").iterdir()) == before


def test_compact_rpc_refuses_a_link_and_deletes_nothing_outside(gallery, index, procs, tmp_path):
    victim = _outside_folder(tmp_path)
    node = procs.node(index, [0, 1])
    coord = procs.coordinator(gallery["model"], index, "--nodes", node.address)
    os.symlink(victim.parent, index / "shards" / "0042")  # appears while everything runs
    stub = facepq_pb2_grpc.CoordinatorStub(grpc.insecure_channel(coord.address))
    with pytest.raises(grpc.RpcError) as err:
        stub.Compact(facepq_pb2.CompactRequest(), timeout=60)
    assert victim.exists()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "symbolic link" in err.value.details() and "shards/0042" in err.value.details()


def test_a_node_refuses_to_start_on_a_linked_shard_and_never_reads_through_a_new_link(gallery, index, procs,
                                                                                     tmp_path):
    import shutil

    # The same, valid segment files, but reached through a link: checksums would pass.
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(index / "shards" / "0001"), elsewhere)
    os.symlink(elsewhere, index / "shards" / "0001")
    with pytest.raises(StartFailed) as err:
        procs.node(index, [0, 1])
    assert err.value.returncode == 2
    assert "symbolic link" in err.value.output and "shards/0001" in err.value.output
    assert "Traceback" not in err.value.output

    # A node already serving: a segment replaced by a link (to a valid copy) is never read through it.
    os.unlink(index / "shards" / "0001")
    shutil.move(str(elsewhere), index / "shards" / "0001")
    node = procs.node(index, [0, 1])
    store = IndexStore(index)
    seg = index / store.load_manifest().shards[1].segments[0].path
    copy = tmp_path / "copy.arrow"
    shutil.copy2(seg, copy)
    os.unlink(seg)
    os.symlink(copy, seg)
    stub = facepq_pb2_grpc.QueryNodeStub(grpc.insecure_channel(node.address))

    def shard1():
        return next(s for s in stub.Status(facepq_pb2.NodeStatusRequest(), timeout=5).shards if s.shard == 1)

    deadline = time.monotonic() + 15
    while shard1().state == facepq_pb2.SHARD_SERVING and time.monotonic() < deadline:
        time.sleep(0.2)
    state = shard1()
    assert state.state == facepq_pb2.SHARD_NOT_SERVING and "symbolic link" in state.reason


def test_store_paths_never_leave_the_root(tmp_path):
    """The rule itself: every read, write, delete and listing of IndexStore refuses a link under the root."""
    from facepq_core.errors import IndexFormatError
    from tests.support.index import build_index

    index = tmp_path / "idx"
    build_index(index, rows=60, shard_count=1)
    victim = _outside_folder(tmp_path)
    os.symlink(victim.parent, index / "shards" / "0007")
    store = IndexStore(index)
    for call in (lambda: store.read_bytes("shards/0007/precious.txt"),
                 lambda: store.delete("shards/0007/precious.txt"),
                 lambda: store.write_bytes("shards/0007/new.arrow", b"x"),
                 lambda: store.list_files("shards"),
                 lambda: store.file_exists("shards/0007/precious.txt")):
        with pytest.raises(IndexFormatError, match="symbolic link"):
            call()
    assert victim.exists() and not (victim.parent / "new.arrow").exists()
    os.unlink(index / "CURRENT")
    os.symlink(victim, index / "CURRENT")
    with pytest.raises(IndexFormatError, match="symbolic link"):
        store.current_version()


def test_listing_skips_a_file_renamed_between_reading_the_directory_and_its_stat(tmp_path, monkeypatch):
    """The race test_gc_leases met: a writer renamed its temporary segment while garbage collection
    listed the shard (FileNotFoundError from the stat was a Compact failing with UNKNOWN)."""
    import indexer.store as store_module

    shard = tmp_path / "idx" / "shards" / "0000"
    shard.mkdir(parents=True)
    (shard / "kept.arrow").write_bytes(b"k")
    moving = shard / ".tmp-moving.arrow"
    moving.write_bytes(b"m")
    real_scandir = os.scandir

    def scandir_then_publish(path):
        entries = list(real_scandir(path))
        if os.fspath(path) == str(shard) and moving.exists():
            moving.rename(shard / "published.arrow")  # a real rename after the directory was read
        return iter(entries)

    monkeypatch.setattr(store_module.os, "scandir", scandir_then_publish)
    listed = [e.path for e in IndexStore(str(tmp_path / "idx")).list_files("shards")]
    assert listed == ["shards/0000/kept.arrow"]  # the published file is listed by the next listing
    assert [e.path for e in IndexStore(str(tmp_path / "idx")).list_files("shards")] == [
        "shards/0000/kept.arrow", "shards/0000/published.arrow"]
