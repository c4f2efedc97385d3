"""`facepq bench <what>`: benchmarks that print ratios against a reference measured in the same run.

Each benchmark lives in bench/<name>_bench.py beside the package (source checkout) and
exposes `add_arguments(parser)` and `main_args(args)`. To add one, append to BENCHES.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

from facepq.errors import ConfigError

BENCH_DIR = pathlib.Path(__file__).resolve().parent.parent / "bench"
# name -> (file in bench/, help)
BENCHES = {
    "scan": ("scan_bench.py", "scan kernel vs FAISS IndexPQ / IndexPQFastScan (one thread, same codes)"),
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
    return _load(BENCHES[args.bench][0]).main_args(args)


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (ratios against references measured in the same run)")
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (filename, help_text) in BENCHES.items():
        b = sub.add_parser(name, help=help_text)
        if (BENCH_DIR / filename).is_file():
            _load(filename).add_arguments(b)
        b.set_defaults(handler=_run)
