"""`facepq demo`, `facepq up`, `facepq down`: the whole system on one machine in one command.

`demo` runs every step (data, training, Ray ingest, Redis + query nodes + coordinator,
enrolment, searches, metrics) and stops everything it started, also on Ctrl-C or
SIGTERM. `up` does the same up to enrolment and keeps serving until stopped, or, with
`--model M --index I`, serves the user's own index as it is; `down` stops an `up` from
another terminal (safe to call twice). `up` serves its coordinator on port 50050 (what
`facepq search` assumes); the demo, which stops on its own, on any free port.

One launcher per workdir: `demo` and `up` hold the workdir's lock (facepq.launcher.WorkdirLock)
for as long as they run, so a second one on the same workdir is refused before it touches
the index the first one serves.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pathlib
import shutil
import signal
import time


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default=None,
                   help="the launcher's folder: logs, cluster state, and the demo's photos and index (default "
                        "./.facepq/demo; one demo or up at a time per workdir)")
    p.add_argument("--data", help="your own photos: a folder of <person>/<photo> folders of face crops "
                                  "(default: generated synthetic faces)")
    p.add_argument("--small", action="store_true", default=os.environ.get("FACEPQ_DEMO_SMALL") == "1",
                   help="a CI-sized run: fewer people, photos and epochs (also FACEPQ_DEMO_SMALL=1)")
    p.add_argument("--bits", type=int, help="code length in bits (default 64)")
    p.add_argument("--epochs", type=int, help="training epochs (default 24; 3 with --small)")
    p.add_argument("--people", type=int, help="synthetic people (default 160; 30 with --small)")
    p.add_argument("--photos", type=int, help="synthetic photos per person (default 10; 6 with --small)")
    p.add_argument("--width", type=int, help="resnet20 channels (default 32; 16 with --small)")
    p.add_argument("--shards", type=int, help="index shards (default 2)")
    p.add_argument("--replicas", type=int, help="query nodes serving each shard (default 1; 2 = each node "
                                                "serves every shard)")
    p.add_argument("--no-redis", action="store_true", help="static node list instead of a Redis registry")
    p.add_argument("--seed", type=int, help="data split and training seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="end to end on this machine: train, ingest, serve, enrol, search",
                              description="Generate faces, train a small OPQN model, ingest a gallery of people "
                                          "it never saw with Ray, serve it with Redis + query nodes + a "
                                          "coordinator, enrol a new person, search, report mAP and latency, and "
                                          "stop everything.")
    _add_common(p)
    p.set_defaults(handler=_demo)
    p = subparsers.add_parser("up", help="serve your index (--model/--index) or the demo's, until Ctrl-C / "
                                         "`facepq down`",
                              description="Start Redis, query nodes and a coordinator on this machine and keep "
                                          "them serving, supervised, until Ctrl-C, SIGTERM or `facepq down`. With "
                                          "--model and --index it serves your trained model and index as they "
                                          "are; without them it builds the demo's (as `facepq demo` does) first.")
    g = p.add_argument_group("your own index")
    g.add_argument("--model", help="the model the index was built with (model.pt, or the `facepq train --out` folder)")
    g.add_argument("--index", help="the index to serve (built by `facepq ingest`)")
    g.add_argument("--nodes", type=int, help="query node processes (default: one per shard); each shard is "
                                             "served by --replicas of them")
    p.add_argument("--port", type=int, default=None,
                   help="the coordinator's port (default 50050, what `facepq search` assumes; 0 = any free port)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the HTTP/JSON API and the web page on this port, e.g. 8080 (default: off)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus /metrics: the coordinator on this port, query node i on port+1+i (default: off)")
    _add_common(p)
    p.set_defaults(handler=_up)
    p = subparsers.add_parser("down", help="stop what `facepq up` started (safe to call twice)")
    p.add_argument("--workdir", default=None, help="the workdir given to `facepq up` (default ./.facepq/demo)")
    p.set_defaults(handler=_down)


def _settings(args):
    from facepq.demo import SMALL, DemoSettings

    settings = DemoSettings(**(SMALL if args.small else {}))
    for name in ("bits", "epochs", "people", "photos", "width", "shards", "replicas", "seed"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    from query_node.placement import assign_shards

    assign_shards(settings.shards, settings.shards, settings.replicas)  # refuse a bad layout before any work
    return settings


def _workdir(args) -> pathlib.Path:
    from facepq.demo import DEFAULT_WORKDIR

    path = pathlib.Path(args.workdir) if args.workdir else DEFAULT_WORKDIR
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def _say(text: str = "") -> None:
    print(text, flush=True)


def _quiet_logging(verbose: bool) -> None:
    """Keep the demo's output readable: training epochs stay, library chatter goes.

    Also, before torch loads: OpenMP threads that wait for work sleep instead of spinning, which on a
    machine busy with other work takes cores from the threads doing it (this process's and its nodes').
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("opqn_model.methods").setLevel(logging.INFO)  # a line per epoch: the longest step


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM behaves like Ctrl-C, so `finally` blocks stop the cluster."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_ignored():
    """While cleaning up, a second Ctrl-C must not abandon half-stopped processes (the stop is bounded)."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _build(args, workdir: pathlib.Path, settings, pieces: dict, coordinator_port: int = 0) -> None:
    """Steps 1-5: data, model, index, cluster, enrolment, filling `pieces` as they exist.

    `pieces` is filled step by step (not returned at the end) so that an interruption at any
    point leaves the caller holding every process started so far.
    """
    from facepq import demo
    from facepq.client import CoordinatorClient
    from facepq.launcher import LocalCluster
    from facepq_core.progress import bars_enabled

    progress = bars_enabled(not args.no_progress)
    _say(f"[1/6] data: {'your photos in ' + args.data if args.data else 'synthetic faces (not real people)'}")
    data = demo.prepare_data(workdir, settings, args.data)
    _say(f"      {len(data.train)} photos of {len({r.person for r in data.train})} training people; "
         f"{len(data.unseen_people)} unseen people: gallery {len(data.gallery)} photos, "
         f"{len(data.queries) + 1} queries, {data.enrol_person} kept aside for enrolment")

    _say(f"[2/6] model: resnet20 width {settings.width}, {settings.bits}-bit OPQN codes, {settings.epochs} epochs")
    model, reused, summary = demo.train_model(workdir, settings, data, progress)
    if reused:
        _say(f"      reusing {model} (trained earlier on the same settings and training photos)")
    else:
        _say(f"      trained in {summary['seconds']:.0f} s (wall, with {demo.idle_cores()} torch thread(s)); the best "
             f"epoch by validation code mAP {summary['best_val_map']:.3f} (mAP of the codes on training-set people "
             f"held out of the gradient steps)"
             + ("; then the code head refitted to that trunk's embeddings (codes that keep unseen people apart)"
                if summary.get("head_refitted") else ""))
        _say(f"      cached as {model}: the next demo, in any workdir, reuses it")

    _say(f"[3/6] index: Ray ingest of {len(data.gallery)} gallery photos into {settings.shards} shards")
    ingest = demo.ingest_gallery(workdir, model, data, settings, progress)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # ray.init replaced it with its own
    _say(f"      {ingest.faces_added} faces in {ingest.seconds:.1f} s (of which starting Ray and its encoder actors "
         f"{ingest.ray_seconds + ingest.startup_seconds:.1f} s), index version {ingest.version}")

    use_redis = not args.no_redis and shutil.which("redis-server") is not None
    nodes = settings.shards
    _say(f"[4/6] serving: {'redis-server registry' if use_redis else 'static node list (no redis-server)'}, "
         f"{nodes} query nodes, {settings.replicas} replica(s) per shard, 1 coordinator")
    cluster = LocalCluster(workdir, workdir / "index", model, settings.shards, settings.replicas, redis=use_redis,
                           coordinator_port=coordinator_port, http_port=getattr(args, "http_port", None),
                           metrics_port=getattr(args, "metrics_port", None))
    pieces.update(data=data, model=model, cluster=cluster, settings=settings)
    cluster.start()
    _print_processes(cluster)

    _say(f"[5/6] enrol: {data.enrol_person} ({len(data.enrol_photos)} photos) through the coordinator's Enrol RPC")
    client = CoordinatorClient(cluster.coordinator_address, timeout=60.0)
    pieces["client"] = client
    enrol = demo.enrol_and_find(client, data)
    _say(f"      enrolled {len(enrol.face_ids)} faces, index version {enrol.index_version}")
    if enrol.rank is None:
        _say(f"      another photo of {enrol.person}: NOT served within {enrol.seconds:.0f} s "
             f"(see {workdir / 'logs'})")
    else:
        _say(f"      another photo of {enrol.person} finds them {enrol.seconds:.1f} s after enrolling (the nodes "
             f"reload the new index version): their best face at rank {enrol.rank} of the {enrol.searched} faces "
             f"returned (rank 1 = the first hit)")


def _report(args, workdir, pieces) -> None:
    from facepq import demo
    from facepq_core.progress import bars_enabled

    data, client, settings = pieces["data"], pieces["client"], pieces["settings"]
    run = demo.search_all(client, data, rounds=settings.rounds, progress=bars_enabled(not args.no_progress))
    _say(f"[6/6] search: {len(run.queries)} queries (one photo of each unseen person, the enrolled one included) "
         f"x {settings.rounds} rounds over gRPC")
    _say()
    _say("example hits (a photo of an unseen person -> its top 3; * = the query's person)")
    _say(f"  {'query person':14s} {'rank':>4}  {'hit person':14s} {'score':>8}  {'shard':>5}")
    for query, reply in list(zip(run.queries, run.replies))[-5:]:  # the last ones include the enrolled person
        for hit in reply.hits[:3]:
            mark = "*" if hit.person == query.person else " "
            _say(f"  {query.person if hit.rank == 1 else '':14s} {hit.rank:>4}  {hit.person[:14]:14s} "
                 f"{hit.score:8.3f}  {hit.shard:>5} {mark}")
    metrics = demo.offline_metrics(pieces["model"], data)
    _say(f"  score: the log-likelihood of the face's code under the query's lookup tables (a sum over its "
         f"{metrics['M']} sub-codes);")
    _say("  higher is closer, and scores compare only within one query")
    people = len(data.unseen_people)
    _say()
    _say(f"search latency, {len(run.latencies_ms)} searches (a photo in, its top {demo.SEARCH_K} out):")
    _say(f"  p50 {run.percentile(50):.1f} ms, p99 {run.percentile(99):.1f} ms as the client saw them; of that the "
         f"coordinator's own time p50 {run.percentile(50, True):.1f} ms, p99 {run.percentile(99, True):.1f} ms "
         f"(decode, resnet20, lookup tables, fan-out to the nodes, merge); the rest is gRPC between the processes")
    _say(f"finding unseen people: {metrics['n_queries']} queries against a gallery of {metrics['n_gallery']} photos "
         f"of {people} people (none seen in training):")
    _say(f"  P@1 (the first hit is the query's person): {run.p_at_1():.3f} over gRPC, {metrics['p_at_1']:.3f} "
         f"computed offline from the same photos and codes (chance: {1 / people:.3f})")
    _say(f"  queries whose top score is shared by two people (a tie, ordered arbitrarily): {run.rank1_ties()} over "
         f"gRPC, {metrics['rank1_ties']} offline; without ties the two P@1 agree, as a search is exact")
    _say(f"  mAP@all (every photo of the person ranked before anyone else = 1.0): {metrics['map']:.3f} with the "
         f"{metrics['bits']}-bit codes the index stores ({metrics['M']}x{metrics['K']}), {metrics['map_float']:.3f} "
         f"with the float embeddings they compress (cosine): the codes keep {metrics['map_ratio_vs_float']:.2f}x")
    cluster = pieces["cluster"]
    _say()
    _say("where everything lives")
    _say(f"  workdir      {workdir}")
    _say(f"  photos       {data.root}")
    _say(f"  model        {pieces['model']}")
    _say(f"  index        {workdir / 'index'}")
    _say(f"  logs         {workdir / 'logs'}")
    _say(f"  coordinator  {cluster.coordinator_address}" + (f"   registry {cluster.redis_url}" if cluster.redis_url else ""))
    _say("  keep it serving: facepq up (same options; coordinator on port 50050), then facepq search PHOTO")


def _stop(pieces: dict) -> None:
    with _signals_ignored():
        if pieces.get("client") is not None:
            pieces["client"].close()
        if pieces.get("cluster") is not None:
            pieces["cluster"].stop()


def _demo(args) -> int:
    import atexit

    from facepq.launcher import WorkdirLock

    _quiet_logging(getattr(args, "verbose", False))
    t_start = time.monotonic()
    workdir, settings = _workdir(args), _settings(args)
    pieces: dict = {}
    atexit.register(_stop, pieces)  # also when something outside the try exits the interpreter
    with WorkdirLock(workdir, "facepq demo"), _sigterm_as_interrupt():
        try:
            _build(args, workdir, settings, pieces)
            _report(args, workdir, pieces)
        finally:
            _stop(pieces)
    _say(f"stopped all processes; demo took {time.monotonic() - t_start:.0f} s")
    return 0


# ---- up / down --------------------------------------------------------------------------------------
# `up` is the launcher of its cluster: the launcher's state file (cluster.json) records it, and `down`
# reads that file (facepq.launcher.running_state / stop_recorded). There is no second state file.
def _up(args) -> int:
    import atexit

    from facepq.launcher import WorkdirLock, check_port_free, running_state
    from facepq_core.addresses import DEFAULT_COORDINATOR_PORT
    from facepq_core.errors import ConfigError

    _quiet_logging(getattr(args, "verbose", False))
    own = _own_index(args)
    workdir = _workdir(args)
    settings = None if own else _settings(args)
    port = DEFAULT_COORDINATOR_PORT if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    pieces: dict = {}
    atexit.register(_stop, pieces)
    with WorkdirLock(workdir, "facepq up"), _sigterm_as_interrupt():
        previous = running_state(workdir)
        if previous:  # a launcher of an older facepq, which held no lock
            raise ConfigError(f"facepq up is already running in {workdir} (pid {previous['pid']}, coordinator "
                              f"{previous.get('coordinator')}); run `facepq down --workdir {workdir}` first")
        check_port_free("127.0.0.1", port)  # before the demo's build or any process
        if args.http_port:
            check_port_free("127.0.0.1", args.http_port)
        try:
            if own:
                _serve_own(args, workdir, port, pieces)
            else:
                _build(args, workdir, settings, pieces, coordinator_port=port)
            return _supervise(workdir, pieces["cluster"])
        except KeyboardInterrupt:  # Ctrl-C or `facepq down` is how `up` is meant to end
            _say("facepq up: stopping")
            return 0
        finally:
            _stop(pieces)  # the launcher records the cluster as stopped


# Options that shape the demo's own data, model and index: meaningless when serving the user's.
_DEMO_ONLY = ("data", "bits", "epochs", "people", "photos", "width", "shards", "seed")


def _own_index(args) -> bool:
    """True for `up --model M --index I`; refuses half of the pair and demo-only options beside it."""
    from facepq_core.errors import ConfigError

    if bool(args.model) != bool(args.index):
        raise ConfigError("--model and --index go together: the index and the model it was built with")
    if not args.index:
        if args.nodes is not None:
            raise ConfigError("--nodes applies to serving your own index (--model/--index); the demo runs one "
                              "node per shard")
        return False
    given = [f"--{name}" for name in _DEMO_ONLY if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} shape the demo's own index; `up --model --index` serves yours as "
                          f"it is (its shards are the index's)")
    return True


def _serve_own(args, workdir: pathlib.Path, port: int, pieces: dict) -> None:
    """`up --model M --index I`: the launcher's cluster over the user's index, one node per shard by default."""
    from facepq.launcher import LocalCluster
    from indexer.info import index_info
    from query_node.placement import assign_shards

    info = index_info(args.index)  # refuses a path that holds no index, before any process starts
    shards, replicas = info["shard_count"], args.replicas or 1
    nodes = args.nodes or shards
    assign_shards(shards, nodes, replicas)  # refuse a layout that leaves a shard or a node out
    use_redis = not args.no_redis and shutil.which("redis-server") is not None
    _say(f"facepq up: index {info['index']}: version {info['version']}, {info['faces']} faces of "
         f"{info['people']} people in {shards} shard(s); model {args.model}")
    _say(f"  serving: {'redis-server registry' if use_redis else 'static node list (no redis-server)'}, {nodes} "
         f"query node(s), {replicas} replica(s) per shard, 1 coordinator")
    cluster = LocalCluster(workdir, args.index, args.model, shards, replicas, redis=use_redis, nodes=nodes,
                           coordinator_port=port, http_port=args.http_port, metrics_port=args.metrics_port)
    pieces["cluster"] = cluster
    cluster.start()
    _print_processes(cluster)


def _print_processes(cluster) -> None:
    for proc in cluster.processes:
        shards = ""
        if proc.name.startswith("node-"):
            shards = f"  shards {cluster.assignment[int(proc.name.split('-')[1])]}"
        _say(f"      {proc.name:12s} pid {proc.pid:<7d} {proc.address}{shards}")


def _supervise(workdir: pathlib.Path, cluster) -> int:
    """Serve until interrupted; a process that exits stops the rest (exit 1)."""
    from facepq_core.addresses import DEFAULT_COORDINATOR_PORT

    address = cluster.coordinator_address
    flag = "" if address.endswith(f":{DEFAULT_COORDINATOR_PORT}") else f" --coordinator {address}"
    _say(f"facepq up: serving; coordinator {address}")
    _say(f"  search: facepq search PHOTO{flag}    enrol: facepq enrol --person NAME PHOTO...{flag}")
    _say(f"  status: facepq status{flag}    logs: {workdir / 'logs'}")
    if cluster.http_url:
        _say(f"  web page and HTTP API: {cluster.http_url}/  (OpenAPI: {cluster.http_url}/docs)")
    _say(f"  stop:   Ctrl-C, or facepq down --workdir {workdir}")
    while True:
        time.sleep(1.0)
        dead = [name for name, ok in cluster.alive().items() if not ok]
        if dead:
            _say(f"facepq up: {', '.join(dead)} exited (see {workdir / 'logs'}); stopping")
            return 1


def _down(args) -> int:
    from facepq.demo import DEFAULT_WORKDIR
    from facepq.launcher import STATE_FILE, stop_recorded

    workdir = pathlib.Path(args.workdir) if args.workdir else DEFAULT_WORKDIR
    stopped = stop_recorded(workdir)
    if stopped is None:
        print(f"facepq down: nothing running in {workdir} (no running cluster in {STATE_FILE})")
        return 0
    print(f"facepq down: stopped {stopped} process(es) of {workdir}")
    return 0
