"""Scale: exhaustive vs cell-partitioned search from 1M to 100M codes, against FAISS on the same codes, one run.

For each size N and code layout (8-bit M=8 K=256 and 4-bit M=16 K=16, both 64-bit codes):

* data: N vectors of a Gaussian mixture in 32 dims (N/1000 centres, so cells mean something), encoded by
  one FAISS product quantizer (L2). Our index stores exactly those codes; our lookup tables are
  -|q_m - c_mk|^2 from the same quantizer, so our scores are FAISS's ADC distances, negated.
  `--model` adds a row set on the model's real code distribution: cached trunk embeddings
  (FACEPQ_CACHE) replicated with noise (up to 2^19 distinct noisy codes, tiled to N) and encoded by the
  model's codec; held-out embeddings with noise are the queries (ours only: FAISS has no such codec).
* ours: a real index written by IndexWriter (1 shard; `--cells` cells, default 4*sqrt(N) rounded to a
  power of two, at most 1024; segments of `--segment-rows` rows, default the writer's 1M) and searched
  through the node's in-process path (IndexView.search: kernels, cell ranges, metadata lookup),
  exhaustive (nprobe=0) and at each --nprobe. A search of some cells reads a row range per cell in
  every segment, so `--segment-rows` lets a smaller gallery have as many ranges as a larger one
  (10M rows in segments of 100k: the 100 segments of a 100M index).
* FAISS: IndexPQ (8-bit) or IndexPQFastScan (4-bit) on the same codes; IndexIVFPQ (8-bit) or
  IndexIVFPQFastScan (4-bit) with by_residual=False and the same quantizer (so the same codes inside
  its lists), its coarse quantizer k-means on the vectors, the same number of lists, at each nprobe.

Measured per method: single-query latency p50/p99 (one thread), batch throughput (--batch queries a
call) with 1 and 2 threads (ours: two threads each searching half a batch, our kernel being
single-threaded per call; FAISS: OpenMP threads), recall@10 and @100 against the same family's
exhaustive answer (ours vs our exhaustive scan, FAISS IVF vs IndexPQ), bytes the method keeps in
memory, and build time. Writes OUT/scale.json, OUT/scale.md and OUT/latency_vs_n.png.

    facepq bench scale --sizes 1000000,10000000 [--out DIR]      facepq bench scale --small
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

DIM = 32
LAYOUTS = {"8bit": (8, 8), "4bit": (16, 4)}  # name -> (M, nbits)
CHUNK = 1_000_000
REAL_POOL = 1 << 19  # distinct noisy codes of real embeddings (tiled to larger sizes)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


# ---------------------------------------------------------------- data
def mixture_chunk(seed: int, centres: np.ndarray, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, len(centres), size=n)]
    return (x + 0.35 * rng.standard_normal(x.shape, dtype=np.float32)).astype(np.float32)


class Synthetic:
    """N mixture vectors, produced chunk by chunk (never all at once), and queries from the same mixture."""

    def __init__(self, n: int, seed: int, queries: int):
        rng = np.random.default_rng(seed)
        self.n, self.seed = n, seed
        self.centres = rng.standard_normal((max(16, n // 1000), DIM)).astype(np.float32)
        self.queries = mixture_chunk(seed + 7919, self.centres, queries)

    def chunks(self):
        for i, lo in enumerate(range(0, self.n, CHUNK)):
            yield mixture_chunk(self.seed * 1000 + i, self.centres, min(CHUNK, self.n - lo))

    def sample(self, n: int) -> np.ndarray:
        return mixture_chunk(self.seed + 104729, self.centres, n)


def pq_centroids(pq) -> np.ndarray:
    """float32 [M, K, dsub] of a FAISS ProductQuantizer."""
    import faiss

    return faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)


def pq_tables(pq, queries: np.ndarray) -> np.ndarray:
    """float32 [Q, M, K]: -|q_m - c_mk|^2 (higher is better), the FAISS quantizer's own centroids."""
    cent = pq_centroids(pq)
    sub = queries.reshape(len(queries), pq.M, 1, pq.dsub)
    return -np.square(sub - cent[None]).sum(-1).astype(np.float32)


