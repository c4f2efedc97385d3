"""The Ray ingest job: gallery -> face crops -> OPQN codes -> segments -> one commit.

    list inputs ─► ray.data.from_items ─► map_batches(read_and_align | read_embedding_chunk)   CPU tasks
               ─► map_batches(EncoderActor, ActorPoolStrategy(size=actors))                  checkpoint loaded once per actor
               ─► iter_batches in the driver ─► IndexWriter.add ─► IndexWriter.commit         one new version

Inputs (indexer.inputs): a photo folder or .csv/.parquet photo list, or embeddings
of the model's trunk (.npy + sidecar, or Parquet with an `embedding` column).

Ray: connects to `ray_address`, else to the cluster in $RAY_ADDRESS (as under
`ray job submit -- facepq ingest ...`), else starts a local Ray on this machine's CPUs.
Nothing is visible in the index until the final commit; a job killed before it
leaves the previous version intact, and running it again skips faces already present.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pathlib
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from facepq_core.errors import ConfigError, DataError
from indexer.inputs import Inputs, list_inputs
from indexer.manifest import ModelMeta
from indexer.writer import DEFAULT_SEGMENT_ROWS, IndexWriter

log = logging.getLogger(__name__)

# Fractional: two 1-CPU actors on a 2-CPU machine left nothing for the read tasks and hung.
ACTOR_CPUS = 0.5
# torch intra-op threads per encoder actor: its CPU share (at least 1). Set explicitly, not left to
# OMP_NUM_THREADS, which Ray only sets when the user has not: two 2-thread actors on 2 cores
# contend instead of adding up.
ACTOR_THREADS = max(1, int(ACTOR_CPUS))
# Longest wait for the whole encoder pool to start (worker start, torch import, checkpoint load)
# before any photo is read; a pool the cluster cannot place fails with a clear error, not a hang.
ACTOR_START_TIMEOUT_S = 300
PROGRESS_EVERY_S = 2.0  # INFO progress lines (shown with -v; a bar on a terminal)
MIN_RATE_WINDOW_S = 2.0  # a rate over a shorter window is noise (one burst of batches), so none is printed


@dataclass
class IngestSummary:
    """What an ingest did (printed by `facepq ingest`)."""

    index_uri: str
    version: int | None
    previous_version: int | None
    inputs: int = 0
    faces_encoded: int = 0
    faces_added: int = 0
    duplicates_skipped: int = 0
    segments_written: int = 0
    shards_written: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    converted: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)  # reason -> a few photo paths
    seconds: float = 0.0          # wall time of the whole run
    ray_seconds: float = 0.0      # connecting to / starting Ray
    startup_seconds: float = 0.0  # pipeline start -> every actor's first batch (actor start, model load)
    actors: int = 0               # encoder actors the pipeline ran (what was asked, at most the work items)
    refine: str = "none"          # the index's refinement tier
    cells: int = 0                # the index's cell partition (0: none, exhaustive only)
    steady_rate: float = 0.0      # faces/s once every actor delivered a batch (what more actors speed up)
    steady_seconds: float = 0.0   # the window `steady_rate` is measured over (start-up's end -> last batch)
    dba: str = ""                 # database-side augmentation applied ("" = none): "k=.. alpha=.. over N faces"
    dba_seconds: float = 0.0      # its exact kNN, averaging and encoding in the driver

    def timing_line(self) -> str:
        """Where the wall time went; a rate only where its window is long enough to mean something."""
        parts = [f"Ray {self.ray_seconds:.1f} s",
                 f"encoder start-up {self.startup_seconds:.1f} s ({self.actors} actor{'s' * (self.actors != 1)}, "
                 f"model load, their first batches)"]
        if self.steady_seconds >= MIN_RATE_WINDOW_S:
            parts.append(f"then {self.steady_seconds:.1f} s at {self.steady_rate:.0f} inputs/s")
        else:  # a small gallery arrives in one burst of batches: there is no rate to speak of
            parts.append(f"then {self.steady_seconds:.1f} s for the rest (too short for a rate)")
        other = max(0.0, self.seconds - self.ray_seconds - self.startup_seconds - self.steady_seconds)
        return "  time: " + ", ".join(parts) + f"; model, inputs, segments and commit {other:.1f} s"

    def summary_lines(self) -> list[str]:
        lines = [f"ingest into {self.index_uri}: {self.inputs} inputs in {self.seconds:.1f} s",
                 self.timing_line(),
                 f"  faces encoded: {self.faces_encoded}",
                 f"  faces added: {self.faces_added}",
                 f"  duplicates skipped (already in the index): {self.duplicates_skipped}"]
        lines.append(f"  photos skipped: {sum(self.skipped.values())}")
        for reason, count in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
            examples = self.examples.get(reason, [])
            lines.append(f"    {reason}: {count}" + (f" (e.g. {', '.join(examples)})" if examples else ""))
        if self.converted:
            lines.append("  photos converted: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.converted.items())))
        lines.append(f"  segments written: {self.segments_written} in shards {self.shards_written or '-'}")
        if self.cells:
            lines.append(f"  cell partition: {self.cells} cells (searches may scan a few: --nprobe)")
        if self.refine != "none":
            lines.append(f"  refinement tier: {self.refine} (stored beside the codes)")
        if self.dba:
            lines.append(f"  database-side augmentation: {self.dba} (exact kNN, {self.dba_seconds:.1f} s; stale "
                         f"once faces are enrolled or deleted: re-ingest into a new index to recompute)")
        if self.version == self.previous_version:
            lines.append(f"  index version: {self.version} (unchanged: nothing new)")
        else:
            lines.append(f"  index version: {self.previous_version or 'none'} -> {self.version}")
        return lines


def load_model_info(model_path: str, refine: str | None = None) -> tuple[ModelMeta, dict, int]:
    """(ModelMeta, face-pipeline settings, embedding dim) of a checkpoint, without building its trunk.

    `refine`: the refinement tier the index stores ('codes:256', 'float16'; None: none), which the
    model must offer (ConfigError otherwise).
    """
    from facepq_core.refine import RefineTier
    from opqn_model.api import refine_codec, refine_codecs_of
    from opqn_model.checkpoint import load_checkpoint
    from opqn_model.methods import get_method

    payload = load_checkpoint(model_path)
    config = payload["model_config"]
    codec = get_method(payload["method"]).codec(payload)
    tier = None
    if refine is not None:
        tier = RefineTier.of(refine, refine_codec(refine_codecs_of(payload), codec.embedding_dim, refine))
    meta = ModelMeta.from_code_spec(codec.spec, payload["fingerprint"], config.trunk, codec.name, tier)
    pipeline = dict(config.pipeline or {})
    if not pipeline:  # checkpoints without stored settings: the trunk's default pipeline
        from opqn_model.api import FaceEncoder

        pipeline = FaceEncoder.from_checkpoint(payload).pipeline.to_dict()
    return meta, pipeline, codec.embedding_dim


def _codewords(model_path: str):
    """The model codec's codewords (the space a new index's cells are fitted in; facepq_core.partition)."""
    from opqn_model.checkpoint import load_checkpoint
    from opqn_model.methods import get_method

    payload = load_checkpoint(model_path)
    return get_method(payload["method"]).codec(payload).codewords()


def _index_refine(index_uri, refine: str | None) -> str | None:
    """The refinement tier an ingest writes: the one asked for, else an existing index's own (None: none)."""
    from facepq_core.refine import parse_refine
    from indexer.store import IndexStore

    if refine is not None:
        return parse_refine(refine)
    store = IndexStore(index_uri)
    version = store.current_version()
    if version is None:
        return None
    tier = store.load_manifest(version).model.refine
    return tier.kind if tier else None


