"""The `facepq` command: one entry point whose subcommands live with their components.

Each component exposes `register(subparsers)` in its own `cli.py`; those modules
import only argparse at module level so `facepq --help` stays instant, and load
torch, Ray or gRPC inside the command that needs them.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from facepq import __version__
from facepq_core.errors import FacepqError
from facepq_core.logs import ENV_LOG_FORMAT, LOG_FORMATS, configure_logging, default_log_format
from facepq_core.progress import QUIET, log_level

# (module, what it adds) — order is the order of `facepq --help`.
COMPONENT_CLIS = [
    "opqn_model.cli",  # train, eval, embed
    "indexer.cli",  # ingest, index, delete, compact
    "query_node.cli",  # node, coordinator
    "facepq.client_cli",  # search, enrol, status (clients of a coordinator)
    "facepq.demo_cli",  # demo, up, down
    "facepq.bench_cli",  # bench
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facepq",
        description="Face search over OPQN product-quantization codes: train, ingest, serve, search.",
    )
    parser.add_argument("--version", action="version", version=f"facepq {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more detail: -v each phase and its progress (INFO), -vv debug")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=default_log_format(),
                        help="log lines as text or as one JSON object per line (default $FACEPQ_LOG_FORMAT, else text; "
                             "servers started by `facepq up` inherit it)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMPONENT_CLIS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # component not present in this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # OpenMP worker threads (torch) spin while they wait for work by default. On a host where
    # other processes hold the cores (query nodes, Ray workers, anything) the spinning thread
    # takes the core from the one it waits for: training the test suite's tiny model cost 20 s of
    # CPU that way at load ~5, 3 s with sleeping threads. Set before any component loads torch;
    # an explicit OMP_WAIT_POLICY in the environment wins, and children (servers, Ray) inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    # Quiet by default (warnings, then the command's summary); servers log INFO, their operations log.
    os.environ[ENV_LOG_FORMAT] = args.log_format  # children (servers of `facepq up`, Ray workers) log alike
    configure_logging(log_level(args.verbose, getattr(args, "log_level", QUIET)), args.log_format)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except FacepqError as exc:
        print(f"facepq {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"facepq {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
