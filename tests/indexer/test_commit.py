"""Commits: atomic versions, dedup, model checks, delete + compact, garbage collection, locks."""
from __future__ import annotations

import os
import threading
from dataclasses import replace

import numpy as np
import pytest

from facepq_core.errors import ConfigError, DataError, IndexFormatError, Unavailable
from indexer.commit import commit_segments, compact, delete_faces
from indexer.errors import IndexLockTimeout
from indexer.info import index_info
from indexer.lock import commit_lock
from indexer.segment import open_segment, write_segment
from indexer.store import IndexStore
from indexer.writer import IndexWriter
from tests.support.index import live_row_ids


def test_writer_shards_by_face_id_and_reingest_adds_nothing(tmp_path, meta, rows):
    ids, persons, sources, codes = rows
    w = IndexWriter(tmp_path / "idx", meta, segment_rows=64)
    assert w.add(ids, persons, sources, codes) == len(ids)
    assert w.commit("first") == 1
    store = IndexStore(tmp_path / "idx")
    manifest = store.load_manifest()
    assert manifest.shard_count == 4 and manifest.live_faces == len(ids)
    for shard, state in enumerate(manifest.shards):
        for ref in state.segments:
            assert ref.rows <= 64
            assert np.all(open_segment(store, ref).face_ids % np.uint64(4) == shard)

    again = IndexWriter(tmp_path / "idx", meta)
    assert again.add(ids, persons, sources, codes) == 0 and again.stats.duplicates_skipped == len(ids)
    assert again.commit("same rows") == 1  # nothing new: no new version
    half = IndexWriter(tmp_path / "idx", meta)
    extra = np.array([5, 6], dtype=np.uint64)
    both = np.concatenate([ids[:10], extra, extra])  # duplicates within one batch too
    names = list(persons[:10]) + ["a"] * 4  # the same faces under the same names (the enrol rule)
    assert half.add(both, names, ["s"] * 14, np.zeros((14, 8), np.uint8)) == 2
    assert half.commit("two new") == 2
    assert sorted(live_row_ids(store).tolist()) == sorted(ids.tolist() + [5, 6])
    # Of rows repeating one face id within a batch, the first is kept.
    last = IndexWriter(tmp_path / "idx", meta)
    assert last.add(np.array([9, 8, 9], np.uint64), ["first", "x", "first"], ["1", "s", "2"],
                    np.zeros((3, 8), np.uint8)) == 2
    last.commit("first wins")
    names = {open_segment(store, r).person_at(i) for r in store.load_manifest().segments
             for i in np.flatnonzero(open_segment(store, r).face_ids == 9)}
    assert names == {"first"}


def test_uncommitted_files_are_ignored_by_readers_then_garbage_collected(tmp_path, meta, rows):
    ids, persons, sources, codes = rows
    store = IndexStore(tmp_path / "idx")
    w = IndexWriter(store, meta)
    w.add(ids[:100], persons[:100], sources[:100], codes[:100])
    assert w.commit("v1") == 1
    # A job that wrote segments (and even its next manifest) but died before moving CURRENT:
    orphan = write_segment(store, 0, ids[200:300], persons[200:300], sources[200:300], codes[200:300], meta)
    half = store.load_manifest().successor("never committed")
    half.shards[0].segments.append(orphan)
    store.write_manifest(half)
    with open(os.path.join(store.root, "shards/0000/.tmp-dead-x.arrow"), "wb") as f:
        f.write(b"half a segment")
    assert store.current_version() == 1
    assert store.load_manifest().live_faces == 100
    assert not np.isin(ids[200:300], live_row_ids(store)).any()

    stats = compact(store, grace_seconds=3600)  # too young: a running job's files are safe
    assert os.path.exists(store.local_path(orphan.path))
    stats = compact(store, grace_seconds=0)
    assert stats.files_deleted == 2 and stats.manifests_deleted == 1
    assert not os.path.exists(store.local_path(orphan.path))
    assert not os.path.exists(os.path.join(store.root, "shards/0000/.tmp-dead-x.arrow"))
    # The next commit reuses version 2 cleanly.
    w2 = IndexWriter(store, meta)
    w2.add(ids[200:300], persons[200:300], sources[200:300], codes[200:300])
    assert w2.commit("v2") == 2 and store.load_manifest().live_faces == 200


