"""`facepq bench <name> [args...]`: benchmarks that print ratios against a reference measured in the same run.

Each benchmark is a module of the `bench` package beside this one in a source checkout
(it is not installed with facepq) with a `main(argv) -> int`; the arguments after the
name are passed through unparsed, so `facepq --help` never imports a benchmark (or
numpy). `facepq bench <name> --help` shows that benchmark's own options. To add one,
append to BENCHES.
"""
from __future__ import annotations

import argparse
import importlib
import pathlib
import sys

from facepq_core.errors import ConfigError

SOURCE_ROOT = pathlib.Path(__file__).resolve().parent.parent
# name -> (module in bench/, help)
BENCHES = {
    "scan": ("scan_bench", "scan kernel vs FAISS IndexPQ / IndexPQFastScan (one thread, same codes)"),
    "popcount": ("popcount_bench", "popcount Hamming kernel vs FAISS IndexBinaryFlat (one thread, same 64-bit codes)"),
    "quality": ("model_quality", ("codes (OPQN, ITQ, two-stage) vs FAISS OPQ+PQ vs float embeddings: unseen people "
                                  "among distractors (--protocol unseen: the older gallery without distractors)")),
    "scratch": ("scratch_quality", ("from-scratch networks (OPQN, OPQN+R-MAC, DMH, DAGH, ITQ) vs their float "
                                    "trunks on face crops: people absent from training (ORL)")),
    "openset": ("open_set", "open-set identification (DIR@FAR) of codes vs float on unseen people with distractors"),
    "http": ("http_bench", "the same searches through the coordinator's HTTP/JSON API and through gRPC"),
    "ingest": ("ingest_bench", "encode throughput 1 vs 2 actors, writer codes/s, 1M-embedding ingest"),
    "twostage": ("two_stage_bench", ("two-stage search (first pass + refinement tier) vs single-stage time at "
                                     "1M codes, node's in-process search path")),
    "load": ("load_bench", "N clients x T s through the coordinator vs nodes direct; hot-reload soak of RSS/fds"),
    "scale": ("scale_bench", ("exhaustive vs cell-partitioned search, 1M..100M codes, vs FAISS IndexPQ / IVFPQ / "
                              "(IVF)PQFastScan on the same codes: latency, throughput, recall, memory, build time")),
    "report": ("report", "all of the above, measured once, as DIR/report.md with PNG plots (--small: CI-sized)"),
}


def bench_module(module: str):
    """Import `bench.<module>` from the source checkout this facepq runs from."""
    if not (SOURCE_ROOT / "bench" / f"{module}.py").is_file():
        raise ConfigError(f"benchmark bench/{module}.py not found under {SOURCE_ROOT}: benchmarks run from a "
                          f"source checkout of facepq")
    if str(SOURCE_ROOT) not in sys.path:
        sys.path.insert(0, str(SOURCE_ROOT))
    return importlib.import_module(f"bench.{module}")


def _run(args) -> int:
    return int(bench_module(BENCHES[args.bench][0]).main(args.bench_args) or 0)


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (ratios against references measured in the same run)",
                              description="Benchmarks; options after the name go to that benchmark "
                                          "(`facepq bench scan --help`).")
    p.add_argument("bench", choices=sorted(BENCHES), metavar="NAME",
                   help="; ".join(f"{n}: {h}" for n, (_, h) in BENCHES.items()))
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(handler=_run)
