"""Load shedding: a bounded amount of work in progress per server, and a fast, retryable refusal beyond it.

Without a bound, 200 concurrent photo clients queued inside the gRPC server, each waiting for the few
worker threads, and almost all ran out of deadline (8 of 1,007 answered in time). An `Admission` lets
`limit` requests work at once; up to `queue` more wait for a slot, each at most `max_wait` seconds (or
less: never past the caller's own deadline); anything beyond is refused at once with `Overloaded`
(RESOURCE_EXHAUSTED), whose message and `retry_after_ms` (sent as the `grpc-retry-pushback-ms` trailer)
say when to retry. A refusal costs microseconds, so the server stays responsive (health checks included)
while it is full, and the requests it does take finish in time.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

from facepq_core.errors import Overloaded


class Admission:
    """At most `limit` requests in progress; `queue` more may wait up to `max_wait` s for a slot.

    Args:
        what: names the work in refusals ("photo searches and enrolments").
        limit: requests in progress at once (>= 1).
        queue: requests allowed to wait for a slot (>= 0).
        max_wait: the longest a request waits for a slot, seconds.
    """

    def __init__(self, what: str, limit: int, queue: int | None = None, max_wait: float = 1.0):
        if limit < 1:
            raise ValueError(f"admission limit must be >= 1, got {limit}")
        self.what, self.limit = what, limit
        self.queue = limit if queue is None else queue
        self.max_wait = max_wait
        self._cond = threading.Condition()
        self.in_progress = self.waiting = 0
        self.refused = 0
        self._seconds = 0.0  # moving average of a request's time in progress (retry advice)

    def _refuse(self) -> Overloaded:
        self.refused += 1
        retry_ms = int(1000 * max(0.1, min(30.0, self._seconds * (1 + self.waiting / self.limit))))
        return Overloaded(f"server busy: {self.in_progress} {self.what} in progress (limit {self.limit}) and "
                          f"{self.waiting} waiting; retry in about {retry_ms} ms, with backoff", retry_ms)

    @contextlib.contextmanager
    def slot(self, time_remaining: float | None = None) -> Iterator[None]:
        """Hold a slot for the block; raises Overloaded when none frees up in time.

        Args:
            time_remaining: seconds left of the caller's deadline (None: none); a request never waits
                for a slot longer than that.
        """
        wait = self.max_wait if time_remaining is None else max(0.0, min(self.max_wait, time_remaining))
        with self._cond:
            if self.in_progress >= self.limit:
                if self.waiting >= self.queue or wait <= 0:
                    raise self._refuse()
                self.waiting += 1
                try:
                    deadline = time.monotonic() + wait
                    while self.in_progress >= self.limit:
                        left = deadline - time.monotonic()
                        timed_out = left <= 0 or not self._cond.wait(left)
                        if timed_out and self.in_progress >= self.limit:
                            raise self._refuse()
                finally:
                    self.waiting -= 1
            self.in_progress += 1
        t0 = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self.in_progress -= 1
                self._seconds += 0.2 * ((time.monotonic() - t0) - self._seconds)
                self._cond.notify()


def default_photo_limit() -> int:
    """Photo work in progress at once: one per CPU (detection and the trunk are CPU-bound), at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def photo_gate(limit: int | None = None) -> Admission:
    """The gate for photo work (a photo Search or Verify, an Enrol: face detection and the trunk, up to seconds
    of CPU each): `limit` (default `default_photo_limit()`) at work, four times as many waiting up to 2 s each
    (they hold server threads: the gRPC shell's WORKERS leaves room beside them), the rest refused."""
    limit = limit or default_photo_limit()
    return Admission("photo searches and enrolments", limit, queue=4 * limit, max_wait=2.0)
