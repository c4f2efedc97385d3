"""One command that measures scan, quality, latency and ingest and writes a Markdown report with plots.

    facepq bench report [--out DIR] [--small] [--data DIR] [--skip scan,quality,latency,ingest]

Writes DIR/report.md and DIR/*.png. Every figure is a ratio to a reference measured in the same
run: scan vs FAISS IndexPQ / FastScan and a single-thread memory-read bound over the same bytes;
mAP vs float features and FAISS OPQ+PQ; coordinator latency vs the nodes queried directly; encode
throughput with 2 actors vs 1. The measurements are the other benchmarks' own functions
(scan_bench.run, model_quality.run, load_bench.*, ingest_bench.bench_actors). `--small` is CI-sized.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import logging
import os
import pathlib
import platform
import sys
import tempfile
import time
import traceback

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

BENCH_DIR = pathlib.Path(__file__).resolve().parent
SECTIONS = ("scan", "quality", "latency", "ingest")
log = logging.getLogger("bench.report")


# ---------------------------------------------------------------- machine


def machine() -> list[str]:
    """Lines describing the machine and library versions."""
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    versions = [f"python {platform.python_version()}", f"numpy {np.__version__}"]
    for mod in ("faiss", "torch", "numba", "grpc", "ray"):
        try:
            versions.append(f"{mod} {getattr(__import__(mod), '__version__', '?')}")
        except ImportError:
            versions.append(f"{mod} not installed")
    return [f"- CPU: {cpu}, {os.cpu_count()} logical cores (shared; load average "
            f"{os.getloadavg()[0]:.1f} at start)",
            f"- RAM: {ram}", f"- {', '.join(versions)}",
            f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- OS: {platform.platform()}"]


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: pathlib.Path) -> None:
    """Lay out, write (72 dpi PNG) and close a report figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


# ---------------------------------------------------------------- scan


def read_bound(nbytes: int, repeats: int = 3) -> float:
    """Seconds for one thread to read `nbytes` of uint8 codes once (numpy sum over them, best of `repeats`).

    The bytes are summed as uint64 words so numpy's loop is limited by reading memory, not by
    per-byte arithmetic. For arrays that fit in cache this is a cache-bandwidth bound.
    """
    buf = np.random.default_rng(0).integers(0, 256, nbytes + (-nbytes) % 8, dtype=np.uint8)
    words = buf.view(np.uint64)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        words.sum()
        best = min(best, time.perf_counter() - t0)
    return best