# ---------------------------------------------------------------- timing
def percentiles(ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def time_single(fn, queries: int) -> list[float]:
    out = []
    for i in range(queries):
        t0 = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def batch_throughput(fn_batch, queries: int, batch: int, threads: int) -> float:
    """Queries per second answering `queries` queries in calls of `batch`, over `threads` threads."""
    starts = list(range(0, queries - batch + 1, batch)) or [0]
    per = max(1, batch // threads)
    work = [(s + t * per, s + min(batch, (t + 1) * per)) for s in starts for t in range(threads)]
    t0 = time.perf_counter()
    if threads == 1:
        for lo, hi in work:
            fn_batch(lo, hi)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda w: fn_batch(*w), work))
    return len(starts) * batch / (time.perf_counter() - t0)


def recall(found: list[list[int]], truth: list[list[int]], k: int) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / max(1, min(k, len(t))) for f, t in zip(found, truth)]))


# ---------------------------------------------------------------- ours
def build_ours(root: pathlib.Path, codes_iter, meta, cells: int | None, codewords=None, segment_rows=None,
               total: int = 0, log=lambda line: None):
    """Write the codes as a one-shard index with the real IndexWriter; seconds taken. Logs progress every
    tenth of `total` rows (a 100M build takes many minutes)."""
    from indexer.writer import DEFAULT_SEGMENT_ROWS, IndexWriter

    t0 = time.perf_counter()
    import pyarrow as pa

    writer = IndexWriter(str(root), meta, shard_count=1, cells=cells, codewords=codewords,
                         segment_rows=segment_rows or DEFAULT_SEGMENT_ROWS)
    first, next_report = 0, total // 10
    for codes in codes_iter:
        n = len(codes)
        ids = np.arange(first, first + n, dtype=np.uint64)
        names = pa.repeat(pa.scalar("x"), n)
        writer.add(ids, names, names, codes)
        first += n
        if total >= 10 and first >= next_report and first < total:
            log(f"    ours: {first:,} of {total:,} codes written ({time.perf_counter() - t0:.0f} s)")
            next_report = first + total // 10
    writer.commit("bench scale")
    return time.perf_counter() - t0


def measure_ours(root, tables, args, nprobes, log) -> tuple[list[dict], list[list[int]]]:
    """Our rows: nprobe=all (the exhaustive scan: every cell) and each nprobe below the cell count; and the
    exhaustive top-100 face ids of each query (the truth other rows are measured against)."""
    from indexer.store import IndexStore
    from query_node.index_view import load_view
    from query_node.shard_search import ScanStats

    view = load_view(IndexStore(str(root)), [0])
    data = view.shards[0]
    part_bytes = view.cell_probe.nbytes if view.cell_probe is not None else 0
    offsets_bytes = sum(s.cell_offsets.nbytes for s in data.segments if s.cell_offsets is not None)
    offsets_bytes += data.cell_layout().nbytes  # the shard's table of all segments' offsets, a second copy

    def ids(hits):
        return [h.face_id for h in hits]

    truth10 = [ids(view.search(tables[i:i + 1], 10, [0])[0]) for i in range(len(tables))]
    truth100 = [ids(view.search(tables[i:i + 1], 100, [0])[0]) for i in range(len(tables))]
    rows = []
    for nprobe in [0] + [p for p in nprobes if view.cell_probe is not None and p < view.cell_probe.cells]:
        view.search(tables[:1], 10, [0], nprobe=nprobe)  # warm
        scan_ms = []

        def one(i):
            stats = ScanStats()
            view.search(tables[i:i + 1], 10, [0], stats, nprobe=nprobe)
            scan_ms.append(stats.scan_seconds * 1e3)

        lat = time_single(one, len(tables))
        got10 = [ids(view.search(tables[i:i + 1], 10, [0], nprobe=nprobe)[0]) for i in range(len(tables))]
        got100 = [ids(view.search(tables[i:i + 1], 100, [0], nprobe=nprobe)[0]) for i in range(len(tables))]
        tput = {t: batch_throughput(lambda lo, hi: view.search(tables[lo:hi], 10, [0], nprobe=nprobe),
                                    len(tables), args.batch, t) for t in args.threads}
        p50, p99 = percentiles(lat)
        rows.append(dict(method="ours exhaustive" if not nprobe else "ours cells", nprobe=nprobe or "all",
                         cells=view.cell_probe.cells if view.cell_probe is not None else 0, p50_ms=p50, p99_ms=p99,
                         scan_p50_ms=float(np.median(scan_ms)),
                         qps={str(t): q for t, q in tput.items()}, recall10=recall(got10, truth10, 10),
                         recall100=recall(got100, truth100, 100),
                         memory_bytes=data.code_bytes + part_bytes + offsets_bytes))
        log_row(log, rows[-1])
        if not nprobe:
            rows += split_rows(view, tables, args, truth10, rows[-1], log)
    return rows, truth100