def test_readers_see_whole_commits_only(tmp_path, meta, rows):
    ids, persons, sources, codes = rows
    store = IndexStore(tmp_path / "idx")
    stop, seen, errors = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            try:
                if store.exists():
                    m = store.load_manifest()
                    live = sum(open_segment(store, r).rows for r in m.segments)
                    seen.add((m.version, m.live_faces, live))
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for k in range(5):
            w = IndexWriter(store, meta, segment_rows=30)
            sl = slice(k * 100, (k + 1) * 100)
            w.add(ids[sl], persons[sl], sources[sl], codes[sl])
            w.commit(f"batch {k}")
    finally:
        stop.set()
        t.join(10)
    assert not errors
    assert seen and all(faces == live == 100 * version for version, faces, live in seen)


def test_commit_refuses_codes_of_another_model_or_shard_count(tmp_path, meta, rows):
    ids, persons, sources, codes = rows
    w = IndexWriter(tmp_path / "idx", meta)
    w.add(ids, persons, sources, codes)
    w.commit("v1")
    other = replace(meta, fingerprint="0123456789abcdef")
    with pytest.raises(IndexFormatError, match=f"{meta.fingerprint}.*0123456789abcdef"):
        IndexWriter(tmp_path / "idx", other)
    store = IndexStore(tmp_path / "idx")
    ref = write_segment(store, 0, ids[:5] + np.uint64(1), persons[:5], sources[:5], codes[:5], other)
    with pytest.raises(IndexFormatError, match="0123456789abcdef"):
        commit_segments(store, {0: [ref]}, other, 4, "wrong model")
    with pytest.raises(ConfigError, match="4 shards"):
        IndexWriter(tmp_path / "idx", meta, shard_count=8)
    assert store.current_version() == 1


def test_delete_then_compact_removes_the_person_from_every_live_file(tmp_path, meta, rows):
    ids, persons, sources, codes = rows
    codes = codes.copy()
    victim = "person_03"
    mask = np.array([p == victim for p in persons])
    # Give the victim a code pattern no one else has, so a byte scan can find it.
    codes[mask] = np.frombuffer(b"\xde\xad\xbe\xef\xca\xfe\xf0\x0d", np.uint8)
    codes[~mask & np.all(codes == codes[mask][0], axis=1)] ^= 1
    store = IndexStore(tmp_path / "idx")
    w = IndexWriter(store, meta, segment_rows=100)
    w.add(ids, persons, sources, codes)
    w.commit("v1")

    with pytest.raises(DataError, match="no live faces of person 'nobody'"):
        delete_faces(store, person="nobody")
    assert store.current_version() == 1
    version, n = delete_faces(store, person=victim)
    assert (version, n) == (2, int(mask.sum()))
    assert index_info(store)["faces"] == len(ids) - n and index_info(store)["people"] == 9
    assert not np.isin(ids[mask], live_row_ids(store)).any()
    with pytest.raises(DataError, match="no live faces"):
        delete_faces(store, person=victim)

    stats = compact(store, grace_seconds=0)
    assert stats.rows_removed == n and stats.version == 3
    manifest = store.load_manifest()
    assert manifest.tombstone_count == 0 and manifest.live_faces == len(ids) - n
    victim_ids = [int(i).to_bytes(8, "little") for i in ids[mask]]
    for ref in manifest.segments:
        data = open(store.local_path(ref.path), "rb").read()
        assert victim.encode() not in data
        assert b"\xde\xad\xbe\xef\xca\xfe\xf0\x0d" not in data
        assert not any(v in data for v in victim_ids)
    # Nothing else on disk holds them either (old segments were garbage-collected with grace 0).
    for dirpath, _, files in os.walk(os.path.join(store.root, "shards")):
        for name in files:
            assert victim.encode() not in open(os.path.join(dirpath, name), "rb").read()


