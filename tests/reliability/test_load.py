"""A tiny bounded run of bench/load_bench.py: correctness only (no errors, no incomplete answers, file
descriptors not growing across hot reloads). Throughput and latency go to the benchmark report, never here."""
from __future__ import annotations

import threading

import pytest

from bench import grpc_floor

pytestmark = pytest.mark.timeout(240)


def test_bounded_load_and_hot_reload_soak(gallery, index):
    from bench import load_bench

    cluster = load_bench.start_cluster(str(gallery["model"]), str(index))
    try:
        res = load_bench.coordinator_load(cluster, gallery["enc"].embedding_dim, clients=3, seconds=3)
        assert res.requests > 0 and res.errors == 0 and res.incomplete == 0, res.error_codes
        assert len(res.latencies_ms) == res.requests

        # Hot reloads while 2 clients keep searching: no search fails, no fd leak in the nodes.
        during = {}
        t = threading.Thread(target=lambda: during.update(
            r=load_bench.coordinator_load(cluster, gallery["enc"].embedding_dim, clients=2, seconds=6)))
        t.start()
        soak = load_bench.soak(cluster, reloads=16)
        t.join(60)
        r = during["r"]
        assert r.requests > 0 and r.errors == 0 and r.incomplete == 0, r.error_codes
        assert soak.versions == list(range(soak.versions[0], soak.versions[0] + 16))
        for pid, fds in soak.fds.items():
            # after a few reloads the node holds a bounded set of views: the count must plateau
            assert max(fds[4:]) - min(fds[4:]) <= 4, (pid, fds)
            assert all(x > 0 for x in soak.rss_kb[pid])
    finally:
        cluster.close()


def test_grpc_floor_times_a_relay_over_two_busy_backends():
    """bench/grpc_floor.py (the load benchmark's reference for what Python gRPC costs) really starts its three
    processes and separates the backends' busy time from the latency around it."""
    r = grpc_floor.measure_floor(work_ms=3.0, requests=40, warmup=5)
    assert 1.0 < r["work_ms"] < 30.0          # the backends burned about what they were asked to
    assert r["relay_ms"] > r["work_ms"]
    assert 0.0 < r["floor_ms"] < r["relay_ms"]
