"""`facepq ingest`, `facepq index info|people|faces|face|rename|merge|move|export|import`, `facepq delete`,
`facepq compact`.

Only argparse is imported at module level; Ray, torch and pyarrow load inside
the handlers so `facepq --help` stays instant.
"""
from __future__ import annotations

import argparse


def _face_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a face id is a whole number, got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"a face id is in 0..2^64-1, got {text}")
    return value


def _index_command(sub, name: str, handler, summary: str, json_help: str, description: str | None = None):
    """An `index` subcommand with the --index and --json every one of them takes."""
    p = sub.add_parser(name, help=summary, description=description or summary)
    p.add_argument("--index", required=True)
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(handler=handler)
    return p


def register(subparsers) -> None:
    p = subparsers.add_parser("ingest", help="encode a gallery (photos or embeddings) into an index (Ray job)",
                              description="Encode a gallery with a trained model and commit it to an index. "
                                          "Runs on a local Ray, or on the cluster given by --ray-address / "
                                          "$RAY_ADDRESS (so it works under `ray job submit -- facepq ingest ...`).")
    p.add_argument("--model", required=True, help="trained checkpoint (model.pt)")
    p.add_argument("--gallery", required=True,
                   help="photo folder <root>/<person>/<photo>, a .csv/.parquet list (path, person), or embeddings: "
                        "X.npy float32 [N, E] with sidecar X.csv (person[, source]), or .parquet (embedding, person, source)")
    p.add_argument("--index", required=True, help="index path or pyarrow.fs URI (created on first ingest)")
    p.add_argument("--shards", type=int, default=None, help="shards of a new index (default 4; fixed at creation)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else local Ray)")
    p.add_argument("--actors", type=int, default=None,
                   help="encoder actors (default: CPUs, at most 8; never more than the photos, or the chunks of "
                        "embeddings, to encode)")
    p.add_argument("--batch-size", type=int, default=64, help="photos per encoder call (default 64)")
    p.add_argument("--segment-rows", type=int, default=None, help="rows per segment file (default 1,000,000)")
    p.add_argument("--read-cpus", type=float, default=None,
                   help="CPUs per photo read/align task; default 0.5 fuses reading into the encoder actors "
                        "(best on one machine); e.g. 1 keeps reads as tasks over all CPUs of a cluster")
    p.add_argument("--redis", default=None, help="redis://host:port/db for the commit lock (object stores)")
    p.add_argument("--refine", default=None, metavar="none|codes:BITS|float16",
                   help="refinement tier stored beside the codes of a NEW index, re-scoring each shard's "
                        "first-pass candidates at search time: codes:BITS = the model's longer product codes "
                        "(e.g. codes:256, 32 bytes a face), float16 = the embedding itself (a biometric "
                        "template: 2 bytes a dimension). Default: an existing index's own tier, none for a new one")
    p.add_argument("--dba-k", type=int, default=0, metavar="K",
                   help="database-side augmentation of a NEW index: encode each face from the weighted average of "
                        "its embedding and its K nearest gallery neighbours' (exact kNN in the job: O(N^2); "
                        "default 0 = none). Stale once faces are enrolled or deleted (see `index info`)")
    p.add_argument("--dba-alpha", type=float, default=3.0, metavar="A",
                   help="database-side augmentation: weigh each neighbour by its cosine to the face to the power A "
                        "(0 = plain average; default 3)")
    p.add_argument("--cells", type=int, default=None, metavar="L",
                   help="partition a NEW index into L cells (k-means of the codes, fitted on the first faces "
                        "written), so a search may scan only the --nprobe cells nearest the query; default none: "
                        "exhaustive only. An existing index keeps its partition")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (drawn only on a terminal anyway)")
    p.set_defaults(handler=_ingest)

    p = subparsers.add_parser("index", help="inspect an index: info, people, a person's faces, face ids",
                              description="Inspect an index.")
    sub = p.add_subparsers(dest="index_command", metavar="SUBCOMMAND")
    info = _index_command(sub, "info", _info, "version, faces, people, shards, segments, tombstones, bytes",
                          "machine-readable output")
    info.add_argument("--verify", action="store_true", help="also check every segment's sha256")
    people = _index_command(sub, "people", _people, "the people in the index with their face counts",
                            "one JSON object per person, one per line",
                            "Every person with at least one live face, sorted by name.")
    people.add_argument("--contains", metavar="TEXT", help="only names containing TEXT (case-insensitive)")
    faces = _index_command(sub, "faces", _faces, "a person's faces: face ids, sources, shards",
                           "one JSON object per face, one per line",
                           "The live faces of one person (exact name; a near miss gets suggestions).")
    faces.add_argument("--person", required=True, help="exact, case-sensitive name (see `facepq index people`)")
    face = _index_command(sub, "face", _face, "look up face ids: person, source, shard",
                          "one JSON object per face, one per line",
                          "Look up live faces by face id (as search results and enrolment print them).")
    face.add_argument("face_ids", nargs="+", type=_face_id, metavar="FACE_ID")

    rename = _index_command(sub, "rename", _rename, "rename a person (one commit)", "machine-readable output",
                            "Give every face of a person a new name; a name that has faces already is refused "
                            "(use merge).")
    rename.add_argument("--person", required=True)
    rename.add_argument("--to", required=True, dest="new_name", metavar="NEW_NAME")
    merge = _index_command(sub, "merge", _merge, "merge people into one (one commit)", "machine-readable output")
    merge.add_argument("--people", required=True, nargs="+", metavar="NAME")
    merge.add_argument("--into", required=True, metavar="NAME", help="an existing or a new name")
    move = _index_command(sub, "move", _move, "move faces to another person (one commit)", "machine-readable output")
    move.add_argument("face_ids", nargs="+", type=_face_id, metavar="FACE_ID")
    move.add_argument("--to", required=True, dest="person", metavar="NAME", help="an existing or a new name")
    for q in (rename, merge, move):
        q.add_argument("--redis", default=None, help="redis URL for the commit lock")
    export = _index_command(sub, "export", _export, "write people's codes and names to a file (no photos)",
                            "machine-readable output",
                            "Export the live faces (codes, face ids, names, sources; never photos) of some or all "
                            "people to an Arrow file another index of the same model can import.")
    export.add_argument("--out", required=True, help="the file to write (.arrow)")
    export.add_argument("--person", nargs="+", dest="persons", metavar="NAME", help="only these people")
    imp = _index_command(sub, "import", _import, "add an export file's people to an index (same model only)",
                         "machine-readable output")
    imp.add_argument("file", help="a file `facepq index export` wrote")
    imp.add_argument("--shards", type=int, default=None, help="shards of a new index (default 4)")
    imp.add_argument("--redis", default=None, help="redis URL for the commit lock")

    p = subparsers.add_parser("delete", help="delete a person or faces from an index (tombstones; see compact)")
    p.add_argument("--index", required=True)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--person", help="delete every face of this person (exact name; `facepq index people` lists them)")
    who.add_argument("--face-id", type=_face_id, nargs="+", dest="face_ids", help="delete these face ids")
    p.add_argument("--redis", default=None, help="redis URL for the commit lock")
    p.set_defaults(handler=_delete)

    p = subparsers.add_parser("compact", help="physically remove deleted faces and garbage-collect old files")
    p.add_argument("--index", required=True)
    p.add_argument("--grace", type=float, default=3600.0,
                   help="seconds a replaced or unreferenced file is kept for running readers/jobs (default 3600)")
    p.add_argument("--keep-manifests", type=int, default=10, help="past versions kept at most (default 10)")
    p.add_argument("--redis", default=None, help="redis URL for the commit lock")
    p.set_defaults(handler=_compact)


