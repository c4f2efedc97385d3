"""Load and soak benchmark of a real cluster on loopback: 2 query nodes + a coordinator.

Load: N client threads search by embedding through the coordinator for T seconds;
prints throughput, p50/p99 latency, errors and incomplete answers. The reference in
the same run is the same load sent straight to the nodes' Search with precomputed
lookup tables (no model, no fan-out), so the ratio shows what the coordinator costs;
so does the CPU a search of every process on each path, printed with their ratio
(`cpu_per_request`: steadier than throughput on a machine shared with other work).

Soak: K hot reloads (each a real commit that deletes and re-enrols a face, so the
number of live segments stays constant) while the nodes keep serving; after each
reload the nodes' resident memory (RSS) and open file descriptors are read with
psutil. A leak shows as growth from the first reloads to the last.

Overhead (--overhead N): N sequential searches by one client, each measured three ways
in the same run: (a) the bare kernel, in this process, over the same shards the nodes
serve (single thread, as a node scans; the slower node's half per query, since the two
nodes scan in parallel), (b) end to end through the coordinator over gRPC, (c) straight
to both nodes with precomputed tables. Overhead = p50(b) - p50(a). The nodes' and the
coordinator's own reports (node scan_ms, node took_ms, coordinator took_ms) are printed
alongside, and every node's resident memory against the code bytes it serves and
against the RSS of a node serving a tiny index (the runtime baseline). The same run then
measures Python gRPC's own floor in the same shape (bench/grpc_floor.py): what no change
inside facepq can remove on this machine.

Run: python bench/load_bench.py --model model.pt [--rows 200000] [--clients 8] [--seconds 20] [--reloads 50]
     [--overhead 300] [--compare-batching [--rounds 3]]
(the index is random codes with the model's fingerprint, built in a temporary folder unless --index is given;
an --index path that does not exist yet is built there and kept, to be reused by later runs)
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from bench import grpc_floor as floor_bench
from bench.harness import ServerProcess

REPO = pathlib.Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- processes


SERVER_START_TIMEOUT = 120  # seconds: a big index loads before the node prints 'listening on'


@dataclass
class Cluster:
    index: str
    nodes: list[ServerProcess]
    coordinator: ServerProcess

    def close(self) -> None:
        for s in [self.coordinator, *self.nodes]:
            s.kill()


def start_cluster(model: str, index: str, poll: float = 0.2, node_args: tuple = (),
                  coordinator_args: tuple = ()) -> Cluster:
    """Two nodes (shard halves, started with `node_args`) and a coordinator with a static node list (and
    `coordinator_args`); the caller closes it."""
    from indexer.store import IndexStore

    shards = IndexStore(index).load_manifest().shard_count
    halves = [list(range(0, max(1, shards // 2))), list(range(max(1, shards // 2), shards)) or [0]]
    nodes = []
    try:
        for part in halves:
            nodes.append(ServerProcess(["node", "--index", index, "--shards", ",".join(map(str, part)), "--poll", poll,
                                        *node_args], timeout=SERVER_START_TIMEOUT))
        coord = ServerProcess(["coordinator", "--model", model, "--index", index, "--port", "0", "--nodes",
                               ",".join(n.address for n in nodes), *coordinator_args], timeout=SERVER_START_TIMEOUT)
    except BaseException:
        for n in nodes:
            n.kill()
        raise
    return Cluster(index, nodes, coord)


def build_random_index(model: str, path: str, rows: int, shards: int = 2, seed: int = 0) -> None:
    """`rows` random codes under the model's fingerprint (scan cost is the same as real codes)."""
    from indexer.manifest import ModelMeta
    from indexer.writer import IndexWriter
    from opqn_model.api import FaceEncoder

    enc = FaceEncoder.load(model)
    meta = ModelMeta.from_encoder(enc)
    rng = np.random.default_rng(seed)
    ids = rng.choice(2**62, size=rows, replace=False).astype(np.uint64)
    codes = rng.integers(0, 256, size=(rows, meta.code_bytes), dtype=np.uint8)
    w = IndexWriter(path, meta, shard_count=shards)
    w.add(ids, [f"person{i % 1000}" for i in range(rows)], [f"row{i}" for i in range(rows)], codes)
    w.commit(f"load bench: {rows} random codes")


# ---------------------------------------------------------------- load


