"""A facepq cluster spread over virtual hosts, under partitions and hangs (issue 15, second half).

Three hosts run a Ray cluster (`ray start`) and the gallery is ingested by `ray job submit -- facepq
ingest`; six more run Redis, four query nodes (two replicas of each of two shards) and the coordinator.
Then a seeded schedule of faults (tests/multihost/nemesis.py: cuts with prohibit and blackhole routes,
links down, SIGSTOP) runs while clients search, enrol and delete (tests/multihost/workload.py); every
operation lands in a history that tests.support.history_check checks against the index's commit log.
Each property is its own test below, on the same run. The schedule and the history summary are printed
in the session's summary.
"""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _violations(run, prop):
    found = run.report.of(prop)
    return "\n".join([f"{len(found)} violations of {prop}:"] + [v.message for v in found[:20]])


# ---- the Ray cluster -------------------------------------------------------------------------------------
def test_ingest_is_a_ray_job_whose_encoders_ran_on_the_worker_hosts(multihost_ingest, tiny_model):
    run = multihost_ingest
    # The head announces no CPUs, so encoders can only run on workers; two 0.5-CPU actors on two 1-CPU
    # workers are spread by Ray's default (hybrid) policy, one per worker.
    assert run.encoder_hosts == ["rayw1", "rayw2"], run.output[-3000:]
    assert run.driver_hosts == ["rayhead"]
    assert "index version: none -> 1" in run.output
    photos = sum(1 for _ in tiny_model.data.rglob("*.png"))
    assert (run.info["version"], run.info["faces"], run.info["shard_count"]) == (1, photos, 2)


# ---- the history: safety ---------------------------------------------------------------------------------
def test_the_run_exercised_every_fault_and_every_operation(fault_run):
    """Not a property: the checks below would pass vacuously on a run that did nothing."""
    from tests.multihost.nemesis import FAULT_KINDS

    h = fault_run.history
    assert not fault_run.client_errors, fault_run.client_errors
    assert {f.name for f in h.faults} == set(FAULT_KINDS)
    assert all(f.healed is not None for f in h.faults)
    counts = h.counts()
    assert counts.get("enrol ok", 0) >= 10 and counts.get("delete ok", 0) >= 5, counts
    assert counts.get("search ok", 0) >= 100, counts
    for f in h.faults:  # searches ran during every fault
        assert any(f.started <= s.invoked <= f.healed for s in h.of("search")), f.description
    assert all(fault_run.report.checked[p] > 0 for p in fault_run.report.checked), fault_run.report.checked


def test_a_shard_without_a_reachable_replica_is_reported_missing(fault_run):
    """The isolate-shard fault really cut the shard off: answers to searches made during it name it missing."""
    h = fault_run.history
    for f in (f for f in h.faults if f.name == "isolate-shard"):
        shard = int(f.description.split()[1])
        during = [s for s in h.of("search", "ok") if f.started <= s.invoked <= f.healed]
        assert any(list(s.missing_shards) == [shard] and not s.complete for s in during), \
            [s.describe() for s in during]


def test_no_acknowledged_enrolment_is_lost(fault_run):
    assert not fault_run.report.of("lost-enrolment"), _violations(fault_run, "lost-enrolment")


def test_no_person_is_visible_after_their_delete_was_acknowledged(fault_run):
    assert not fault_run.report.of("visible-after-delete"), _violations(fault_run, "visible-after-delete")


def test_no_answer_is_older_than_a_write_acknowledged_before_it(fault_run):
    assert not fault_run.report.of("stale-answer"), _violations(fault_run, "stale-answer")


def test_no_answer_mixes_versions(fault_run):
    assert not fault_run.report.of("mixed-versions"), _violations(fault_run, "mixed-versions")


def test_every_answer_lacking_a_shard_says_so(fault_run):
    assert not fault_run.report.of("undeclared-missing-shard"), _violations(fault_run, "undeclared-missing-shard")


# ---- the history: liveness -------------------------------------------------------------------------------
def test_answers_return_to_complete_after_each_heal(fault_run):
    assert not fault_run.report.of("no-recovery-after-heal"), _violations(fault_run, "no-recovery-after-heal")


def test_every_answer_is_complete_while_each_shard_keeps_a_replica(fault_run):
    prop = "unavailable-with-a-live-replica"
    assert not fault_run.report.of(prop), _violations(fault_run, prop)


def test_writes_refused_during_a_partition_say_retry(fault_run):
    """A write that fails because part of the cluster is away says so with a retryable status."""
    retryable = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED")
    failed = [w for w in fault_run.history.of("enrol") + fault_run.history.of("delete") if w.outcome != "ok"]
    assert failed, "no write failed: the registry faults did not reach the writes"
    wrong = [w.describe() for w in failed if not w.error.startswith(retryable)]
    assert not wrong, "\n".join(wrong)
