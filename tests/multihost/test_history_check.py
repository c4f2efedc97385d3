"""The history checker (tests.support.history_check) on hand-made histories: a clean one passes every
property, and each kind of violation, put in on purpose, is caught by its property and only by it.

The index of these histories has 2 shards (a face's shard is its id % 2), replicas a0, a1 (shard 0) and
b0, b1 (shard 1), and this commit log:
    v1: alice 10 (shard 0), bob 11 (shard 1)
    v2: + carol 20 (shard 0)            (enrol carol, acknowledged at t=2)
    v3: - bob                           (delete bob, acknowledged at t=4)
"""
from __future__ import annotations

import pytest

from tests.support.history import FAIL, INFO, OK, History, Hit, Op
from tests.support.history_check import CHECKS, CommitLog, check

PERSONS = {10: "alice", 11: "bob", 20: "carol"}
LOG = CommitLog(versions={1: {0: frozenset({10}), 1: frozenset({11})},
                          2: {0: frozenset({10, 20}), 1: frozenset({11})},
                          3: {0: frozenset({10, 20}), 1: frozenset()}},
                persons=PERSONS, shard_count=2)
REPLICAS = {0: ["a0", "a1"], 1: ["b0", "b1"]}


def hits(*face_ids):
    return tuple(Hit(f, PERSONS[f], f % 2) for f in face_ids)


def search(t0, t1, version, faces, missing=(), complete=None, outcome=OK, top_k=1000, error=""):
    complete = not missing if complete is None else complete
    return Op("search", "reader", t0, completed=t1, outcome=outcome, version=version if outcome == OK else None,
              hits=hits(*faces) if outcome == OK else (), complete=complete if outcome == OK else None,
              missing_shards=tuple(missing), top_k=top_k, error=error)


def base() -> History:
    """A clean history: enrol carol, delete bob, searches before/between/after, one fault healed."""
    h = History()
    h.add(search(0.0, 0.1, 1, [10, 11]))
    h.add(Op("enrol", "writer", 1.0, completed=2.0, outcome=OK, person="carol", face_ids=(20,), version=2))
    h.add(search(1.5, 1.6, 1, [10, 11]))                # concurrent with the enrol: v1 is fine
    h.add(search(2.5, 2.6, 2, [10, 11, 20]))
    h.add(Op("delete", "writer", 3.0, completed=4.0, outcome=OK, person="bob", version=3))
    h.add(search(3.5, 3.6, 2, [10, 11, 20]))            # concurrent with the delete: bob may show
    h.add(search(4.5, 4.6, 3, [10, 20]))
    h.faults.append(_fault("hang-node a0", {"a0"}, 5.0, 6.0))
    h.add(search(5.2, 5.3, 3, [10, 20]))                # a1 answers shard 0
    h.add(search(6.5, 6.6, 3, [10, 20]))
    h.add(search(7.0, 7.1, 3, [10, 20]))
    return h


def _fault(name, lost, started, healed):
    from tests.support.history import Fault

    return Fault(name=name, description=name, lost=frozenset(lost), started=started, healed=healed)


def violations(h, prop=None):
    report = check(h, LOG, REPLICAS)
    return [v.prop for v in report.violations] if prop is None else [v.message for v in report.of(prop)]


def test_a_clean_history_passes_every_property_and_every_property_checked_something():
    report = check(base(), LOG, REPLICAS)
    assert report.violations == []
    assert set(report.checked) == set(CHECKS) and all(report.checked[p] > 0 for p in CHECKS), report.checked
    summary = "\n".join(report.summary_lines(base()))
    assert "violations: 0" in summary and "faults injected: 1 (hang-node a0)" in summary
    assert "search ok: 8" in summary and "enrol ok: 1" in summary


def test_an_acknowledged_enrolment_missing_from_a_later_answer_is_lost():
    h = base()
    h.add(search(8.0, 8.1, 3, [10]))  # carol's face 20 (shard 0, answered) is gone
    assert violations(h) == ["lost-enrolment", "mixed-versions"]
    assert "lacks its faces [20]" in violations(h, "lost-enrolment")[0]