@dataclass
class LoadResult:
    requests: int
    errors: int
    incomplete: int
    seconds: float
    latencies_ms: list[float] = field(repr=False, default_factory=list)
    error_codes: dict = field(default_factory=dict)

    @property
    def qps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        return float(np.percentile(np.asarray(self.latencies_ms), p))


def run_load(call, clients: int, seconds: float, make_request) -> LoadResult:
    """`clients` threads each calling `call(make_request(rng))` back to back for `seconds`.

    An answer with `.complete == False` counts as incomplete; an exception as an error (by code).
    """
    import grpc

    stop = time.monotonic() + seconds
    lock = threading.Lock()
    result = LoadResult(0, 0, 0, seconds)

    def worker(i):
        rng = np.random.default_rng(1000 + i)
        lat, errs, incomplete, codes = [], 0, 0, {}
        while time.monotonic() < stop:
            req = make_request(rng)
            t0 = time.perf_counter()
            try:
                reply = call(req)
                if getattr(reply, "complete", True) is False:
                    incomplete += 1
            except grpc.RpcError as exc:
                errs += 1
                name = exc.code().name if exc.code() else "UNKNOWN"
                codes[name] = codes.get(name, 0) + 1
            lat.append((time.perf_counter() - t0) * 1e3)
        with lock:
            result.latencies_ms += lat
            result.requests += len(lat)
            result.errors += errs
            result.incomplete += incomplete
            for k, v in codes.items():
                result.error_codes[k] = result.error_codes.get(k, 0) + v

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    result.seconds = time.monotonic() - t0
    return result


def coordinator_load(cluster: Cluster, dim: int, clients: int, seconds: float, top_k: int = 10) -> LoadResult:
    import grpc

    from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc

    stub = facepq_pb2_grpc.CoordinatorStub(grpc.insecure_channel(cluster.coordinator.address))

    def make(rng):
        return facepq_pb2.SearchRequest(embedding=facepq_pb2.Embedding(values=rng.standard_normal(dim).tolist()),
                                        top_k=top_k)

    return run_load(lambda r: stub.Search(r, timeout=30), clients, seconds, make)


def cpu_per_request(pids: dict[str, int], run) -> tuple[LoadResult, dict[str, float]]:
    """`run()` -> its LoadResult, and the CPU (user + system) each process of `pids` and this one ("client")
    spent per request meanwhile, in ms. On a shared machine throughput moves with the neighbours; CPU a
    request moves much less, so it is the steadier way to compare two paths of one run."""
    import psutil

    procs = {**{name: psutil.Process(pid) for name, pid in pids.items()}, "client": psutil.Process()}

    def seconds():
        return {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}  # user + system, all its threads

    before = seconds()
    result = run()
    used = {name: s - before[name] for name, s in seconds().items()}
    return result, {name: s / max(1, result.requests) * 1e3 for name, s in used.items()}


def node_load(cluster: Cluster, model: str, clients: int, seconds: float, top_k: int = 10) -> LoadResult:
    """Reference: the same searches straight to the nodes (tables precomputed, both nodes per request)."""
    import grpc

    from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
    from opqn_model.api import FaceEncoder
    from query_node.wire import table_message

    enc = FaceEncoder.load(model)
    rng = np.random.default_rng(7)
    tables = np.asarray(enc.codec.query_tables(rng.standard_normal((64, enc.embedding_dim)).astype(np.float32)),
                        np.float32)
    msgs = [table_message(facepq_pb2, t) for t in tables]
    stubs = [facepq_pb2_grpc.QueryNodeStub(grpc.insecure_channel(n.address)) for n in cluster.nodes]
    with ThreadPoolExecutor(clients) as pool:  # one call of each request leaves the client's thread
        return run_load(lambda req: call_all_nodes(stubs, req, pool)[-1], clients, seconds,
                        lambda r: facepq_pb2.NodeSearchRequest(tables=[msgs[int(r.integers(len(msgs)))]], top_k=top_k))


def call_all_nodes(stubs, req, pool: ThreadPoolExecutor) -> list:
    """Search on every node at once, the way the coordinator calls them (floor_bench.fan_out)."""
    return floor_bench.fan_out([s.Search for s in stubs], req, pool)


# ---------------------------------------------------------------- overhead over the bare kernel


def load_avg() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _pcts(xs) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    return (float(np.percentile(a, 50)), float(np.percentile(a, 99))) if a.size else (float("nan"),) * 2


