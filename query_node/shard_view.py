"""A query node's view of its shards at one index version, and the watcher that swaps it.

`IndexView` memory-maps every segment of the served shards (zero-copy: the code
matrix is the file's pages, so resident memory is about the bytes scanned),
verifies each segment's sha256 once, and turns tombstones into per-segment skip
masks. A shard whose segment is missing or corrupt is NOT_SERVING with the reason
recorded: it is never scanned, so it never returns wrong scores.

`LiveIndex` holds the current view and a watcher thread that polls the index's
CURRENT pointer; a new version builds a new view (reusing the already verified,
immutable segments of the old one) and swaps a single reference. Queries that
started on the old view finish on it; its memory maps close when the last
reference goes away. The last few views stay addressable by version
(`view_at`), so a coordinator can ask every shard for the same committed
version while a reload is under way (no torn reads across nodes).

Segments are immutable, so a served file that changes on disk is corruption
(a disk fault, an operator's mistake). Every poll the watcher stats each served
segment (size, mtime, inode: cheap) and re-verifies the sha256 of any that
changed; a failing one turns its shard NOT_SERVING at once, so the memory map
of a file altered in place never feeds scores to a query for longer than one
poll. (A file truncated in place while mapped can still fault a query that
touches the lost pages in that window; writers never do that: they write new
files and rename.)
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from facepq_core.errors import ConfigError, FacepqError, IndexFormatError
from query_node.merge import Hit, merge_shard_lists
from query_node.scan import ScanTables, TopKHeap, scan_tables

log = logging.getLogger(__name__)


_MADV_RANDOM = 1
_MADV_DONTNEED = 4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def advise_random_access(seg) -> None:
    """Keep a segment's metadata (face_id, person, source) out of the map's resident pages.

    A node reads these columns with positional reads (SegmentView.hit_metadata, tombstone_mask),
    never through the map, so no search faults them in. Two things still could:
    - a fault next to them: the kernel maps the already cached pages around a faulting one too
      (fault-around, a 64 KiB window, MADV_RANDOM or not), but only within the fault's VMA. The
      whole pages holding only metadata get their own VMA (MADV_RANDOM, which also turns readahead
      off for any other reader of the arrays), so a scan of the first codes maps no metadata.
    - opening the file, before that split: Arrow reads the record batch header from the page the
      face ids start on, and fault-around maps up to 15 pages of face ids with it. MADV_DONTNEED
      unmaps them again (the page cache keeps them; a later access faults a page back in).
    Only for a segment mapped from a local file (`seg.reader` set: its metadata buffers are checked
    to lie in the map): DONTNEED on the heap copy of a remote segment would zero it. The code
    column keeps the default advice: it is scanned front to back. Best effort: Linux only.
    """
    if getattr(seg, "reader", None) is None:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    # The metadata buffers are adjacent in the file (column order, padding between), codes after them.
    bufs = [seg.batch.column(0).buffers()[1]] + [b for column in (seg.persons, seg.sources)
                                                 for b in column.buffers() if b is not None]
    lo, hi = min(b.address for b in bufs), max(b.address + b.size for b in bufs)
    inner_lo, inner_hi = -(-lo // _PAGE) * _PAGE, hi // _PAGE * _PAGE
    if inner_hi > inner_lo:
        libc.madvise(ctypes.c_void_p(inner_lo), ctypes.c_size_t(inner_hi - inner_lo), _MADV_RANDOM)
    outer_lo, outer_hi = lo // _PAGE * _PAGE, -(-hi // _PAGE) * _PAGE
    libc.madvise(ctypes.c_void_p(outer_lo), ctypes.c_size_t(outer_hi - outer_lo), _MADV_DONTNEED)


@dataclass
class ShardData:
    """One served shard at one version."""

    shard: int
    segments: list = field(default_factory=list)   # indexer.segment.SegmentView, scan order
    skips: list = field(default_factory=list)      # bool [rows] per segment (True = tombstoned) or None
    rows: int = 0
    live_rows: int = 0
    code_bytes: int = 0
    serving: bool = True
    reason: str = ""

    def search(self, tables: ScanTables, k: int, stats: ScanStats | None = None) -> list[list[Hit]]:
        """Top-k of this shard for `query_node.scan.ScanTables`; one best-first list per query.

        `stats` (optional) accumulates the seconds spent in the scan kernel and the rows scanned.
        """
        heap = TopKHeap(tables.byte.shape[0], k)
        offsets = []
        t0 = time.perf_counter()
        for seg, skip in zip(self.segments, self.skips):
            offsets.append(heap.rows_scanned)
            heap.scan(seg.codes, tables, skip)
        if stats is not None:
            stats.scan_seconds += time.perf_counter() - t0
            stats.rows += heap.rows_scanned
        scores, rows = heap.result()
        starts = np.asarray(offsets, dtype=np.int64)
        # One searchsorted for every hit of every query, not one per hit.
        seg_of = np.searchsorted(starts, rows, side="right") - 1
        meta = self._hit_metadata(rows, seg_of, starts)
        out = []
        for q in range(scores.shape[0]):
            hits = []
            for score, row in zip(scores[q].tolist(), rows[q].tolist()):
                if row < 0:
                    break
                face_id, person, source = meta[row]
                hits.append(Hit(face_id=face_id, person=person, source=source, score=score, shard=self.shard))
            out.append(hits)
        return out

    def _hit_metadata(self, rows: np.ndarray, seg_of: np.ndarray, starts: np.ndarray) -> dict:
        """{shard row: (face_id, person, source)} for every hit (rows >= 0) of every query.

        Read with SegmentView.hit_metadata (positional reads of a local file), not through the
        segment's map: mapped pages once touched stay resident, so looking hits up through the
        map made a node's RSS grow with traffic towards the whole file (measured 1.3 x the code
        bytes after 310 searches on 5M rows, and growing). A native reader doing the same reads
        in one C call measured slower here (ctypes' per-call cost), so the reads stay in Python.
        """
        found = rows >= 0
        hit_rows, hit_segs = rows[found], seg_of[found]
        meta = {}
        for s in np.unique(hit_segs).tolist():
            shard_rows = np.unique(hit_rows[hit_segs == s])
            ids, persons, sources = self.segments[s].hit_metadata(shard_rows - starts[s])
            meta.update(zip(shard_rows.tolist(), zip(ids.tolist(), persons, sources)))
        return meta


@dataclass
class ScanStats:
    """What one search cost inside a node: kernel seconds (all shards, all queries) and rows scanned."""

    scan_seconds: float = 0.0
    rows: int = 0


class IndexView:
    """The served shards of one index version (immutable once built)."""

    def __init__(self, manifest, shards: dict[int, ShardData]):
        from facepq_core.codecs import codec_class

        self.manifest = manifest
        self.model = manifest.model
        try:  # the scan kernel family of the index's codec; an unknown codec is never scanned
            self.kernel = codec_class(manifest.model.codec).kernel
        except ConfigError as exc:
            raise IndexFormatError(f"cannot serve this index: {exc}") from None
        self.version = str(manifest.version)
        self.shards = shards

    def serving_shards(self) -> list[int]:
        return sorted(s for s, d in self.shards.items() if d.serving)

    def search(self, lookup_tables: np.ndarray, k: int, shards: list[int],
               stats: ScanStats | None = None) -> list[list[Hit]]:
        """Exact top-k over `shards` (all serving) for float32 [Q, M, K] tables; one list per query.

        `stats` (optional) accumulates the kernel's seconds and rows over the shards scanned.
        """
        tables = scan_tables(lookup_tables, self.model.packed, self.model.code_bytes)
        per_shard = [self.shards[s].search(tables, k, stats) for s in shards]
        return [merge_shard_lists([res[q] for res in per_shard], k) for q in range(tables.byte.shape[0])]


def load_view(store, shard_ids: list[int], previous: IndexView | None = None, verify: bool = True,
              manifest=None, recheck: frozenset = frozenset()) -> IndexView:
    """Open the current manifest's segments of `shard_ids`.

    Args:
        store: indexer.store.IndexStore.
        shard_ids: shards this node serves; each must exist in the index.
        previous: a view whose already verified segments (same id) are reused.
        verify: check every newly opened segment's size and sha256.
        manifest: the manifest to open (default: the current one).
        recheck: segment ids never reused from `previous` (their files changed on disk).
    Raises:
        IndexFormatError: no index / unreadable manifest. ConfigError: a shard outside the index.
    """
    from indexer.errors import SegmentCorrupt
    from indexer.segment import open_segment

    manifest = manifest if manifest is not None else store.load_manifest()
    bad = [s for s in shard_ids if s < 0 or s >= manifest.shard_count]
    if bad:
        raise ConfigError(f"shard(s) {bad} do not exist: the index at {store.uri} has {manifest.shard_count} "
                          f"shards (0..{manifest.shard_count - 1})")
    reuse = {}
    if previous is not None:
        for data in previous.shards.values():
            reuse.update({seg.ref.id: seg for seg in data.segments if seg.ref.id not in recheck})
    shards = {}
    for shard in shard_ids:
        state = manifest.shards[shard]
        data = ShardData(shard=shard)
        try:
            for ref in state.segments:
                seg = reuse.get(ref.id)
                if seg is None or seg.ref.sha256 != ref.sha256:
                    seg = open_segment(store, ref, verify=verify or ref.id in recheck, model=manifest.model)
                    advise_random_access(seg)
                data.segments.append(seg)
        except SegmentCorrupt as exc:
            log.error("shard %d NOT_SERVING at version %d: %s", shard, manifest.version, exc)
            shards[shard] = ShardData(shard=shard, serving=False, reason=str(exc))
            continue
        tomb = np.fromiter(state.tombstones, dtype=np.uint64, count=len(state.tombstones))
        for seg in data.segments:
            if tomb.size:
                # tombstone_mask reads the face ids with positional reads in chunks rather than
                # np.isin over seg.face_ids (the map), which would leave the whole column resident
                # for as long as the segment is served. Not madvise(DONTNEED) after the fact: the
                # whole column would still be resident at once while the masks are computed (a
                # peak of 8 bytes a row per segment), and madvise is Linux-only best effort.
                skip = seg.tombstone_mask(tomb)
                data.skips.append(skip if skip.any() else None)
            else:
                data.skips.append(None)
            data.rows += seg.rows
            data.code_bytes += seg.codes.nbytes
        data.live_rows = data.rows - sum(int(s.sum()) for s in data.skips if s is not None)
        shards[shard] = data
    return IndexView(manifest, shards)


RECENT_VIEWS = 3  # views kept addressable by version (each holds only mmaps, shared with its successor)
# A superseded view is kept this long at most: enough for searches in flight to align their versions,
# short enough that the pages of files deleted by `compact` (a deleted person's rows) are unmapped soon.
VIEW_GRACE_SECONDS = 10.0


def _file_stamp(path: str | None):
    """(size, mtime_ns, inode) of a local file; None when it cannot be stat'ed (gone) or is remote."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class LiveIndex:
    """The current IndexView of an index, kept up to date by a polling watcher thread.

    Args:
        index_uri: path or URI of the index.
        shard_ids: shards to serve.
        poll_seconds: how often CURRENT is read and the served segment files are stat'ed.
        on_change: called with the new view after every swap (health, registry).
        verify: check each newly opened segment's sha256.
        view_grace: seconds a superseded view stays addressable (`view_at`) before it is dropped.
    """

    def __init__(self, index_uri, shard_ids: list[int], poll_seconds: float = 0.5, on_change=None, verify=True,
                 view_grace: float = VIEW_GRACE_SECONDS):
        from indexer.store import IndexStore

        self.store = IndexStore(index_uri)
        self.shard_ids = sorted(set(int(s) for s in shard_ids))
        if not self.shard_ids:
            raise ConfigError("a node must serve at least one shard (e.g. --shards 0,1)")
        self.poll_seconds = poll_seconds
        self.on_change = on_change
        self.verify = verify
        self.view_grace = view_grace
        self._superseded: dict[str, float] = {}  # version -> monotonic time it stopped being current
        self._reload_lock = threading.Lock()  # the watcher and on-demand loads never build views at once
        self._recent: OrderedDict[str, IndexView] = OrderedDict()
        self._stamps: dict[str, tuple] = {}  # segment id -> file stamp when it was verified
        self._view = load_view(self.store, self.shard_ids, verify=verify)
        self._remember(self._view)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error = ""

    @property
    def view(self) -> IndexView:
        """The current view; hold on to it for the whole query (it never changes under you)."""
        return self._view

    def _remember(self, view: IndexView) -> None:
        now = time.monotonic()
        for version in self._recent:
            if version != view.version:
                self._superseded.setdefault(version, now)
        self._superseded.pop(view.version, None)
        self._recent[view.version] = view
        self._recent.move_to_end(view.version)
        while len(self._recent) > RECENT_VIEWS:
            self._superseded.pop(self._recent.popitem(last=False)[0], None)
        for data in view.shards.values():
            for seg in data.segments:
                if seg.ref.id not in self._stamps:
                    self._stamps[seg.ref.id] = _file_stamp(self.store.local_path(seg.ref.path))
        self._forget_expired(now)

    def _forget_expired(self, now: float) -> None:
        """Drop superseded views older than view_grace (their memory maps close with them)."""
        for version, since in list(self._superseded.items()):
            if now - since >= self.view_grace:
                self._recent.pop(version, None)
                del self._superseded[version]
        live = {seg.ref.id for v in self._recent.values() for d in v.shards.values() for seg in d.segments}
        for sid in [s for s in self._stamps if s not in live]:
            del self._stamps[sid]

    def _swap(self, new: IndexView) -> None:
        old, self._view = self._view, new  # one reference assignment: atomic for readers
        self._remember(new)
        if old.version != new.version:
            log.info("index version %s -> %s", old.version, new.version)
        if self.on_change:
            self.on_change(new)

    def reload_if_changed(self) -> bool:
        """Build and swap in a new view when CURRENT moved; True when it did."""
        with self._reload_lock:
            current = self.store.current_version()
            if current is None or str(current) == self._view.version:
                return False
            self._swap(load_view(self.store, self.shard_ids, previous=self._view, verify=self.verify))
            return True

    def view_at(self, version: str) -> IndexView:
        """The view of committed `version` if this node holds it; when `version` is newer than the current
        view, the index's current version is loaded first. Otherwise (an old version no longer kept, or a
        newer one that cannot be loaded) the current view: callers compare `.version`."""
        view = self._view
        if not version or version == view.version:
            return view
        kept = self._recent.get(version)
        if kept is not None:
            return kept
        # isascii: str.isdigit() accepts digits such as '²' that int() refuses.
        if version.isascii() and version.isdigit() and int(version) > int(view.version):
            try:
                self.reload_if_changed()
            except (FacepqError, OSError) as exc:
                log.warning("cannot load version %s on demand (serving %s): %s", version, view.version, exc)
            return self._recent.get(version, self._view)
        return view

    def check_segments(self) -> list[str]:
        """Re-verify served segments whose files changed on disk; returns the ids found changed.

        A changed segment is reopened with its checksum checked; when that fails its shard
        becomes NOT_SERVING in a new view of the same version (swapped in at once).
        """
        view = self._view
        changed = []
        for data in view.shards.values():
            for seg in data.segments:
                stamp = _file_stamp(self.store.local_path(seg.ref.path))
                if self.store.is_local and stamp != self._stamps.get(seg.ref.id):
                    changed.append(seg.ref.id)
        if not changed:
            return []
        log.error("segment file(s) %s changed on disk while served; re-verifying their checksums", changed)
        with self._reload_lock:
            new = load_view(self.store, self.shard_ids, previous=view, verify=self.verify,
                            manifest=view.manifest, recheck=frozenset(changed))
            for sid in changed:
                self._stamps.pop(sid, None)
            # The version did not change, so older views of it must not be served either.
            self._recent.pop(new.version, None)
            self._swap(new)
        return changed

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.reload_if_changed()
                self.check_segments()
                with self._reload_lock:
                    self._forget_expired(time.monotonic())
                self.last_error = ""
            except FacepqError as exc:  # keep serving the old view; retry next poll
                if str(exc) != self.last_error:
                    log.warning("cannot load the new index version (still serving %s): %s", self._view.version, exc)
                self.last_error = str(exc)
            except OSError as exc:
                log.warning("index watcher: %s", exc)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="facepq-index-watcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