def test_an_enrolment_whose_acknowledged_version_lacks_it_is_lost():
    h = base()
    h.add(Op("enrol", "writer", 8.0, completed=8.5, outcome=OK, person="dave", face_ids=(30,), version=3))
    assert any("which lacks [30]" in m for m in violations(h, "lost-enrolment"))


def test_a_first_delete_that_finds_an_acknowledged_enrolee_gone_is_a_lost_enrolment():
    h = base()
    h.add(Op("delete", "writer", 8.0, completed=8.5, outcome=FAIL, person="carol", error="NOT_FOUND: no live faces"))
    assert violations(h) == ["lost-enrolment"]
    assert "found nobody" in violations(h, "lost-enrolment")[0]
    h = base()  # after an earlier delete (here one whose reply was lost) NOT_FOUND is the right answer
    h.add(Op("delete", "writer", 7.5, completed=7.8, outcome=INFO, person="carol", error="DEADLINE_EXCEEDED"))
    h.add(Op("delete", "writer", 8.0, completed=8.5, outcome=FAIL, person="carol", error="NOT_FOUND: no live faces"))
    assert "lost-enrolment" not in violations(h)


def test_a_lost_enrolment_is_excused_by_a_delete_invoked_before_the_search_ended_even_unacknowledged():
    h = base()
    h.add(Op("delete", "writer", 7.9, completed=9.0, outcome=INFO, person="carol", error="DEADLINE_EXCEEDED"))
    h.add(search(8.0, 8.1, 3, [10]))
    assert "lost-enrolment" not in violations(h)


def test_a_shard_declared_missing_excuses_its_faces_but_not_the_others():
    h = base()
    h.faults.append(_fault("isolate-shard 0", {"a0", "a1"}, 7.9, 8.11))
    h.add(search(8.0, 8.1, 3, [], missing=[0]))      # shard 0 missing: carol's absence is declared
    h.add(search(8.12, 8.13, 3, [10, 20]))
    h.faults.append(_fault("isolate-shard 1", {"b0", "b1"}, 8.15, 8.4))
    h.add(search(8.2, 8.3, 3, [10, 20], missing=[1]))  # shard 1 (empty at v3) declared missing: fine
    h.add(search(8.5, 8.6, 3, [10, 20]))
    assert violations(h) == []
    h.add(search(8.7, 8.8, 3, [10, 20], missing=[1]))  # ...when no fault took its replicas: unavailability
    assert violations(h) == ["no-recovery-after-heal", "unavailable-with-a-live-replica"]


def test_a_person_returned_after_the_delete_was_acknowledged_is_caught():
    h = base()
    h.add(search(8.0, 8.1, 2, [10, 11, 20]))  # bob again, from the old version
    found = violations(h)
    assert "visible-after-delete" in found and "stale-answer" in found
    assert "returns [11]" in violations(h, "visible-after-delete")[0]


def test_a_delete_whose_acknowledged_version_still_holds_the_person_is_caught():
    h = base()
    h.add(Op("delete", "writer", 8.0, completed=8.5, outcome=OK, person="alice", version=3))
    assert any("where [10] are live" in m for m in violations(h, "visible-after-delete"))


def test_an_answer_older_than_an_acknowledged_write_is_stale():
    h = base()
    h.faults.append(_fault("isolate-shard 1", {"b0", "b1"}, 7.9, 8.2))
    h.add(search(8.0, 8.1, 2, [10, 20], missing=[1]))  # v2 after v3 was acknowledged; bob's shard missing
    h.add(search(8.5, 8.6, 3, [10, 20]))
    assert violations(h) == ["stale-answer"]


def test_a_shard_from_another_version_is_a_mixed_answer_naming_that_version():
    h = base()
    h.add(search(8.0, 8.1, 3, [10, 11, 20]))  # says v3, shard 1 is v1/v2's {11}
    messages = violations(h, "mixed-versions")
    assert len(messages) == 1 and "shard 1 is the content of v[1, 2]" in messages[0]
    h = base()
    h.faults.clear()
    h.ops.append(search(8.0, 8.1, 1, [10, 20, 11]))  # says v1, shard 0 is v2's
    assert "shard 0 is the content of v[2, 3]" in violations(h, "mixed-versions")[0]


