"""Check a finished History (tests.support.history) against the index's commit log, in the spirit of Jepsen.

The commit log is the ground truth of what each committed version holds: shard -> live face ids
(`CommitLog`, read from the manifests by tests.support.index.commit_log). The index serialises its
commits, so the log is the order every write took effect in; clients only see it through replies.
Only OK operations are acknowledged; an INFO write may have taken effect at any moment after its
invocation, so it never makes a requirement and it excuses what it could explain.

Properties (each a registered check; `check()` runs them all):

* lost-enrolment: an acknowledged enrolment is in its committed version, and every search invoked
  after the acknowledgement returns its faces from every shard it answered, unless a delete of that
  person was invoked before the search completed; the first delete of that person does not answer
  NOT_FOUND.
* visible-after-delete: an acknowledged delete left none of the person's faces live in its version,
  and no search invoked after the acknowledgement returns that person.
* stale-answer: no search answers from a version older than a write acknowledged before it began.
* mixed-versions: every answered shard of an answer holds exactly the live faces of that shard at
  the answer's version (no shard of another version, no phantom face). Needs whole answers:
  answers cut at top_k are checked only by the other properties.
* undeclared-missing-shard: an answer lacking a shard says so: a shard with live faces that returned
  none is in missing_shards, `complete` is true exactly when missing_shards is empty, and no hit
  comes from a shard declared missing.
* no-recovery-after-heal: after the last active fault is healed, some search invoked before the next
  fault answers complete, and every later search that ends before the next fault answers, complete.
  (A search that stalls across the next fault's start is judged by the next property.)
* unavailable-with-a-live-replica: a search running while every shard kept a replica no fault took
  away answers, complete. A fault's replicas count as lost until the first complete answer after its
  heal (reconnecting is recovery, not availability). Each violation is blamed on the faults in force
  that took a replica of a missing shard, else on the last fault healed before it (a replica back
  from an outage that still stalls).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from tests.support.history import OK, History, Op


@dataclass(frozen=True)
class CommitLog:
    """versions: version -> shard -> frozenset of live face ids; persons: face id -> person; pruned: versions
    that were committed but can no longer be read (garbage-collected manifests or segments): answers from
    them are not checked against the log."""

    versions: Mapping[int, Mapping[int, frozenset]]
    persons: Mapping[int, str]
    shard_count: int
    pruned: frozenset = frozenset()

    def shard_of(self, face_id: int) -> int:
        return face_id % self.shard_count

    def live(self, version: int) -> set:
        return set().union(*self.versions[version].values()) if version in self.versions else set()


@dataclass(frozen=True)
class Violation:
    prop: str
    message: str
    faults: tuple = ()  # names of the faults in force, where the property depends on them


@dataclass
class Report:
    violations: list = field(default_factory=list)
    checked: dict = field(default_factory=dict)  # property -> how many (operation, requirement) pairs it checked

    def of(self, prop: str) -> list[Violation]:
        return [v for v in self.violations if v.prop == prop]

    def summary_lines(self, history: History, limit: int = 5) -> list[str]:
        """The history summary: operations by kind and outcome, faults, and violations per property."""
        counts = history.counts()
        lines = [f"operations: {len(history.ops)} ("
                 + ", ".join(f"{k}: {v}" for k, v in counts.items()) + ")",
                 f"faults injected: {len(history.faults)} ("
                 + ", ".join(f"{f.name}" for f in history.faults) + ")",
                 f"violations: {len(self.violations)}"]
        errors = Counter(f"{o.kind} {o.outcome}: {o.error[:100]}" for o in history.ops if o.error)
        lines[1:1] = [f"  {text} (x{n})" for text, n in sorted(errors.items())]
        for prop in CHECKS:
            found = self.of(prop)
            lines.append(f"  {prop}: {len(found)} violations in {self.checked.get(prop, 0)} checks")
            by_fault = Counter(name for v in found for name in v.faults)
            if by_fault:
                lines.append("    during: " + ", ".join(f"{name} {n}" for name, n in sorted(by_fault.items())))
            lines += [f"    {v.message}" for v in found[:limit]]
            if len(found) > limit:
                lines.append(f"    ... and {len(found) - limit} more")
        return lines


CHECKS: dict[str, Callable] = {}


def _check(name: str):
    def register(fn):
        CHECKS[name] = fn
        return fn
    return register


def _searches(history: History) -> list[Op]:
    return sorted(history.of("search", OK), key=lambda o: o.invoked)


def _answered(op: Op, log: CommitLog) -> set:
    return set(range(log.shard_count)) - set(op.missing_shards)


def _searches_after(history: History, write: Op, excused: Callable[[Op], bool]) -> Iterator[Op]:
    """OK searches invoked after `write` was acknowledged, but those `excused` (another write may explain them)."""
    for s in _searches(history):
        if s.invoked > write.completed and not excused(s):
            yield s


@_check("lost-enrolment")
def lost_enrolments(history: History, log: CommitLog, replicas) -> tuple[list, int]:
    out, n = [], 0
    deletes = history.of("delete")
    for e in history.of("enrol", OK):
        n += 1
        missing = set(e.face_ids) - log.live(e.version)
        if missing and e.version not in log.pruned:
            out.append(f"enrol #{e.index} of {e.person} acknowledged version {e.version}, which lacks "
                       f"{sorted(missing)}")
        deleted = lambda s, e=e: any(d.person == e.person and d.invoked < s.completed for d in deletes)  # noqa: E731
        for s in _searches_after(history, e, deleted):
            n += 1
            seen = {h.face_id for h in s.hits}
            lost = [f for f in e.face_ids if log.shard_of(f) in _answered(s, log) and f not in seen]
            if lost and not s.truncated:
                out.append(f"search #{s.index} (v{s.version}, invoked {s.invoked - e.completed:.2f} s after enrol "
                           f"#{e.index} of {e.person} was acknowledged) lacks its faces {lost}")
        for d in deletes:  # a delete that found nobody to delete is a read too
            if d.person != e.person or d.invoked <= e.completed or not d.error.startswith("NOT_FOUND"):
                continue
            n += 1
            if not any(o.person == e.person and o.invoked < d.invoked for o in deletes):
                out.append(f"delete #{d.index} of {e.person} found nobody ({d.error}) after enrol #{e.index} was "
                           f"acknowledged")
    return out, n


@_check("visible-after-delete")
def visible_after_delete(history: History, log: CommitLog, replicas) -> tuple[list, int]:
    out, n = [], 0
    enrols = history.of("enrol")
    for d in history.of("delete", OK):
        n += 1
        still = sorted(f for f in log.live(d.version) if log.persons.get(f) == d.person)  # none when pruned
        if still:
            out.append(f"delete #{d.index} of {d.person} acknowledged version {d.version}, where {still} are live")
        enrolled_again = lambda s, d=d: any(e.person == d.person and d.invoked < e.invoked < s.completed  # noqa: E731
                                            for e in enrols)
        for s in _searches_after(history, d, enrolled_again):
            n += 1
            seen = sorted(h.face_id for h in s.hits if h.person == d.person)
            if seen:
                out.append(f"search #{s.index} (v{s.version}, invoked {s.invoked - d.completed:.2f} s after delete "
                           f"#{d.index} of {d.person} was acknowledged at v{d.version}) returns {seen}")
    return out, n


@_check("stale-answer")
def stale_answers(history: History, log: CommitLog, replicas) -> tuple[list, int]:
    out, n = [], 0
    acked = sorted((w.completed, w.version, w.index) for w in history.of("enrol", OK) + history.of("delete", OK))
    for s in _searches(history):
        before = [(v, i) for t, v, i in acked if t < s.invoked]
        if not before:
            continue
        n += 1
        newest, index = max(before)
        if s.version is None or s.version < newest:
            out.append(f"search #{s.index} answers from v{s.version}, older than v{newest} acknowledged by write "
                       f"#{index} before it began")
    return out, n


def _versions_with(log: CommitLog, shard: int, faces: set) -> list[int]:
    return sorted(v for v, shards in log.versions.items() if shards.get(shard, frozenset()) == faces)


@_check("mixed-versions")
def mixed_versions(history: History, log: CommitLog, replicas) -> tuple[list, int]:
    out, n = [], 0
    for s in _searches(history):
        if s.truncated or s.version in log.pruned:
            continue
        n += 1
        if s.version not in log.versions:
            out.append(f"search #{s.index} answers from v{s.version}, a version never committed")
            continue
        for shard in sorted(_answered(s, log)):
            got = {h.face_id for h in s.hits if h.shard == shard}
            want = set(log.versions[s.version].get(shard, frozenset()))
            if got == want or not got:  # an empty shard is undeclared-missing's case
                continue
            others = _versions_with(log, shard, got)
            origin = f"the content of v{others}" if others else "no committed version's content"
            out.append(f"search #{s.index} says v{s.version} but its shard {shard} is {origin}: "
                       f"{len(got - want)} faces too many, {len(want - got)} missing")
    return out, n


@_check("undeclared-missing-shard")
def undeclared_missing(history: History, log: CommitLog, replicas) -> tuple[list, int]:
    out, n = [], 0
    for s in _searches(history):
        n += 1
        if bool(s.complete) == bool(s.missing_shards):
            out.append(f"search #{s.index} says complete={s.complete} with missing_shards={list(s.missing_shards)}")
        from_missing = sorted({h.shard for h in s.hits} & set(s.missing_shards))
        if from_missing:
            out.append(f"search #{s.index} returns hits of shards {from_missing} it declares missing")
        if s.truncated or s.version not in log.versions:
            continue
        for shard in sorted(_answered(s, log)):
            if log.versions[s.version].get(shard) and not any(h.shard == shard for h in s.hits):
                out.append(f"search #{s.index} (v{s.version}) has nothing from shard {shard}, which holds "
                           f"{len(log.versions[s.version][shard])} faces, and does not declare it missing")
    return out, n


def _quiet_periods(history: History, end: float) -> list[tuple[float, float, str]]:
    """(heal time, next fault start or `end`, what was healed) for each moment the last active fault healed."""
    events = sorted([(f.started, 1, f) for f in history.faults] + [(f.healed, -1, f) for f in history.faults
                                                                     if f.healed is not None], key=lambda e: e[:2])
    active, periods, healed = 0, [], None
    for t, delta, f in events:
        if delta > 0 and active == 0 and healed is not None:
            periods.append((healed[0], t, healed[1]))
            healed = None
        active += delta
        if delta < 0 and active == 0:
            healed = (t, f.name)
    if healed is not None:
        periods.append((healed[0], end, healed[1]))
    return periods


def first_complete_after(history: History, t: float) -> Op | None:
    return next((s for s in _searches(history) if s.invoked >= t and s.complete), None)


@_check("no-recovery-after-heal")
def no_recovery(history: History, log: CommitLog, replicas) -> tuple[list, int]:
    out = []
    end = max((o.completed or o.invoked for o in history.ops), default=0.0) + 1.0
    periods = _quiet_periods(history, end)
    searches = sorted(history.of("search"), key=lambda o: o.invoked)
    for healed, next_fault, what in periods:
        first = first_complete_after(history, healed)
        if first is None or first.invoked >= next_fault:
            out.append(f"no complete answer between the heal of {what} at {healed:.2f} and {next_fault:.2f}")
            continue
        after = [s for s in searches if first.invoked < s.invoked and s.completed is not None
                 and s.completed <= next_fault]
        for s in after:
            if s.outcome != OK or not s.complete:
                out.append(f"search #{s.index} after recovery from {what} (first complete answer #{first.index}) "
                           f"is {s.outcome} complete={s.complete} {s.error}".rstrip())
    return out, len(periods)


PROP_UNAVAILABLE = "unavailable-with-a-live-replica"


@_check(PROP_UNAVAILABLE)
def unavailable_with_replica(history: History, log: CommitLog, replicas: Mapping[int, Sequence[str]]
                             ) -> tuple[list, int]:
    out, n = [], 0
    until = {}
    for f in history.faults:
        first = first_complete_after(history, f.healed) if f.healed is not None else None
        until[id(f)] = first.invoked if first is not None else float("inf")  # never recovered: still in force
    for s in sorted(history.of("search"), key=lambda o: o.invoked):
        if s.completed is None:
            continue
        active = [f for f in history.faults if f.active_during(s.invoked, s.completed, until[id(f)])]
        lost = set().union(*(f.lost for f in active)) if active else set()
        if any(not set(replicas[shard]) - lost for shard in replicas):
            continue  # some shard had no replica left: an incomplete answer is the right one
        n += 1
        if s.outcome != OK or not s.complete:
            blamed = _blamed(history, s, active, replicas)
            error = f" ({s.error})" if s.error else ""
            message = (f"search #{s.index} took {s.completed - s.invoked:.2f} s and is {s.outcome}{error} "
                       f"complete={s.complete} missing={list(s.missing_shards)} while every shard kept a replica "
                       f"(faults: {', '.join(f.name for f in active) or 'none'}; lost: {sorted(lost) or '-'}; "
                       f"blamed on: {', '.join(blamed)})")
            out.append(Violation(PROP_UNAVAILABLE, message, blamed))
    return out, n


def _blamed(history: History, s: Op, active: list, replicas) -> tuple:
    """The faults that took a replica of a shard this answer misses; when none did (a replica no fault
    holds stalled, e.g. on a connection an earlier outage left stuck), the last fault healed before it."""
    missing = [r for shard in s.missing_shards for r in replicas[shard]]
    names = tuple(f.name for f in active if not missing or set(missing) & f.lost)
    if names:
        return names
    healed = [f for f in history.faults if f.healed is not None and f.healed <= s.invoked]
    return (f"after {healed[-1].name}",) if healed else ("none",)


def check(history: History, log: CommitLog, replicas: Mapping[int, Sequence[str]],
          properties: Sequence[str] | None = None) -> Report:
    """Run the checks (default: all) over a finished history.

    Args:
        history: the run's operations and faults.
        log: what each committed version of the index holds.
        replicas: shard -> names of the nodes serving it (the names faults list in `lost`).
    """
    report = Report()
    for name in properties or CHECKS:
        found, checked = CHECKS[name](history, log, replicas)
        report.violations += [m if isinstance(m, Violation) else Violation(name, m) for m in found]
        report.checked[name] = checked
    return report
