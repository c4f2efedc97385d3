"""query_node.admission: a bounded amount of work in progress, a short bounded wait, then a fast refusal."""
from __future__ import annotations

import threading

import pytest

from facepq_core.errors import Overloaded
from query_node.admission import Admission


def test_slots_queue_and_refusals_with_retry_advice():
    gate = Admission("photo searches", limit=2, queue=1, max_wait=5.0)
    release, entered = threading.Event(), threading.Semaphore(0)

    def hold():
        with gate.slot():
            entered.release()
            release.wait(10)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for t in holders:
        t.start()
    for _ in holders:
        entered.acquire(timeout=10)
    assert gate.in_progress == 2
    with pytest.raises(Overloaded) as err, gate.slot(time_remaining=0):  # no wait: the caller's deadline
        pass
    assert err.value.status == "RESOURCE_EXHAUSTED" and err.value.retry_after_ms >= 100
    assert "2 photo searches in progress (limit 2)" in str(err.value) and "retry in about" in str(err.value)

    waiter_done = threading.Event()

    def wait_for_slot():
        with gate.slot():
            waiter_done.set()

    waiter = threading.Thread(target=wait_for_slot)
    waiter.start()
    for _ in range(3000):  # until the waiter is queued (generous: a busy machine may start it late)
        if gate.waiting == 1:
            break
        threading.Event().wait(0.01)
    assert gate.waiting == 1, "the waiter never queued"
    with pytest.raises(Overloaded), gate.slot():  # the queue (1) is full: refused at once
        pass
    release.set()
    waiter.join(10)
    for t in holders:  # before counting: a holder may still be leaving its slot when the waiter is done
        t.join(10)
    assert waiter_done.is_set() and gate.in_progress == 0 and gate.refused == 2


def test_a_wait_that_runs_out_is_refused():
    gate = Admission("enrolments", limit=1, queue=4, max_wait=0.05)
    with gate.slot(), pytest.raises(Overloaded), gate.slot():
        pass
    with gate.slot():  # free again
        pass