def split_rows(view, tables, args, truth10, exhaustive: dict, log) -> list[dict]:
    """One query's exhaustive scan split over t native threads (the node's `--threads`): its latency, and
    its answer against the one-thread answer (the same by construction; measured, not assumed)."""
    rows = []
    for t in [t for t in args.threads if t > 1]:
        def search(i):
            return [h.face_id for h in view.search(tables[i:i + 1], 10, [0], threads=t)[0]]

        search(0)  # warm
        lat = time_single(search, len(tables))
        got10 = [search(i) for i in range(len(tables))]
        p50, p99 = percentiles(lat)
        row = {k: v for k, v in exhaustive.items() if k != "scan_p50_ms"}  # the kernel's share is not split out
        row.update(method=f"ours exhaustive, one query on {t} threads", p50_ms=p50, p99_ms=p99, qps={},
                   recall10=recall(got10, truth10, 10))
        rows.append(row)
        log_row(log, rows[-1])
    return rows


def measure_device(codes, spec, tables, truth, args, log) -> list[dict]:
    """The batched scan on a torch device (query_node.device_scan): one query at a time, then batches of
    `args.batch`, with recall against `truth`, our exhaustive top-100 (equal by construction; measured, not
    assumed)."""
    from query_node.device_scan import DeviceCodes

    t0 = time.perf_counter()
    device = DeviceCodes(codes, spec, args.device_scan)  # face ids are row numbers in these indexes
    build_s = time.perf_counter() - t0  # unpacked and copied to the device
    device.search(tables[:args.batch], 10)  # warm: kernels loaded, memory allocated
    lat = time_single(lambda i: device.search(tables[i:i + 1], 10), len(tables))
    got = [list(r) for r in device.search(tables, 100)[1]]
    qps = batch_throughput(lambda lo, hi: device.search(tables[lo:hi], 10), len(tables), args.batch, 1)
    p50, p99 = percentiles(lat)
    row = dict(method=f"ours {args.device_scan} batched scan", nprobe="all", cells=0, p50_ms=p50, p99_ms=p99,
               qps={"1": qps}, recall10=recall(got, truth, 10), recall100=recall(got, truth, 100),
               memory_bytes=device.nbytes, build_s=build_s)
    log_row(log, row)
    return [row]


def device_scan_choice(name: str | None) -> str | None:
    """--device-scan: None (default) = "cuda" where torch sees one, else no rows; "none" = no rows.

    Raises ConfigError for a device torch cannot name or use here."""
    from facepq_core.errors import ConfigError

    try:
        import torch
    except ImportError:
        if name in (None, "none"):
            return None
        raise ConfigError(f"--device-scan {name}: torch is not installed") from None
    if name is None:
        return "cuda" if torch.cuda.is_available() else None
    if name == "none":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"--device-scan {name}: not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device-scan {name}: torch sees no CUDA device on this machine")
    return name


