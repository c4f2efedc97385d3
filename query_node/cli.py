"""`facepq node`, `facepq coordinator` (the clients of a coordinator are in facepq/client_cli.py).

The coordinator listens on port 50050 by default (facepq_core.addresses), the port every
client assumes when an address has none; nodes default to any free port (they announce
their address to the registry). Servers print exactly one line `facepq <what> listening
on HOST:PORT` when ready (a coordinator's HTTP API and metrics print `serving on` / `metrics on` lines
before it) (scripts and tests wait for it) and stop gracefully on SIGTERM /
SIGINT.
TLS and token flags (with FACEPQ_* environment fallbacks) are in query_node.security.
"""
from __future__ import annotations

import argparse
import logging


def _shard_list(text: str) -> list[int]:
    try:
        shards = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shards must be comma-separated shard numbers like 0,1, got {text!r}")
    if not shards or min(shards) < 0:
        raise argparse.ArgumentTypeError(f"--shards needs at least one shard number >= 0, got {text!r}")
    return shards


def _wait_for_signal(poll: float = 0.2) -> int:
    """Block until SIGTERM or SIGINT; returns the signal's number.

    The handler only records the signal. It used to set a threading.Event the main thread was waiting
    on, but a handler runs in the main thread between bytecodes, and Event.set() takes the lock that
    Event.wait() holds around its timed wait: a signal arriving in that window deadlocked the process
    for good (a node SIGTERMed by its launcher's death stayed up, found by the demo's SIGKILL test).
    time.sleep resumes after a handler returns (PEP 475), so the flag is seen within `poll` seconds.
    """
    import signal
    import time

    received: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    while not received:
        time.sleep(poll)
    return received[0]


def _serve_metrics(args) -> None:
    """--metrics-port: Prometheus /metrics on its own port (query_node.metrics); a line says where."""
    if args.metrics_port is None:
        return
    from query_node.metrics import serve_metrics

    port = serve_metrics(args.metrics_port, args.metrics_host or args.host)
    print(f"facepq metrics on http://{args.metrics_host or args.host}:{port}/metrics", flush=True)


def _node(args) -> int:
    from facepq_core.errors import ConfigError
    from query_node.node_server import NodeServer
    from query_node.registry import Heartbeat, NodeRecord
    from query_node.security import server_security

    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    tls, tokens = server_security(args)
    server = NodeServer(args.index, args.shards, host=args.host, port=args.port, node_id=args.node_id,
                        poll_seconds=args.poll, tls=tls, auth_tokens=tokens, view_grace=args.view_grace,
                        threads=args.threads, **_batching(args)).start()
    heartbeat = None
    try:
        _serve_metrics(args)
        if args.redis:
            def record():
                view = server.live.view
                return NodeRecord(node_id=server.node_id, address=server.address, shards=view.serving_shards(),
                                  index_version=view.version)

            heartbeat = Heartbeat(args.redis, record, ttl=args.ttl)
            heartbeat.start()
            server.listeners.append(lambda view: heartbeat.beat())  # announce a new version at once
        print(f"facepq node listening on {server.address}", flush=True)
        _wait_for_signal()
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        server.stop()
    return 0


def _coordinator(args) -> int:
    import os

    import torch

    from facepq_core.errors import ConfigError
    from query_node.coordinator_server import CoordinatorServer
    from query_node.security import ENV_NODE_AUTH_TOKEN, ClientTls, load_tokens, server_security

    tls, tokens = server_security(args)
    node_tls = ClientTls.from_paths(args.node_tls_ca, args.tls_cert if args.node_tls_ca else None,
                                    args.tls_key if args.node_tls_ca else None)
    node_tokens = load_tokens(args.node_auth_token_file, os.environ.get(ENV_NODE_AUTH_TOKEN))
    # Never the admin token: it would reach every process listed as a node (query_node.security).
    node_token = node_tokens[0] if node_tokens else None
    if node_token and node_token in tokens:
        raise ConfigError("the node token must differ from the admin token (--auth-token-file): nodes, and "
                          "anything listed as one, must never hold the token that changes the index")
    nodes = [a.strip() for a in args.nodes.split(",") if a.strip()] if args.nodes else None
    if args.torch_threads < 1:
        raise ConfigError(f"--torch-threads must be >= 1, got {args.torch_threads}")
    # A search's model work (embedding -> lookup table) is microseconds of arithmetic; more OpenMP
    # threads only add workers that spin after every op, taking cores from the nodes' scans on a
    # shared machine. Photo searches and enrolments run the trunk and may want more.
    torch.set_num_threads(args.torch_threads)
    server = CoordinatorServer(args.model, args.index, redis_url=args.redis, nodes=nodes, host=args.host,
                               port=args.port, tls=tls, auth_tokens=tokens, auth_search=args.auth_search,
                               node_tls=node_tls, node_token=node_token, upkeep_seconds=args.upkeep_seconds,
                               max_inflight_photos=args.max_inflight_photos,
                               thumbnail_roots=args.thumbnail_root, **_batching(args)).start()
    try:
        _serve_metrics(args)
        if args.http_port is not None:
            http = server.serve_http(args.http_host or args.host, args.http_port)
            # not "listening on": that line is the one readiness line a server prints (the coordinator's, below)
            print(f"facepq http serving on http://{http.address} (API /v1, web page /, OpenAPI /openapi.json)",
                  flush=True)
        print(f"facepq coordinator listening on {server.address}", flush=True)
        _wait_for_signal()
    finally:
        server.stop()
    return 0


