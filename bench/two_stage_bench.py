"""Two-stage search time vs single-stage, on a node's in-process search path, at 1M codes.

    python bench/two_stage_bench.py [--rows 1000000] [--queries 300] [--candidates 50,100,500]
    (or `facepq bench twostage`)

One index per refinement tier (codes:256 = 32-byte product codes; float16 = the 128-d
embedding, 256 bytes), one shard, one segment of `rows` faces, 64-bit first-pass codes
(8 x 256), random codes, written by the real IndexWriter. Each query is searched through
`IndexView.search` (what a query node runs for a request: scan kernel with the top-R heap,
the second pass's positional reads and re-scoring, the hits' metadata lookup), top-10,
single-stage and each two-stage setting in turn for the same query, so drift in the
machine's load hits every setting alike. Reported: median and p90 wall ms per query, the
median CPU ms of the searching thread (on a shared machine the wall time also counts the
time other processes held the cores), and each two-stage median over the single-stage
median of the same run (the target: <= 1.5x). References from the same run (FAISS, one
thread, 1M random 128-d vectors, top-10): exact float search (IndexFlatIP: what searching
the float embeddings costs) and IndexPQ with 8 x 8-bit codes (FAISS OPQ+PQ's scan).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np

from bench.entry import run_main

TIERS = ("codes:256", "float16")
EMBEDDING_DIM = 128  # dlib's


def build(path: pathlib.Path, rows: int, kind: str, seed: int = 0):
    """A one-shard index of `rows` random 8 x 256 codes with tier `kind`; returns its RefineTier."""
    from facepq_core.codecs.float16 import Float16Codec
    from facepq_core.codes import CodeSpec
    from facepq_core.refine import RefineTier
    from indexer.manifest import ModelMeta
    from indexer.writer import IndexWriter

    if kind == "float16":
        tier = RefineTier.of(kind, Float16Codec(EMBEDDING_DIM))
    else:
        m = int(kind.split(":")[1]) // 8
        tier = RefineTier(kind=kind, codec="pq", code_bytes=m, query_shape=(m, 256))
    meta = ModelMeta.from_code_spec(CodeSpec(8, 256), fingerprint="b" * 16, trunk="bench", refine=tier)
    rng = np.random.default_rng(seed)
    writer = IndexWriter(str(path), meta, shard_count=1, segment_rows=rows)
    step = 250_000
    for start in range(0, rows, step):
        n = min(step, rows - start)
        ids = np.arange(start + 1, start + n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        codes = rng.integers(0, 256, size=(n, 8), dtype=np.uint8)
        if kind == "float16":
            refine = Float16Codec(EMBEDDING_DIM).encode(rng.standard_normal((n, EMBEDDING_DIM)).astype(np.float32))
        else:
            refine = rng.integers(0, 256, size=(n, tier.code_bytes), dtype=np.uint8)
        writer.add(ids, [f"p{i % 1000}" for i in range(n)], [f"s{start + i}" for i in range(n)], codes, refine)
    writer.commit("two-stage bench")
    return tier


def _refine_table(rng, tier) -> np.ndarray:
    if tier.codec == "float16":
        v = rng.standard_normal(tier.query_shape[1]).astype(np.float32)
        return (v / np.linalg.norm(v))[None, None, :]
    return rng.standard_normal((1, *tier.query_shape)).astype(np.float32)


def measure(path: pathlib.Path, tier, queries: int, candidates: list[int], k: int = 10, seed: int = 1) -> dict:
    """{"times"|"cpu"|"rescore": {setting: [seconds per query]}} for 'single' and 'R=<n>' over the same
    queries, interleaved."""
    from indexer.store import IndexStore
    from query_node.index_view import load_view
    from query_node.scan import warmup
    from query_node.shard_search import ScanStats
    from query_node.two_stage import RefineQuery

    warmup()
    view = load_view(IndexStore(str(path)), [0])
    rng = np.random.default_rng(seed)
    times: dict[str, list[float]] = {"single": [], **{f"R={r}": [] for r in candidates}}
    rescore: dict[str, list[float]] = {f"R={r}": [] for r in candidates}
    cpu: dict[str, list[float]] = {name: [] for name in times}
    for i in range(queries + 5):  # the first 5 warm the caches and are not counted
        lut = rng.standard_normal((1, 8, 256)).astype(np.float32)
        refine = _refine_table(rng, tier)
        for name, series in times.items():
            second = None if name == "single" else RefineQuery(refine, int(name[2:]), tier.kernel)
            stats = ScanStats()
            t0, c0 = time.perf_counter(), time.thread_time()
            view.search(lut, k, [0], stats, second)
            if i >= 5:
                series.append(time.perf_counter() - t0)
                cpu[name].append(time.thread_time() - c0)
                if second is not None:
                    rescore[name].append(stats.rescore_seconds)
    return {"times": times, "cpu": cpu, "rescore": rescore}


def faiss_references(rows: int, queries: int = 50, seed: int = 2) -> dict:
    """{name: median ms per query}: FAISS IndexFlatIP and IndexPQ (8 x 8 bits) over `rows` random unit vectors,
    one thread, top-10 (empty when faiss is not installed)."""
    try:
        import faiss
    except ImportError:
        return {}
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(seed)

    def unit(n):
        v = rng.standard_normal((n, EMBEDDING_DIM)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    flat = faiss.IndexFlatIP(EMBEDDING_DIM)
    pq = faiss.IndexPQ(EMBEDDING_DIM, 8, 8, faiss.METRIC_INNER_PRODUCT)
    pq.train(unit(20_000))
    for start in range(0, rows, 250_000):
        chunk = unit(min(250_000, rows - start))
        flat.add(chunk)
        pq.add(chunk)
    out = {}
    for name, index in (("float, exact (FAISS IndexFlatIP)", flat), ("FAISS IndexPQ 8 x 8 bits", pq)):
        times = []
        for _ in range(queries):
            q = unit(1)
            t0 = time.perf_counter()
            index.search(q, 10)
            times.append(time.perf_counter() - t0)
        out[name] = float(np.median(times)) * 1e3
    return out


def run(rows: int, queries: int, candidates: list[int], work: pathlib.Path | None = None, log=print) -> dict:
    tmp = tempfile.TemporaryDirectory() if work is None else None
    root = pathlib.Path(tmp.name) if tmp is not None else work
    root.mkdir(parents=True, exist_ok=True)
    out = {"rows": rows, "queries": queries, "tiers": {}}
    try:
        for kind in TIERS:
            t0 = time.monotonic()
            tier = build(root / kind.replace(":", "-"), rows, kind)
            log(f"built {rows} rows with tier {kind} in {time.monotonic() - t0:.0f} s")
            res = measure(root / kind.replace(":", "-"), tier, queries, candidates)
            single = float(np.median(res["times"]["single"]))
            single_cpu = float(np.median(res["cpu"]["single"]))
            table = {}
            for name, values in res["times"].items():
                med, cpu = float(np.median(values)), float(np.median(res["cpu"][name]))
                table[name] = {"median_ms": med * 1e3, "p90_ms": float(np.percentile(values, 90)) * 1e3,
                               "vs_single": med / single, "cpu_ms": cpu * 1e3, "cpu_vs_single": cpu / single_cpu,
                               "rescore_ms": float(np.median(res["rescore"][name])) * 1e3 if name in res["rescore"]
                               else 0.0}
            out["tiers"][kind] = {"bytes_per_face": tier.code_bytes, "settings": table}
    finally:
        if tmp is not None:
            tmp.cleanup()
    out["references_ms"] = faiss_references(rows)
    return out


def print_table(result: dict) -> None:
    print(f"{result['rows']:,} codes (8 B, 8 x 256) in one shard, top-10, {result['queries']} queries, "
          f"node's in-process search path (IndexView.search)")
    print(f"{'tier':>10} {'setting':>8} {'median ms':>10} {'p90 ms':>8} {'x single':>9} {'CPU ms':>7} "
          f"{'x single':>9} {'2nd pass ms':>11}")
    for kind, t in result["tiers"].items():
        for name, row in t["settings"].items():
            print(f"{kind:>10} {name:>8} {row['median_ms']:10.2f} {row['p90_ms']:8.2f} {row['vs_single']:9.2f} "
                  f"{row['cpu_ms']:7.2f} {row['cpu_vs_single']:9.2f} {row['rescore_ms']:11.2f}")
    for name, ms in result.get("references_ms", {}).items():
        print(f"reference, same run: {name}: {ms:.2f} ms median")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="facepq bench twostage", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--candidates", default="50,100,500")
    ap.add_argument("--work", type=pathlib.Path, help="folder for the indexes (default: a temporary folder)")
    ap.add_argument("--json")
    return run_main(ap, argv, lambda a: run(a.rows, a.queries, [int(c) for c in a.candidates.split(",")], a.work), print_table)


if __name__ == "__main__":
    sys.exit(main())