def section_scan(out: pathlib.Path, sizes: list[int], queries: int, repeats: int, quick: bool = False) -> list[str]:
    """`quick`: FAISS's codebooks trained with the scan benchmark's QUICK_TRAIN_ITERATIONS (--small)."""
    scan = importlib.import_module("bench.scan_bench")
    rows = scan.run(sizes, k=100, queries=queries, repeats=repeats, log=log.info,
                    train_iterations=scan.QUICK_TRAIN_ITERATIONS if quick else scan.TRAIN_ITERATIONS)
    code_bytes = {name: m * nbits // 8 for name, m, nbits, _ in scan.CONFIGS}
    bound = {(n, b): n / read_bound(n * b) for n in sizes for b in set(code_bytes.values())}
    plt = _figure()
    fig, axes = plt.subplots(1, len(scan.CONFIGS), figsize=(12, 3.6), sharey=True)
    for ax, (name, *_rest) in zip(np.atleast_1d(axes), scan.CONFIGS):
        rs = [r for r in rows if r.config == name]
        ns = [r.n for r in rs]
        ax.plot(ns, [r.n / r.ours_ms * 1e3 for r in rs], "o-", label="facepq kernel")
        ax.plot(ns, [r.n / r.faiss_ms * 1e3 for r in rs], "s--", label=f"FAISS {rs[0].faiss_name}")
        ax.plot(ns, [bound[(n, code_bytes[name])] for n in ns], "k:", label="memory read bound")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{name} ({code_bytes[name]} B/code)", fontsize=9)
        ax.set_xlabel("gallery size N (codes)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    np.atleast_1d(axes)[0].set_ylabel("codes/s (1 thread)")
    _save(fig, out / "scan_throughput.png")
    lines = ["## 1. Scan throughput", "",
             f"One thread, top-100, best of {repeats} per query, {queries} queries; random codes loaded into "
             "FAISS and into our kernel (same lookup tables). Memory read bound: a single-thread numpy sum over "
             "the same number of code bytes, measured in this run.", "",
             "![scan throughput](scan_throughput.png)", "",
             "| config | N | ours M codes/s | FAISS | FAISS M codes/s | ours / FAISS | bound M codes/s "
             "| ours / bound | top-k overlap | matches reference |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ours, theirs = r.n / r.ours_ms / 1e3, r.n / r.faiss_ms / 1e3
        b = bound[(r.n, code_bytes[r.config])] / 1e6
        lines.append(f"| {r.config} | {r.n:,} | {ours:.1f} | {r.faiss_name} | {theirs:.1f} | {r.ratio:.2f}x | "
                     f"{b:.0f} | {ours / b:.3f}x | {r.overlap_faiss * 100:.0f}% | {r.exact_vs_reference} |")
    return lines + [""]


# ---------------------------------------------------------------- quality


def section_quality(out: pathlib.Path, work: pathlib.Path, data: str | None, small: bool) -> list[str]:
    mq = importlib.import_module("bench.model_quality")
    mq.OPQ_ITERATIONS = 4 if small else 50
    if data:
        source = f"real photos `{data}` (dlib trunk, frozen; features cached)"
        bits, epochs = ([32], 4) if small else ([32, 48, 64], 4)
        result = mq.run(data, bits, epochs, 0.3, 0, work / "quality")
    else:
        from opqn_model.synthetic import write_faces

        # >= 256 training photos: FAISS trains 256-centroid sub-quantizers on them
        people, photos, bits, epochs = (40, 10, [32], 2) if small else (60, 12, [16, 32, 64], 6)
        data = str(write_faces(work / "synthetic_faces", people, photos, size=32, seed=3))
        source = (f"**synthetic faces** ({people} people x {photos} photos, 32x32, generated) with the resnet20 "
                  f"trunk (width 16) trained end to end for {epochs} epochs per code length, FAISS OPQ with {mq.OPQ_ITERATIONS} rounds - no real photos "
                  "were given or found; numbers show the pipeline works, not real-face quality")
        result = mq.run(data, bits, epochs, 0.3, 0, work / "quality", trunk="resnet20",
                        model_options={"input_size": 32, "trunk_width": 16,
                                       "pipeline": {"size": 32, "mode": "none"}})
    rows = result["rows"]
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    b = [r["bits"] for r in rows]
    ax.plot(b, [r["map_float"] for r in rows], "k:", marker="^", label="float features (cosine)")
    ax.plot(b, [r["map_opqn"] for r in rows], "o-", label="OPQN codes")
    ax.plot(b, [r["map_itq"] for r in rows], "d-.", label="ITQ binary codes (Hamming)")
    ax.plot(b, [r["map_faiss_opq_pq"] for r in rows], "s--", label="FAISS OPQ+PQ")
    ax.set_xlabel("bits per face")
    ax.set_ylabel("mAP (unseen identities)")
    ax.set_xticks(b)
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out / "quality_map.png")
    lines = ["## 2. Retrieval quality (mAP) vs bits", "",
             f"Data: {source}. Unseen identities: {result['n_queries']} queries against a gallery of "
             f"{result['n_gallery']} photos of {result['unseen_people']} people; trained on "
             f"{result['train_photos']} photos of {result['train_people']} other people.", "",
             "![mAP vs bits](quality_map.png)", "",
             "| bits | code | float mAP | OPQN mAP | OPQN / float | ITQ mAP (Hamming) | ITQ / float "
             "| FAISS OPQ+PQ mAP | FAISS / float | OPQN / FAISS |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['M']}x{r['K']} | {r['map_float']:.4f} | {r['map_opqn']:.4f} | "
                     f"{r['opqn_vs_float']:.3f}x | {r['map_itq']:.4f} | {r['itq_vs_float']:.3f}x | "
                     f"{r['map_faiss_opq_pq']:.4f} | {r['faiss_vs_float']:.3f}x | "
                     f"{r['map_opqn'] / max(r['map_faiss_opq_pq'], 1e-9):.3f}x |")
    return lines + [""]


# ---------------------------------------------------------------- latency


def section_latency(out: pathlib.Path, work: pathlib.Path, model: pathlib.Path, rows: int, clients: list[int],
                    seconds: float) -> list[str]:
    lb = importlib.import_module("bench.load_bench")
    from opqn_model.api import FaceEncoder

    dim = FaceEncoder.load(model).embedding_dim
    index = str(work / "latency.idx")
    lb.build_random_index(str(model), index, rows)
    cluster = lb.start_cluster(str(model), index)
    results = []
    try:
        for c in clients:
            ref = lb.node_load(cluster, str(model), c, seconds)
            res = lb.coordinator_load(cluster, dim, c, seconds)
            log.info("%d clients: direct p50 %.2f ms, coordinator p50 %.2f ms", c, ref.pct(50), res.pct(50))
            results.append((c, ref, res))
    finally:
        cluster.close()
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    cs = [c for c, _, _ in results]
    for label, idx, style in (("coordinator", 2, "-"), ("nodes direct", 1, "--")):
        for p, marker in ((50, "o"), (99, "s")):
            ax.plot(cs, [r[idx].pct(p) for r in results], style, marker=marker, label=f"{label} p{p}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(cs)
    ax.set_xticklabels([str(c) for c in cs])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, out / "latency.png")
    lines = ["## 3. End-to-end gRPC latency", "",
             f"A real cluster on loopback: 2 query nodes (shard halves) + a coordinator, index of {rows:,} random "
             f"codes ({model.name}). Each client searches back to back for {seconds:g} s. Coordinator: search by "
             "embedding (lookup tables + fan-out + merge). Reference: the same load straight to both nodes "
             "with precomputed tables.", "", "![latency vs clients](latency.png)", "",
             "| clients | direct req/s | direct p50 ms | direct p99 ms | coord req/s | coord p50 ms | coord p99 ms "
             "| p50 coord / direct | p99 coord / direct | errors | incomplete |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c, ref, res in results:
        lines.append(f"| {c} | {ref.qps:.0f} | {ref.pct(50):.2f} | {ref.pct(99):.2f} | {res.qps:.0f} | "
                     f"{res.pct(50):.2f} | {res.pct(99):.2f} | {res.pct(50) / ref.pct(50):.2f}x | "
                     f"{res.pct(99) / ref.pct(99):.2f}x | {ref.errors + res.errors} | "
                     f"{ref.incomplete + res.incomplete} |")
    return lines + [""]


# ---------------------------------------------------------------- ingest


def section_ingest(work: pathlib.Path, model: pathlib.Path, photos: int, rounds: int = 2) -> list[str]:
    import contextlib
    import io

    import ray

    ib = importlib.import_module("bench.ingest_bench")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed:  # keep its CLI lines out of our output
            rates = ib.bench_actors(model, work / "ingest", photos, rounds=rounds)
    finally:
        ray.shutdown()
    log.info("%s", printed.getvalue().strip())
    order = ", ".join(str(a) for r in range(rounds) for a in ((1, 2) if r % 2 == 0 else (2, 1)))
    lines = ["## 4. Ingest throughput vs encoder actors", "",
             f"Ray pipeline (read, detect/align, encode, write) over {rates[1]['photos']} synthetic 64x64 photos "
             f"with the model {model.name}; steady rate = photos/s once every actor has started and delivered its "
             f"first batch; {'means of ' if rounds > 1 else ''}runs in the order {order}. Reference: 1 actor. "
             f"{os.cpu_count()} CPUs, shared.", "",
             "| actors | photos | wall s | start-up s | photos/s (wall) | vs 1 actor (wall) | steady photos/s "
             "| vs 1 actor (steady) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a in (1, 2):
        r, r1 = rates[a], rates[1]
        # with few photos there may be no batch after the first, so no steady rate: shown as n/a
        steady = f"{r['steady_rate'] / r1['steady_rate']:.2f}x" if r["steady_rate"] and r1["steady_rate"] else "n/a"
        lines.append(f"| {a} | {r['photos']} | {r['wall_s']:.1f} | {r['startup_s']:.1f} | "
                     f"{r['photos'] / r['wall_s']:.1f} | {(r['photos'] / r['wall_s']) / (r1['photos'] / r1['wall_s']):.2f}x"
                     f" | {r['steady_rate']:.0f} | {steady} |")
    return lines + [""]


# ---------------------------------------------------------------- main


def build_report(out: pathlib.Path, small: bool, data: str | None, skip: set[str]) -> int:
    """Run the sections not in `skip`, write out/report.md; returns the number of sections that failed."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.png"):
        stale.unlink()
    failures = 0
    started = time.monotonic()
    lines = [f"# facepq benchmark report{' (CI-sized: --small)' if small else ''}", "",
             "Every figure is compared with a reference measured in the same run on the same machine.", "",
             "## Machine", "", *machine(), ""]
    with tempfile.TemporaryDirectory(prefix="facepq-report-") as tmp:
        work = pathlib.Path(tmp)
        model = None

        def need_model():
            nonlocal model
            if model is None:  # resnet20 width 32 on 64x64 crops, trained 1 epoch on synthetic faces
                model = importlib.import_module("bench.ingest_bench").tiny_model(work / "tiny")
            return model

        plan = {
            # --small: one size, quickly trained codebooks and one round of ingest runs (the sections and their
            # ratios are the same)
            "scan": lambda: section_scan(out, [100_000] if small else [1_000_000, 3_000_000],
                                         1 if small else 3, 2 if small else 3, quick=small),
            "quality": lambda: section_quality(out, work, data, small),
            "latency": lambda: section_latency(out, work, need_model(), 20_000 if small else 1_000_000,
                                               [1, 2] if small else [1, 2, 4, 8], 2.0 if small else 10.0),
            "ingest": lambda: section_ingest(work, need_model(), 40 if small else 3200, 1 if small else 2),
        }
        for name in SECTIONS:
            if name in skip:
                continue
            t0 = time.monotonic()
            log.info("section %s ...", name)
            try:
                lines += plan[name]()
            except Exception as exc:  # one broken section must not hide the others; reported and counted
                failures += 1
                log.error("section %s failed: %s", name, exc)
                lines += [f"## {name}: FAILED", "", "```", traceback.format_exc()[-2000:], "```", ""]
            log.info("section %s took %.0f s", name, time.monotonic() - t0)
    lines += [f"_Generated by `facepq bench report{' --small' if small else ''}` in "
              f"{time.monotonic() - started:.0f} s._", ""]
    (out / "report.md").write_text("\n".join(lines))
    return failures


def main(argv=None) -> int:
    from facepq_core.errors import ConfigError

    ap = argparse.ArgumentParser(prog="facepq bench report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmark-report", help="folder for report.md and the PNG plots")
    ap.add_argument("--small", action="store_true", help="CI-sized run (about 1 minute on 2 cores)")
    ap.add_argument("--data", help="photo folder for the quality section (default ../shared/data/lfw5 if "
                                   "present and not --small, else generated synthetic faces)")
    ap.add_argument("--skip", default="", help=f"comma-separated sections to leave out: {','.join(SECTIONS)}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(SECTIONS):
        raise ConfigError(f"--skip takes {','.join(SECTIONS)}; unknown: {','.join(sorted(skip - set(SECTIONS)))}")
    data = args.data
    if data and not pathlib.Path(data).is_dir():
        raise ConfigError(f"--data {data} is not a folder")
    if data is None and not args.small:
        default = BENCH_DIR.parent.parent / "shared" / "data" / "lfw5"
        data = str(default) if default.is_dir() else None
    out = pathlib.Path(args.out)
    failures = build_report(out, args.small, data, skip)
    print(f"wrote {out / 'report.md'}" + (f" ({failures} section(s) FAILED, see the report)" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH_DIR.parent))
    sys.exit(main())
