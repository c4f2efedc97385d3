"""Garbage collection of index files no retained version needs.

Rules (also in docs/index-format.md):
* A past manifest w (< current) is *expired* when it is more than `keep_manifests`
  versions old, or when it stopped being current more than `grace_seconds` ago
  (measured by the mtime of the next manifest file). Readers that loaded it had that
  long to move on. Expired manifests are deleted. Manifests numbered above the current
  version (a commit that died before moving CURRENT) are deleted once older than the grace.
* A file under `shards/` that no retained manifest references, and that is older than
  `grace_seconds`, is deleted, unless a writer still running may own it: files written
  since the earliest live writer lease began are kept whatever the grace (indexer.lease;
  a writer holds its lease from before its first file until its commit or abort). That
  covers segments replaced by compaction, segments of jobs that died before committing,
  and temporary files of interrupted writes; stale leases of dead writers are removed.

Runs under the commit lock (called by `indexer.commit.compact`).
"""
from __future__ import annotations

import logging
import re
import time

from facepq_core.errors import IndexFormatError
from indexer.lease import protected_since
from indexer.store import MANIFEST_DIR, SHARD_DIR, IndexStore, manifest_path

log = logging.getLogger(__name__)

_MANIFEST_NAME = re.compile(r"^manifests/(\d{8,})\.json$")


def collect_garbage(store: IndexStore, stats, grace_seconds: float = 3600.0, keep_manifests: int = 10) -> None:
    """Delete expired manifests and unreferenced segment files; adds counts to `stats` (CompactStats)."""
    current = store.current_version()
    if current is None:
        return
    store.check_no_links()  # before deleting anything: a link could lead outside the index root
    now = time.time()
    old_enough = now - max(0.0, grace_seconds)
    manifests = {}
    for entry in store.list_files(MANIFEST_DIR):
        m = _MANIFEST_NAME.match(entry.path)
        if m:
            manifests[int(m.group(1))] = entry
        elif entry.mtime <= old_enough:  # temp files of an interrupted manifest write
            store.delete(entry.path)
            stats.files_deleted += 1
    retained, expired = [], []
    for v, entry in sorted(manifests.items()):
        if v == current:
            retained.append(v)
        elif v > current:
            (expired if entry.mtime <= old_enough else retained).append(v)
        else:
            nxt = manifests.get(v + 1)
            superseded_at = nxt.mtime if nxt is not None else 0.0
            too_many = v <= current - max(1, keep_manifests)
            (expired if too_many or superseded_at <= old_enough else retained).append(v)
    referenced: set[str] = set()
    for v in retained:
        try:
            referenced.update(s.path for s in store.load_manifest(v).segments)
        except IndexFormatError as exc:
            if v == current:
                raise
            log.warning("gc: skipping unreadable manifest %d of %s: %s", v, store.uri, exc)
    for v in expired:
        store.delete(manifest_path(v))
        stats.manifests_deleted += 1
    writers_since = protected_since(store)  # after `now`: a lease taken before it is seen here
    for entry in store.list_files(SHARD_DIR):
        if entry.path in referenced or entry.mtime > old_enough:
            continue
        if writers_since is not None and entry.mtime >= writers_since:
            stats.files_kept_for_writers += 1
            continue
        store.delete(entry.path)
        stats.files_deleted += 1
        stats.bytes_freed += entry.size
    log.info("gc %s: deleted %d manifests and %d files (%d bytes)", store.uri, stats.manifests_deleted,
             stats.files_deleted, stats.bytes_freed)