def _ingest(args: argparse.Namespace) -> int:
    from facepq_core.progress import bars_enabled
    from indexer.job import run_ingest
    from indexer.writer import DEFAULT_SEGMENT_ROWS

    summary = run_ingest(args.model, args.gallery, args.index, shards=args.shards, ray_address=args.ray_address,
                         actors=args.actors, batch_size=args.batch_size, redis_url=args.redis,
                         progress=bars_enabled(not args.no_progress),
                         segment_rows=args.segment_rows or DEFAULT_SEGMENT_ROWS,
                         read_cpus=args.read_cpus, refine=args.refine,
                         dba=(args.dba_k, args.dba_alpha) if args.dba_k else None, cells=args.cells)
    print("\n".join(summary.summary_lines()))
    return 0


def _info(args: argparse.Namespace) -> int:
    import json

    from indexer.info import index_info

    info = index_info(args.index, verify=args.verify)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"index {info['index']}: version {info['version']} (format {info['format_version']}, {info['created_at']})")
    print(f"  model: {info['model']['fingerprint']} trunk {info['model']['trunk']} "
          f"M={info['model']['M']} K={info['model']['K']} ({info['model']['bits']} bits, {info['model']['code_bytes']} B/code)")
    tiers = ", ".join(f"{t['tier']} {t.get('kind', t['codec'])} {t['bytes_per_face']} B/face "
                      f"({'in memory' if t['resident'] else 'read for candidates only'})" for t in info["tiers"])
    print(f"  bytes per face: {tiers}")
    if info["model"].get("partition"):
        print(f"  cell partition: {info['model']['partition']['cells']} cells (searches may scan a few: --nprobe)")
    if info.get("cells"):
        c = info["cells"]
        print(f"    rows per cell: mean {c['mean_rows']:.1f}, largest {c['largest_rows']} "
              f"({c['largest_over_mean']:.1f}x the mean), empty cells {c['empty']}")
    print(f"  faces: {info['faces']} live ({info['rows']} rows, {info['tombstones']} tombstoned), people: {info['people']}")
    print(f"  shards: {info['shard_count']}, segments: {info['segments']}, bytes: {info['bytes']}")
    for sh in info["shards"]:
        print(f"    shard {sh['shard']}: {sh['faces']} faces in {sh['segments']} segments, {sh['bytes']} bytes")
    if args.verify:
        print(f"  verified: all {info['segments']} segments match their sha256")
    aug = info.get("augmentation")
    if aug and aug.get("kind") == "dba":
        state = ("STALE: faces were enrolled or deleted since; re-ingest into a new index to recompute"
                 if aug.get("stale") else "current")
        print(f"  database-side augmentation: k={aug.get('k')} alpha={aug.get('alpha')} over {aug.get('faces')} "
              f"faces ({state})")
    print(f"  last commit: {info['message']}")
    return 0


