"""Load and soak benchmark of a real cluster on loopback: 2 query nodes + a coordinator.

Load: N client threads search by embedding through the coordinator for T seconds;
prints throughput, p50/p99 latency, errors and incomplete answers. The reference in
the same run is the same load sent straight to the nodes' Search with precomputed
lookup tables (no model, no fan-out), so the ratio shows what the coordinator costs.

Soak: K hot reloads (each a real commit that deletes and re-enrols a face, so the
number of live segments stays constant) while the nodes keep serving; after each
reload the nodes' resident memory (VmRSS) and open file descriptors are read from
/proc. A leak shows as growth from the first reloads to the last.

Run: python bench/load_bench.py --model model.pt [--rows 200000] [--clients 8] [--seconds 20] [--reloads 50]
(the index is random codes with the model's fingerprint, built in a temporary folder unless --index is given)
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
from dataclasses import dataclass, field

import numpy as np

from facepq.server_process import ServerProcess

REPO = pathlib.Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- processes


class Server(ServerProcess):
    """A `facepq node|coordinator` process; `.address` once it printed 'listening on'."""

    def __init__(self, args, timeout=120):
        super().__init__(args, timeout=timeout)


@dataclass
class Cluster:
    index: str
    nodes: list[Server]
    coordinator: Server

    def close(self) -> None:
        for s in [self.coordinator, *self.nodes]:
            s.kill()


def start_cluster(model: str, index: str, poll: float = 0.2) -> Cluster:
    """Two nodes (shard halves) and a coordinator with a static node list; the caller closes it."""
    from indexer.store import IndexStore

    shards = IndexStore(index).load_manifest().shard_count
    halves = [list(range(0, max(1, shards // 2))), list(range(max(1, shards // 2), shards)) or [0]]
    nodes = []
    try:
        for part in halves:
            nodes.append(Server(["node", "--index", index, "--shards", ",".join(map(str, part)), "--poll", poll]))
        coord = Server(["coordinator", "--model", model, "--index", index, "--nodes",
                        ",".join(n.address for n in nodes)])
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


def node_load(cluster: Cluster, model: str, clients: int, seconds: float, top_k: int = 10) -> LoadResult:
    """Reference: the same searches straight to the nodes (tables precomputed, both nodes per request)."""
    import grpc

    from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
    from opqn_model.api import FaceEncoder

    enc = FaceEncoder.load(model)
    rng = np.random.default_rng(7)
    tables = np.asarray(enc.lookup_tables(rng.standard_normal((64, enc.embedding_dim)).astype(np.float32)),
                        np.float32)
    msgs = [facepq_pb2.LookupTable(m=t.shape[0], k=t.shape[1], values=t.reshape(-1).tolist()) for t in tables]
    stubs = [facepq_pb2_grpc.QueryNodeStub(grpc.insecure_channel(n.address)) for n in cluster.nodes]

    def call(req):
        futures = [s.Search.future(req, timeout=30) for s in stubs]
        return [f.result() for f in futures][-1]

    return run_load(call, clients, seconds,
                    lambda r: facepq_pb2.NodeSearchRequest(tables=[msgs[int(r.integers(len(msgs)))]], top_k=top_k))


# ---------------------------------------------------------------- soak


def proc_usage(pid: int) -> tuple[int, int]:
    """(resident memory in KiB, open file descriptors) of a process, from /proc."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


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


def main(argv=None) -> int:
    import logging

    ap = argparse.ArgumentParser(prog="facepq bench load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="trained checkpoint (.pt)")
    ap.add_argument("--index", help="existing index of this model (default: random codes in a temporary folder)")
    ap.add_argument("--rows", type=int, default=200_000, help="rows of the random index")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--reloads", type=int, default=50, help="hot reloads in the soak (0 = no soak)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from opqn_model.api import FaceEncoder

    dim = FaceEncoder.load(args.model).embedding_dim
    with tempfile.TemporaryDirectory(prefix="facepq-load-") as tmp:
        index = args.index or os.path.join(tmp, "idx")
        if not args.index:
            print(f"building a random index of {args.rows} rows ...", flush=True)
            build_random_index(args.model, index, args.rows)
        cluster = start_cluster(args.model, index)
        try:
            print(f"machine: {os.cpu_count()} CPUs; cluster: 2 nodes + coordinator on loopback; index {index}")
            ref = node_load(cluster, args.model, args.clients, args.seconds, args.top_k)
            res = coordinator_load(cluster, dim, args.clients, args.seconds, args.top_k)
            print(f"{'path':32s} {'clients':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
                  f"{'incomplete':>10}")
            for name, r in (("nodes direct (reference)", ref), ("coordinator (embedding)", res)):
                print(f"{name:32s} {args.clients:>7} {r.qps:>9.1f} {r.pct(50):>8.2f} {r.pct(99):>8.2f} "
                      f"{r.errors:>7} {r.incomplete:>10}" + (f"  {r.error_codes}" if r.error_codes else ""))
            if ref.qps:
                print(f"coordinator throughput = {res.qps / ref.qps:.2f} x the nodes-direct reference")
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
