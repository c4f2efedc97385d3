"""`facepq node`, `facepq coordinator`, `facepq search`.

Servers print exactly one line `facepq <what> listening on HOST:PORT` when ready
(scripts and tests wait for it) and stop gracefully on SIGTERM / SIGINT.
TLS and token flags (with FACEPQ_* environment fallbacks) are in query_node.security.
"""
from __future__ import annotations

import argparse
import json
import sys


def _shard_list(text: str) -> list[int]:
    try:
        shards = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shards must be comma-separated shard numbers like 0,1, got {text!r}")
    if not shards or min(shards) < 0:
        raise argparse.ArgumentTypeError(f"--shards needs at least one shard number >= 0, got {text!r}")
    return shards


def _wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def _node(args) -> int:
    from query_node.node_server import NodeServer
    from query_node.registry import Heartbeat, NodeRecord
    from query_node.security import server_security

    tls, tokens = server_security(args)
    server = NodeServer(args.index, args.shards, host=args.host, port=args.port, node_id=args.node_id,
                        poll_seconds=args.poll, tls=tls, auth_tokens=tokens, view_grace=args.view_grace).start()
    heartbeat = None
    try:
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
    node_token = node_tokens[0] if node_tokens else (tokens[0] if tokens else None)
    nodes = [a.strip() for a in args.nodes.split(",") if a.strip()] if args.nodes else None
    if args.torch_threads < 1:
        raise ConfigError(f"--torch-threads must be >= 1, got {args.torch_threads}")
    # A search's model work (embedding -> lookup table) is microseconds of arithmetic; more OpenMP
    # threads only add workers that spin after every op, taking cores from the nodes' scans on a
    # shared machine. Photo searches and enrolments run the trunk and may want more.
    torch.set_num_threads(args.torch_threads)
    server = CoordinatorServer(args.model, args.index, redis_url=args.redis, nodes=nodes, host=args.host,
                               port=args.port, tls=tls, auth_tokens=tokens, auth_search=args.auth_search,
                               node_tls=node_tls, node_token=node_token).start()
    try:
        print(f"facepq coordinator listening on {server.address}", flush=True)
        _wait_for_signal()
    finally:
        server.stop()
    return 0


def _search(args) -> int:
    import grpc

    from facepq_core.errors import ConfigError, DataError
    from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
    from query_node.security import bearer_metadata, client_security, make_channel

    tls, token = client_security(args)
    try:
        with open(args.photo, "rb") as f:
            photo = f.read()
    except OSError as exc:
        raise DataError(f"cannot read photo {args.photo}: {exc.strerror}") from exc
    with make_channel(args.coordinator, tls, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        try:
            request = facepq_pb2.SearchRequest(photo=photo, top_k=args.k, refine_candidates=args.candidates)
            reply = facepq_pb2_grpc.CoordinatorStub(ch).Search(request, timeout=args.timeout,
                                                               metadata=bearer_metadata(token))
        except grpc.RpcError as exc:
            raise ConfigError(f"{exc.code().name}: {exc.details()}") from exc
    hits = [{"rank": i + 1, "face_id": h.face_id, "person": h.person, "score": round(h.score, 6),
             "source": h.source, "shard": h.shard} for i, h in enumerate(reply.hits)]
    if args.json:
        print(json.dumps({"hits": hits, "complete": reply.complete, "missing_shards": list(reply.missing_shards),
                          "index_version": reply.index_version, "took_ms": round(reply.took_ms, 2)}, indent=1))
        return 0
    print(f"{'rank':>4}  {'person':24s} {'score':>9}  {'shard':>5}  source")
    for h in hits:
        print(f"{h['rank']:>4}  {h['person'][:24]:24s} {h['score']:>9.4f}  {h['shard']:>5}  {h['source']}")
    status = "complete" if reply.complete else f"INCOMPLETE: shards {list(reply.missing_shards)} did not answer"
    print(f"index version {reply.index_version}, {reply.took_ms:.1f} ms, {status}")
    if not reply.complete:
        print(f"warning: results miss shards {list(reply.missing_shards)}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    import os

    from query_node.security import ENV_NODE_AUTH_TOKEN, ENV_TLS_CA, add_client_flags, add_server_flags

    p = subparsers.add_parser("node", help="serve index shards over gRPC (a query node)")
    p.add_argument("--index", required=True, help="index path or URI")
    p.add_argument("--shards", required=True, type=_shard_list, help="shards to serve, e.g. 0,1")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port (printed when ready)")
    p.add_argument("--redis", help="registry URL, e.g. redis://127.0.0.1:6379/0 (omit for static mode)")
    p.add_argument("--node-id", help="name in the registry (default host:port)")
    p.add_argument("--ttl", type=float, default=5.0, help="registry heartbeat TTL in seconds")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between checks for a new index version")
    p.add_argument("--view-grace", type=float, default=10.0,
                   help="seconds a replaced index version stays answerable for searches in flight (default 10)")
    add_server_flags(p, "require this token (from coordinators) for Search and Status")
    p.set_defaults(handler=_node)

    p = subparsers.add_parser("coordinator", help="serve Search/Enrol/Delete: model + fan-out to query nodes")
    p.add_argument("--model", required=True, help="trained checkpoint (.pt)")
    p.add_argument("--index", required=True, help="index path or URI (enrol/delete commit here)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--redis", help="registry URL")
    g.add_argument("--nodes", help="static node list host:port,host:port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    add_server_flags(p, "require this token for Enrol, Delete and Compact")
    p.add_argument("--node-tls-ca", default=os.environ.get(ENV_TLS_CA),
                   help=f"talk TLS to query nodes, verified with this CA; --tls-cert/--tls-key are the client "
                        f"certificate when nodes require mutual TLS (env {ENV_TLS_CA})")
    p.add_argument("--node-auth-token-file",
                   help=f"token sent to query nodes (env {ENV_NODE_AUTH_TOKEN}; default: this server's own token)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="threads for the model (1 suits embedding searches; raise it for photo-heavy load)")
    p.set_defaults(handler=_coordinator)

    p = subparsers.add_parser("search", help="search a photo through a coordinator")
    p.add_argument("photo", help="photo file (JPEG/PNG/PGM)")
    p.add_argument("--coordinator", required=True, help="host:port")
    p.add_argument("-k", type=int, default=10, help="results (1..1000)")
    p.add_argument("--candidates", type=int, default=None,
                   help="on an index with a refinement tier: first-pass candidates re-scored per shard "
                        "(default 100; 0 = the first pass alone)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=10.0)
    add_client_flags(p)
    p.set_defaults(handler=_search)
