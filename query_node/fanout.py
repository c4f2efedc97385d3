"""Fan-out planning for one search, as data in and data out: which replica to ask, which answers count.

A search asks ONE healthy replica of every shard, shards grouped per node. `FanOut` is
the bookkeeping of that, with no calls of its own: the caller (query_node.coordinator)
asks `next_round()` for {node address: shards}, makes those calls, reports each
outcome with `answered()` or `failed()`, calls `end_round()`, and repeats until the
plan is empty or time is up; `result()` then merges what was kept.

Rules:
* A node that fails with a code in RETRY_CODES (UNAVAILABLE, DEADLINE_EXCEEDED,
  NOT_FOUND: it restarted with other shards, RESOURCE_EXHAUSTED: it is full, ...) has its shards asked of another
  replica in the next round; any other code means the node refused the request
  itself (NodeRefused: a coordinator/node mismatch, not worth a retry).
* Every shard of an answer comes from ONE committed version, at least `min_version`:
  a node answering from an older version is treated as failed. When answers of two
  versions arrive, the newest wins: the other answers are dropped and their shards
  asked again at that version, the same replicas included (they may load it on
  demand). After MAX_VERSION_ROUNDS such realignments the search gives up
  (VersionConflict).
* A slow or hung replica does not hold a search: while a round's calls are in flight the
  caller may `reassign()` an unanswered call's shards to the next untried replica (a
  hedged request after a short wait, a failed one after the per-node timeout); whichever
  answer arrives first counts, and a later one that brings no pending shard is ignored.
* Shards that no replica answered are reported (`missing_shards`), never silently
  left out.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from facepq_core.errors import NodeRefused, VersionConflict
from query_node.merge import Hit, merge_node_replies

log = logging.getLogger(__name__)

RETRY_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND", "CANCELLED", "UNKNOWN", "INTERNAL",
               "RESOURCE_EXHAUSTED")  # a busy node sheds load: another replica may have room
MAX_VERSION_ROUNDS = 3


@dataclass
class NodeReply:
    """One node's answer to one search call.

    Attributes:
        version: the committed index version it answered from.
        shards: the shards it searched.
        results: per query, its best-first hits over `shards` (any objects with face_id, person,
            source, score and shard: the node's Hit messages are merged as they are).
        scan_ms: its scan kernel's time.
    """

    version: int
    shards: Sequence[int]
    results: Sequence[Sequence]
    scan_ms: float = 0.0


class NodeCallError(Exception):
    """A node call that failed: `code` is the status name (e.g. "UNAVAILABLE"), `details` the node's message."""

    def __init__(self, code: str, details: str | None = ""):
        self.code, self.details = code, details
        super().__init__(f"{code}: {details}")


@dataclass
class FanOutResult:
    hits: list[list[Hit]]                 # one best-first list per query
    missing_shards: list[int] = field(default_factory=list)
    index_version: str = ""
    node_scan_ms: float = 0.0             # the slowest answering node's reported kernel time

    @property
    def complete(self) -> bool:
        return not self.missing_shards


def replicas_by_shard(nodes: Sequence, shard_count: int, turn: int = 0) -> dict[int, list]:
    """shard -> the healthy nodes serving it, each list rotated by `turn` to spread load over replicas.

    Args:
        nodes: query_node.registry.NodeRecord-like (`.healthy`, `.shards`).
        shard_count: shards of the index; shards a node names outside 0..shard_count-1 are ignored.
        turn: rotation (a counter the caller increments per search).
    """
    out: dict[int, list] = {s: [] for s in range(shard_count)}
    for n in nodes:
        if not n.healthy:
            continue
        for s in n.shards:
            if s in out:
                out[s].append(n)
    for s, lst in out.items():
        if lst:
            r = turn % len(lst)
            out[s] = lst[r:] + lst[:r]
    return out


@dataclass
class _Answer:
    version: int
    shards: list[int]        # the shards this answer supplies (not already supplied by another)
    results: Sequence[Sequence]
    scan_ms: float


class FanOut:
    """The state of one search's fan-out; see the module docstring for the rules.

    Args:
        replicas: shard -> addresses of the nodes serving it, in the order to try them.
        shard_count: every shard 0..shard_count-1 must be answered for a complete result.
        min_version: the oldest committed version acceptable (None or 0: any).
    Attributes:
        target: the index version to ask nodes for in this round ("" = their current one).
    """

    def __init__(self, replicas: Mapping[int, Sequence[str]], shard_count: int, min_version: int | None = None):
        self.replicas = {s: list(replicas.get(s, ())) for s in range(shard_count)}
        self.tried: dict[int, set[str]] = {s: set() for s in self.replicas}
        self.pending = set(range(shard_count))
        self.target = str(min_version) if min_version else ""
        self.version_rounds = 0
        self._answers: list[_Answer] = []
        self._plan: dict[str, list[int]] = {}

    def next_round(self) -> dict[str, list[int]]:
        """{address: shards} to ask now: for every pending shard its first replica not yet tried (at this
        version). Empty when nothing is pending or every pending shard has run out of replicas."""
        plan: dict[str, list[int]] = {}
        for s in sorted(self.pending):
            choice = next((a for a in self.replicas[s] if a not in self.tried[s]), None)
            if choice is not None:
                plan.setdefault(choice, []).append(s)
        for address, shards in plan.items():
            for s in shards:
                self.tried[s].add(address)
        self._plan = plan
        return plan

    def reassign(self, address: str) -> dict[str, list[int]]:
        """{address: shards} asking the next untried replica for the still pending shards of the call to
        `address` in this round (a hedge, or a call given up on); empty when none is left to ask."""
        plan: dict[str, list[int]] = {}
        for s in self._plan.get(address, ()):
            if s not in self.pending:
                continue
            choice = next((a for a in self.replicas[s] if a not in self.tried[s]), None)
            if choice is not None:
                plan.setdefault(choice, []).append(s)
                self.tried[s].add(choice)
        for alt, shards in plan.items():
            self._plan.setdefault(alt, []).extend(shards)
        return plan

    def has_alternative(self, shards: Sequence[int]) -> bool:
        """True when some shard of `shards` has a replica not yet asked (so a call for them may be cut short)."""
        return any(a not in self.tried[s] for s in shards for a in self.replicas[s])

    def answered(self, address: str, reply: NodeReply) -> None:
        """Count a node's reply, unless it comes from a version older than the one required, or brings no
        shard still pending (a hedged call's slower twin)."""
        if self.target and reply.version < int(self.target):  # it could not load the version asked for
            log.warning("node %s answered from version %d, older than the required %s; asking another replica",
                        address, reply.version, self.target)
            return
        fresh = [s for s in reply.shards if s in self.pending]
        if not fresh:
            return
        self._answers.append(_Answer(reply.version, fresh, reply.results, reply.scan_ms))
        self.pending.difference_update(fresh)

    def failed(self, address: str, error: NodeCallError) -> None:
        """Note a failed call: its shards stay pending for another replica.

        Raises:
            NodeRefused: the node refused the request itself (a code outside RETRY_CODES).
        """
        log.warning("node %s failed for shards %s: %s %s", address, self._plan.get(address), error.code,
                    error.details)
        if error.code not in RETRY_CODES:
            log.error("a query node refused a search: %s %s", error.code, error.details)
            raise NodeRefused(f"a query node refused the search ({error.code}: {error.details}); check that nodes "
                              f"and coordinator serve the same index and share the node token")

    def end_round(self) -> None:
        """Realign versions: keep the newest version's answers, re-ask the shards of the others at it.

        Raises:
            VersionConflict: the versions disagreed more than MAX_VERSION_ROUNDS times.
        """
        versions = {a.version for a in self._answers}
        if len(versions) <= 1:
            return
        self.version_rounds += 1
        if self.version_rounds > MAX_VERSION_ROUNDS:
            raise VersionConflict(f"the index changed {self.version_rounds} times during one search; retry")
        newest = max(versions)
        self.target = str(newest)
        for a in self._answers:
            if a.version != newest:
                self.pending.update(a.shards)
                for s in a.shards:
                    self.tried[s] = set()  # the same replica can answer the new version after loading it
        self._answers = [a for a in self._answers if a.version == newest]

    def result(self, queries: int, k: int) -> FanOutResult:
        """The merged top-k of every query over the answers kept; pending shards are `missing_shards`."""
        version = str(self._answers[0].version) if self._answers else ""
        hits = [merge_node_replies([(a.shards, a.results[i]) for a in self._answers], k) for i in range(queries)]
        return FanOutResult(hits=hits, missing_shards=sorted(self.pending), index_version=version,
                            node_scan_ms=max((a.scan_ms for a in self._answers), default=0.0))
