"""`facepq bench <name> [args...]`: benchmarks that print ratios against a reference measured in the same run.

Each benchmark is a script bench/<file> beside the package (a source checkout) with a
`main(argv) -> int`; the arguments after the name are passed through unparsed, so
`facepq --help` never imports a benchmark (or numpy). `facepq bench <name> --help`
shows that benchmark's own options. To add one, append to BENCHES.
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

from facepq.errors import ConfigError

BENCH_DIR = pathlib.Path(__file__).resolve().parent.parent / "bench"
# name -> (file in bench/, help)
BENCHES = {
    "scan": ("scan_bench.py", "scan kernel vs FAISS IndexPQ / IndexPQFastScan (one thread, same codes)"),
    "quality": ("model_quality.py", "OPQN codes vs FAISS OPQ+PQ vs float embeddings, unseen identities"),
    "ingest": ("ingest_bench.py", "encode throughput 1 vs 2 actors, writer codes/s, 1M-embedding ingest"),
    "load": ("load_bench.py", "N clients x T s through the coordinator vs nodes direct; hot-reload soak of RSS/fds"),
    "report": ("report.py", "all of the above, measured once, as DIR/report.md with PNG plots (--small: CI-sized)"),
}


def _load(filename: str):
    path = BENCH_DIR / filename
    if not path.is_file():
        raise ConfigError(f"benchmark file {path} not found: benchmarks run from a source checkout of facepq")
    name = f"facepq_bench_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _run(args) -> int:
    return int(_load(BENCHES[args.bench][0]).main(args.bench_args) or 0)


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (ratios against references measured in the same run)",
                              description="Benchmarks; options after the name go to that benchmark "
                                          "(`facepq bench scan --help`).")
    p.add_argument("bench", choices=sorted(BENCHES), metavar="NAME",
                   help="; ".join(f"{n}: {h}" for n, (_, h) in BENCHES.items()))
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(handler=_run)