def _add_batch_flags(p, what: str, window: float) -> None:
    from query_node.batcher import DEFAULT_MAX_QUERIES

    p.add_argument("--batch-window-ms", type=float, default=window * 1e3,
                   help=f"queries arriving while a {what} runs gather into the next, batched {what}, which starts "
                        f"when the one in flight ends, when full, or after this many ms (0 = off; a query arriving "
                        f"when none is in flight never waits; default %(default)s)")
    p.add_argument("--batch-max", type=int, default=DEFAULT_MAX_QUERIES,
                   help=f"queries per batched {what} (default %(default)s)")


def _batching(args) -> dict:
    """--batch-window-ms / --batch-max as the servers' batch_window (seconds) and batch_max."""
    from facepq_core.errors import ConfigError

    if not args.batch_window_ms >= 0 or args.batch_max < 1:  # (not >= 0: NaN too)
        raise ConfigError(f"--batch-window-ms must be >= 0 and --batch-max >= 1, got {args.batch_window_ms} and "
                          f"{args.batch_max}")
    return {"batch_window": args.batch_window_ms / 1e3, "batch_max": args.batch_max}


def _add_metrics_flags(p) -> None:
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (0 = any free port; default: off)")
    p.add_argument("--metrics-host", default=None, help="where /metrics listens (default --host)")


def register(subparsers) -> None:
    import os

    from facepq_core.addresses import DEFAULT_COORDINATOR_PORT
    from query_node.batcher import DEFAULT_FAN_OUT_WINDOW, DEFAULT_WINDOW
    from query_node.security import ENV_NODE_AUTH_TOKEN, ENV_TLS_CA, add_server_flags

    p = subparsers.add_parser("node", help="serve index shards over gRPC (a query node)")
    p.add_argument("--index", required=True, help="index path or URI")
    p.add_argument("--shards", required=True, type=_shard_list, help="shards to serve, e.g. 0,1")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port (printed when ready)")
    p.add_argument("--redis", help="registry URL, e.g. redis://127.0.0.1:6379/0 (omit for static mode)")
    p.add_argument("--node-id", help="name in the registry (default host:port)")
    p.add_argument("--ttl", type=float, default=5.0, help="registry heartbeat TTL in seconds")
    p.add_argument("--threads", type=int, default=None,
                   help="native scan threads (default: the cores in this process's CPU affinity mask)")
    _add_batch_flags(p, "scan", DEFAULT_WINDOW)
    p.add_argument("--poll", type=float, default=0.5, help="seconds between checks for a new index version")
    p.add_argument("--view-grace", type=float, default=10.0,
                   help="seconds a replaced index version stays answerable for searches in flight (default 10)")
    add_server_flags(p, "require this token (from coordinators) for Search and Status")
    _add_metrics_flags(p)
    p.set_defaults(handler=_node, log_level=logging.INFO)  # a server's INFO lines are its operations log

    p = subparsers.add_parser("coordinator", help="serve Search/Enrol/Delete: model + fan-out to query nodes")
    p.add_argument("--model", required=True, help="trained checkpoint (.pt)")
    p.add_argument("--index", required=True, help="index path or URI (enrol/delete commit here)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--redis", help="registry URL")
    g.add_argument("--nodes", help="static node list host:port,host:port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_COORDINATOR_PORT,
                   help="port to listen on (default %(default)s, what clients assume; 0 = any free port)")
    add_server_flags(p, "require this token for Enrol, Delete and Compact")
    p.add_argument("--node-tls-ca", default=os.environ.get(ENV_TLS_CA),
                   help=f"talk TLS to query nodes, verified with this CA; --tls-cert/--tls-key are the client "
                        f"certificate when nodes require mutual TLS (env {ENV_TLS_CA})")
    p.add_argument("--node-auth-token-file",
                   help=f"the node token, shared with the query nodes (their --auth-token-file): a bearer derived "
                        f"from it authenticates this coordinator to them, and their replies must prove it, else "
                        f"their hits are ignored (env {ENV_NODE_AUTH_TOKEN}; never the admin token)")
    p.add_argument("--max-inflight-photos", type=int, default=None,
                   help="photo searches and enrolments in progress at once (default: CPUs, at most 4); four times "
                        "as many wait up to 2 s, the rest get RESOURCE_EXHAUSTED with retry advice")
    p.add_argument("--upkeep-seconds", type=float, default=30.0,
                   help="seconds between background merges of small segments (what enrolments add); 0 = never")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="threads for the model (1 suits embedding searches; raise it for photo-heavy load)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the HTTP/JSON API, its OpenAPI document and the web page on this port "
                        "(0 = any free port; same tokens and TLS as gRPC)")
    p.add_argument("--http-host", default=None, help="where the HTTP API listens (default --host)")
    p.add_argument("--thumbnail-root", action="append", default=[], metavar="DIR",
                   help="the web page may show thumbnails of gallery photos whose source is a file under DIR "
                        "(repeatable; default: none, the page shows the source)")
    _add_batch_flags(p, "fan-out to the nodes", DEFAULT_FAN_OUT_WINDOW)
    _add_metrics_flags(p)
    p.set_defaults(handler=_coordinator, log_level=logging.INFO)
