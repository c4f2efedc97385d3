"""Writer leases: how a writer that has not committed yet stays visible to garbage collection.

Segment files exist before the commit that references them (an ingest writes for hours, then commits
once). Garbage collection used to tell them from orphans by age alone (the grace), so it deleted the
files of any writer running longer than the grace, and with grace 0 those of nearly every concurrent
Enrol. Now a writer holds a lease from before its first file until its commit or abort:

* the lease is a file `writers/<random>.lease` under the index root; on a local disk its mtime (the
  filesystem's clock, the clock segment mtimes use) is when the writer began; an object store's lease
  says so in its content (its mtime moves with each renewal);
* garbage collection keeps every unreferenced file under `shards/` whose mtime is at or after the
  earliest live lease began (less LEASE_SLACK_S for timestamp granularity), whatever the grace;
* a lease is live while its holder lives: on a local disk the holder keeps an `flock` on it, which the
  kernel drops when the process dies, so a SIGKILLed writer's lease is stale at once; on an object store
  (no locks) the holder rewrites it every LEASE_TTL_S / 3 and it is stale once older than LEASE_TTL_S;
* stale leases are deleted by garbage collection; the dead writer's files then age out under the grace.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid

from indexer.store import IndexStore

log = logging.getLogger(__name__)

LEASE_DIR = "writers"
LEASE_TTL_S = 600.0  # object stores only: a lease not renewed for this long belongs to a dead writer
LEASE_SLACK_S = 2.0  # file timestamps of a writer's first files may read slightly before its lease's


class WriterLease:
    """The lease of one writer: `acquire()` before writing any file, `release()` after commit or abort."""

    def __init__(self, store: IndexStore):
        self.store = store
        self.rel = f"{LEASE_DIR}/{uuid.uuid4().hex}.lease"
        self._fd: int | None = None
        self._stop: threading.Event | None = None
        self.held = False
        self.started = 0.0

    def _content(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": self.started,
                           "renewed": time.time()}).encode()

    def acquire(self) -> None:
        if self.held:
            return
        self.started = time.time()
        if self.store.is_local:
            import fcntl

            self.store.makedirs(LEASE_DIR)
            path = self.store.full_path(self.rel)
            with self.store.writing("taking a writer lease"):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.write(fd, self._content())
                except BaseException:
                    os.close(fd)
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                    raise
            self._fd = fd
        else:
            self.store.write_bytes(self.rel, self._content())
            self._stop = threading.Event()
            threading.Thread(target=self._renew, args=(self._stop,), name="facepq-writer-lease", daemon=True).start()
        self.held = True

    def _renew(self, stop: threading.Event) -> None:
        while not stop.wait(LEASE_TTL_S / 3):
            try:
                self.store.write_bytes(self.rel, self._content())
            except Exception as exc:  # noqa: BLE001 - keep trying; a lease left to expire only risks this writer
                log.warning("could not renew writer lease %s: %s", self.rel, exc)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._stop is not None:
            self._stop.set()
        with contextlib.suppress(OSError):
            self.store.delete(self.rel)
        if self._fd is not None:
            os.close(self._fd)  # also drops the flock
            self._fd = None


def _is_live(store: IndexStore, rel: str, mtime: float, now: float) -> bool:
    if not store.is_local:
        return now - mtime < LEASE_TTL_S
    import fcntl

    try:
        fd = os.open(store.full_path(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # released meanwhile
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True  # its writer holds it
    finally:
        os.close(fd)
    return False


def _started(store: IndexStore, rel: str, fallback: float) -> float:
    """When a renewed (object-store) lease began: its content says; its mtime moves with every renewal."""
    try:
        return float(json.loads(store.read_bytes(rel))["started"])
    except Exception:  # noqa: BLE001 - unreadable: protect from its last renewal on, at least
        return fallback


def protected_since(store: IndexStore, now: float | None = None) -> float | None:
    """The earliest start (filesystem time) of a live writer lease, less LEASE_SLACK_S; None when no writer
    is running. Stale leases (their writer died) are deleted on the way."""
    now = time.time() if now is None else now
    earliest = None
    for entry in store.list_files(LEASE_DIR):
        if not entry.path.endswith(".lease"):
            continue
        if _is_live(store, entry.path, entry.mtime, now):
            began = entry.mtime if store.is_local else _started(store, entry.path, entry.mtime)
            earliest = began if earliest is None else min(earliest, began)
        else:
            log.info("gc: removing the stale writer lease %s (its writer is gone)", entry.path)
            store.delete(entry.path)
    return None if earliest is None else earliest - LEASE_SLACK_S
