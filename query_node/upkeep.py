"""The coordinator's background upkeep: bounded rounds of small-segment merging (indexer.upkeep).

The coordinator is where small writes come from (every Enrol commits a segment), so it also keeps their
number down. A round runs every `interval` seconds; it does nothing (not even take the commit lock) when
no merge is due, and at most one bounded merge per shard when one is. A round that fails (the lock held
too long, a full disk) is logged and retried next time: upkeep never stops the coordinator.
"""
from __future__ import annotations

import logging
import threading

from facepq_core.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 30.0


class Upkeep:
    """Run `indexer.upkeep.merge_small_segments` on `store` every `interval` seconds in a daemon thread.

    Args:
        store: indexer.store.IndexStore.  policy: indexer.upkeep.MergePolicy.
        redis_url: the commit lock's Redis (None: the file lock).  interval: seconds between rounds.
    """

    def __init__(self, store, policy=None, redis_url: str | None = None, interval: float = DEFAULT_INTERVAL_S):
        from indexer.upkeep import MergePolicy

        if not interval > 0:
            raise ConfigError(f"the upkeep interval must be > 0 seconds (or 0 for none), got {interval}")
        self.store, self.policy = store, policy or MergePolicy()
        self.redis_url, self.interval = redis_url, interval
        self.rounds = self.merges = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self):
        """One round; returns its indexer.upkeep.MergeStats (None when it failed: see `last_error`)."""
        from indexer.upkeep import merge_small_segments

        try:
            stats = merge_small_segments(self.store, self.policy, redis_url=self.redis_url, lock_timeout=5.0)
        except Exception as exc:  # noqa: BLE001 - logged; the next round retries
            if str(exc) != self.last_error:
                log.warning("upkeep of %s failed (retrying every %g s): %s", self.store.uri, self.interval, exc)
            self.last_error = str(exc)
            return None
        self.rounds += 1
        self.last_error = ""
        if stats.merges:
            self.merges += stats.merges
            log.info("upkeep of %s: merged %d small segments of shards %s into %d (version %s)", self.store.uri,
                     stats.segments_merged, stats.shards, stats.merges, stats.version)
        return stats

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.run_once()

    def start(self) -> Upkeep:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="facepq-upkeep", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