def init_ray(ray_address: str | None = None) -> bool:
    """Connect to / start Ray; True when this call started it (the caller shuts it down).

    A Ray started here serves this machine only, so it listens on loopback: left to itself Ray binds its
    GCS, raylet and workers to every interface with authentication disabled, which lets anyone on the
    network submit code to it. Ray's single-machine mode (what it uses on macOS and Windows: node IP
    127.0.0.1) is switched on for that; a cluster given by address is used as it is configured.

    Ray follows facepq's verbosity (facepq_core.progress): unless facepq logs INFO (`-v`), Ray's own
    INFO/WARNING lines and its C++ core's log lines on stderr (e.g. core_worker.cc's note that an actor
    restart would fail, which a one-shot job never does) are kept out of the output; they still reach
    the session's log files.
    """
    import ray

    if ray.is_initialized():
        return False  # a Ray this process already runs is used as it is (nothing of its mode is touched)
    local = not ray_address and not os.environ.get("RAY_ADDRESS")
    with _ray_on_loopback() if local else contextlib.nullcontext():
        return _init_ray(ray_address, local)


def _init_ray(ray_address: str | None, local: bool) -> bool:
    import ray

    from facepq_core.progress import is_quiet

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = is_quiet("indexer")
    options = {"log_to_driver": False, "logging_level": logging.ERROR if quiet else logging.INFO}
    try:
        with native_stderr_hidden(quiet):
            if ray_address:
                ray.init(address=ray_address, **options)
            elif not local:
                ray.init(address="auto", **options)
            else:
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **options)
    except ConnectionError as exc:
        raise ConfigError(f"cannot connect to Ray at {ray_address or os.environ.get('RAY_ADDRESS')}: {exc}") from exc
    return True


