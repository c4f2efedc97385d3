"""`facepq search`, `facepq enrol`, `facepq status`: a running coordinator, through facepq.client.

    facepq search face.jpg                      # one photo, a table of the top 10
    facepq search photos/ -k 3 --json           # every photo under a folder: one JSON line per photo
    facepq search --embedding queries.npy       # trunk embeddings, one search per row
    facepq search face.jpg --far 0.001 --group-by person   # open-set, one row per person
    facepq enrol --person "Ada Lovelace" ada1.jpg ada2.jpg
    facepq verify a.jpg --person "Ada Lovelace"      # exit 0 same person, 1 different
    facepq status

The coordinator is --coordinator HOST[:PORT] (default $FACEPQ_COORDINATOR, else 127.0.0.1:50050,
where `facepq up` serves). Exit codes: 0 every answer complete; 1 some queries of a batch could
not be searched (each is reported); 2 the command failed (a usage error, no coordinator, a refused
request); 3 an answer is incomplete (some shards had no node answering: the hits are the best of
the others) or, for `status`, some shard has no node.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_OK, EXIT_SOME_FAILED, EXIT_INCOMPLETE = 0, 1, 3
ENV_COORDINATOR = "FACEPQ_COORDINATOR"


def _nprobe(text: str) -> int:
    """--nprobe: cells per shard, a whole number (0 or 'all': every cell)."""
    if text == "all":
        return 0
    if not (text.isascii() and text.isdigit()) or int(text) >= 2**32:
        raise argparse.ArgumentTypeError(f"--nprobe takes a whole number of cells or 'all', got {text!r}")
    return int(text)


def _top_k(text: str) -> int:
    from query_node.wire import MAX_TOP_K

    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"-k must be a whole number, got {text!r}") from None
    if not 1 <= k <= MAX_TOP_K:
        raise argparse.ArgumentTypeError(f"-k must be in 1..{MAX_TOP_K}, got {k}")
    return k


def _add_connection(p: argparse.ArgumentParser) -> None:
    from facepq_core.addresses import DEFAULT_COORDINATOR_ADDRESS
    from query_node.security import add_client_flags

    p.add_argument("--coordinator", default=os.environ.get(ENV_COORDINATOR, DEFAULT_COORDINATOR_ADDRESS),
                   help=f"HOST[:PORT] of the coordinator; port 50050 when omitted (default ${ENV_COORDINATOR}, "
                        f"else {DEFAULT_COORDINATOR_ADDRESS})")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds per request, retries of an unreachable coordinator included (default 10)")
    add_client_flags(p)


def _add_operating_point(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--far", type=float, help="operating point: a per-comparison false-accept rate, e.g. 0.001 (needs "
                                             "`facepq calibrate`); hits below its threshold are dropped, and a query "
                                             "none reaches answers 'unknown'")
    g.add_argument("--threshold", type=float, help="operating point as a raw score threshold")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "search", help="search photos, folders of photos or embeddings through a coordinator",
        description="Search through a running coordinator. Several photos (or a folder, searched with its "
                    "subfolders, or an embedding file of several rows) go over one connection, a few at a "
                    "time, and print one table, or one JSON line per query with --json. Exit code 3 when an "
                    "answer is incomplete (shards without a node: a warning names them), 1 when some queries "
                    "of a batch could not be searched (each is reported), 2 on errors.")
    p.add_argument("photos", nargs="*", metavar="PHOTO|DIR", help="photo files (JPEG/PNG/...) or folders of them")
    p.add_argument("--embedding", metavar="FILE",
                   help="search trunk embeddings instead: .npy float [E] or [N, E], or a text file of one "
                        "embedding per line (numbers separated by commas or spaces)")
    p.add_argument("-k", type=_top_k, default=10, help="hits per query, 1..1000 (default 10)")
    p.add_argument("--json", action="store_true", help="one JSON object per query, one per line (the schema in "
                                                       "the README's gRPC API section)")
    p.add_argument("--concurrency", type=int, default=4, help="searches in flight for a batch (default 4)")
    p.add_argument("--candidates", type=int, default=None, metavar="R",
                   help="on an index with a refinement tier: first-pass candidates re-scored per shard "
                        "(default the coordinator's, 100; 0 = the first pass alone)")
    _add_operating_point(p)
    p.add_argument("--group-by", choices=["face", "person"], default="face",
                   help="face: the top k faces (default); person: the top k people, each with their best faces")
    p.add_argument("--faces-per-person", type=int, default=0, help="--group-by person: faces per person (default 3)")
    p.add_argument("--all-faces", action="store_true",
                   help="search every face of a photo at least --min-face-px wide (default: its largest face)")
    p.add_argument("--min-face-px", type=int, default=0, help="--all-faces: smallest face side in pixels (default 40)")
    p.add_argument("--qe-n", type=int, default=0, metavar="N",
                   help="alpha-query expansion: search again with the query combined with its first answer's top N "
                        "hits (as their codes reconstruct them), 0..100 (default 0: no expansion)")
    p.add_argument("--qe-alpha", type=float, default=3.0, metavar="A",
                   help="alpha-query expansion: weigh each of the N hits by its similarity to the query to the "
                        "power A (0 = plain average; default 3)")
    p.add_argument("--nprobe", type=_nprobe, default=0, metavar="N",
                   help="on an index with a cell partition (ingest --cells): cells each shard scans, the N "
                        "nearest the query (fewer = faster, may miss faces); 0 or all = every cell (default)")
    _add_connection(p)
    p.set_defaults(handler=_search)

    p = subparsers.add_parser("verify", help="1:1: is this face the same person as that photo, or an enrolled person?",
                              description="Score photo A against photo B (or an enrolled --person: their best face) "
                                          "as a search would, and decide at --far (default 0.001; needs a "
                                          "calibrated model) or a raw --threshold. Exit 0 same, 1 different.")
    p.add_argument("photo_a", metavar="PHOTO_A")
    p.add_argument("photo_b", nargs="?", metavar="PHOTO_B")
    p.add_argument("--person", help="an enrolled person instead of PHOTO_B")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_operating_point(p)
    _add_connection(p)
    p.set_defaults(handler=_verify)

    p = subparsers.add_parser("enrol", help="add a person's photos to the served index through the coordinator",
                              description="Enrol a few photos of one person through the coordinator's Enrol "
                                          "call: no Ray start-up; searchable once the nodes reload (~1 s). For "
                                          "large galleries use `facepq ingest`.")
    p.add_argument("photos", nargs="+", metavar="PHOTO|DIR", help="photo files or folders of them")
    p.add_argument("--person", required=True, help="the person's name (as searches will report it)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_connection(p)
    p.set_defaults(handler=_enrol)

    p = subparsers.add_parser("status", help="the coordinator's view: index version, nodes, shards without a node",
                              description="Ask a coordinator for its index version, model and query nodes. Exit "
                                          "code 3 when some shard has no live node (searches would be incomplete).")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_connection(p)
    p.set_defaults(handler=_status)


# ---- inputs --------------------------------------------------------------------------------------
def photo_paths(items) -> list[str]:
    """Photo files named on the command line; a folder stands for every photo under it (sorted).

    Raises DataError for a path that does not exist or a folder without photos.
    """
    from facepq_core.errors import DataError
    from opqn_model.datasets import IMAGE_EXTENSIONS, is_photo_name

    paths = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(item)
                           for name in names if is_photo_name(name))
            if not found:
                raise DataError(f"folder {item} holds no photos (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, "
                                f"subfolders included)")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise DataError(f"{item} does not exist")
    return paths


def read_photo(path: str) -> bytes:
    from facepq_core.errors import DataError

    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise DataError(f"cannot read photo {path}: {exc.strerror}") from None


def read_embeddings(path: str):
    """float32 [N, E] from a .npy ([E] or [N, E]) or a text file of one embedding per line.

    Raises DataError for an unreadable file, ragged rows, or values that are not finite numbers.
    """
    import numpy as np

    from facepq_core.errors import DataError

    try:
        if path.endswith(".npy"):
            values = np.load(path, allow_pickle=False)
        else:
            with open(path, encoding="utf-8") as f:
                rows = [line.replace(",", " ").split() for line in f if line.strip() and not line.startswith("#")]
            if len({len(r) for r in rows}) > 1:
                raise DataError(f"{path}: rows hold different numbers of values ({sorted({len(r) for r in rows})})")
            values = np.array(rows, dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read embeddings from {path}: {exc}") from None
    values = np.atleast_2d(np.asarray(values))
    if values.ndim != 2 or values.size == 0 or not np.issubdtype(values.dtype, np.number):
        raise DataError(f"{path}: expected numbers shaped [E] or [N, E], got {values.dtype} {list(values.shape)}")
    if not np.isfinite(values).all():
        raise DataError(f"{path}: embeddings hold NaN or infinite values")
    return values.astype(np.float32)


def _queries(args) -> list[tuple[str, dict]]:
    from facepq_core.errors import ConfigError

    if not args.photos and not args.embedding:
        raise ConfigError("give photos, folders of photos, or --embedding FILE to search")
    queries = [(path, {"photo": read_photo(path)}) for path in photo_paths(args.photos)]
    if args.embedding:
        rows = read_embeddings(args.embedding)
        names = [args.embedding] if len(rows) == 1 else [f"{args.embedding}:{i}" for i in range(len(rows))]
        queries += [(name, {"embedding": row}) for name, row in zip(names, rows)]
    return queries


# ---- commands ------------------------------------------------------------------------------------
def _search(args) -> int:
    from facepq.client import CoordinatorClient

    from facepq_core.expansion import check_expansion

    check_expansion(args.qe_n, args.qe_alpha)  # a bad option is the command's error before any query is sent
    queries = _queries(args)
    incomplete, failed = [], []
    with CoordinatorClient.from_args(args) as client:
        options = {"far": args.far, "threshold": args.threshold, "group_by": args.group_by,
                   "faces_per_person": args.faces_per_person, "faces": "all" if args.all_faces else "largest",
                   "min_face_px": args.min_face_px, "candidates": args.candidates,
                   "expansion": (args.qe_n, args.qe_alpha) if args.qe_n else None, "nprobe": args.nprobe}
        if len(queries) == 1:  # one query: its error is the command's error (exit 2)
            name, kwargs = queries[0]
            results = [(name, client.search(k=args.k, query=name, **kwargs, **options))]
        else:
            results = client.search_many([(n, {**kw, **options}) for n, kw in queries], k=args.k,
                                         concurrency=args.concurrency)
        batch = len(queries) > 1
        if not args.json:
            _print(f"{'query  ' if batch else ''}{'rank':>4}  {'person':24s} {'score':>9}  {'shard':>5}  source")
        for name, result in results:
            if isinstance(result, Exception):
                failed.append(name)
                _print(_json({"query": name, "error": {"status": getattr(result, "status", "UNKNOWN"),
                                                            "message": str(result)}})
                       if args.json else f"{name}  error: {result}")
                continue
            if not result.complete:
                incomplete.append((name, result.missing_shards))
            if args.json:
                _print(_json(result.to_json()))
            else:
                _print_hits(result, batch)
    if batch and not args.json:
        _print(f"{len(queries)} queries: {len(queries) - len(failed)} answered "
               f"({len(incomplete)} incomplete), {len(failed)} failed")
    for name, missing in incomplete:
        print(f"facepq search: warning: INCOMPLETE answer{' for ' + name if batch else ''}: shards {missing} had "
              f"no node answering; the hits are the best of the other shards only", file=sys.stderr)
    if incomplete:
        return EXIT_INCOMPLETE
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _print_hits(reply, batch: bool) -> None:
    for h in reply.hits:
        query = f"{reply.query if h.rank == 1 else '':{len(reply.query)}s}  " if batch else ""
        similarity = f"  similarity {h.similarity:.3f}" if h.similarity is not None else ""
        _print(f"{query}{h.rank:>4}  {h.person[:24]:24s} {h.score:>9.4f}  {h.shard:>5}  {h.source}{similarity}")
    if reply.unknown:
        _print(f"{reply.query + '  ' if batch else ''}unknown: no face reaches the operating point "
               f"(score {reply.threshold:.4g}); this person is not in the gallery")
    elif not reply.hits:
        _print(f"{reply.query + '  ' if batch else ''}(no hits: the index is empty or no shard answered)")
    if not batch:
        state = "complete" if reply.complete else f"INCOMPLETE: shards {reply.missing_shards} did not answer"
        _print(f"index version {reply.index_version}, {reply.took_ms:.1f} ms in the coordinator "
               f"({reply.latency_ms:.1f} ms here), {state}")


def _enrol(args) -> int:
    from facepq.client import CoordinatorClient, Photo

    photos = [Photo(read_photo(p), p) for p in photo_paths(args.photos)]
    with CoordinatorClient.from_args(args) as client:
        reply = client.enrol(args.person, photos)
    if args.json:
        _print(_json({"person": args.person, "face_ids": [str(i) for i in reply.face_ids],
                           "skipped": reply.skipped, "index_version": reply.index_version}))
        return EXIT_OK
    version = f"index version {reply.index_version}" if reply.index_version else "index unchanged (all present)"
    _print(f"enrolled {len(reply.face_ids)} face(s) of {args.person!r} from {len(photos)} photo(s); {version}; "
           f"searchable once the nodes reload (within about a second)")
    for line in reply.skipped:
        _print(f"  skipped {line}")
    return EXIT_OK


def _verify(args) -> int:
    from facepq.client import CoordinatorClient
    from facepq_core.errors import ConfigError

    if (args.photo_b is None) == (args.person is None):
        raise ConfigError("give PHOTO_B or --person NAME to verify against")
    b = {"person": args.person} if args.person else {"photo_b": read_photo(args.photo_b)}
    with CoordinatorClient.from_args(args) as client:
        r = client.verify(photo_a=read_photo(args.photo_a), far=args.far, threshold=args.threshold, **b)
    if args.json:
        _print(_json({"same": r.same, "score": r.score, "similarity": r.similarity, "threshold": r.threshold,
                      "far": r.far, "best_face_id": str(r.best_face_id), "faces_compared": r.faces_compared}))
    else:
        point = f"far {r.far:g}, " if r.far is not None else ""
        sim = f", similarity {r.similarity:.3f}" if r.similarity is not None else ""
        _print(f"{'same person' if r.same else 'different people'}: score {r.score:.4g}{sim} "
               f"({point}threshold {r.threshold:.4g}; {r.faces_compared} face(s) compared)")
    return EXIT_OK if r.same else EXIT_SOME_FAILED


def _status(args) -> int:
    from facepq.client import CoordinatorClient

    with CoordinatorClient.from_args(args) as client:
        status = client.status()
    if args.json:
        _print(_json(status.to_json()))
    else:
        _print(f"coordinator {client.address}: index version {status.index_version or '?'}, "
               f"{status.shard_count} shards, model {status.model_fingerprint}")
        _print(f"  {'node':24s} {'address':22s} {'version':>8}  {'healthy':7s}  shards")
        for n in status.nodes:
            _print(f"  {n.node_id[:24]:24s} {n.address:22s} {n.index_version:>8}  {n.healthy!s:7s}  {n.shards}")
        _print("  every shard has a node" if status.complete else
               f"  shards {status.uncovered_shards} have no live node: searches are incomplete")
    if not status.complete:
        print(f"facepq status: warning: shards {status.uncovered_shards} have no live node", file=sys.stderr)
        return EXIT_INCOMPLETE
    return EXIT_OK


def _json(value) -> str:
    """Compact JSON, one object per line: byte for byte what clients/node/search.js prints."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _print(text: str) -> None:
    print(text, flush=True)
