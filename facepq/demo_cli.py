"""`facepq demo`, `facepq up`, `facepq down`: the whole system on one machine in one command.

`demo` runs every step (data, training, Ray ingest, Redis + query nodes + coordinator,
enrolment, searches, metrics) and stops everything it started, also on Ctrl-C or
SIGTERM. `up` does the same up to enrolment and keeps serving until stopped;
`down` stops an `up` from another terminal (safe to call twice).
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
    p.add_argument("--workdir", default=None, help="where data, model, index and logs go (default ./.facepq/demo)")
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
    p = subparsers.add_parser("up", help="like demo, then keep serving until Ctrl-C / `facepq down`")
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
    """Keep the demo's output readable: training epochs stay, library chatter goes."""
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("opqn_model.train").setLevel(logging.INFO)


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


def _build(args, workdir: pathlib.Path, settings, pieces: dict) -> None:
    """Steps 1-5: data, model, index, cluster, enrolment, filling `pieces` as they exist.

    `pieces` is filled step by step (not returned at the end) so that an interruption at any
    point leaves the caller holding every process started so far.
    """
    from facepq import demo
    from facepq.launcher import LocalCluster

    progress = not args.no_progress
    _say(f"[1/6] data: {'your photos in ' + args.data if args.data else 'synthetic faces (not real people)'}")
    data = demo.prepare_data(workdir, settings, args.data)
    _say(f"      {len(data.train)} photos of {len({r.person for r in data.train})} training people; "
         f"{len(data.unseen_people)} unseen people: gallery {len(data.gallery)} photos, "
         f"{len(data.queries) + 1} queries, {data.enrol_person} kept aside for enrolment")

    _say(f"[2/6] model: resnet20 width {settings.width}, {settings.bits}-bit OPQN codes, {settings.epochs} epochs")
    model, reused, summary = demo.train_model(workdir, settings, data, progress)
    if reused:
        _say(f"      reusing {model} (same settings and training photos)")
    else:
        _say(f"      trained in {summary['seconds']:.0f} s; best validation code mAP {summary['best_val_map']:.3f}")

    _say(f"[3/6] index: Ray ingest of {len(data.gallery)} gallery photos into {settings.shards} shards")
    ingest = demo.ingest_gallery(workdir, model, data, settings, progress)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # ray.init replaced it with its own
    _say(f"      {ingest.faces_added} faces in {ingest.seconds:.1f} s, index version {ingest.version}")

    use_redis = not args.no_redis and shutil.which("redis-server") is not None
    nodes = settings.shards
    _say(f"[4/6] serving: {'redis-server registry' if use_redis else 'static node list (no redis-server)'}, "
         f"{nodes} query nodes, {settings.replicas} replica(s) per shard, 1 coordinator")
    cluster = LocalCluster(workdir, workdir / "index", model, settings.shards, settings.replicas, redis=use_redis)
    pieces.update(data=data, model=model, cluster=cluster, settings=settings)
    cluster.start()
    for proc in cluster.processes:
        shards = ""
        if proc.name.startswith("node-"):
            shards = f"  shards {cluster.assignment[int(proc.name.split('-')[1])]}"
        _say(f"      {proc.name:12s} pid {proc.pid:<7d} {proc.address}{shards}")

    _say(f"[5/6] enrol: {data.enrol_person} ({len(data.enrol_photos)} photos) through the coordinator's Enrol RPC")
    client = demo.CoordinatorClient(cluster.coordinator_address)
    pieces["client"] = client
    enrol = demo.enrol_and_find(client, data)
    _say(f"      enrolled {len(enrol.face_ids)} faces, index version {enrol.index_version}")
    if enrol.rank is None:
        _say(f"      another photo of {enrol.person}: NOT served within {enrol.seconds:.0f} s "
             f"(see {workdir / 'logs'})")
    else:
        _say(f"      another photo of {enrol.person} finds them {enrol.seconds:.1f} s after enrolling (hot reload): "
             f"best match at rank {enrol.rank} of {enrol.searched} faces")