@contextlib.contextmanager
def native_stderr_hidden(hidden: bool = True):
    """Point file descriptor 2 at /dev/null while Ray's C++ core may write to it (start-up, the encoder
    actors' creation, shutdown): those lines bypass Python's logging, so levels cannot hold them back.

    Only around calls that print nothing of facepq's own; with `-v` (hidden=False) nothing is hidden.
    """
    if not hidden:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _quiet_ray_data_console(quiet: bool) -> None:
    """Ray Data logs INFO lines to the console through its own handler (its file handler keeps them).

    Lowering that handler's level once does not hold: Ray Data rebuilds its handlers from its logging
    config whenever a context with another dataset logger becomes current (`DataContext._set_current`), and
    a rebuilt console handler logged "Dataset ... execution finished" to stderr of a quiet ingest (CI,
    2026-12-02). So the config it rebuilds from becomes a copy of Ray Data's default with the console at
    ERROR (`RAY_DATA_LOGGING_CONFIG`, unless the user names one), and the handlers of now are lowered too.
    """
    if not quiet:
        return
    if "RAY_DATA_LOGGING_CONFIG" not in os.environ:
        path = _quiet_ray_data_logging_config()
        if path:
            os.environ["RAY_DATA_LOGGING_CONFIG"] = path
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.ERROR)


def _quiet_ray_data_logging_config() -> str | None:
    """A file holding Ray Data's default logging config with its console handler at ERROR (named by its
    content, written once, atomically); None when this Ray has no such default to copy."""
    import copy
    import hashlib
    import tempfile

    import yaml

    try:
        from ray.data._internal.logging import DEFAULT_CONFIG
        config = copy.deepcopy(DEFAULT_CONFIG)
        config["handlers"]["console"]["level"] = "ERROR"
    except (ImportError, KeyError, TypeError):
        return None
    text = yaml.safe_dump(config)
    path = os.path.join(tempfile.gettempdir(),
                        f"facepq-ray-data-logging-{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml")
    if not os.path.exists(path):
        part = f"{path}.{os.getpid()}.part"
        with open(part, "w") as f:
            f.write(text)
        os.replace(part, path)
    return path


