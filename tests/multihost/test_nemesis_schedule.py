"""The nemesis's seeded schedule (tests.multihost.nemesis.schedule), without a cluster: what it plans.

`schedule` only reads which shards and replicas a cluster has, so a plain record of them stands in.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from query_node.service import SEARCH_TIMEOUT
from tests.multihost.nemesis import FAULT_KINDS, schedule

CLUSTER = SimpleNamespace(replicas={0: ["a0", "a1"], 1: ["b0", "b1"]}, net=None)


@pytest.mark.parametrize("seed", range(40))
def test_every_kind_is_planned_and_each_hold_is_in_range(seed):
    plan = schedule(CLUSTER, seed, extra=2, hold=(4.0, 7.0))
    assert sorted({p.kind for p in plan}) == sorted(FAULT_KINDS) and len(plan) == len(FAULT_KINDS) + 2
    for p in plan:
        assert max(4.0, FAULT_KINDS[p.kind].min_hold) <= p.hold <= max(7.0, FAULT_KINDS[p.kind].min_hold), p


@pytest.mark.parametrize("seed", range(40))
def test_a_shard_is_cut_for_longer_than_a_search_may_wait(seed):
    """Shorter, a search begun at the cut could be answered complete after the heal and no answer made
    during the cut would name the shard missing (seed 15 held it 4.8 s against a 5 s search timeout)."""
    cuts = [p for p in schedule(CLUSTER, seed) if p.kind == "isolate-shard"]
    assert cuts and all(p.hold >= SEARCH_TIMEOUT + 1.0 for p in cuts), cuts


def test_the_schedule_is_the_same_for_the_same_seed():
    assert schedule(CLUSTER, 15) == schedule(CLUSTER, 15) != schedule(CLUSTER, 16)


# ---- the nemesis's waits, on a bare history (no cluster: they only read the history)


def _nemesis(recovery_timeout: float = 0.3):
    from tests.multihost.nemesis import Nemesis
    from tests.support.history import History

    return Nemesis(None, History(), recovery_timeout=recovery_timeout)


def test_a_fault_held_until_a_write_fails_waits_for_a_failed_write_begun_during_it(monkeypatch):
    import threading
    import time

    from tests.multihost import nemesis as nemesis_module

    monkeypatch.setattr(nemesis_module, "WRITE_FAILURE_WAIT", 0.4)   # (every operation below is already in)
    n = _nemesis()
    n.history.invoke("enrol", person="p0").fail("UNAVAILABLE before the fault")
    since = time.monotonic()
    n.history.invoke("search").fail("UNAVAILABLE")               # not a write
    n.history.invoke("delete", person="p1")                      # in flight: not failed yet
    n.history.invoke("enrol", person="p2").ok(face_ids=(1,))     # a write that went through
    assert not n.wait_for_failed_write(since)                    # none of those ends the hold

    # a write failing while the hold waits ends it; the wait is long, so a slow machine still sees it fail
    monkeypatch.setattr(nemesis_module, "WRITE_FAILURE_WAIT", 120.0)
    since = time.monotonic()
    write = n.history.invoke("enrol", person="p3")
    threading.Timer(0.1, write.fail, args=("UNAVAILABLE: registry unreachable",)).start()
    assert n.wait_for_failed_write(since)


def test_recovery_is_the_first_complete_answer_after_the_heal():
    import time

    n = _nemesis()
    n.history.invoke("search").ok(complete=True)   # before the heal: does not count
    healed = time.monotonic()
    n.history.invoke("search").ok(complete=False, missing_shards=(1,))
    assert n.wait_for_complete_answer(healed) is None
    n.history.invoke("search").ok(complete=True)
    took = n.wait_for_complete_answer(healed)
    assert took is not None and took >= 0
