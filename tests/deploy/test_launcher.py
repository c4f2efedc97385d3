"""facepq.launcher: shard placement, failing starts that name the process, no processes left behind."""
from __future__ import annotations

import itertools
import pathlib
import subprocess
import sys

import pytest

from facepq.launcher import LaunchError, LocalCluster, process_start_time
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
