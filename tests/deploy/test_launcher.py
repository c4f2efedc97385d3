"""facepq.launcher: shard placement, failing starts that name the process, no processes left behind."""
from __future__ import annotations

import itertools
import json
import os
import pathlib
import subprocess
import sys

import pytest

from facepq.launcher import (
    STATE_FILE,
    LaunchError,
    LocalCluster,
    process_start_time,
    read_state,
    running_state,
    stop_processes,
    stop_recorded,
)
from facepq_core.errors import ConfigError
from query_node.placement import assign_shards

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("shards,nodes", list(itertools.product(range(1, 6), range(1, 6))))
def test_assign_shards_puts_every_shard_on_exactly_replicas_distinct_nodes(shards, nodes):
    for replicas in range(1, nodes + 1):
        if nodes > shards * replicas:  # more nodes than replica slots: some node would idle
            with pytest.raises(ConfigError, match="without shards"):
                assign_shards(shards, nodes, replicas)
            continue
        plan = assign_shards(shards, nodes, replicas)
        assert len(plan) == nodes and all(plan)
        for s in range(shards):
            assert sum(s in node for node in plan) == replicas
        sizes = [len(node) for node in plan]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == shards * replicas


def test_assign_shards_refuses_more_replicas_than_nodes():
    with pytest.raises(ConfigError, match="replicas"):
        assign_shards(2, 2, 3)


def test_a_node_that_cannot_start_is_named_with_its_log_and_nothing_is_left(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    cluster = LocalCluster(tmp_path / "work", tmp_path / "no-such-index", tmp_path / "model.pt", shards=1,
                           redis=True, start_timeout=120)
    with pytest.raises(LaunchError) as info:
        cluster.start()
    message = str(info.value)
    assert "node-0 exited" in message and "node-0.log" in message
    assert "no-such-index" in message  # the node's own error, quoted from its log
    names = [p.name for p in cluster.processes]
    assert names == ["redis", "node-0"]  # the coordinator was never started
    for proc in cluster.processes:
        assert process_start_time(proc.pid) is None, f"{proc.name} (pid {proc.pid}) is still running"


def test_health_probe_reports_serving_then_failure(tmp_path):
    from tests.support.index import build_index
    from tests.support.processes import node

    build_index(tmp_path / "idx", rows=200, shard_count=1)
    n = node(tmp_path / "idx", [0])
    probe = [sys.executable, str(REPO / "deploy" / "grpc_health_probe.py"), n.address]
    try:
        ok = subprocess.run(probe, capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0 and "SERVING" in ok.stdout
        unknown = subprocess.run(probe + ["--service", "facepq.shard.7"], capture_output=True, text=True, timeout=30)
        assert unknown.returncode == 1
    finally:
        n.terminate()
    gone = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr


def _sleeper(**kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], **kw)


def _dead_process() -> tuple[int, float]:
    proc = _sleeper()
    start_time = process_start_time(proc.pid)
    proc.kill()
    proc.wait()
    return proc.pid, start_time


def test_stop_processes_stops_a_group_and_leaves_a_recycled_pid_alone():
    leader, bystander = _sleeper(start_new_session=True), _sleeper()
    try:
        assert stop_processes([(leader.pid, process_start_time(leader.pid)),
                               (bystander.pid, process_start_time(bystander.pid) - 5)]) == 1
        assert leader.poll() is not None and process_start_time(leader.pid) is None
        assert bystander.poll() is None  # recorded start time differs: another process with that pid
    finally:
        bystander.kill()
        bystander.wait()


def test_a_zombie_that_is_not_our_child_counts_as_stopped():
    """`facepq down` waits for `facepq up`, which stays a zombie until its own parent reaps it."""
    import psutil

    from facepq.launcher import _wait_gone

    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                               "c = subprocess.Popen([sys.executable, '-c', 'pass']); print(c.pid, flush=True)\n"
                               "time.sleep(300)"], stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        assert _wait_gone([child], timeout=120) == []
        assert process_start_time(child.pid) is None
    finally:
        parent.kill()
        parent.wait()


def test_the_state_file_is_running_only_while_its_launcher_runs(tmp_path):
    me = {"pid": os.getpid(), "start_time": process_start_time(os.getpid()), "processes": [], "stopped": False}
    assert running_state(tmp_path) is None and read_state(tmp_path) is None
    (tmp_path / STATE_FILE).write_text(json.dumps(me))
    assert running_state(tmp_path) == me
    (tmp_path / STATE_FILE).write_text(json.dumps(dict(me, start_time=me["start_time"] - 60)))  # a recycled pid
    assert running_state(tmp_path) is None
    (tmp_path / STATE_FILE).write_text(json.dumps(dict(me, stopped=True)))
    assert running_state(tmp_path) is None


def test_down_after_a_launcher_killed_with_sigkill_stops_its_children_once(tmp_path):
    pid, start_time = _dead_process()
    child = _sleeper(start_new_session=True)
    try:
        state = {"pid": pid, "start_time": start_time, "stopped": False,
                 "processes": [{"name": "node-0", "pid": child.pid, "start_time": process_start_time(child.pid)}]}
        (tmp_path / STATE_FILE).write_text(json.dumps(state))
        assert stop_recorded(tmp_path, grace=5) == 1
        assert child.poll() is not None and process_start_time(child.pid) is None
        assert read_state(tmp_path)["stopped"] is True
        assert stop_recorded(tmp_path) is None  # safe twice
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