def test_a_phantom_face_and_an_uncommitted_version_are_mixed_answers():
    h = base()
    h.add(Op("search", "reader", 8.0, completed=8.1, outcome=OK, version=3, complete=True, top_k=1000,
             hits=hits(10, 20) + (Hit(40, "mallory", 0),)))
    assert "no committed version's content" in violations(h, "mixed-versions")[0]
    h = base()
    h.add(search(8.0, 8.1, 9, [10, 20]))
    assert "v9, a version never committed" in violations(h, "mixed-versions")[0]


def test_an_answer_from_a_garbage_collected_version_is_not_checked_against_the_log():
    import dataclasses

    h = base()
    h.add(search(8.0, 8.1, 4, [10, 20]))
    assert "v4, a version never committed" in violations(h, "mixed-versions")[0]
    pruned = dataclasses.replace(LOG, pruned=frozenset({4}))
    assert check(h, pruned, REPLICAS).violations == []


def test_a_truncated_answer_is_not_held_to_the_whole_version():
    h = base()
    h.add(search(8.0, 8.1, 3, [10], top_k=1))  # top_k=1: one face is the whole answer
    assert violations(h) == []


def test_a_silently_missing_shard_and_inconsistent_flags_are_caught():
    h = base()
    h.add(search(8.0, 8.1, 2, [10, 20], complete=True))  # v2 shard 1 holds bob: absent, undeclared
    h.ops[-1].version = 2
    h.ops[-1].invoked = 2.7  # before the delete: not stale, just silently partial
    h.ops[-1].completed = 2.8
    assert violations(h) == ["undeclared-missing-shard"]
    assert "has nothing from shard 1" in violations(h, "undeclared-missing-shard")[0]

    h = base()
    h.add(search(8.0, 8.1, 3, [10, 20], missing=[1], complete=True))
    h.add(search(8.2, 8.3, 3, [10, 20], missing=[], complete=False))
    h.add(search(8.4, 8.5, 3, [10, 20], missing=[0]))  # hits of the shard it says is missing
    messages = violations(h, "undeclared-missing-shard")
    assert len(messages) == 3
    assert "complete=True with missing_shards=[1]" in messages[0]
    assert "complete=False with missing_shards=[]" in messages[1]
    assert "returns hits of shards [0] it declares missing" in messages[2]


def test_answers_that_never_return_to_complete_after_a_heal_are_caught():
    h = base()
    h.faults.append(_fault("isolate-shard 1", {"b0", "b1"}, 8.0, 9.0))
    h.add(search(8.5, 8.6, 3, [10, 20], missing=[1]))   # during the fault: declared, fine
    h.add(search(9.5, 9.6, 3, [10, 20], missing=[1]))   # after the heal, and nothing complete follows
    assert violations(h) == ["no-recovery-after-heal"]
    assert "no complete answer between the heal of isolate-shard 1" in violations(h, "no-recovery-after-heal")[0]


def test_answers_that_recover_then_fall_back_to_incomplete_are_caught():
    h = base()
    h.add(search(7.5, 7.6, 3, [10, 20], missing=[1]))  # after the first heal's recovery, no fault active
    h.add(search(7.8, 7.9, None, [], outcome=FAIL, error="DEADLINE_EXCEEDED"))
    messages = violations(h, "no-recovery-after-heal")
    assert len(messages) == 2 and "is ok complete=False" in messages[0] and "DEADLINE_EXCEEDED" in messages[1]


def test_no_search_after_the_last_heal_is_not_a_pass():
    h = History()
    h.add(search(0.0, 0.1, 3, [10, 20]))
    h.faults.append(_fault("hang-node a0", {"a0"}, 1.0, 2.0))
    assert violations(h) == ["no-recovery-after-heal"]


def test_an_incomplete_answer_while_every_shard_kept_a_replica_is_unavailability():
    h = base()
    h.faults.append(_fault("hang-node b0", {"b0"}, 8.0, 9.0))
    h.add(search(8.1, 13.1, 3, [10, 20], missing=[1]))  # waited for b0 although b1 was fine
    h.add(search(9.5, 9.6, 3, [10, 20]))
    assert violations(h) == ["unavailable-with-a-live-replica"]
    assert "took 5.00 s" in violations(h, "unavailable-with-a-live-replica")[0]
    assert "    during: hang-node b0 1" in check(h, LOG, REPLICAS).summary_lines(h)