def _report(args, workdir, pieces) -> None:
    from facepq import demo

    data, client, settings = pieces["data"], pieces["client"], pieces["settings"]
    run = demo.search_all(client, data, rounds=settings.rounds, progress=not args.no_progress)
    _say(f"[6/6] search: {len(run.queries)} queries (one per unseen person) x {settings.rounds} rounds over gRPC")
    _say()
    _say("example hits (query photo of an unseen person -> top 3; * = same person)")
    _say(f"  {'query person':14s} {'rank':>4}  {'hit person':14s} {'score':>8}  {'shard':>5}")
    for query, reply in list(zip(run.queries, run.replies))[-5:]:  # the last ones include the enrolled person
        for rank, hit in enumerate(reply.hits[:3], 1):
            mark = "*" if hit.person == query.person else " "
            _say(f"  {query.person if rank == 1 else '':14s} {rank:>4}  {hit.person[:14]:14s} {hit.score:8.3f}  "
                 f"{hit.shard:>5} {mark}")
    metrics = demo.offline_metrics(pieces["model"], data)
    _say()
    _say(f"search latency over {len(run.latencies_ms)} searches (photo in, top-{demo.SEARCH_K} out, client side): "
         f"p50 {run.percentile(50):.1f} ms, p99 {run.percentile(99):.1f} ms "
         f"(coordinator's own time p50 {run.percentile(50, True):.1f} ms, p99 {run.percentile(99, True):.1f} ms)")
    _say(f"unseen-identity mAP@all (offline, same photos), {metrics['n_queries']} queries vs gallery of "
         f"{metrics['n_gallery']} ({metrics['bits']}-bit codes, {metrics['M']}x{metrics['K']}):")
    _say(f"  mAP codes (OPQN, asymmetric lookup tables): {metrics['map']:.4f}")
    _say(f"  mAP float (trunk embeddings, cosine):       {metrics['map_float']:.4f}")
    _say(f"  codes / float: {metrics['map_ratio_vs_float']:.3f}; P@1 offline {metrics['p_at_1']:.3f}, "
         f"over gRPC {run.p_at_1():.3f}")
    cluster = pieces["cluster"]
    _say()
    _say("where everything lives")
    _say(f"  workdir      {workdir}")
    _say(f"  photos       {data.root}")
    _say(f"  model        {pieces['model']}")
    _say(f"  index        {workdir / 'index'}")
    _say(f"  logs         {workdir / 'logs'}")
    _say(f"  coordinator  {cluster.coordinator_address}" + (f"   registry {cluster.redis_url}" if cluster.redis_url else ""))
    _say("  keep it serving: facepq up (same options), then facepq search PHOTO --coordinator HOST:PORT")


def _stop(pieces: dict) -> None:
    with _signals_ignored():
        if pieces.get("client") is not None:
            pieces["client"].close()
        if pieces.get("cluster") is not None:
            pieces["cluster"].stop()


def _demo(args) -> int:
    import atexit

    _quiet_logging(getattr(args, "verbose", False))
    t_start = time.monotonic()
    workdir, settings = _workdir(args), _settings(args)
    pieces: dict = {}
    atexit.register(_stop, pieces)  # also when something outside the try exits the interpreter
    with _sigterm_as_interrupt():
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

    from facepq.launcher import running_state
    from facepq_core.errors import ConfigError

    _quiet_logging(getattr(args, "verbose", False))
    workdir, settings = _workdir(args), _settings(args)
    previous = running_state(workdir)
    if previous:
        raise ConfigError(f"facepq up is already running in {workdir} (pid {previous['pid']}, coordinator "
                          f"{previous.get('coordinator')}); run `facepq down --workdir {workdir}` first")
    pieces: dict = {}
    atexit.register(_stop, pieces)
    with _sigterm_as_interrupt():
        try:
            _build(args, workdir, settings, pieces)
            cluster = pieces["cluster"]
            _say(f"facepq up: serving; coordinator {cluster.coordinator_address}")
            _say(f"  search: facepq search PHOTO --coordinator {cluster.coordinator_address}")
            _say(f"  stop:   Ctrl-C, or facepq down --workdir {workdir}")
            while True:
                time.sleep(1.0)
                dead = [name for name, ok in cluster.alive().items() if not ok]
                if dead:
                    _say(f"facepq up: {', '.join(dead)} exited (see {workdir / 'logs'}); stopping")
                    return 1
        except KeyboardInterrupt:  # Ctrl-C or `facepq down` is how `up` is meant to end
            _say("facepq up: stopping")
            return 0
        finally:
            _stop(pieces)  # the launcher records the cluster as stopped


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
