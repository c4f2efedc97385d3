"""The nemesis of a multi-host run: a seeded schedule of faults, injected one at a time and healed.

Each fault kind is a registered class (`@fault_kind`): `plan(cluster, rng)` picks its target,
`start()` / `heal()` do and undo it on the virtual hosts, and `lost` names the replicas it takes from
the coordinator (what the history checker needs to know which answers must stay complete).

    partition-node        node <-> coordinator cut with `prohibit` routes (refused at once)
    blackhole-node        node -> coordinator packets dropped (a `blackhole` route on the node: silence)
    hang-node             the node's process SIGSTOPped (SIGCONT to heal)
    isolate-node          the node's link down (it reaches no one, no one reaches it)
    node-registry         node <-> Redis cut: it cannot heartbeat and leaves the topology within its TTL
    coordinator-registry  coordinator <-> Redis cut: no topology updates, no commit lock (writes fail)
    hang-registry         Redis SIGSTOPped
    isolate-shard         both replicas of one shard with their links down: that shard has no replica

`schedule(seed, ...)` gives every kind once in a seeded order, then `extra` more drawn at random, each
with a seeded target and hold time. `Nemesis.run` starts each fault, holds it (the two that stop writes,
coordinator-registry and hang-registry, longer: until a write made during them has failed), heals it, waits until an
answer invoked after the heal is complete again (or `recovery_timeout` passes: the checker reports it),
and keeps a short quiet gap before the next.
"""
from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass

from query_node.service import SEARCH_TIMEOUT
from tests.support.history import History

FAULT_KINDS: dict[str, type] = {}
# Seconds a fault that stops writes may be held waiting for one to fail: a write waits at most the Redis client's
# connect and reply timeouts (5 s each, indexer.lock) after its photos are encoded.
WRITE_FAILURE_WAIT = 40.0


def fault_kind(name: str):
    def register(cls):
        cls.kind = name
        FAULT_KINDS[name] = cls
        return cls
    return register


class FaultKind:
    kind = ""
    fixed_target = ""      # the one host this kind acts on (else: a query node drawn by the schedule)
    takes_replica = True   # the target is a replica the coordinator loses
    min_hold = 0.0         # seconds the fault must last for its effect to be seen (the schedule holds it longer)
    # Held past its planned time until a write invoked during it has failed (at most WRITE_FAILURE_WAIT s):
    # a write already waiting on Redis as the fault starts may outlast a short hold and succeed after the
    # heal, and the next one start after it, so no write would meet the fault (seed 15: both registry faults
    # held 4.8 and 6.8 s, each met by one write that waited 5 s and succeeded, and none failed).
    held_until_a_write_fails = False

    def __init__(self, cluster, target: str):
        self.cluster, self.net, self.target = cluster, cluster.net, target

    @classmethod
    def choose(cls, cluster, rng: random.Random) -> str:
        return cls.fixed_target or rng.choice(sorted(n for names in cluster.replicas.values() for n in names))

    @property
    def lost(self) -> set[str]:
        return {self.target} if self.takes_replica else set()

    def describe(self) -> str:
        return f"{self.kind} {self.target}"

    def start(self) -> None:
        raise NotImplementedError

    def heal(self) -> None:
        raise NotImplementedError


class _Cut(FaultKind):
    peer = "coord"
    how = "prohibit"
    both = True

    def start(self):
        self.net.cut(self.net[self.target], self.net[self.peer], self.how, both=self.both)

    def heal(self):
        self.net.heal(self.net[self.target], self.net[self.peer], self.how)


@fault_kind("partition-node")
class PartitionNode(_Cut):
    pass


@fault_kind("blackhole-node")
class BlackholeNode(_Cut):
    """The node's packets to the coordinator vanish: requests arrive, answers never do."""

    how = "blackhole"
    both = False


@fault_kind("node-registry")
class NodeRegistry(_Cut):
    peer = "redis"


@fault_kind("coordinator-registry")
class CoordinatorRegistry(_Cut):
    peer = "redis"
    fixed_target = "coord"
    takes_replica = False
    held_until_a_write_fails = True


class _Hang(FaultKind):
    def start(self):
        os.kill(self.cluster.pid(self.target), signal.SIGSTOP)

    def heal(self):
        os.kill(self.cluster.pid(self.target), signal.SIGCONT)


@fault_kind("hang-node")
class HangNode(_Hang):
    pass


