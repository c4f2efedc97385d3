"""Batched scans: queries that arrive while the node is busy share one pass over the codes.

The kernels scan each block of codes once for every query of a call (each query keeps
its own heap, so a query's answer does not depend on the others in its batch). A node
under concurrent load therefore answers more queries per second by scanning them
together. `SearchBatcher.run` decides per request:

* no scan in flight (light load): scan at once, alone; single-query latency unchanged;
* a batch for the same view, k and shards is open with room: join it and wait for it;
* otherwise open a batch and lead it: wait until the scan in flight ends (or the batch
  holds `max_queries` queries, or `window` seconds have passed), then scan every member's
  tables in one call and hand each member its slice.

So one scan runs at a time and the next batch is whatever arrived meanwhile (group commit):
batches grow with the load, with no timer to tune. A fixed wait (the first design: lead, wait
`window`, scan, while other batches ran) gave batches of 1-3 searches at 8 clients and left the
coordinator's fan-outs overlapping; waiting for the scan in flight gives 3-4, and a search through
the coordinator costs about a quarter less CPU (README, "Batched fan-outs"). Bounded: a request
waits at most `window` plus one batched scan. Requests with different keys (index version, k, shards)
never share a batch.

Nodes batch their scans with it; the coordinator batches whole searches with it too (one
fan-out, one call per node, for the searches that arrive together: query_node.coordinator).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

DEFAULT_WINDOW = 0.001      # seconds a batch waits at most for the scan in flight (a node's --batch-window-ms)
# A coordinator's batch waits for a whole fan-out (two hops and the nodes' scans: 2-7 ms under load), so it
# may wait longer: at 1 ms it left before the fan-out in flight ended and batches stayed at 1-3 searches.
DEFAULT_FAN_OUT_WINDOW = 0.01
DEFAULT_MAX_QUERIES = 16    # queries per batch (the --batch-max default)


class _Batch:
    def __init__(self):
        self.tables: list[np.ndarray] = []
        self.size = 0
        self.done = threading.Event()     # set when results (or error) are in
        self.results = None
        self.error: BaseException | None = None

    def add(self, tables: np.ndarray) -> int:
        """Append a member's tables [Q, M, K]; returns where its queries start in the batch."""
        start = self.size
        self.tables.append(tables)
        self.size += tables.shape[0]
        return start


class SearchBatcher:
    """Gathers concurrent requests with the same key into one scan.

    Args:
        window: the longest a batch waits for the scan in flight to end, in seconds (0 disables batching).
        max_queries: queries per batched scan (a batch leaves when full, whatever is in flight).
    """

    def __init__(self, window: float = DEFAULT_WINDOW, max_queries: int = DEFAULT_MAX_QUERIES):
        if window < 0 or max_queries < 1:
            raise ValueError(f"window must be >= 0 and max_queries >= 1, got {window} and {max_queries}")
        self.window = window
        self.max_queries = max_queries
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a scan ended, or a batch filled up
        self._open: dict = {}
        self._scans = 0           # scans running, alone or batched
        self.batches = 0          # batched scans run (more than one request)
        self.batched_requests = 0

    @property
    def enabled(self) -> bool:
        return self.window > 0 and self.max_queries > 1

    def queued(self, key) -> int:
        """Queries waiting in the open batch of `key` (0 when none is open)."""
        with self._lock:
            batch = self._open.get(key)
            return batch.size if batch is not None else 0

    def run(self, key, tables: np.ndarray, scan: Callable[[np.ndarray], tuple[list, object]]) -> tuple[list, object]:
        """Answer `tables` float32 [Q, M, K] with `scan(batch_tables) -> (one result per query, extra)`.

        Returns this request's results (in its query order) and the batch's `extra`.
        """
        q = tables.shape[0]
        if not self.enabled or q >= self.max_queries:
            return self._alone(tables, scan)
        with self._lock:
            batch = self._open.get(key)
            if batch is not None and batch.size + q <= self.max_queries:
                start = batch.add(tables)
                if batch.size >= self.max_queries:
                    self._changed.notify_all()
                role = "member"
            elif self._scans == 0:
                self._scans += 1
                role = "alone"
            else:
                batch = self._open[key] = _Batch()
                start = batch.add(tables)
                role = "leader"
        if role == "alone":
            return self._scan_counted(tables, scan)
        if role == "member":
            batch.done.wait()
            if batch.error is not None:
                raise batch.error
            return batch.results[0][start:start + q], batch.results[1]
        with self._lock:
            leave_by = time.monotonic() + self.window
            while batch.size < self.max_queries and self._scans > 0:
                remaining = leave_by - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            if self._open.get(key) is batch:
                del self._open[key]
            members = len(batch.tables)
            self._scans += 1
            if members > 1:
                self.batches += 1
                self.batched_requests += members
        try:
            results = self._scan_counted(np.concatenate(batch.tables) if members > 1 else batch.tables[0], scan)
            batch.results = results
        except BaseException as exc:
            batch.error = exc
            raise
        finally:
            batch.done.set()
        return results[0][:q], results[1]

    def _alone(self, tables, scan):
        with self._lock:
            self._scans += 1
        return self._scan_counted(tables, scan)

    def _scan_counted(self, tables, scan):
        """Run `scan` for a scan already counted in flight; uncount it afterwards and wake waiting batches."""
        try:
            return scan(tables)
        finally:
            with self._lock:
                self._scans -= 1
                self._changed.notify_all()