def test_deleting_face_ids_and_enrolling_them_again(tmp_path, meta, rows):
    ids, persons, sources, codes = rows
    store = IndexStore(tmp_path / "idx")
    w = IndexWriter(store, meta)
    w.add(ids, persons, sources, codes)
    w.commit("v1")
    with pytest.raises(DataError, match="not live"):
        delete_faces(store, face_ids=[int(ids[0]), 12345])
    assert delete_faces(store, face_ids=ids[:20]) == (2, 20)
    # Enrolled again (under a corrected name): live once, with the new name, tombstones gone.
    w = IndexWriter(store, meta)
    assert w.add(ids[:20], ["renamed"] * 20, sources[:20], codes[:20]) == 20
    assert w.commit("re-enrol") == 3
    manifest = store.load_manifest()
    assert manifest.tombstone_count == 0 and manifest.live_faces == len(ids)
    live = live_row_ids(store)
    assert len(live) == len(np.unique(live)) == len(ids)
    assert index_info(store)["people"] == 11


def test_concurrent_writers_commit_both_without_duplicates(tmp_path, meta, rows):
    ids, persons, sources, codes = rows
    store = IndexStore(tmp_path / "idx")
    a, b = IndexWriter(store, meta), IndexWriter(store, meta)  # both opened on the empty index
    a.add(ids[:300], persons[:300], sources[:300], codes[:300])
    b.add(ids[200:], persons[200:], sources[200:], codes[200:])  # 100 faces overlap
    assert a.commit("a") == 1 and b.commit("b") == 2
    live = live_row_ids(store)
    assert len(live) == len(np.unique(live)) == len(ids)


@pytest.mark.parametrize("segment_rows", [40, 100_000])  # segments written during add / only at commit
def test_repeats_across_adds_keep_the_first_row_and_every_column_stays_aligned(tmp_path, meta, rows, segment_rows):
    ids, persons, sources, codes = rows
    store = IndexStore(tmp_path / "idx")
    w = IndexWriter(store, meta, segment_rows=segment_rows, on_conflict="skip")
    w.add(ids[:300], persons[:300], sources[:300], codes[:300])
    # Rows 200..299 again under other names and codes (refused by the enrol rule, reported in
    # `conflicts`), plus a repeat within the batch.
    again = np.concatenate([ids[200:400], ids[350:360]])
    w.add(again, ["second"] * 210, [f"s{i}" for i in range(210)], np.full((210, 8), 7, np.uint8))
    other = IndexWriter(store, meta)  # commits rows ours still buffers
    other.add(ids[380:450], ["other"] * 70, sources[380:450], codes[380:450])
    assert other.commit("other") == 1
    assert w.commit("mine") == 2
    assert (w.stats.rows_added, w.stats.duplicates_skipped) == (380, 130)
    # 200..299 are ours as persons[i], 380..399 were committed by `other` first: 120 photos refused.
    assert sorted(c.face_id for c in w.conflicts) == sorted(ids[200:300].tolist() + ids[380:400].tolist())
    manifest = store.load_manifest()
    by_id = {}
    for shard, state in enumerate(manifest.shards):
        for ref in state.segments:
            seg = open_segment(store, ref, model=manifest.model)
            assert ref.rows <= segment_rows and np.all(seg.face_ids % np.uint64(4) == shard)
            for i, fid in enumerate(seg.face_ids.tolist()):
                assert fid not in by_id
                by_id[fid] = (seg.person_at(i), seg.source_at(i), seg.codes[i].tolist())
    assert len(by_id) == 450
    for i in range(450):  # the first row given for a face wins, with its own person, source and code
        want = (persons[i], sources[i], codes[i].tolist()) if i < 300 else \
            ("other", sources[i], codes[i].tolist()) if i >= 380 else ("second", f"s{i - 200}", [7] * 8)
        assert by_id[int(ids[i])] == want


def test_file_lock_times_out_with_a_clear_error(tmp_path, meta):
    store = IndexStore(tmp_path / "idx")
    held, release = threading.Event(), threading.Event()

    def holder():
        with commit_lock(store):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(10)
        # flock locks are per open file description, so a second open in this process contends too.
        with pytest.raises(IndexLockTimeout, match="commit lock"):
            with commit_lock(store, timeout=0.3):
                pass
    finally:
        release.set()
        t.join(10)
    with commit_lock(store, timeout=1):
        pass