@dataclass
class OverheadResult:
    """Per request (same query, same order), in ms."""

    kernel_ms: list = field(default_factory=list)        # (a) in-process kernel, slower node's shards
    parallel_ms: list = field(default_factory=list)      # (a') both nodes' shards at once on 2 threads, wall
    node_search_ms: list = field(default_factory=list)   # in-process IndexView.search (kernel + hit lookup + merge)
    coord_ms: list = field(default_factory=list)         # (b) client-side latency through the coordinator
    coord_took_ms: list = field(default_factory=list)    # the coordinator's own reported time
    coord_node_scan_ms: list = field(default_factory=list)  # slowest node's reported scan_ms, via the coordinator
    direct_ms: list = field(default_factory=list)        # (c) client-side latency straight to both nodes
    direct_scan_ms: list = field(default_factory=list)   # slowest node's reported scan_ms, direct
    direct_took_ms: list = field(default_factory=list)   # slowest node's reported handler time, direct
    incomplete: int = 0


def _node_shards(cluster: Cluster) -> list[list[int]]:
    import grpc

    from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc

    out = []
    for n in cluster.nodes:
        with grpc.insecure_channel(n.address) as ch:
            st = facepq_pb2_grpc.QueryNodeStub(ch).Status(facepq_pb2.NodeStatusRequest(), timeout=10)
        out.append([s.shard for s in st.shards])
    return out


def kernel_ms(view, shards: list[int], tables, k: int) -> float:
    """ms of the bare scan kernel over `shards` of `view`: one TopKHeap per shard, as ShardData.search."""
    from query_node.scan import TopKHeap

    t0 = time.perf_counter()
    for s in shards:
        data = view.shards[s]
        heap = TopKHeap(tables.byte.shape[0], k)
        for seg, skip in zip(data.segments, data.skips):
            heap.scan(seg.codes, tables, skip)
    return (time.perf_counter() - t0) * 1e3


def overhead_run(cluster: Cluster, model: str, requests: int, top_k: int = 10, warmup: int = 10) -> OverheadResult:
    """`requests` sequential searches, each timed as (a) bare kernel in-process, (b) coordinator, (c) nodes direct."""
    import grpc

    from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
    from indexer.store import IndexStore
    from opqn_model.api import FaceEncoder
    from query_node.index_view import load_view
    from query_node.scan import scan_tables
    from query_node.wire import table_message

    enc = FaceEncoder.load(model)
    store = IndexStore(cluster.index)
    parts = _node_shards(cluster)
    view = load_view(store, sorted({s for p in parts for s in p}), verify=False)  # the nodes verified them
    coord = facepq_pb2_grpc.CoordinatorStub(grpc.insecure_channel(cluster.coordinator.address))
    nodes = [facepq_pb2_grpc.QueryNodeStub(grpc.insecure_channel(n.address)) for n in cluster.nodes]
    rng = np.random.default_rng(11)
    embs = rng.standard_normal((warmup + requests, enc.embedding_dim)).astype(np.float32)
    # Tables computed up front (what the coordinator computes per query), so no torch work, and none of
    # its OpenMP threads spinning afterwards, shares the cores with the timed scans.
    all_luts = np.asarray(enc.codec.query_tables(embs), np.float32)
    out = OverheadResult()
    pool = ThreadPoolExecutor(max(1, len(parts)))
    for i in range(warmup + requests):
        emb, luts = embs[i], all_luts[i:i + 1]
        tables = scan_tables(luts, view.model.packed, view.model.code_bytes)   # what a node scans with
        a = max(kernel_ms(view, p, tables, top_k) for p in parts)
        # The nodes scan at the same time, competing for cores and memory bandwidth: the same two scans on
        # two threads of this process (the kernel releases the GIL) are the bare reference for that.
        t0 = time.perf_counter()
        list(pool.map(kernel_ms, [view] * len(parts), parts, [tables] * len(parts), [top_k] * len(parts)))
        a_par = (time.perf_counter() - t0) * 1e3
        full = 0.0
        for p in parts:
            t0 = time.perf_counter()
            view.search(luts, top_k, p)
            full = max(full, (time.perf_counter() - t0) * 1e3)
        req = facepq_pb2.SearchRequest(embedding=facepq_pb2.Embedding(values=emb.tolist()), top_k=top_k)
        t0 = time.perf_counter()
        reply = coord.Search(req, timeout=30)
        b = (time.perf_counter() - t0) * 1e3
        nreq = facepq_pb2.NodeSearchRequest(tables=[table_message(facepq_pb2, luts[0])], top_k=top_k)
        t0 = time.perf_counter()
        replies = call_all_nodes(nodes, nreq, pool)
        c = (time.perf_counter() - t0) * 1e3
        if i < warmup:
            continue
        out.kernel_ms.append(a)
        out.parallel_ms.append(a_par)
        out.node_search_ms.append(full)
        out.coord_ms.append(b)
        out.coord_took_ms.append(reply.took_ms)
        out.coord_node_scan_ms.append(getattr(reply, "node_scan_ms", float("nan")))
        out.incomplete += not reply.complete
        out.direct_ms.append(c)
        out.direct_scan_ms.append(max(getattr(r, "scan_ms", float("nan")) for r in replies))
        out.direct_took_ms.append(max(getattr(r, "took_ms", float("nan")) for r in replies))
    pool.shutdown()
    return out


