"""The commit lock: one writer at a time turns the current manifest into the next.

Local indexes always use an `fcntl` lock on `<index>/_lock` (released by the
kernel when the holder dies, so a SIGKILLed ingest never wedges the index),
whether or not a Redis URL is given, so writers configured differently still
exclude each other. When a Redis URL is given (required for object stores,
where no file lock exists) a Redis lock is taken first: redis-py's `Lock` (a key
set with `SET key token NX PX ttl`; release and renewal are Lua scripts that act
only while the key still holds our token, so a holder that stalled past its TTL
can never release someone else's lock), renewed by a keep-alive thread while the
holder works. Every wait has a timeout.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from typing import Iterator

from facepq_core.errors import ConfigError
from facepq_core.redis_errors import redis_error
from indexer.errors import IndexLockTimeout
from indexer.store import LOCK_FILE, IndexStore

log = logging.getLogger(__name__)

_POLL_S = 0.05
_REDIS_TTL_S = 30.0  # how long a dead holder blocks other writers; renewed every third of it while held


@contextlib.contextmanager
def commit_lock(store: IndexStore, redis_url: str | None = None, timeout: float = 60.0) -> Iterator[None]:
    """Hold the index's commit lock for the duration of the block.

    Args:
        store: the index.
        redis_url: use a Redis lock (redis://host:port/db) instead of the local file lock.
        timeout: seconds to wait for the lock before raising IndexLockTimeout.
    """
    if redis_url and store.is_local:
        # Both, always in this order: a writer given a Redis URL (the coordinator) and one without
        # (a CLI ingest) still exclude each other through the file lock.
        deadline = time.monotonic() + timeout
        with _redis_lock(store, redis_url, timeout):
            with _file_lock(store, max(0.0, deadline - time.monotonic())):
                yield
    elif redis_url:
        with _redis_lock(store, redis_url, timeout):
            yield
    elif store.is_local:
        with _file_lock(store, timeout):
            yield
    else:
        raise ConfigError(f"{store.uri} is on an object store, which has no file lock: pass a Redis URL (--redis) "
                          f"so concurrent commits are serialised")


@contextlib.contextmanager
def _file_lock(store: IndexStore, timeout: float) -> Iterator[None]:
    import fcntl

    path = store.full_path(LOCK_FILE)  # refuses a link; O_NOFOLLOW covers one made after the check
    with store.writing("taking the commit lock"):
        os.makedirs(store.root, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise IndexLockTimeout(f"another writer held the commit lock of {store.uri} ({path}) for more "
                                           f"than {timeout:g} s; retry when it has finished") from None
                time.sleep(_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def redis_lock_key(store: IndexStore) -> str:
    where = f"file://{store.root}" if store.is_local else store.uri
    return "facepq:index-lock:" + hashlib.sha256(where.encode("utf-8")).hexdigest()[:24]


@contextlib.contextmanager
def _redis_lock(store: IndexStore, redis_url: str, timeout: float) -> Iterator[None]:
    import redis
    from redis.exceptions import RedisError

    client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    key = redis_lock_key(store)
    # thread_local=False: the keep-alive thread renews with the token the acquiring thread got.
    lock = client.lock(key, timeout=_REDIS_TTL_S, sleep=_POLL_S, thread_local=False)
    try:
        try:
            acquired = lock.acquire(blocking_timeout=timeout)
        except RedisError as exc:
            raise redis_error(exc, redis_url, "take the commit lock") from exc
        if not acquired:
            raise IndexLockTimeout(f"another writer held the Redis commit lock {key} of {store.uri} for more "
                                   f"than {timeout:g} s; retry when it has finished")
        with _kept_alive(lock, store):
            yield
    finally:
        client.close()


@contextlib.contextmanager
def _kept_alive(lock, store: IndexStore) -> Iterator[None]:
    """Renew `lock`'s TTL every third of it while the block runs, then release it.

    Long commits (compaction of big segments) outlive one TTL. The TTL is what frees the lock
    of a holder that died; a holder that stalled past it finds the key gone or taken and stops
    renewing, and its release deletes nothing (redis-py's release and reacquire are Lua scripts
    that act only while the key still holds our token).
    """
    from redis.exceptions import LockNotOwnedError, RedisError

    stop = threading.Event()

    def keep_alive() -> None:
        while not stop.wait(lock.timeout / 3):
            try:
                lock.reacquire()
            except LockNotOwnedError:
                log.error("lost the Redis commit lock %s of %s", lock.name, store.uri)
                return
            except RedisError as exc:
                log.warning("could not extend the Redis commit lock %s: %s", lock.name, exc)

    watchdog = threading.Thread(target=keep_alive, name="facepq-lock-keepalive", daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        stop.set()
        watchdog.join(timeout=10)
        try:
            lock.release()
        except LockNotOwnedError:  # expired or taken while we stalled: nothing of ours to delete
            log.warning("the Redis commit lock %s of %s had already expired at release", lock.name, store.uri)
        except RedisError as exc:  # the TTL frees it anyway
            log.warning("could not release the Redis commit lock %s (expires in %g s): %s", lock.name,
                        lock.timeout, exc)