# ---------------------------------------------------------------- FAISS
def build_faiss(data: Synthetic, m: int, nbits: int, cells: int, seed: int, with_ivf: bool = True):
    """(flat index, IVF index (None without `with_ivf`), seconds to build each, the codes (uint8 chunks), objects
    the indexes point at without owning them: keep them alive while the indexes are used)."""
    import faiss

    sample = data.sample(max(256 * 40, 40 * cells))
    t0 = time.perf_counter()
    pq_index = faiss.IndexPQ(DIM, m, nbits)
    pq_index.pq.cp.seed = seed
    pq_index.train(sample)
    train_s = time.perf_counter() - t0
    km = faiss.Kmeans(DIM, cells, niter=10, seed=seed)
    t1 = time.perf_counter()
    km.train(sample)
    quant = faiss.IndexFlatL2(DIM)
    quant.add(km.centroids)
    ivf = faiss.IndexIVFPQ(quant, DIM, cells, m, nbits)
    ivf.by_residual = False
    ivf.pq = pq_index.pq
    ivf.is_trained = True
    ivf_train_s = time.perf_counter() - t1
    codes, flat_s, ivf_s = [], 0.0, 0.0
    for x in data.chunks():
        t = time.perf_counter()
        c = pq_index.sa_encode(x)
        pq_index.add_sa_codes(c)
        flat_s += time.perf_counter() - t
        t = time.perf_counter()
        if with_ivf:
            ivf.add(x)
        ivf_s += time.perf_counter() - t
        codes.append(c)
    if nbits == 4:
        t = time.perf_counter()
        flat = faiss.IndexPQFastScan(pq_index)
        flat_s += time.perf_counter() - t
        t = time.perf_counter()
        ivf = faiss.IndexIVFPQFastScan(ivf) if with_ivf else ivf
        ivf_s += time.perf_counter() - t
    else:
        flat = pq_index
    # The indexes point at these without owning them: kept alive for as long as the indexes are used.
    return flat, ivf if with_ivf else None, train_s + flat_s, ivf_train_s + ivf_s, codes, [quant, pq_index]


def measure_faiss(flat, ivf, queries, nprobes, args, nbits, log) -> list[dict]:
    import faiss

    faiss.omp_set_num_threads(1)
    _, t10 = flat.search(queries, 10)
    _, t100 = flat.search(queries, 100)
    truth10, truth100 = t10.tolist(), t100.tolist()
    rows = []
    flat_name = "FAISS IndexPQFastScan" if nbits == 4 else "FAISS IndexPQ"
    ivf_name = "FAISS IndexIVFPQFastScan" if nbits == 4 else "FAISS IndexIVFPQ"
    ivf_rows = [(ivf_name, ivf, p) for p in nprobes if p < ivf.nlist] if ivf is not None else []
    for name, index, nprobe in [(flat_name, flat, None)] + ivf_rows:
        if nprobe is not None:
            index.nprobe = nprobe
        faiss.omp_set_num_threads(1)
        index.search(queries[:1], 10)
        lat = time_single(lambda i: index.search(queries[i:i + 1], 10), len(queries))
        got10 = index.search(queries, 10)[1].tolist()
        got100 = index.search(queries, 100)[1].tolist()
        tput = {}
        for t in args.threads:
            faiss.omp_set_num_threads(t)
            tput[str(t)] = batch_throughput(lambda lo, hi: index.search(queries[lo:hi], 10), len(queries),
                                            args.batch, 1)
        faiss.omp_set_num_threads(1)
        p50, p99 = percentiles(lat)
        memory = faiss.serialize_index(index).nbytes
        rows.append(dict(method=name, nprobe=nprobe or "all", cells=ivf.nlist if nprobe else 0, p50_ms=p50,
                         p99_ms=p99, qps=tput, recall10=recall(got10, truth10, 10),
                         recall100=recall(got100, truth100, 100), memory_bytes=int(memory)))
        log_row(log, rows[-1])
    return rows