def _people(args: argparse.Namespace) -> int:
    import json

    from indexer.people import list_people

    people = list_people(args.index, contains=args.contains)
    if args.json:
        for p in people:
            print(json.dumps({"person": p.person, "faces": p.faces, "shards": p.shards}))
        return 0
    width = max([6] + [len(p.person) for p in people[:10000]])
    print(f"{'person':{width}s}  {'faces':>6}  shards")
    for p in people:
        print(f"{p.person:{width}s}  {p.faces:>6}  {','.join(map(str, p.shards))}")
    what = f" matching {args.contains!r}" if args.contains else ""
    print(f"{len(people)} people{what}, {sum(p.faces for p in people)} faces")
    return 0


def _print_faces(records, as_json: bool) -> None:
    import json

    if as_json:
        for r in records:
            print(json.dumps(r.to_json()))
        return
    print(f"{'face_id':>20}  {'person':24s} {'shard':>5}  source")
    for r in records:
        print(f"{r.face_id:>20}  {r.person[:24]:24s} {r.shard:>5}  {r.source}")


def _faces(args: argparse.Namespace) -> int:
    from indexer.people import person_faces

    records = person_faces(args.index, args.person)
    _print_faces(records, args.json)
    if not args.json:
        print(f"{len(records)} faces of {args.person!r}")
    return 0


def _face(args: argparse.Namespace) -> int:
    from indexer.people import find_faces

    _print_faces(find_faces(args.index, args.face_ids), args.json)
    return 0


def _delete(args: argparse.Namespace) -> int:
    from indexer.commit import delete_faces
    from indexer.store import IndexStore

    version, n = delete_faces(IndexStore(args.index), person=args.person, face_ids=args.face_ids,
                              redis_url=args.redis)
    print(f"deleted {n} faces; index version {version} (run `facepq compact` to remove them from disk)")
    return 0


def _compact(args: argparse.Namespace) -> int:
    from indexer.commit import compact
    from indexer.store import IndexStore

    stats = compact(IndexStore(args.index), redis_url=args.redis, grace_seconds=args.grace,
                    keep_manifests=args.keep_manifests)
    print(f"compacted: removed {stats.rows_removed} deleted rows from {stats.segments_rewritten} segments; "
          f"deleted {stats.files_deleted} files ({stats.bytes_freed} bytes) and {stats.manifests_deleted} old "
          f"manifests; index version {stats.version}")
    return 0


def _print_change(args, what: str, result) -> int:
    import json

    if args.json:
        print(json.dumps({"faces_changed": result.faces_changed, "segments_rewritten": result.segments_rewritten,
                          "index_version": result.index_version}))
    else:
        print(f"{what}: {result.faces_changed} faces ({result.segments_rewritten} segments rewritten); index version "
              f"{result.index_version}")
    return 0


def _rename(args: argparse.Namespace) -> int:
    from indexer.relabel import rename_person

    result = rename_person(args.index, args.person, args.new_name, redis_url=args.redis)
    return _print_change(args, f"renamed {args.person!r} to {args.new_name!r}", result)


def _merge(args: argparse.Namespace) -> int:
    from indexer.relabel import merge_people

    result = merge_people(args.index, args.people, args.into, redis_url=args.redis)
    return _print_change(args, f"merged {', '.join(map(repr, args.people))} into {args.into!r}", result)


def _move(args: argparse.Namespace) -> int:
    from indexer.relabel import move_faces

    result = move_faces(args.index, args.face_ids, args.person, redis_url=args.redis)
    return _print_change(args, f"moved to {args.person!r}", result)


def _export(args: argparse.Namespace) -> int:
    import json

    from indexer.transfer import export_people

    faces, people = export_people(args.index, args.out, args.persons)
    print(json.dumps({"faces": faces, "people": people, "file": args.out}) if args.json else
          f"exported {faces} faces of {people} people to {args.out} (codes and names; no photos)")
    return 0


def _import(args: argparse.Namespace) -> int:
    import json

    from indexer.transfer import import_people

    r = import_people(args.index, args.file, redis_url=args.redis, shard_count=args.shards)
    print(json.dumps(vars(r)) if args.json else
          f"imported {r.faces_added} faces of {r.people} people ({r.faces_skipped} already there); index version "
          f"{r.index_version}")
    return 0