def test_redis_lock_serialises_commits_and_is_released(tmp_path, meta, rows, redis_server):
    import redis

    from indexer.lock import redis_lock_key

    ids, persons, sources, codes = rows
    store = IndexStore(tmp_path / "idx")
    client = redis.Redis.from_url(redis_server.url)
    key = redis_lock_key(store)
    with commit_lock(store, redis_url=redis_server.url):
        assert client.exists(key)
        with pytest.raises(IndexLockTimeout, match="Redis commit lock"):
            with commit_lock(store, redis_url=redis_server.url, timeout=0.3):
                pass
    assert not client.exists(key)
    # A writer with Redis and one without (a CLI ingest beside the coordinator) still exclude each other.
    with commit_lock(store):
        with pytest.raises(IndexLockTimeout, match="commit lock"):
            with commit_lock(store, redis_url=redis_server.url, timeout=0.3):
                pass
    assert not client.exists(key)
    w = IndexWriter(store, meta, redis_url=redis_server.url)
    w.add(ids, persons, sources, codes)
    assert w.commit("via redis") == 1
    assert delete_faces(store, person="person_01", redis_url=redis_server.url)[0] == 2
    assert compact(store, redis_url=redis_server.url, grace_seconds=0).version == 3
    assert not client.exists(key)
    redis_server.stop()
    with pytest.raises(Unavailable, match="cannot take the commit lock: Redis at .* is unreachable"):
        delete_faces(store, person="person_02", redis_url=redis_server.url, lock_timeout=1)


def test_redis_lock_is_kept_alive_past_its_ttl_while_held(tmp_path, redis_server, monkeypatch):
    """A commit longer than the lock's TTL keeps the lock: the key still holds our token after six renewals
    (each at least a third of the TTL after the previous one, so the key has outlived two TTLs)."""
    import redis
    import redis.lock

    from indexer import lock as commit_lock_module
    from indexer.lock import redis_lock_key

    monkeypatch.setattr(commit_lock_module, "_REDIS_TTL_S", 1.0)
    renewed = threading.Semaphore(0)
    reacquire = redis.lock.Lock.reacquire

    def counted(lock):
        result = reacquire(lock)  # raises LockNotOwnedError, and counts nothing, once the key is not ours
        renewed.release()
        return result

    monkeypatch.setattr(redis.lock.Lock, "reacquire", counted)
    store = IndexStore(tmp_path / "idx")
    client = redis.Redis.from_url(redis_server.url)
    key = redis_lock_key(store)
    with commit_lock(store, redis_url=redis_server.url):
        token = client.get(key)
        assert token
        for renewal in range(6):
            assert renewed.acquire(timeout=30), f"the keep-alive stopped after {renewal} renewals"
        assert client.get(key) == token and client.pttl(key) > 0
        with pytest.raises(IndexLockTimeout, match="Redis commit lock"):
            with commit_lock(store, redis_url=redis_server.url, timeout=0.2):
                pass
    assert not client.exists(key)


def test_a_redis_lock_lost_while_held_never_releases_the_new_holders_key(tmp_path, redis_server):
    import redis

    from indexer.lock import redis_lock_key

    store = IndexStore(tmp_path / "idx")
    client = redis.Redis.from_url(redis_server.url)
    key = redis_lock_key(store)
    with commit_lock(store, redis_url=redis_server.url):
        client.set(key, b"another-writer")  # ours expired while we stalled, and someone else took it
    assert client.get(key) == b"another-writer"