@contextlib.contextmanager
def _ray_on_loopback():
    """While Ray starts: make a Ray started by this process use node IP 127.0.0.1, so all its servers bind to
    loopback.

    Ray maps an explicit `_node_ip_address="127.0.0.1"` back to the host's address; its single-machine
    mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) does not. The constant is read at import, so it is also set
    on an already imported Ray. The environment variable is restored afterwards: child processes of this
    one (a `ray start` of a real cluster, say) must not inherit single-machine mode.
    """
    var = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    previous = os.environ.get(var)
    os.environ[var] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    switch = constants is not None and hasattr(constants, "ENABLE_RAY_CLUSTER")
    was = constants.ENABLE_RAY_CLUSTER if switch else None
    if switch:
        constants.ENABLE_RAY_CLUSTER = False
    elif constants is not None:  # a Ray without this switch: say so rather than silently listening everywhere
        log.warning("cannot keep the local Ray on loopback with this Ray version; it may listen on every "
                    "interface")
    try:
        yield
    finally:
        # Both back as they were (a running Ray keeps its node address; the switch only matters at a start):
        # a later Ray started here, or a `ray start` child, must not inherit single-machine mode half-way.
        if previous is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = previous
        if switch:
            constants.ENABLE_RAY_CLUSTER = was


# ---- the job -----------------------------------------------------------------------------------
def run_ingest(model_path: str, gallery: str, index_uri: str, shards: int | None = None,
               ray_address: str | None = None, actors: int | None = None, batch_size: int = 64,
               redis_url: str | None = None, progress: bool = True,
               segment_rows: int = DEFAULT_SEGMENT_ROWS, read_cpus: float | None = None,
               actor_start_timeout: float = ACTOR_START_TIMEOUT_S, refine: str | None = None,
               dba: tuple[int, float] | None = None, cells: int | None = None) -> IngestSummary:
    """Encode a gallery with the model at `model_path` and commit it to the index at `index_uri`.

    Args:
        shards: shard count of a new index (default 4); must match an existing index when given.
        ray_address: Ray cluster to use (default: $RAY_ADDRESS, else a local Ray).
        actors: encoder actors (default: the cluster's CPU count, at most 8); never more than the gallery's
            photos, or its chunks of EMBEDDING_CHUNK_ROWS (indexer.inputs) embeddings.
        batch_size: photos (or embedding rows) per encoder call.
        redis_url: Redis commit lock, for object-store indexes or many concurrent writers.
        segment_rows: rows per segment file.
        read_cpus: CPUs per read/align task. Default: the actors' 0.5, so Ray Data fuses reading into
            the encoder actors (least data movement; best on one machine). Any other value keeps the
            reads as separate tasks that spread over every CPU of a cluster (e.g. 1 with GPU actors).
        actor_start_timeout: seconds to wait for every encoder actor to start before any input is read.
        refine: refinement tier of a NEW index ('none', 'codes:BITS', 'float16'; facepq_core.refine). None: an
            existing index's own tier, none for a new index. An existing index keeps the tier it was created
            with (another one is refused).
        dba: (k, alpha): database-side augmentation (indexer.dba): the actors return embeddings, the driver
            averages each with its k nearest neighbours' (exact kNN over this job's faces) and encodes them. Only
            into a new index (the neighbours of faces already indexed cannot be recomputed from their codes).
        cells: cell partition of a NEW index (facepq_core.partition; None/0: none). An existing index keeps
            its own (another cell count is refused).
    Raises:
        DataError / ConfigError / CheckpointError / IndexFormatError for unusable inputs, a model that
        does not match the index, or a Ray cluster that cannot be reached.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if actor_start_timeout <= 0:
        raise ConfigError(f"actor start timeout must be > 0 s, got {actor_start_timeout}")
    if read_cpus is not None and not 0 < read_cpus <= 64:
        raise ConfigError(f"read CPUs per task must be in (0, 64], got {read_cpus}")
    t0 = time.monotonic()
    model_path = str(pathlib.Path(model_path).resolve())
    meta, pipeline, embedding_dim = load_model_info(model_path, _index_refine(index_uri, refine))
    # Open the writer first: a model/index mismatch fails before any encoding.
    # The enrol rule (indexer.enrol_rule): photos already enrolled as another person are skipped and reported.
    writer = IndexWriter(index_uri, meta, shard_count=shards, redis_url=redis_url, segment_rows=segment_rows,
                         on_conflict="skip", cells=cells, codewords=_codewords(model_path) if cells else None)
    previous = writer.base_version
    collector = None
    if dba is not None:
        from indexer.dba import check_dba

        collector = _Collected(check_dba(*dba))
        if previous is not None:
            writer.abort()
            raise ConfigError(f"database-side augmentation averages every face with its neighbours in the gallery "
                              f"being ingested, and {writer.store.uri} already holds version {previous} (faces whose "
                              f"neighbours cannot be recomputed from codes): ingest with --dba-k into a new index")
    inputs = list_inputs(gallery, embedding_dim=embedding_dim)
    log.info("ingest %s (%d %s) into %s with model %s", gallery, inputs.count, inputs.kind, writer.store.uri,
             meta.fingerprint)
    summary = IngestSummary(index_uri=writer.store.uri, version=previous, previous_version=previous,
                            inputs=inputs.count)
    t_ray = time.monotonic()
    started = init_ray(ray_address)
    summary.ray_seconds = time.monotonic() - t_ray
    try:
        _run_pipeline(inputs, model_path, pipeline, writer, summary, actors, batch_size, progress, gallery,
                      ACTOR_CPUS if read_cpus is None else read_cpus, actor_start_timeout, collector)
        if collector is not None:
            t_dba = time.monotonic()
            collector.encode_into(writer, model_path)
            summary.dba_seconds = time.monotonic() - t_dba
            summary.dba = f"k={collector.dba.k} alpha={collector.dba.alpha:g} over {collector.faces} faces"
        summary.refine = meta.refine.kind if meta.refine else "none"
        message = f"ingest {gallery} (model {meta.fingerprint})"
        summary.version = writer.commit(message)
        summary.cells = writer.model.partition.cells if writer.model.partition else 0
    except BaseException:
        writer.abort()  # the segments of a failed job are removed now, not left to garbage collection
        raise
    finally:
        if started:
            import ray

            from facepq_core.progress import is_quiet

            with native_stderr_hidden(is_quiet("indexer")):
                ray.shutdown()
    summary.faces_added = writer.stats.rows_added
    summary.duplicates_skipped = writer.stats.duplicates_skipped - len(writer.conflicts)
    if writer.conflicts:
        summary.skipped["enrolled_as_other"] = len(writer.conflicts)
        summary.examples["enrolled_as_other"] = [f"{c.source} (enrolled as {c.enrolled_as!r})"
                                                 for c in writer.conflicts[:3]]
    summary.segments_written = writer.stats.segments_written
    summary.shards_written = sorted(writer.stats.shards_written)
    summary.seconds = time.monotonic() - t0
    return summary


def _run_pipeline(inputs: Inputs, model_path: str, pipeline: dict, writer: IndexWriter, summary: IngestSummary,
                  actors: int | None, batch_size: int, progress: bool, gallery: str, read_cpus: float,
                  actor_start_timeout: float, collector=None) -> None:
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    actors = int(actors) if actors else min(cpus, 8)
    if actors < 1:
        raise ConfigError(f"actors must be >= 1, got {actors}")
    # No more actors than work items (photos, or embedding chunks of EMBEDDING_CHUNK_ROWS): the others would
    # start (interpreter, torch, the model: seconds of CPU each) and get nothing (Ray Data warns as much);
    # an embeddings file of fewer rows than a chunk is one item.
    actors = min(actors, max(1, len(inputs.items)))
    summary.actors = actors
    from facepq_core.progress import is_quiet

    _quiet_ray_data_console(is_quiet("indexer"))
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.wait_for_min_actors_s
    ctx.enable_progress_bars = False  # we report progress ourselves, in faces
    # Start the whole encoder pool before streaming (Ray Data's default starts actors in the
    # background and waits for them forever): the first actor up no longer races the others'
    # start-up for the CPUs, and the steady rate is that of the whole pool.
    ctx.wait_for_min_actors_s = actor_start_timeout
    try:
        refine = writer.model.refine.kind if writer.model.refine else None
        _stream(ray, build_dataset(ray, inputs, pipeline, model_path, actors, batch_size, gallery, read_cpus, refine,
                                   features=collector is not None),
                inputs, writer if collector is None else collector, summary, progress, actors, actor_start_timeout)
    finally:
        ctx.enable_progress_bars, ctx.wait_for_min_actors_s = saved


def build_dataset(ray, inputs: Inputs, pipeline: dict, model_path: str, actors: int, batch_size: int, gallery: str,
           read_cpus: float, refine: str | None = None, features: bool = False):
    """The Ray Data pipeline: inputs -> read stage -> encoder actor pool (lazy; nothing runs yet).

    `refine`: the index's refinement tier, whose rows the encoder actors make beside the codes.
    `features`: the actors return embeddings instead of codes (database-side augmentation)."""
    from indexer.encode_actor import EncoderActor, read_and_align, read_embedding_chunk

    if inputs.kind == "photos":
        blocks = max(actors, -(-len(inputs.items) // batch_size))  # every actor gets work, even on small inputs
        ds = ray.data.from_items(inputs.items, override_num_blocks=min(blocks, 200, len(inputs.items)))
        ds = ds.map_batches(read_and_align, fn_kwargs={"pipeline": pipeline}, batch_size=batch_size,
                            batch_format="numpy", num_cpus=read_cpus)
    else:
        ds = ray.data.from_items(inputs.items, override_num_blocks=len(inputs.items))
        ds = ds.map_batches(read_embedding_chunk, fn_kwargs={"path": str(pathlib.Path(gallery).resolve()),
                                                             "kind": inputs.kind},
                            batch_size=1, batch_format="numpy", num_cpus=read_cpus)
    ds = ds.map_batches(EncoderActor, fn_constructor_kwargs={"model_path": model_path, "threads": ACTOR_THREADS,
                                                             "refine": refine, "features": features},
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=ACTOR_CPUS,
                        batch_size=batch_size if inputs.kind == "photos" else max(batch_size, 4096),
                        batch_format="numpy")
    return ds


def _stream(ray, ds, inputs: Inputs, writer, summary: IngestSummary, progress: bool,
            actors: int = 1, actor_start_timeout: float = ACTOR_START_TIMEOUT_S) -> None:
    """Pull encoded batches into the writer (an IndexWriter, or a _Collected gathering embeddings for
    database-side augmentation: the same `add` taking embeddings for codes), counting skips and reporting progress.

    The steady rate counts from the `actors`-th batch on: each actor's first batch lands at about the
    same time, so counting those would credit a larger pool with work done before the clock started.
    """
    from tqdm import tqdm

    from opqn_model.datasets import SkipCounter

    skips = SkipCounter()
    bar = tqdm(total=inputs.count, unit="face", desc="ingest", disable=not progress, smoothing=0.1)
    done, batches, last_log, t_start = 0, 0, 0.0, time.monotonic()
    t_first = first_n = None  # when every actor has delivered a batch (the steady window starts)
    from facepq_core.progress import is_quiet

    try:
        batches_in = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
        with native_stderr_hidden(is_quiet("indexer")):  # the pool starts: Ray's C++ notes on its actors
            first = next(batches_in, None)
        _quiet_ray_data_console(is_quiet("indexer"))  # Ray Data set up its loggers for this execution
        for batch in ([] if first is None else itertools.chain([first], batches_in)):
            n = len(batch["face_id"])
            if inputs.kind == "photos":
                ok = np.array([not s for s in batch["skip"]], dtype=bool)
                for reason, source in zip(batch["skip"][~ok], batch["source"][~ok]):
                    skips.add(str(reason), str(source))
                for note, source in zip(batch["note"][ok], batch["source"][ok]):
                    skips.add_note(str(note) or None, str(source))
                writer.add(batch["face_id"][ok], batch["person"][ok], batch["source"][ok],
                           batch["feature" if "feature" in batch else "code"][ok],
                           batch["refine"][ok] if "refine" in batch else None)
                summary.faces_encoded += int(ok.sum())
            else:
                import pyarrow as pa

                rows = pa.array(batch["row"])
                writer.add(batch["face_id"], inputs.persons.take(rows), inputs.sources.take(rows),
                           batch["feature" if "feature" in batch else "code"], batch.get("refine"))
                summary.faces_encoded += n
            done += n
            bar.update(n)
            now = time.monotonic()
            batches += 1
            if t_first is None and (batches >= actors or done == inputs.count):
                t_first, first_n = now, done
            if now - last_log >= PROGRESS_EVERY_S or done == inputs.count:
                last_log = now
                rate = done / max(now - t_start, 1e-9)
                eta = (inputs.count - done) / rate if rate > 0 else float("inf")
                log.info("ingest progress: %d/%d inputs (%.0f/s, ETA %.0f s)", done, inputs.count, rate, eta)
    except ray.exceptions.GetTimeoutError as exc:
        raise ConfigError(f"the {actors} encoder actors ({ACTOR_CPUS} CPU each) did not all start within "
                          f"{actor_start_timeout:g} s: the Ray cluster may lack the CPUs for them (use fewer "
                          f"--actors) or loading the model is failing; see the Ray worker logs") from exc
    except ray.exceptions.RayError as exc:
        raise _translate_ray_error(exc) from exc
    finally:
        bar.close()
    if t_first is not None:
        summary.startup_seconds = t_first - t_start
        steady = time.monotonic() - t_first
        summary.steady_seconds = steady
        summary.steady_rate = (done - first_n) / steady if steady > 0 else 0.0
    summary.skipped, summary.converted = dict(skips.skipped), dict(skips.converted)
    summary.examples = {k: list(v) for k, v in skips.examples.items() if k in skips.skipped}


class _Collected:
    """Every face of a DBA ingest, gathered in the driver (N x E float32), then augmented, encoded and added."""

    def __init__(self, dba):
        self.dba = dba
        self.ids, self.persons, self.sources, self.features = [], [], [], []

    @property
    def faces(self) -> int:
        return sum(len(i) for i in self.ids)

    def add(self, face_ids, persons, sources, features, refine=None) -> None:
        self.ids.append(np.asarray(face_ids, dtype=np.uint64))
        self.persons += [str(p) for p in (persons.to_pylist() if hasattr(persons, "to_pylist") else persons)]
        self.sources += [str(s) for s in (sources.to_pylist() if hasattr(sources, "to_pylist") else sources)]
        self.features.append(np.asarray(features, dtype=np.float32))

    def encode_into(self, writer: IndexWriter, model_path: str) -> None:
        """Augment (indexer.dba), encode with the model's codec (and the index's tier) and add to `writer`,
        which records the augmentation in the commit's manifest."""
        from indexer.dba import augment
        from opqn_model.api import refine_codec, refine_codecs_of
        from opqn_model.checkpoint import load_checkpoint
        from opqn_model.methods import get_method

        if not self.ids:
            return
        payload = load_checkpoint(model_path)
        codec = get_method(payload["method"]).codec(payload)
        feats = augment(np.concatenate(self.features), self.dba)
        tier = writer.model.refine
        rows = refine_codec(refine_codecs_of(payload), codec.embedding_dim, tier.kind).encode(feats) if tier else None
        writer.add(np.concatenate(self.ids), self.persons, self.sources, codec.encode(feats), rows)
        writer.augmentation = self.dba.record(len(feats))


def _translate_ray_error(exc: Exception) -> Exception:
    """The FacepqError raised inside a Ray task/actor (e.g. CheckpointError), as a one-line error here.

    Ray Data wraps errors of a UDF in UserCodeException without the original object, so
    the error is recovered from the remote traceback text when the cause chain lacks it.
    """
    import re

    from facepq_core import errors

    cause = exc
    for _ in range(10):
        if cause is None:
            break
        if isinstance(cause, errors.FacepqError):
            return cause
        cause = getattr(cause, "cause", None) or cause.__cause__
    found = re.findall(r"facepq_core\.errors\.(\w+): (.+)", str(exc))
    if found:
        name, message = found[-1]
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, errors.FacepqError) and cls is not errors.BadImage:
            return cls(f"in a Ray worker: {message.strip()}")
    first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return DataError(f"the ingest pipeline failed in a Ray worker: {first}")