def node_memory(cluster: Cluster) -> list[tuple[int, int, int]]:
    """(pid, RSS KiB, code bytes served) per node."""
    import grpc

    from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc

    out = []
    for n in cluster.nodes:
        with grpc.insecure_channel(n.address) as ch:
            st = facepq_pb2_grpc.QueryNodeStub(ch).Status(facepq_pb2.NodeStatusRequest(), timeout=10)
        out.append((n.pid, proc_usage(n.pid)[0], sum(s.code_bytes for s in st.shards)))
    return out


def baseline_node_rss(model: str, tmp: str, searches: int = 20) -> int:
    """RSS (KiB) of a node serving a 1000-row index after a few searches: the runtime's own share."""
    import grpc

    from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
    from opqn_model.api import FaceEncoder
    from query_node.wire import table_message

    index = os.path.join(tmp, "baseline-idx")
    if not os.path.exists(index):
        build_random_index(model, index, 1000, shards=1)
    n = ServerProcess(["node", "--index", index, "--shards", "0"], timeout=SERVER_START_TIMEOUT)
    try:
        enc = FaceEncoder.load(model)
        luts = np.asarray(enc.codec.query_tables(np.ones((1, enc.embedding_dim), np.float32)), np.float32)
        with grpc.insecure_channel(n.address) as ch:
            stub = facepq_pb2_grpc.QueryNodeStub(ch)
            for _ in range(searches):
                stub.Search(facepq_pb2.NodeSearchRequest(tables=[table_message(facepq_pb2, luts[0])], top_k=10),
                            timeout=30)
        return proc_usage(n.pid)[0]
    finally:
        n.kill()


def grpc_floor(r: OverheadResult, requests: int) -> dict:
    """bench/grpc_floor.py in the cluster's shape, its backends busy for the nodes' median kernel time."""
    work = float(np.nanmedian(np.asarray(r.coord_node_scan_ms, dtype=np.float64)))
    return floor_bench.measure_floor(work if np.isfinite(work) else 1.0, requests)


