"""Fixtures of the multi-host suite: virtual hosts, a Ray ingest across three of them, a serving cluster on
six more, and one seeded run of faults under a stream of searches, enrolments and deletions.

Everything is module-scoped and built once, in order:

    multihost_network  9 hosts (network namespaces on a bridge; skips when namespaces cannot be made)
    multihost_ingest   Ray head + 2 workers (`ray start`), `ray job submit -- facepq ingest` of the tiny
                       model's gallery into an index on the shared filesystem; Ray is stopped after it
    face_cluster       Redis, 4 query nodes, a coordinator (tests/multihost/cluster.py)
    fault_run          the seeded fault schedule (tests/multihost/nemesis.py) under the workload
                       (tests/multihost/workload.py), then the history checked against the commit log

The schedule and the history summary are printed at the end of the session (a terminal-summary
section), whatever `-s` or `-q` say, so CI's output shows them.
"""
from __future__ import annotations

import os
import pathlib
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from tests.support import netns, run_summary
from tests.support.history import History
from tests.support.history_check import Report, check
from tests.support.index import commit_log
from tests.support.ray_cluster import RayCluster, ray_env

SEED = int(os.environ.get("FACEPQ_MULTIHOST_SEED", "15"))  # fixed: the schedule is the same every run
RAY_HOSTS = ["rayhead", "rayw1", "rayw2"]
ENCODER_ACTOR = "MapWorker(MapBatches(read_and_align)->MapBatches(EncoderActor))"


def say(line: str = "") -> None:
    """Print now (visible with -s) and again in the session's summary section (tests/support/run_summary.py)."""
    print(line, flush=True)
    run_summary.add("multi-host: fault schedule and history summary", line)


@pytest.fixture(scope="module")
def multihost_network():
    from tests.multihost.cluster import HOSTS

    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(f"multi-host tests need virtual hosts: {reason}")
    with netns.VirtualNetwork() as net:
        for name in RAY_HOSTS + HOSTS:
            net.add_host(name)
        yield net
        net.heal_all()
    leftovers = net.leftovers()
    assert not leftovers, f"teardown left {leftovers}"


@dataclass
class IngestRun:
    index: pathlib.Path
    output: str
    encoder_hosts: list      # host name of each encoder actor the job had
    driver_hosts: list       # host name of each job supervisor (where the entrypoint ran)
    info: dict               # indexer.info.index_info of the index the job committed (checksums verified)
    seconds: float
    cpu_seconds: float       # used by the Ray hosts' processes


@pytest.fixture(scope="module")
def multihost_ingest(multihost_network, tiny_model, tmp_path_factory) -> IngestRun:
    from indexer.info import index_info

    net = multihost_network
    index = tmp_path_factory.mktemp("multihost") / "index"
    ray = RayCluster(net["rayhead"], [net["rayw1"], net["rayw2"]], ray_env())
    t0 = time.monotonic()
    try:
        ray.start()
        done = ray.submit(["facepq", "ingest", "--model", tiny_model.path, "--gallery", tiny_model.data,
                           "--index", index, "--shards", 2, "--actors", 2, "--no-progress"],
                          runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
        by_ip = {h.ip: h.name for h in net.hosts.values()}
        node_host = {node: by_ip.get(ip, ip) for node, ip in ray.node_ips().items()}
        encoders = [node_host.get(a["node_id"], "?") for a in ray.actors(ENCODER_ACTOR)]
        drivers = [node_host.get(a["node_id"], "?") for a in ray.actors("JobSupervisor")]
    finally:
        ray.stop()
    return IngestRun(index=index, output=done.stdout, encoder_hosts=sorted(encoders), driver_hosts=drivers,
                     info=index_info(index, verify=True), seconds=time.monotonic() - t0, cpu_seconds=ray.cpu_seconds)


@pytest.fixture(scope="module")
def face_cluster(multihost_network, multihost_ingest, tiny_model, tmp_path_factory):
    from tests.multihost.cluster import FaceCluster

    workdir = tmp_path_factory.mktemp("multihost-redis")
    cluster = FaceCluster(multihost_network, str(tiny_model.path), str(multihost_ingest.index), str(workdir))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@dataclass
class FaultRun:
    history: History
    report: Report
    plan: list
    recovery: list
    cluster_output: str
    client_errors: list
    seconds: float
    summary: list = field(default_factory=list)


@pytest.fixture(scope="module")
def fault_run(face_cluster, multihost_ingest, tiny_model, tmp_path_factory) -> FaultRun:
    from indexer.job import load_model_info
    from tests.multihost.cluster import HOSTS
    from tests.multihost.nemesis import Nemesis, schedule
    from tests.multihost.workload import Workload, enrolment_photos

    cluster = face_cluster
    plan = schedule(cluster, SEED, extra=0)  # every kind once: two repeats drawn at random added ~16 s, no check
    say(f"fault schedule (seed {SEED}; hosts: " + ", ".join(f"{h.name} {h.ip}" for h in cluster.net.hosts.values())
        + ")")
    for i, p in enumerate(plan, 1):
        say("  " + p.line(i))
    history = History()
    embedding = np.random.default_rng(SEED).standard_normal(load_model_info(str(tiny_model.path))[2]).astype(np.float32)
    gallery_people = sorted(p.name for p in pathlib.Path(tiny_model.data).iterdir() if p.is_dir())
    channel = cluster.channel()
    workload = Workload(history, channel, embedding, enrolment_photos(80, 2, seed=SEED), gallery_people, seed=SEED,
                        searchers=3)
    nemesis = Nemesis(cluster, history)
    t0 = time.monotonic()
    workload.start()
    try:
        warm = nemesis.wait_for_complete_answer(t0)
        assert warm is not None, f"the cluster never answered complete before the faults:\n{cluster.output()}"
        nemesis.run(plan)
        cluster.net.heal_all()
        nemesis.wait_for_complete_answer(time.monotonic())
        time.sleep(2.0)  # a last stretch of fault-free operations: the final reads
    finally:
        workload.stop()
        cluster.net.heal_all()
    seconds = time.monotonic() - t0
    serving_cpu = sum(cluster.net[name].cpu_seconds() for name in HOSTS)
    saved = tmp_path_factory.mktemp("multihost-history") / "history.jsonl"
    history.dump(saved)
    report = check(history, commit_log(multihost_ingest.index), cluster.replicas)
    lines = report.summary_lines(history)
    say(f"history summary ({seconds:.0f} s; recovery after each heal, seconds to the first complete answer: "
        + ", ".join("never" if r is None else f"{r:.1f}" for r in nemesis.recovery) + f"; saved in {saved})")
    for line in lines:
        say("  " + line)
    own = resource.getrusage(resource.RUSAGE_SELF)
    say(f"cost: Ray ingest {multihost_ingest.seconds:.0f} s wall, {multihost_ingest.cpu_seconds:.0f} CPU s on the "
        f"Ray hosts; serving hosts {serving_cpu:.0f} CPU s; this test process {own.ru_utime + own.ru_stime:.0f} CPU s "
        f"so far; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    channel.close()
    return FaultRun(history=history, report=report, plan=plan, recovery=nemesis.recovery,
                    cluster_output=cluster.output(), client_errors=workload.errors, seconds=seconds, summary=lines)