def test_an_unreachable_redis_is_named_without_any_part_of_its_password(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://app:p@ss@127.0.0.1:{port}/0"
    with pytest.raises(Unavailable, match="cannot take the commit lock: Redis at .* is unreachable") as info:
        with commit_lock(IndexStore(tmp_path / "idx"), redis_url=url, timeout=1):
            pass
    message = str(info.value)
    assert f"redis://***@127.0.0.1:{port}/0" in message
    assert "ss@" not in message and "p@" not in message


def test_object_store_code_path_round_trips_with_a_redis_lock(tmp_path, meta, rows, redis_server):
    """A non-local pyarrow filesystem (a SubTreeFileSystem stands in for S3/GCS): one-put writes, segments
    read into memory instead of mmap, the Redis lock mandatory."""
    import pyarrow.fs as pafs

    ids, persons, sources, codes = rows
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    store = IndexStore("bucket/idx", filesystem=fs)
    assert not store.is_local and store.local_path("CURRENT") is None
    with pytest.raises(ConfigError, match="Redis URL"):
        IndexWriter(store, meta)
    w = IndexWriter(store, meta, redis_url=redis_server.url, segment_rows=200)
    w.add(ids, persons, sources, codes)
    assert w.commit("remote") == 1
    assert (tmp_path / "bucket/idx/CURRENT").read_text() == "1\n"
    written = {int(face_id): code.tobytes() for face_id, code in zip(ids, codes)}
    for ref in store.load_manifest().segments:  # every row read back through the filesystem is what was written
        view = open_segment(store, ref, model=meta)
        assert view.rows > 0 and view.codes.shape[1] == 8
        assert [view.codes[i].tobytes() for i in range(view.rows)] == [written[int(f)] for f in view.face_ids]
    assert sum(ref.rows for ref in store.load_manifest().segments) == len(ids)
    assert delete_faces(store, person="person_05", redis_url=redis_server.url) == (2, 50)
    stats = compact(store, redis_url=redis_server.url, grace_seconds=0)
    assert stats.rows_removed == 50 and stats.files_deleted > 0
    assert index_info(store, verify=True)["faces"] == len(ids) - 50


def test_a_long_lived_writer_follows_other_writers_deletes_and_compactions(tmp_path, meta, rows):
    """The coordinator's Enrol path keeps one writer open across many commits."""
    ids, persons, sources, codes = rows
    store = IndexStore(tmp_path / "idx")
    enrol = IndexWriter(store, meta)
    enrol.add(ids[:100], persons[:100], sources[:100], codes[:100])
    assert enrol.commit("enrol 1") == 1
    other = IndexWriter(store, meta)
    other.add(ids[100:200], persons[100:200], sources[100:200], codes[100:200])
    assert other.commit("bulk") == 2
    assert enrol.add(ids[150:250], persons[150:250], sources[150:250], codes[150:250]) == 50  # sees the bulk rows
    assert enrol.commit("enrol 2") == 3
    assert delete_faces(store, face_ids=ids[:10])[0] == 4
    compact(store, grace_seconds=0)
    assert enrol.add(ids[:10], ["again"] * 10, sources[:10], codes[:10]) == 10  # deleted: enrols again
    assert enrol.commit("enrol 3") == 6
    live = live_row_ids(store)
    assert len(live) == len(np.unique(live)) == 250


def test_one_writer_shared_by_threads(tmp_path, meta, rows):
    ids, persons, sources, codes = rows
    store = IndexStore(tmp_path / "idx")
    writer = IndexWriter(store, meta, segment_rows=16)
    errors = []

    def enrol(k):
        try:
            for j in range(k * 50, (k + 1) * 50, 10):
                writer.add(ids[j:j + 10], persons[j:j + 10], sources[j:j + 10], codes[j:j + 10])
                writer.commit(f"t{k}")
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            errors.append(exc)

    threads = [threading.Thread(target=enrol, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    live = live_row_ids(store)
    assert len(live) == len(np.unique(live)) == 200


def test_gc_keeps_the_last_manifests_and_every_file_they_need(tmp_path, meta, rows):
    ids, persons, sources, codes = rows
    store = IndexStore(tmp_path / "idx")
    for k in range(5):
        w = IndexWriter(store, meta)
        w.add(ids[k * 100:(k + 1) * 100], persons[k * 100:(k + 1) * 100], sources[k * 100:(k + 1) * 100],
              codes[k * 100:(k + 1) * 100])
        w.commit(f"v{k + 1}")
    stats = compact(store, grace_seconds=3600, keep_manifests=2)
    assert stats.manifests_deleted == 3 and stats.files_deleted == 0  # every segment is still current
    assert sorted(os.listdir(os.path.join(store.root, "manifests"))) == ["00000004.json", "00000005.json"]
    for v in (4, 5):
        for ref in store.load_manifest(v).segments:
            open_segment(store, ref)
    with pytest.raises(IndexFormatError, match="version 3"):
        store.load_manifest(3)