def print_overhead(r: OverheadResult, before, after, baseline_kb: int, top_k: int, floor: dict | None = None) -> None:
    rows = [("(a) bare kernel in-process, slower node", r.kernel_ms),
            ("(a') bare kernel, both nodes' shards at once", r.parallel_ms),
            ("    + hit lookup + merge (IndexView.search)", r.node_search_ms),
            ("    node-reported scan_ms (direct calls)", r.direct_scan_ms),
            ("    node-reported handler took_ms (direct)", r.direct_took_ms),
            ("(c) nodes direct over gRPC, client side", r.direct_ms),
            ("    node scan_ms reported via coordinator", r.coord_node_scan_ms),
            ("    coordinator-reported took_ms", r.coord_took_ms),
            ("(b) through the coordinator, client side", r.coord_ms)]
    print(f"{len(r.kernel_ms)} sequential searches, one client, top-{top_k}; {load_avg()}")
    print(f"{'what':46s} {'p50 ms':>8} {'p99 ms':>8}")
    for name, xs in rows:
        p50, p99 = _pcts(xs)
        print(f"{name:46s} {p50:>8.2f} {p99:>8.2f}")
    a50, b50, c50 = _pcts(r.kernel_ms)[0], _pcts(r.coord_ms)[0], _pcts(r.direct_ms)[0]
    ap50 = _pcts(r.parallel_ms)[0]
    per_req = _pcts(np.asarray(r.coord_ms) - np.asarray(r.kernel_ms))[0]
    print(f"overhead over the bare kernel: p50(b) - p50(a) = {b50 - a50:.2f} ms (median of per-request "
          f"differences {per_req:.2f} ms); of which nodes' own gRPC: p50(c) - p50(a) = {c50 - a50:.2f} ms, "
          f"coordinator: p50(b) - p50(c) = {b50 - c50:.2f} ms; incomplete answers: {r.incomplete}")
    print(f"overhead over the bare kernel run as the cluster runs it (both halves at once): p50(b) - p50(a') = "
          f"{b50 - ap50:.2f} ms (median of per-request differences "
          f"{_pcts(np.asarray(r.coord_ms) - np.asarray(r.parallel_ms))[0]:.2f} ms)")
    # On a shared machine the two nodes' scans compete for the cores with each other and with other work,
    # so the kernel inside the cluster runs slower than alone; the node's own report of the same request
    # separates that from what the coordinator and the transport add.
    in_situ = _pcts(np.asarray(r.coord_ms) - np.asarray(r.coord_node_scan_ms))
    direct = _pcts(np.asarray(r.direct_ms) - np.asarray(r.direct_scan_ms))
    print(f"over the nodes' own kernel time in the same request (slowest node's scan_ms): through the coordinator "
          f"p50 {in_situ[0]:.2f} / p99 {in_situ[1]:.2f} ms; nodes direct p50 {direct[0]:.2f} / p99 {direct[1]:.2f} ms")
    if floor:
        # What Python gRPC costs in the same shape with facepq's work taken out: no change inside facepq
        # can bring its overhead below this on this machine.
        print(f"Python gRPC floor, same shape (client -> relay -> 2 backends each busy {floor['work_ms']:.2f} ms with "
              f"the GIL released, 8 KiB requests, no facepq work): p50 {floor['floor_ms']:.2f} ms over the busy time; "
              f"facepq's own share of its {in_situ[0]:.2f} ms: {in_situ[0] - floor['floor_ms']:.2f} ms (table, "
              f"hit lookups, protobuf, merge)")
    print(f"runtime baseline: a node serving 1000 rows, after 20 searches: RSS {baseline_kb / 1024:.1f} MiB")
    for (pid, rss0, _), (_, rss, code) in zip(before, after):
        extra = (rss - baseline_kb) * 1024
        print(f"node pid {pid}: RSS {rss0 / 1024:.1f} MiB before the searches, {rss / 1024:.1f} MiB after, for "
              f"{code / 2**20:.1f} MiB of codes: (RSS - baseline) = {extra / max(code, 1):.2f} x code bytes")


# ---------------------------------------------------------------- soak


def proc_usage(pid: int) -> tuple[int, int]:
    """(resident memory in KiB, open file descriptors) of a process (psutil)."""
    import psutil

    proc = psutil.Process(pid)
    return proc.memory_info().rss // 1024, proc.num_fds()


