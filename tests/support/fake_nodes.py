"""Query nodes without processes: a registry and NodeClients (query_node.node_client) that answer in memory.

`FakeNodeClients` routes each call to a node object by address and records it (address,
shards, index version asked for, timeout, the thread it ran on). Node objects:
- `MemoryNode`: fixed best-first hits per shard, one gallery per committed version;
  it answers the version asked for when it holds it, else its current one (like
  LiveIndex.view_at), or fails every call with a status code.
- `HangingNode`: stops answering (a SIGSTOPped process): calls block until their deadline.
- `LiveNode`: a real LiveIndex of an index on disk (no watcher thread), answering the
  version asked for as a node does (view_at), so searches through it are exact
  against tests.support.index.brute_force.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from query_node.fanout import NodeCallError, NodeReply
from query_node.merge import Hit, merge_shard_lists
from query_node.registry import NodeRecord


class FakeRegistry:
    """A registry listing fixed NodeRecords."""

    def __init__(self, records: list[NodeRecord]):
        self.records = records

    def nodes(self) -> list[NodeRecord]:
        return list(self.records)


def record(address: str, shards, healthy: bool = True, version: str = "1") -> NodeRecord:
    return NodeRecord(node_id=address, address=address, shards=list(shards), index_version=version, healthy=healthy)


def gallery(shards, per_shard: int = 6, version: int = 1) -> dict[int, list[Hit]]:
    """shard -> best-first hits with distinct scores that interleave across shards (and differ per version)."""
    out = {}
    for s in shards:
        hits = [Hit(face_id=version * 10_000 + s * 100 + i, person=f"p{s}-{i}", source=f"v{version}",
                    score=float(100 * version - (i * len(shards) + s)), shard=s) for i in range(per_shard)]
        out[s] = hits
    return out


def exact_top_k(shard_hits: dict[int, list[Hit]], k: int, shards=None) -> list[Hit]:
    """The global top-k over the given shards (default all) of one gallery."""
    chosen = sorted(shard_hits) if shards is None else sorted(shards)
    return merge_shard_lists([shard_hits[s] for s in chosen], k)


@dataclass
class MemoryNode:
    """A node serving `versions[v]` (shard -> hits) at `current`; `fail` = a status code every call fails with."""

    versions: dict[int, dict[int, list[Hit]]]
    current: int = 1
    fail: str | None = None
    on_call: object = None  # optional callable(node) run first on every call (e.g. to move `current`)

    def search(self, tables, k: int, shards, index_version: str, refine=None) -> NodeReply:
        if self.on_call is not None:
            self.on_call(self)
        if self.fail:
            raise NodeCallError(self.fail, f"fake node says {self.fail}")
        version = int(index_version) if index_version and int(index_version) in self.versions else self.current
        hits = merge_shard_lists([self.versions[version][s] for s in shards], k)
        return NodeReply(version=version, shards=list(shards), results=[hits] * len(tables), scan_ms=1.0)


class LiveNode:
    """A node answering from a real LiveIndex of `shards` of the index at `path` (no watcher thread)."""

    def __init__(self, path, shards):
        from query_node.live_index import LiveIndex

        self.live = LiveIndex(str(path), list(shards))

    def search(self, tables, k: int, shards, index_version: str, refine=None, with_codes=False,
               nprobe: int = 0) -> NodeReply:
        from query_node.two_stage import RefineQuery

        view = self.live.view_at(index_version) if index_version else self.live.view
        second = None if refine is None else RefineQuery(refine[0], refine[1], view.model.refine.kernel)
        return NodeReply(version=int(view.version), shards=list(shards),
                         results=view.search(tables, k, list(shards), refine=second, with_codes=with_codes,
                                             nprobe=nprobe), scan_ms=0.5)


class HangingNode:
    """A node that stops answering (SIGSTOP's shape): every call blocks until `release` is set or its gRPC
    deadline passes (then DEADLINE_EXCEEDED, as a real channel would answer); once released it answers
    like `then` (a MemoryNode)."""

    takes_timeout = True

    def __init__(self, then):
        self.then = then
        self.release = threading.Event()

    def search(self, tables, k: int, shards, index_version: str, timeout: float, refine=None) -> NodeReply:
        if not self.release.wait(timeout):
            raise NodeCallError("DEADLINE_EXCEEDED", "Deadline Exceeded")
        return self.then.search(tables, k, shards, index_version, refine)


@dataclass
class Call:
    address: str
    shards: list[int]
    index_version: str
    timeout: float
    thread: str


@dataclass
class FakeNodeClients:
    """NodeClients over node objects keyed by address; every call is recorded in `calls`."""

    nodes: dict = field(default_factory=dict)  # address -> MemoryNode / LiveNode
    calls: list[Call] = field(default_factory=list)

    def prepare(self, lookup_tables, refine=None, with_codes=False, nprobe=0):
        return lookup_tables, refine, with_codes, nprobe

    def search(self, address, prepared, k, shards, index_version, timeout) -> NodeReply:
        self.calls.append(Call(address, list(shards), index_version, timeout, threading.current_thread().name))
        tables, refine, with_codes, nprobe = prepared
        node = self.nodes[address]
        extra = {"nprobe": nprobe} if nprobe else {}  # only a LiveNode scans cells
        if getattr(node, "takes_timeout", False):
            return node.search(tables, k, shards, index_version, timeout, refine, **extra)
        if with_codes:  # only a LiveNode reads codes
            extra["with_codes"] = True
        return node.search(tables, k, shards, index_version, refine, **extra)

    def close(self) -> None:
        pass

    def asked(self, address) -> list[Call]:
        return [c for c in self.calls if c.address == address]