def log_row(log, r: dict) -> None:
    qps = " ".join(f"{t}t {q:8.0f} q/s" for t, q in r["qps"].items())
    scan = f" (scan {r['scan_p50_ms']:.3f})" if "scan_p50_ms" in r else ""
    log(f"    {r['method']:26s} nprobe {str(r['nprobe']):>4s}  p50 {r['p50_ms']:8.3f} ms{scan}  p99 {r['p99_ms']:8.3f} ms  "
        f"{qps}  recall@10 {r['recall10']:.3f}  @100 {r['recall100']:.3f}  mem {r['memory_bytes'] / 2**20:7.1f} MiB")


# ---------------------------------------------------------------- real codes
def real_embeddings(dim: int) -> np.ndarray | None:
    """Cached trunk embeddings of `dim` dims (FACEPQ_CACHE), unit length; None when there are too few."""
    import sqlite3

    from opqn_model.feature_cache import default_root

    path = default_root() / "features.sqlite"
    if not path.exists():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        blobs = [r[0] for r in conn.execute("select vector from features where vector is not null and dim = ?",
                                            (dim,))]
    finally:
        conn.close()
    if len(blobs) < 200:
        return None
    x = np.stack([np.frombuffer(b, dtype=np.float32) for b in blobs])
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def run_real(model_path: str, n: int, args, work: pathlib.Path, nprobes, log) -> list[dict]:
    from indexer.job import load_model_info
    from opqn_model.checkpoint import load_checkpoint
    from opqn_model.methods import get_method

    meta, _, dim = load_model_info(model_path)
    payload = load_checkpoint(model_path)
    codec = get_method(payload["method"]).codec(payload)
    base = real_embeddings(dim)
    if base is None:
        log(f"  real codes: no cached {dim}-d embeddings under FACEPQ_CACHE; skipped")
        return []
    rng = np.random.default_rng(args.seed)
    held = rng.permutation(len(base))
    query_base, gallery_base = base[held[:args.queries]], base[held[args.queries:]]

    def noisy(x, seed):
        r = np.random.default_rng(seed)
        y = x + 0.15 * r.standard_normal(x.shape, dtype=np.float32) / math.sqrt(dim)
        return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)

    # At most REAL_POOL noisy copies are encoded (the codec's logits cost M*d*K per row in numpy loops:
    # minutes per million rows here); the gallery tiles that pool of codes to N rows.
    pool_rows = min(n, REAL_POOL)
    step = 1 << 16  # the codec's logits are [rows, M, K] float32: 8 KiB a row for 8x256
    x = noisy(gallery_base[np.arange(pool_rows) % len(gallery_base)], args.seed)
    pool = np.concatenate([codec.encode(x[j:j + step]) for j in range(0, len(x), step)])
    del x

    def codes_iter():
        for lo in range(0, n, CHUNK):
            yield pool[np.arange(lo, lo + min(CHUNK, n - lo)) % pool_rows]

    cells = args.cells or default_cells(n)
    root = work / f"real-{n}"
    build_s = build_ours(root, codes_iter(), meta, cells, codec.codewords(), args.segment_rows, n, log)
    tables = codec.query_tables(noisy(query_base, args.seed + 99991))
    log(f"  real codes ({meta.trunk} {meta.codec} M={meta.M} K={meta.K}, {len(gallery_base)} embeddings replicated "
        f"with noise to {pool_rows:,} codes, tiled to {n:,}; {cells} cells): built in {build_s:.1f} s")
    rows, _ = measure_ours(root, tables, args, nprobes, log)
    for r in rows:
        r.update(build_s=build_s, data="real", layout=f"{meta.codec} M={meta.M} K={meta.K}", n=n)
    return rows


# ---------------------------------------------------------------- driver
def default_cells(n: int) -> int:
    return int(min(1024, max(16, 2 ** round(math.log2(4 * math.sqrt(n))))))