def test_a_stall_after_recovery_is_unavailability_blamed_on_the_fault_before_not_the_one_it_overlaps():
    h = base()
    h.faults.append(_fault("isolate-node", {"a1"}, 8.0, 9.0))
    h.add(search(9.1, 9.2, 3, [10, 20]))                 # recovered
    h.add(search(9.3, 14.3, 3, [], missing=[0]))         # then a call to a1 stalls, into the next fault
    h.faults.append(_fault("hang-node", {"b0"}, 12.0, 13.0))
    h.add(search(13.5, 13.6, 3, [10, 20]))
    report = check(h, LOG, REPLICAS)
    assert [v.prop for v in report.violations] == ["unavailable-with-a-live-replica"]
    assert report.violations[0].faults == ("after isolate-node",)
    assert "    during: after isolate-node 1" in report.summary_lines(h)


def test_a_failed_search_while_every_shard_kept_a_replica_is_unavailability():
    h = base()
    h.faults.append(_fault("partition coordinator-registry", set(), 8.0, 9.0))
    h.add(search(8.1, 8.2, None, [], outcome=FAIL, error="UNAVAILABLE"))
    h.add(search(9.5, 9.6, 3, [10, 20]))
    assert violations(h) == ["unavailable-with-a-live-replica"]


def test_incomplete_answers_are_right_when_a_shard_lost_every_replica_until_the_first_complete_one():
    h = base()
    h.faults.append(_fault("isolate-shard 1", {"b0", "b1"}, 8.0, 9.0))
    h.add(search(8.1, 13.1, 3, [10, 20], missing=[1]))
    h.add(search(9.1, 9.2, 3, [10, 20], missing=[1]))  # reconnecting after the heal
    h.add(search(9.5, 9.6, 3, [10, 20]))
    assert violations(h) == []


@pytest.mark.parametrize("prop", sorted(CHECKS))
def test_every_property_can_fail(prop):
    """No property is vacuous: for each one some hand-made history above violates it (listed here)."""
    broken = {
        "lost-enrolment": lambda h: h.add(search(8.0, 8.1, 3, [10])),
        "visible-after-delete": lambda h: h.add(search(8.0, 8.1, 3, [10, 11, 20])),
        "stale-answer": lambda h: h.add(search(8.0, 8.1, 2, [10, 20], missing=[1])),
        "mixed-versions": lambda h: h.add(search(8.0, 8.1, 3, [10, 11, 20])),
        "undeclared-missing-shard": lambda h: h.add(search(8.0, 8.1, 3, [10, 20], missing=[1], complete=True)),
        "no-recovery-after-heal": lambda h: h.add(search(8.0, 8.1, None, [], outcome=FAIL, error="UNAVAILABLE")),
        "unavailable-with-a-live-replica": lambda h: h.add(search(8.0, 8.1, 3, [10, 20], missing=[0])),
    }
    h = base()
    broken[prop](h)
    assert prop in violations(h)


def test_the_commit_log_is_what_each_version_of_a_real_index_holds(tmp_path):
    """tests.support.index.commit_log, the checker's ground truth, on an index written by the real writer."""
    from indexer.commit import delete_faces
    from indexer.store import IndexStore, manifest_path
    from tests.support.index import build_index, commit_log

    _, ids, _ = build_index(tmp_path / "idx", rows=60, shard_count=2, M=4)
    store = IndexStore(str(tmp_path / "idx"))
    version, deleted = delete_faces(store, person="p3")
    assert (version, deleted) == (2, 2)  # rows 3 and 53
    log = commit_log(tmp_path / "idx")
    everyone = {int(i) for i in ids}
    p3 = {int(ids[3]), int(ids[53])}
    assert log.shard_count == 2 and log.pruned == frozenset()
    assert log.live(1) == everyone and log.live(2) == everyone - p3
    assert all(f % 2 == s for v in (1, 2) for s, faces in log.versions[v].items() for f in faces)
    assert {log.persons[f] for f in p3} == {"p3"} and len(log.persons) == 60

    (tmp_path / "idx" / manifest_path(1)).unlink()  # as garbage collection does with old versions
    log = commit_log(tmp_path / "idx")
    assert log.pruned == frozenset({1}) and set(log.versions) == {2}
