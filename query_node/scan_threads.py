"""How many native threads one scan may use: the node's cores, shared among the scans in flight.

A node is given `--threads` cores (default: its CPU affinity mask). An idle node splits a
query's scan over all of them (the kernels cut one segment's rows into runs, each on a
native thread with the GIL released, merged exactly: query_node.fastscan); a busy node
gives each of the scans in flight an equal share, so concurrent queries spread over the
cores instead of every one of them starting a thread per core. Any split gives the same
answer, so the share only changes speed.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager


def default_threads() -> int:
    """The cores this process may run on (its CPU affinity mask; os.cpu_count() where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ThreadBudget:
    """`threads` cores shared by the scans in flight (>= 1 each)."""

    def __init__(self, threads: int):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self._in_flight = 0
        self._lock = threading.Lock()

    @contextmanager
    def share(self):
        """Count one scan in flight for the block; yields its share of the threads."""
        with self._lock:
            self._in_flight += 1
            share = max(1, self.threads // self._in_flight)
        try:
            yield share
        finally:
            with self._lock:
                self._in_flight -= 1
