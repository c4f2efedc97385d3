"""A Jepsen-style history: every operation clients invoked, when, and what came back; every fault injected.

Clients on many threads record into one `History`: `op = history.invoke("search", ...)` before the
call, then exactly one of `op.ok(...)`, `op.fail(error)` (the request was refused: it did nothing)
or `op.info(error)` (indeterminate: it may or may not have taken effect, e.g. a write whose reply was
lost to a timeout). The nemesis records each fault with `history.fault(...)` when it starts and
`.heal()` when it is undone. Times are `time.monotonic()` of this process, so a client's invocation
and a fault's start compare directly. tests.support.history_check checks a finished history.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

OK, FAIL, INFO = "ok", "fail", "info"
KINDS = ("enrol", "delete", "search")


@dataclass(frozen=True)
class Hit:
    face_id: int
    person: str
    shard: int


@dataclass
class Op:
    """One client operation.

    Attributes:
        kind: "enrol", "delete" or "search".
        invoked, completed: monotonic seconds (completed None while in flight).
        outcome: OK, FAIL or INFO (INFO until completed: an operation that never returned is indeterminate).
        person: who is enrolled or deleted.
        face_ids: enrol: the ids the reply acknowledged.
        version: writes: the index version the reply says was committed; search: the answer's version.
        hits, complete, missing_shards, top_k: the search answer.
        error: the status and message of a failed or indeterminate operation.
    """

    kind: str
    process: str
    invoked: float
    index: int = -1
    completed: float | None = None
    outcome: str = INFO
    person: str = ""
    face_ids: tuple = ()
    version: int | None = None
    hits: tuple = ()
    complete: bool | None = None
    missing_shards: tuple = ()
    top_k: int = 0
    error: str = ""

    def ok(self, **fields) -> "Op":
        return self._end(OK, **fields)

    def fail(self, error: str) -> "Op":
        return self._end(FAIL, error=error)

    def info(self, error: str) -> "Op":
        return self._end(INFO, error=error)

    def _end(self, outcome: str, **fields) -> "Op":
        for name, value in fields.items():
            setattr(self, name, value)
        self.outcome, self.completed = outcome, time.monotonic()
        return self

    @property
    def truncated(self) -> bool:
        """A search answer cut at top_k: it is not the whole content of its version (checked less)."""
        return self.kind == "search" and self.top_k > 0 and len(self.hits) >= self.top_k

    def describe(self) -> str:
        when = f"[{self.invoked:.2f}..{self.completed:.2f}]" if self.completed else f"[{self.invoked:.2f}..]"
        what = {"search": f"v{self.version} complete={self.complete} missing={list(self.missing_shards)} "
                          f"{len(self.hits)} hits",
                "enrol": f"{self.person} -> {list(self.face_ids)} v{self.version}",
                "delete": f"{self.person} v{self.version}"}[self.kind]
        return f"#{self.index} {self.kind} {self.outcome} {when} {what} {self.error}".rstrip()


@dataclass
class Fault:
    """One injected fault: what, the replicas (node names) it took from the coordinator, when."""

    name: str
    description: str
    lost: frozenset
    started: float
    healed: float | None = None

    def heal(self, at: float | None = None) -> None:
        self.healed = time.monotonic() if at is None else at

    def active_during(self, start: float, end: float, until: float | None = None) -> bool:
        """True when the fault was in force at some moment of [start, end] (`until` extends it past its heal)."""
        stop = until if until is not None else self.healed
        return self.started <= end and (stop is None or stop >= start)


@dataclass
class History:
    ops: list = field(default_factory=list)
    faults: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def invoke(self, kind: str, process: str | None = None, **fields) -> Op:
        if kind not in KINDS:
            raise ValueError(f"unknown operation kind {kind!r}")
        op = Op(kind=kind, process=process or threading.current_thread().name, invoked=time.monotonic(), **fields)
        with self._lock:
            op.index = len(self.ops)
            self.ops.append(op)
        return op

    def add(self, op: Op) -> Op:
        """Record an operation made elsewhere (a hand-made history, a replay)."""
        with self._lock:
            op.index = len(self.ops)
            self.ops.append(op)
        return op

    def fault(self, name: str, description: str, lost=()) -> Fault:
        f = Fault(name=name, description=description, lost=frozenset(lost), started=time.monotonic())
        with self._lock:
            self.faults.append(f)
        return f

    def dump(self, path) -> None:
        """Write the history as JSON lines (one per operation, then one per fault) for a look afterwards."""
        import json
        from dataclasses import asdict

        with open(path, "w") as f:
            for op in self.ops:
                f.write(json.dumps({"type": "op", **asdict(op)}) + "\n")
            for fault in self.faults:
                f.write(json.dumps({"type": "fault", **asdict(fault), "lost": sorted(fault.lost)}) + "\n")

    def of(self, kind: str, outcome: str | None = None) -> list[Op]:
        return [o for o in self.ops if o.kind == kind and (outcome is None or o.outcome == outcome)]

    def counts(self) -> dict:
        """{"search ok": n, "search incomplete": n, "enrol info": n, ...} for the summary."""
        c = Counter(f"{o.kind} {o.outcome}" for o in self.ops)
        c["search incomplete"] = sum(1 for o in self.of("search", OK) if not o.complete)
        return dict(sorted(c.items()))