def run_size(n: int, args, work: pathlib.Path, log, report=lambda rows: None) -> list[dict]:
    from facepq_core.codes import CodeSpec
    from indexer.manifest import ModelMeta

    rows = []
    cells = args.cells or default_cells(n)
    nprobes = [p for p in args.nprobe if p < cells]
    for layout in args.layouts:
        m, nbits = LAYOUTS[layout]
        data = Synthetic(n, args.seed, args.queries)
        rss0 = rss_bytes()
        flat, ivf, flat_s, ivf_s, codes, keep = build_faiss(data, m, nbits, cells, args.seed, not args.no_faiss_ivf)
        spec = CodeSpec(M=m, K=2 ** nbits)
        meta = ModelMeta.from_code_spec(spec, fingerprint="bench-pq-%d-%d" % (m, nbits), trunk="synthetic", codec="pq")
        pq = keep[1].pq  # the flat IndexPQ the others copied their quantizer from
        tables = pq_tables(pq, data.queries)
        log(f"  {layout} M={m} K={2 ** nbits}, N={n:,}, {cells} cells: FAISS flat built in {flat_s:.1f} s, "
            f"IVF in {ivf_s:.1f} s")
        # One index with cells: nprobe=all scans every cell, which is the exhaustive scan (same rows, same scores).
        root = work / f"{layout}-{n}"
        build_s = build_ours(root, iter(codes), meta, cells, pq_centroids(pq), args.segment_rows, n, log)
        log(f"  ours built in {build_s:.1f} s (index writer: cells fitted and assigned, segments written and hashed)")
        family, truth = measure_ours(root, tables, args, nprobes, log)
        for r in family:
            r["build_s"] = build_s
        if args.device_scan:
            family += measure_device(codes, spec, tables, truth, args, log)
        del codes
        fam = measure_faiss(flat, ivf, data.queries, nprobes, args, nbits, log)
        for r in fam:
            r["build_s"] = ivf_s if "IVF" in r["method"] else flat_s
        for r in family + fam:
            r.update(data="synthetic", layout=f"{layout} M={m} K={2 ** nbits}", n=n)
        rows += family + fam
        log(f"  process RSS {rss_bytes() / 2**20:.0f} MiB (was {rss0 / 2**20:.0f} MiB before this layout)")
        del flat, ivf, keep
        report(rows)
    if args.model:
        rows += run_real(args.model, n, args, work, nprobes, log)
        report(rows)
    return rows