@fault_kind("hang-registry")
class HangRegistry(_Hang):
    fixed_target = "redis"
    takes_replica = False
    held_until_a_write_fails = True


@fault_kind("isolate-node")
class IsolateNode(FaultKind):
    def start(self):
        self.net.link_down(self.net[self.target])

    def heal(self):
        self.net.link_up(self.net[self.target])


@fault_kind("isolate-shard")
class IsolateShard(FaultKind):
    """Every replica of one shard cut off: answers must say that shard is missing.

    A search that starts as the links go down waits out the coordinator's search timeout before it can
    name the shard missing; healed sooner, its retry is answered complete and nothing in the window says
    the shard was missing. So the cut outlasts that timeout, with a margin for a search already running.
    """

    min_hold = SEARCH_TIMEOUT + 2.0

    @classmethod
    def choose(cls, cluster, rng):
        return str(rng.choice(sorted(cluster.replicas)))

    @property
    def lost(self):
        return set(self.cluster.replicas[int(self.target)])

    def describe(self):
        return f"{self.kind} {self.target} ({', '.join(sorted(self.lost))})"

    def start(self):
        for name in sorted(self.lost):
            self.net.link_down(self.net[name])

    def heal(self):
        for name in sorted(self.lost):
            self.net.link_up(self.net[name])


@dataclass(frozen=True)
class PlannedFault:
    kind: str
    target: str
    hold: float  # seconds in force

    def line(self, i: int) -> str:
        longer = ", then until a write fails" if FAULT_KINDS[self.kind].held_until_a_write_fails else ""
        return f"{i:2d}. {self.kind} {self.target}, held {self.hold:.1f} s{longer}"


def schedule(cluster, seed: int, extra: int = 2, hold=(4.0, 7.0)) -> list[PlannedFault]:
    """Every fault kind once in a seeded order, then `extra` random ones; targets and holds seeded too
    (a hold no shorter than its kind's `min_hold`)."""
    rng = random.Random(seed)
    kinds = sorted(FAULT_KINDS)
    rng.shuffle(kinds)
    kinds += [rng.choice(sorted(FAULT_KINDS)) for _ in range(extra)]
    plan = []
    for k in kinds:
        target, held = FAULT_KINDS[k].choose(cluster, rng), rng.uniform(*hold)
        plan.append(PlannedFault(k, target, round(max(held, FAULT_KINDS[k].min_hold), 1)))
    return plan


class Nemesis:
    """Runs a schedule against a cluster, recording each fault in the history."""

    def __init__(self, cluster, history: History, recovery_timeout: float = 60.0, quiet: float = 3.0):
        self.cluster, self.history = cluster, history
        self.recovery_timeout, self.quiet = recovery_timeout, quiet
        self.recovery: list[float | None] = []  # seconds from each heal to the first complete answer after it

    def _wait_for_op(self, since: float, timeout: float, matches) -> float | None:
        """Seconds from `since` until an operation invoked at or after `since` satisfies `matches`; None once
        `timeout` seconds from `since` have passed without one."""
        deadline = since + timeout
        while True:
            if any(o.invoked >= since and matches(o) for o in list(self.history.ops)):
                return time.monotonic() - since
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def wait_for_complete_answer(self, since: float) -> float | None:
        """Seconds until an answer invoked after `since` was complete; None after recovery_timeout."""
        return self._wait_for_op(since, self.recovery_timeout, lambda o: o.outcome == "ok" and o.complete)

    def wait_for_failed_write(self, since: float) -> bool:
        """Wait until a write invoked after `since` has failed; False after WRITE_FAILURE_WAIT s from `since`
        (the checks then find no failed write and say so)."""
        return self._wait_for_op(since, WRITE_FAILURE_WAIT, lambda o: o.kind in ("enrol", "delete") and
                                 o.completed is not None and o.outcome != "ok") is not None

    def run(self, plan: list[PlannedFault]) -> None:
        for planned in plan:
            f = FAULT_KINDS[planned.kind](self.cluster, planned.target)
            f.start()
            record = self.history.fault(planned.kind, f.describe(), f.lost)
            try:
                time.sleep(planned.hold)
                if f.held_until_a_write_fails:
                    self.wait_for_failed_write(record.started)
            finally:
                f.heal()
                record.heal()
            self.recovery.append(self.wait_for_complete_answer(record.healed))
            time.sleep(self.quiet)
