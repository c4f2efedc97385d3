"""Batched scans and fan-outs (query_node.batcher) and the node's thread budget (query_node.scan_threads).

The batcher's decisions are tested with a scan that blocks until the test lets it go (so
"a scan is in flight" is a fact, not a timing guess); the node and coordinator tests run real gRPC
nodes under concurrent clients and compare every answer with the same query asked alone.
"""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from query_node.batcher import SearchBatcher
from query_node.coordinator import Coordinator
from query_node.registry import StaticRegistry
from query_node.scan_threads import ThreadBudget, default_threads
from tests.support.index import brute_force, build_index, dyadic_lut
from tests.support.processes import node

pytestmark = pytest.mark.timeout(240)


class BlockingScan:
    """scan(tables) -> ([row sums], calls so far); blocks while `gate` is clear."""

    def __init__(self):
        self.gate = threading.Event()
        self.started = threading.Event()
        self.calls = []

    def __call__(self, tables):
        self.calls.append(tables.shape[0])
        self.started.set()
        assert self.gate.wait(30)
        return [float(t.sum()) for t in tables], len(self.calls)


def _until(condition, what: str, timeout: float = 30.0) -> None:
    """Wait for `condition()` (a fact the test waits on, never a time it assumes)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"never happened: {what}"
        time.sleep(0.005)


def _scan_in_flight(pool, batcher, scan, key="key", shape=(1, 2, 2)):
    """Submit a request whose scan `scan` holds; returns its future once that scan runs."""
    busy = pool.submit(batcher.run, key, np.zeros(shape, np.float32), scan)
    assert scan.started.wait(30)
    return busy


def test_an_idle_batcher_scans_at_once_alone():
    scan = BlockingScan()
    scan.gate.set()
    batcher = SearchBatcher(window=60.0)   # a wait would hang the test: an idle node must not wait
    results, _ = batcher.run("key", np.ones((2, 3, 4), np.float32), scan)
    assert results == [12.0, 12.0] and scan.calls == [2] and batcher.batches == 0


def test_requests_arriving_during_a_scan_share_one_batched_scan():
    scan = BlockingScan()
    batcher = SearchBatcher(window=60.0, max_queries=4)   # closes when full, never by the clock
    with ThreadPoolExecutor(8) as pool:
        busy = _scan_in_flight(pool, batcher, scan)
        waiting = [pool.submit(batcher.run, "key", np.full((1, 2, 2), i, np.float32), scan) for i in (1, 2)]
        _until(lambda: batcher.queued("key") == 2, "two queries wait in the open batch")
        last = pool.submit(batcher.run, "key", np.full((2, 2, 2), 3, np.float32), scan)  # fills the batch of 4
        _until(lambda: len(scan.calls) == 2, "the full batch starts its scan while the first still runs")
        scan.gate.set()
        assert busy.result(30)[0] == [0.0]
        answers = [f.result(30)[0] for f in waiting] + [last.result(30)[0]]
    assert answers == [[4.0], [8.0], [12.0, 12.0]]        # each request gets its own queries back, in order
    assert scan.calls == [1, 4] and batcher.batches == 1 and batcher.batched_requests == 3


def test_a_batch_leaves_when_the_scan_in_flight_ends_not_by_the_clock():
    """Group commit: the next batch starts as the scan before it ends, however long its window."""
    scan = BlockingScan()
    batcher = SearchBatcher(window=60.0, max_queries=16)
    with ThreadPoolExecutor(8) as pool:
        busy = _scan_in_flight(pool, batcher, scan)
        waiting = [pool.submit(batcher.run, "key", np.full((1, 2, 2), i, np.float32), scan) for i in (1, 2)]
        _until(lambda: batcher.queued("key") == 2, "two queries wait in the open batch")
        assert scan.calls == [1]                          # nothing leaves while the scan in flight runs
        scan.gate.set()
        assert busy.result(30)[0] == [0.0]
        # a minute's window: only the end of the scan before can have started this batch
        assert [f.result(30)[0] for f in waiting] == [[4.0], [8.0]]
    assert scan.calls == [1, 2] and batcher.queued("key") == 0


def test_a_batch_leaves_after_its_window_when_the_scan_in_flight_does_not_end():
    first, second = BlockingScan(), BlockingScan()
    second.gate.set()
    batcher = SearchBatcher(window=0.05, max_queries=16)
    with ThreadPoolExecutor(4) as pool:
        busy = _scan_in_flight(pool, batcher, first)
        late = pool.submit(batcher.run, "key", np.ones((1, 2, 2), np.float32), second)
        assert late.result(30)[0] == [4.0]                # answered while the first scan still holds
        assert not busy.done()
        first.gate.set()
        assert busy.result(30)[0] == [0.0]


def test_different_keys_never_share_a_batch_and_errors_reach_every_member():
    scan = BlockingScan()
    batcher = SearchBatcher(window=0.2, max_queries=16)
    with ThreadPoolExecutor(8) as pool:
        busy = _scan_in_flight(pool, batcher, scan, "a", (1, 1, 1))
        other = [pool.submit(batcher.run, key, np.ones((1, 1, 1), np.float32), scan) for key in ("b", "c")]
        scan.gate.set()
        busy.result(30)
        assert [f.result(30)[0] for f in other] == [[1.0], [1.0]]
    assert sorted(scan.calls) == [1, 1, 1]

    def failing(tables):
        raise RuntimeError("scan failed")

    gate = BlockingScan()
    with ThreadPoolExecutor(4) as pool:
        busy = _scan_in_flight(pool, batcher, gate, "a", (1, 1, 1))
        members = [pool.submit(batcher.run, "x", np.ones((1, 1, 1), np.float32), failing) for _ in range(3)]
        gate.gate.set()
        for f in members:
            with pytest.raises(RuntimeError, match="scan failed"):
                f.result(30)


def test_thread_budget_shares_the_cores_among_scans_in_flight():
    budget = ThreadBudget(4)
    with budget.share() as first:
        assert first == 4
        with budget.share() as second, budget.share() as third:
            assert (second, third) == (2, 1)
    with budget.share() as again:
        assert again == 4
    assert default_threads() >= 1
    with pytest.raises(ValueError):
        ThreadBudget(0)


def _ids(hits):
    return [(h.face_id, h.score, h.shard) for h in hits]


@pytest.mark.slow
@pytest.mark.parametrize("codes", ["8x256", "4-bit"])
def test_a_batching_node_under_concurrent_clients_answers_like_single_queries(tmp_path, codes):
    """8 clients against a real node that batches (long window) and splits scans over 3 threads."""
    from query_node.node_server import NodeServer

    m, kk = (8, 256) if codes == "8x256" else (16, 16)
    path = tmp_path / "idx"
    build_index(path, rows=6000, shard_count=2, M=m, K=kk)
    rng = np.random.default_rng(9)
    luts = [dyadic_lut(rng, m, kk) for _ in range(24)]
    expected = [brute_force(path, lut, 25) for lut in luts]
    server = NodeServer(str(path), [0, 1], threads=3, batch_window=0.02, batch_max=16).start()
    try:
        coord = Coordinator(StaticRegistry([server.address]), shard_count=2)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda lut: coord.search_tables(lut[None], 25, timeout=60), luts * 3))
        for i, res in enumerate(answers):
            assert res.complete
            assert _ids(res.hits[0]) == expected[i % len(luts)], f"query {i % len(luts)}"
        assert server.batcher.batches > 0   # the clients did meet in batched scans
    finally:
        server.stop()


def test_a_batching_coordinator_shares_fan_outs_and_answers_like_single_queries(tmp_path):
    """8 clients through a coordinator that batches (long window) over two real nodes that do not: searches
    meet in shared fan-outs, and each gets exactly the answer it gets alone."""
    from query_node.node_server import NodeServer

    path = tmp_path / "idx"
    build_index(path, rows=6000, shard_count=2)
    rng = np.random.default_rng(12)
    luts = [dyadic_lut(rng, 8, 256) for _ in range(16)]
    expected = [brute_force(path, lut, 20) for lut in luts]
    servers = [NodeServer(str(path), [s]).start() for s in (0, 1)]
    try:
        # a long window that a batch of 4 closes early: searches meet however slowly the machine schedules them
        coord = Coordinator(StaticRegistry([s.address for s in servers]), shard_count=2, batch_window=0.5,
                            batch_max=4)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda lut: coord.search_tables(lut[None], 20, timeout=60), luts * 3))
        for i, res in enumerate(answers):
            assert res.complete and len(res.hits) == 1
            assert _ids(res.hits[0]) == expected[i % len(luts)], f"query {i % len(luts)}"
        assert coord.batcher.batches > 0 and coord.batcher.batched_requests > coord.batcher.batches
        alone = Coordinator(StaticRegistry([s.address for s in servers]), shard_count=2)
        assert alone.batcher.enabled is False   # off unless asked for (the CLI's default asks)
        assert _ids(alone.search_tables(luts[0][None], 20, timeout=60).hits[0]) == expected[0]
    finally:
        for s in servers:
            s.stop()


@pytest.mark.slow
def test_node_process_flags_threads_and_batching(tmp_path):
    path = tmp_path / "idx"
    build_index(path, rows=3000, shard_count=2)
    rng = np.random.default_rng(3)
    luts = [dyadic_lut(rng, 8, 256) for _ in range(8)]
    n = node(path, [0, 1], "--threads", "2", "--batch-window-ms", "5", "--batch-max", "4")
    try:
        coord = Coordinator(StaticRegistry([n.address]), shard_count=2)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda lut: coord.search_tables(lut[None], 10, timeout=60), luts))
        for lut, res in zip(luts, answers):
            assert _ids(res.hits[0]) == brute_force(path, lut, 10)
    finally:
        n.kill()


@pytest.mark.parametrize("command, flags, message", [
    ("node", ("--threads", "0"), "--threads must be >= 1, got 0"),
    ("node", ("--batch-window-ms", "-1"), "--batch-window-ms must be >= 0 and --batch-max >= 1"),
    ("node", ("--batch-max", "0"), "--batch-window-ms must be >= 0 and --batch-max >= 1"),
    ("coordinator", ("--batch-window-ms", "nan"), "--batch-window-ms must be >= 0 and --batch-max >= 1"),
    ("coordinator", ("--batch-max", "0"), "--batch-window-ms must be >= 0 and --batch-max >= 1"),
])
def test_servers_refuse_bad_thread_and_batch_flags(tmp_path, command, flags, message):
    from tests.support.processes import run_cli

    where = ("--shards", "0") if command == "node" else ("--model", tmp_path / "none.pt", "--nodes", "127.0.0.1:1")
    out = run_cli(command, "--index", tmp_path / "none", *where, *flags)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