def write_report(out: pathlib.Path, rows: list[dict], header: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    lines = ["# facepq bench scale", "", *(f"- {k}: {v}" for k, v in header.items()), "",
             "| data | layout | N | method | cells | nprobe | p50 ms | ours: scan p50 ms | p99 ms | "
             + " | ".join(f"q/s {t}t" for t in header["threads"]) + " | recall@10 | recall@100 | memory MiB | build s |",
             "|" + "---|" * (13 + len(header["threads"]))]
    for r in rows:
        scan = f"{r['scan_p50_ms']:.3f}" if "scan_p50_ms" in r else "-"
        lines.append(f"| {r['data']} | {r['layout']} | {r['n']:,} | {r['method']} | {r['cells'] or '-'} | "
                     f"{r['nprobe']} | {r['p50_ms']:.3f} | {scan} | {r['p99_ms']:.3f} | "
                     + " | ".join(f"{r['qps'].get(str(t), 0):.0f}" for t in header["threads"])
                     + f" | {r['recall10']:.3f} | {r['recall100']:.3f} | {r['memory_bytes'] / 2**20:.1f} | "
                       f"{r['build_s']:.1f} |")
    plot = plot_latency(out, rows)
    if plot:
        lines += ["", f"![single-query p50 latency against N]({plot})"]
    (out / "scale.md").write_text("\n".join(lines) + "\n")


def plot_latency(out: pathlib.Path, rows: list[dict]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict = {}
    for r in rows:
        series.setdefault(f"{r['data']} {r['layout']}: {r['method']} nprobe={r['nprobe']}", []).append(
            (r["n"], r["p50_ms"]))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("codes N")
    ax.set_ylabel("single-query p50 latency (ms), top-10")
    ax.legend(fontsize=6)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "latency_vs_n.png", dpi=110)
    plt.close(fig)
    return "latency_vs_n.png"


def parse_ints(text: str, what: str) -> list[int]:
    from facepq_core.errors import ConfigError

    try:
        values = [int(s.replace("_", "")) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{what} must be positive integers, got {text!r}")
    return values


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="facepq bench scale", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, help="codes per run, comma-separated (default 1000000,10000000)")
    ap.add_argument("--small", action="store_true",
                    help="the same comparison at 200,000 codes (unless --sizes) with at most 32 queries: a few minutes")
    ap.add_argument("--nprobe", default="1,4,16,64", help="cells scanned, comma-separated (also FAISS nprobe)")
    ap.add_argument("--cells", type=int, default=None, help="cells (and FAISS lists); default 4*sqrt(N), <= 1024")
    ap.add_argument("--layouts", default="8bit,4bit", help="8bit (M=8 K=256) and/or 4bit (M=16 K=16)")
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16, help="queries per call in the throughput rows")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--no-faiss-ivf", action="store_true",
                    help="skip FAISS's IVF rows (its build: ~10 min at 100M); its flat index stays the reference")
    ap.add_argument("--segment-rows", type=int, default=None,
                    help="rows per segment file (default: the writer's, 1,000,000); fewer rows per segment "
                         "give a smaller gallery as many segments (and cell ranges per search) as a larger one")
    ap.add_argument("--model", default=None, help="an OPQN checkpoint: add rows on its real code distribution")
    ap.add_argument("--device-scan", default=None, metavar="DEVICE",
                    help="also scan the codes on this torch device, in batches (query_node/device_scan.py): "
                         "'cuda', 'cuda:1', 'cpu'; default: cuda where torch sees one, else no such rows; "
                         "'none' = no such rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-scale", help="report folder")
    ap.add_argument("--work", default=None, help="folder for the indexes (default: a temporary folder)")
    args = ap.parse_args(argv)
    from facepq_core.errors import ConfigError

    if args.small:
        args.sizes, args.queries = args.sizes or "200000", min(args.queries, 32)
    args.sizes = args.sizes or "1000000,10000000"
    sizes = parse_ints(args.sizes, "--sizes")
    args.nprobe = parse_ints(args.nprobe, "--nprobe")
    args.threads = parse_ints(args.threads, "--threads")
    args.layouts = [s for s in args.layouts.split(",") if s]
    if set(args.layouts) - set(LAYOUTS):
        raise ConfigError(f"--layouts takes {', '.join(LAYOUTS)}, got {args.layouts}")
    if args.queries < args.batch or min(sizes) < 1000:
        raise ConfigError("need --queries >= --batch and sizes >= 1000")
    args.device_scan = device_scan_choice(args.device_scan)
    if args.segment_rows is not None and args.segment_rows < 1000:
        raise ConfigError(f"--segment-rows must be >= 1000, got {args.segment_rows}")
    if args.work is not None:   # a folder that does not exist yet is made, like --out
        try:
            pathlib.Path(args.work).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--work {args.work}: cannot make the folder ({exc.strerror})") from exc
    import numba

    from indexer.writer import DEFAULT_SEGMENT_ROWS
    from query_node import fastscan

    numba.set_num_threads(1)
    header = {"machine": machine_line(), "load average at start": load_average(),
              "4-bit kernel": fastscan.status(), "sizes": sizes, "queries": args.queries, "batch": args.batch,
              "threads": args.threads, "nprobe": args.nprobe,
              "segment rows": args.segment_rows or DEFAULT_SEGMENT_ROWS,
              "device scan": args.device_scan or "none (no CUDA device here)",
              "command": "facepq bench scale " + " ".join(argv or sys.argv[1:])}
    log = print
    log(f"scale benchmark: {header['machine']}; load {header['load average at start']}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="facepq-scale-", dir=args.work) as work:
        for n in sizes:
            def report(partial, done=list(rows)):  # after every layout: a partial run still reports
                header["load average at end"] = load_average()
                write_report(pathlib.Path(args.out), done + partial, header)

            rows += run_size(n, args, pathlib.Path(work), log, report)
            report([], rows)
    log(f"report: {pathlib.Path(args.out) / 'scale.md'}; load at end {load_average()}")
    return 0


def machine_line() -> str:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs"


if __name__ == "__main__":
    sys.exit(main())