@dataclass
class SoakResult:
    versions: list[int]
    rss_kb: dict[int, list[int]]   # node pid -> one sample per reload
    fds: dict[int, list[int]]

    def growth(self, samples: list[int], window: int = 5) -> float:
        """mean of the last `window` samples minus mean of the first `window` (after warm-up)."""
        w = max(1, min(window, len(samples) // 3))
        return statistics.mean(samples[-w:]) - statistics.mean(samples[:w])


def soak(cluster: Cluster, reloads: int, timeout: float = 30.0, on_reload=None) -> SoakResult:
    """`reloads` commits (delete a face, then enrol it again: alternating), waiting after each until every
    node serves the new version, sampling each node's RSS and fd count."""
    import grpc

    from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
    from indexer.commit import delete_faces
    from indexer.segment import open_segment
    from indexer.store import IndexStore
    from indexer.writer import IndexWriter

    store = IndexStore(cluster.index)
    man = store.load_manifest()
    seg = open_segment(store, man.shards[0].segments[0], model=man.model)
    face_id, person, source, code = int(seg.face_ids[0]), seg.person_at(0), seg.source_at(0), seg.codes[0].copy()
    stubs = {n.pid: facepq_pb2_grpc.QueryNodeStub(grpc.insecure_channel(n.address)) for n in cluster.nodes}
    out = SoakResult([], {p: [] for p in stubs}, {p: [] for p in stubs})
    for i in range(reloads):
        if i % 2 == 0:
            version, _ = delete_faces(store, face_ids=[face_id])
        else:
            w = IndexWriter(store, man.model)
            w.add(np.array([face_id], np.uint64), [person], [source], code[None])
            version = w.commit("soak: enrol again")
        deadline = time.monotonic() + timeout
        for pid, stub in stubs.items():
            while stub.Status(facepq_pb2.NodeStatusRequest(), timeout=5).index_version != str(version):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node {pid} did not load version {version} within {timeout} s")
                time.sleep(0.05)
            rss, fds = proc_usage(pid)
            out.rss_kb[pid].append(rss)
            out.fds[pid].append(fds)
        out.versions.append(int(version))
        if on_reload:
            on_reload(i, version)
    return out


# ---------------------------------------------------------------- main


def paired_ratio(on: list[float], off: list[float]) -> tuple[float, list[float]]:
    """The median of per-round ratios on / off (each round's two runs back to back), and the ratios.

    This machine's speed drifts by up to 2x within minutes; a ratio of two runs minutes apart measures the drift,
    one of adjacent runs much less of it, and the median drops a round that a slow spell split."""
    if len(on) != len(off) or not on:
        raise ValueError(f"need as many runs with as without, at least one: got {len(on)} and {len(off)}")
    ratios = [a / b if b else float("nan") for a, b in zip(on, off)]
    return float(np.median(ratios)), ratios


def compare_batching(model: str, index: str, clients: int, seconds: float, top_k: int,
                     rounds: int = 1) -> tuple[float, float]:
    """Batching off, then on (the default), `rounds` times in alternation: nodes-direct load on nodes started with
    --batch-window-ms 0 and without it; then load through a coordinator started with --batch-window-ms 0 and
    without it (its nodes batching). Returns (node ratio, coordinator ratio), on / off, each the median over the
    rounds (paired_ratio)."""
    from opqn_model.api import FaceEncoder

    dim = FaceEncoder.load(model).embedding_dim
    off = ("--batch-window-ms", "0")
    runs = (("nodes direct, node batching off", dict(node_args=off), "node"),
            ("nodes direct, node batching on", {}, "node"),
            ("coordinator, fan-out batching off", dict(coordinator_args=off), "coordinator"),
            ("coordinator, fan-out batching on", {}, "coordinator"))
    results: dict[str, list] = {name: [] for name, _, _ in runs}
    for _ in range(rounds):
        for name, cluster_args, path in runs:
            cluster = start_cluster(model, index, **cluster_args)
            try:
                results[name].append(node_load(cluster, model, clients, seconds, top_k) if path == "node" else
                                     coordinator_load(cluster, dim, clients, seconds, top_k))
            finally:
                cluster.close()
    print(f"{'batching':36s} {'round':>5} {'clients':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}  "
          f"({load_avg()})")
    for i in range(rounds):
        for name, per_round in results.items():
            r = per_round[i]
            print(f"{name:36s} {i + 1:>5} {clients:>7} {r.qps:>9.1f} {r.pct(50):>8.2f} {r.pct(99):>8.2f} "
                  f"{r.errors:>7}")

    def ratio(on: str, off: str) -> tuple[float, list[float]]:
        return paired_ratio([r.qps for r in results[on]], [r.qps for r in results[off]])

    node, node_rounds = ratio("nodes direct, node batching on", "nodes direct, node batching off")
    coordinator, coordinator_rounds = ratio("coordinator, fan-out batching on", "coordinator, fan-out batching off")

    def each(ratios: list[float]) -> str:
        return "" if len(ratios) < 2 else " (rounds: " + ", ".join(f"{x:.2f}" for x in ratios) + ")"

    print(f"node throughput with batching = {node:.2f} x without{each(node_rounds)} (target >= 1.5)")
    print(f"coordinator throughput with fan-out batching = {coordinator:.2f} x without{each(coordinator_rounds)}")
    return node, coordinator


def main(argv=None) -> int:
    import logging

    ap = argparse.ArgumentParser(prog="facepq bench load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="trained checkpoint (.pt)")
    ap.add_argument("--index", help="index of this model (default: random codes in a temporary folder); a path "
                                    "that does not exist yet gets --rows random codes and is kept")
    ap.add_argument("--rows", type=int, default=200_000, help="rows of the random index")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds per load run (0 = no load runs)")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--reloads", type=int, default=50, help="hot reloads in the soak (0 = no soak)")
    ap.add_argument("--compare-batching", action="store_true",
                    help="also run the nodes-direct load and the coordinator load with batching off "
                         "(--batch-window-ms 0) and on, and print throughput with batching / without for each")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --compare-batching: alternate off and on this many times and print the median of "
                         "the rounds' ratios (default %(default)s)")
    ap.add_argument("--overhead", type=int, default=0, metavar="N",
                    help="N sequential searches timed as bare kernel / nodes direct / coordinator (0 = skip)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    logging.basicConfig(level=logging.WARNING)
    from opqn_model.api import FaceEncoder

    dim = FaceEncoder.load(args.model).embedding_dim
    with tempfile.TemporaryDirectory(prefix="facepq-load-") as tmp:
        index = args.index or os.path.join(tmp, "idx")
        if not os.path.exists(index):
            print(f"building a random index of {args.rows} rows in {index} ...", flush=True)
            t0 = time.monotonic()
            build_random_index(args.model, index, args.rows)
            print(f"built in {time.monotonic() - t0:.0f} s", flush=True)
        if args.compare_batching and args.seconds > 0:
            compare_batching(args.model, index, args.clients, args.seconds, args.top_k, args.rounds)
        cluster = start_cluster(args.model, index)
        try:
            print(f"machine: {os.cpu_count()} CPUs; cluster: 2 nodes + coordinator on loopback; index {index}; "
                  f"{load_avg()}")
            if args.overhead:
                before = node_memory(cluster)
                r = overhead_run(cluster, args.model, args.overhead, args.top_k)
                after = node_memory(cluster)
                floor = grpc_floor(r, args.overhead)
                print_overhead(r, before, after, baseline_node_rss(args.model, tmp), args.top_k, floor)
            if args.seconds > 0:
                pids = {"coordinator": cluster.coordinator.pid,
                        **{f"node {i}": n.pid for i, n in enumerate(cluster.nodes)}}
                ref, ref_cpu = cpu_per_request(pids, lambda: node_load(cluster, args.model, args.clients, args.seconds,
                                                                        args.top_k))
                res, res_cpu = cpu_per_request(pids, lambda: coordinator_load(cluster, dim, args.clients, args.seconds,
                                                                              args.top_k))
                print(f"{'path':32s} {'clients':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
                      f"{'incomplete':>10}  ({load_avg()})")
                for name, r in (("nodes direct (reference)", ref), ("coordinator (embedding)", res)):
                    print(f"{name:32s} {args.clients:>7} {r.qps:>9.1f} {r.pct(50):>8.2f} {r.pct(99):>8.2f} "
                          f"{r.errors:>7} {r.incomplete:>10}" + (f"  {r.error_codes}" if r.error_codes else ""))
                if ref.qps:
                    print(f"coordinator throughput = {res.qps / ref.qps:.2f} x the nodes-direct reference")
                for name, cpu in (("nodes direct", ref_cpu), ("through the coordinator", res_cpu)):
                    print(f"CPU a search, {name}: " + ", ".join(f"{p} {ms:.2f}" for p, ms in cpu.items())
                          + f" = {sum(cpu.values()):.2f} ms")
                if ref.requests and res.requests:
                    print(f"CPU a search through the coordinator = {sum(res_cpu.values()) / sum(ref_cpu.values()):.2f} "
                          f"x the nodes-direct path's (steadier than throughput on a shared machine)")
            if args.reloads:
                s = soak(cluster, args.reloads)
                for n in cluster.nodes:
                    rss, fds = s.rss_kb[n.pid], s.fds[n.pid]
                    print(f"soak node pid {n.pid}: {args.reloads} reloads (versions {s.versions[0]}..{s.versions[-1]}); "
                          f"RSS {rss[0] / 1024:.1f} -> {rss[-1] / 1024:.1f} MiB (growth {s.growth(rss) / 1024:+.2f} "
                          f"MiB, max {max(rss) / 1024:.1f}); fds {fds[0]} -> {fds[-1]} (growth {s.growth(fds):+.1f}, "
                          f"max {max(fds)})")
        finally:
            cluster.close()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
