"""The current index view of a query node, kept up to date by a watcher thread.

`LiveIndex` holds the current view (query_node.index_view.IndexView) and a watcher
thread that polls the index's CURRENT pointer; a new version builds a new view
(reusing the already verified, immutable segments of the old one) and swaps a
single reference. Queries that started on the old view finish on it; its memory
maps close when the last reference goes away. The last few views stay addressable
by version (`view_at`), so a coordinator can ask every shard for the same committed
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

from facepq_core.errors import ConfigError, FacepqError
from query_node.index_view import IndexView, load_view

log = logging.getLogger(__name__)

RECENT_VIEWS = 3  # views kept addressable by version (each holds only mmaps, shared with its successor)
# A superseded view is kept this long at most: enough for searches in flight to align their versions,
# short enough that the pages of files deleted by `compact` (a deleted person's rows) are unmapped soon.
VIEW_GRACE_SECONDS = 10.0


def _file_stamp(store, rel: str):
    """(size, mtime_ns, inode) of a local file; None when it cannot be stat'ed (gone) or is remote;
    "link" when a symbolic link took its place (a change: the segment is reopened, and refused)."""
    try:
        path = store.local_path(rel)
    except FacepqError:
        return "link"
    if path is None:
        return None
    try:
        st = os.lstat(path)
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
        on_status: called with (ok, error text) whenever the watcher starts or stops failing.
        verify: check each newly opened segment's sha256.
        view_grace: seconds a superseded view stays addressable (`view_at`) before it is dropped.
    """

    def __init__(self, index_uri, shard_ids: list[int], poll_seconds: float = 0.5, on_change=None, verify=True,
                 view_grace: float = VIEW_GRACE_SECONDS, on_status=None):
        from indexer.store import IndexStore

        self.store = IndexStore(index_uri)
        self.store.check_no_links()  # a node never serves files reached through a link: refuse to start
        self.shard_ids = sorted(set(int(s) for s in shard_ids))
        if not self.shard_ids:
            raise ConfigError("a node must serve at least one shard (e.g. --shards 0,1)")
        self.poll_seconds = poll_seconds
        self.on_change = on_change
        self.on_status = on_status  # callable(ok: bool, error: str) when the watcher's state changes
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
                    self._stamps[seg.ref.id] = _file_stamp(self.store, seg.ref.path)
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
                stamp = _file_stamp(self.store, seg.ref.path)
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
            self.poll()

    def poll(self) -> str:
        """One watcher step: load a new version, re-check served files, drop expired views. Never raises.

        Each step runs whatever the others did: a current manifest that cannot be read must not stop
        the checks of the files still served (a node whose watcher died kept serving a segment altered
        on disk). Returns the error text ("" when every step succeeded); `last_error` keeps it and
        `on_status(ok, text)` hears of every change, so health can report a node stuck on an old view.
        """
        problems = []
        for step in (self.reload_if_changed, self.check_segments, self._forget_now):
            try:
                step()
            except FacepqError as exc:  # keep serving the last good view; retry next poll
                problems.append(str(exc))
            except Exception as exc:  # anything else too: a dead watcher never recovers
                if f"{type(exc).__name__}: {exc}" != self.last_error:
                    log.exception("index watcher step %s failed", step.__name__)
                problems.append(f"{type(exc).__name__}: {exc}")
        error = "; ".join(problems)
        if error != self.last_error:
            if error:
                log.warning("index watcher (still serving version %s): %s", self._view.version, error[:2000])
            else:
                log.info("index watcher: reading %s again (serving version %s)", self.store.uri, self._view.version)
            self.last_error = error
            if self.on_status is not None:
                self.on_status(not error, error)
        return error

    def _forget_now(self) -> None:
        with self._reload_lock:
            self._forget_expired(time.monotonic())

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="facepq-index-watcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
