"""The steps of `facepq demo` / `facepq up`, as functions (the CLI prints; nothing here does).

1. data: synthetic identities (or the user's person folders), split into training
   people and unseen people; of the unseen people one is kept aside for enrolment
   and one photo of every other is a query, the rest is the gallery;
2. model: a small OPQN model trained on the training people only (resnet20 trained with the
   OPQN loss, then a head refitted to its embeddings when validation prefers it: codes that
   separate people, see TrainConfig.head_refit), cached in the user's cache
   (`demo_cache_root()`) under a key of its settings and training data, so any later run, in
   any workdir, finds it;
3. index: the gallery ingested through Ray into `<workdir>/index`;
4. cluster: `facepq.launcher.LocalCluster`;
5. enrol: the kept-aside person enrolled through the coordinator, then found by
   another photo once the nodes hot-reload the new index version;
6. search: every query through gRPC (latency), and the same queries / gallery
   scored offline (codes vs float mAP) with `opqn_model.evaluate.evaluate_embeddings`.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from facepq_core.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_WORKDIR = pathlib.Path(".facepq") / "demo"
SEARCH_K = 10


@dataclass
class DemoSettings:
    """Everything that shapes a demo run (`--small` swaps in `SMALL`)."""

    people: int = 160
    photos: int = 10
    epochs: int = 24
    width: int = 32
    bits: int = 64
    batch_size: int = 128
    unseen_fraction: float = 0.25
    shards: int = 2
    replicas: int = 1
    rounds: int = 5  # each query is searched this many times for the latency percentiles
    seed: int = 0
    image_size: int = 64


SMALL = dict(people=30, photos=6, epochs=3, width=16, rounds=2)


@dataclass
class DemoData:
    """The demo's split of the photos (opqn_model.datasets.PhotoRecord lists)."""

    root: pathlib.Path
    train: list
    unseen_people: list
    gallery: list
    queries: list  # one photo of each gallery person
    enrol_person: str
    enrol_photos: list
    enrol_query: object
    gallery_list: pathlib.Path  # CSV (path, person) of `gallery`, the ingest's input
    synthetic: dict | None = None  # the generator's parameters when the photos are generated (they key the model)


def prepare_data(workdir: pathlib.Path, settings: DemoSettings, data_dir=None) -> DemoData:
    """Generate (idempotently) or list the photos and split them (see the module docstring)."""
    from opqn_model.datasets import list_photos, split_people, split_photos_per_person
    from opqn_model.synthetic import write_faces

    synthetic = None
    if data_dir is None:
        from opqn_model.synthetic import GENERATOR_VERSION

        root = write_faces(workdir / "faces", settings.people, settings.photos, size=settings.image_size,
                           seed=settings.seed)
        synthetic = {"generator_version": GENERATOR_VERSION, "people": settings.people, "photos": settings.photos,
                     "size": settings.image_size, "seed": settings.seed}
    else:
        root = pathlib.Path(data_dir)
        if not root.is_dir():
            raise DataError(f"--data {root} is not a folder of <person>/<photo> folders")
    records = list_photos(root)
    train, unseen = split_people(records, settings.unseen_fraction, settings.seed)
    counts: dict[str, int] = {}
    for r in unseen:
        counts[r.person] = counts.get(r.person, 0) + 1
    usable = sorted(p for p, n in counts.items() if n >= 2)
    if len(usable) < 3 or len({r.person for r in train}) < 2:
        raise DataError(f"the demo needs at least 2 training people and 3 unseen people with 2+ photos each; "
                        f"{root} gave {len({r.person for r in train})} and {len(usable)} "
                        f"(use more people or photos per person)")
    enrol_person = usable[int(np.random.default_rng(settings.seed).integers(len(usable)))]
    enrol = sorted((r for r in unseen if r.person == enrol_person), key=lambda r: r.path)
    rest = [r for r in unseen if r.person in usable and r.person != enrol_person]
    gallery, queries = split_photos_per_person(rest, 1, settings.seed)
    gallery_list = workdir / "gallery.csv"
    with open(gallery_list, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "person"])
        writer.writerows((os.path.abspath(r.path), r.person) for r in gallery)
    return DemoData(pathlib.Path(root), train, sorted(counts), gallery, queries, enrol_person, enrol[:-1], enrol[-1],
                    gallery_list, synthetic)


# ---- 2. model -------------------------------------------------------------------------------------
def _model_configs(settings: DemoSettings):
    from opqn_model.config import ModelConfig, TrainConfig
    from opqn_model.face_pipeline import FacePipeline

    model_config = ModelConfig(trunk="resnet20", bits=settings.bits, input_size=32, trunk_width=settings.width,
                               pipeline=FacePipeline(size=32, mode="none").to_dict())
    # test_people=0: the demo itself holds the unseen people out (they never reach train()).
    # head_refit: the trained head's codewords are prototypes of the 120 training people, and unseen
    # people who resemble the same one share a code (ties with the wrong person at rank 1).
    train_config = TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, seed=settings.seed,
                               test_people=0.0, head_refit="data")
    return model_config, train_config


ENV_DEMO_CACHE = "FACEPQ_DEMO_CACHE"


def demo_cache_root() -> pathlib.Path:
    """Where trained demo models are kept: $FACEPQ_DEMO_CACHE, else ~/.cache/facepq/demo-models."""
    env = os.environ.get(ENV_DEMO_CACHE)
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "facepq" / "demo-models"


def training_key(settings: DemoSettings, data: DemoData) -> dict:
    """What decides the trained weights: the configs and the training photos.

    Generated photos are a pure function of the generator's parameters, so those stand for them
    (a fresh workdir regenerates the same pixels and finds the model); the user's photos are
    identified by (path, size, mtime).
    """
    model_config, train_config = _model_configs(settings)
    key = {"model_config": model_config.to_dict(), "train_config": train_config.to_dict(),
           "train_people": sorted({r.person for r in data.train})}
    if data.synthetic is not None:
        return {**key, "synthetic": data.synthetic}
    digest = hashlib.sha256()
    for r in sorted(data.train, key=lambda r: r.path):
        st = os.stat(r.path)
        digest.update(f"{os.path.relpath(r.path, data.root)}\0{r.person}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {**key, "data": str(data.root.resolve()), "train_photos": digest.hexdigest()}


def idle_cores() -> int:
    """CPU cores not busy with other work (1 at least): torch threads beyond them wait on each other.

    On the 2-core development machine with other jobs running (load 6-9), training with 2 threads took
    314 s where 1 thread took 261 s (the same demo model).
    """
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        return cores
    return max(1, min(cores, int(cores - busy + 0.5)))


def train_model(workdir: pathlib.Path, settings: DemoSettings, data: DemoData, progress: bool = True):
    """Train (or reuse) the demo model. Returns (model.pt path, reused: bool, train summary or None).

    The model lives in `demo_cache_root()/<hash of training_key>`; it is trained in a private folder and
    renamed into place when complete, so an interrupted run is never reused and two demos at once
    do not write into the same folder.
    """
    import torch

    from opqn_model.train import train

    key = training_key(settings, data)
    root = demo_cache_root()
    model_dir = root / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    key_path, model_path = model_dir / "demo-key.json", model_dir / "model.pt"
    if model_path.is_file() and key_path.is_file():
        try:
            if json.loads(key_path.read_text()) == key:
                return model_path, True, None
        except ValueError:
            pass
    root.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f"{model_dir.name}.", dir=root))
    try:
        model_config, train_config = _model_configs(settings)
        torch.set_num_threads(idle_cores())
        summary = train(data.root, scratch, model_config, train_config, progress=progress, records=data.train)
        (scratch / "demo-key.json").write_text(json.dumps(key, indent=1))
        if model_dir.exists():  # another run finished first, or a stale one without its key
            shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(scratch, model_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary["model"] = str(model_path)
    return model_path, False, summary


# ---- 3. index -------------------------------------------------------------------------------------
def ingest_gallery(workdir: pathlib.Path, model_path, data: DemoData, settings: DemoSettings, progress: bool = True):
    """A fresh index of the gallery (Ray, local) in `<workdir>/index`; returns indexer.job.IngestSummary."""
    from indexer.job import run_ingest

    index = workdir / "index"
    if index.exists():  # every run starts from the gallery alone, without earlier enrolments
        shutil.rmtree(index)
    return run_ingest(str(model_path), str(data.gallery_list), str(index), shards=settings.shards, progress=progress)


# ---- 5/6. gRPC (through facepq.client.CoordinatorClient, the product's client) --------------------
@dataclass
class EnrolResult:
    person: str
    face_ids: list
    index_version: str
    rank: int | None  # best rank of the person's faces for their held-out photo; None = never visible
    searched: int  # faces the search returned (all of them while the index is under FIND_K)
    seconds: float  # from the Enrol call until a search saw them (or gave up)


FIND_K = 1000  # the coordinator's maximum top_k: the demo's whole index, so visibility does not depend on rank


def enrol_and_find(client, data: DemoData, timeout: float = 20.0) -> EnrolResult:
    """Enrol `data.enrol_person` with all but one photo; search the held-out photo until they appear.

    The search asks for FIND_K hits, so "appears" means "the nodes serve the new faces"
    (hot reload), and `rank` then says how well the model ranks them.
    """
    from facepq.client import Photo

    photos = [Photo(pathlib.Path(r.path).read_bytes(), os.path.relpath(r.path, data.root)) for r in data.enrol_photos]
    query = pathlib.Path(data.enrol_query.path).read_bytes()
    t0 = time.monotonic()
    reply = client.enrol(data.enrol_person, photos)
    rank, searched = None, 0
    while time.monotonic() - t0 < timeout:
        result = client.search(photo=query, k=FIND_K)
        searched = len(result.hits)
        rank = next((i + 1 for i, h in enumerate(result.hits) if h.person == data.enrol_person), None)
        if rank is not None:
            break
        time.sleep(0.2)  # nodes poll the index every 0.5 s
    return EnrolResult(data.enrol_person, reply.face_ids, reply.index_version, rank, searched,
                       time.monotonic() - t0)


@dataclass
class SearchRun:
    queries: list  # PhotoRecords searched (the gallery people's queries + the enrolled person's)
    replies: list  # facepq.client.SearchReply of the first round, per query
    latencies_ms: np.ndarray  # client-side, every round
    server_ms: np.ndarray  # took_ms reported by the coordinator, every round

    def percentile(self, q: float, server: bool = False) -> float:
        return float(np.percentile(self.server_ms if server else self.latencies_ms, q))

    def p_at_1(self) -> float:
        """Share of queries whose first hit is the query's person (over gRPC)."""
        ok = [bool(r.hits) and r.hits[0].person == q.person for q, r in zip(self.queries, self.replies)]
        return float(np.mean(ok)) if ok else float("nan")

    def rank1_ties(self) -> int:
        """Queries whose top score is shared by faces of two or more people (their order is arbitrary)."""
        return sum(len({h.person for h in r.hits if h.score == r.hits[0].score}) > 1 for r in self.replies if r.hits)


def search_all(client, data: DemoData, rounds: int = 1, progress: bool = True) -> SearchRun:
    """Search one photo of every unseen person `rounds` times through the coordinator."""
    from tqdm import tqdm

    queries = list(data.queries) + [data.enrol_query]
    photos = [pathlib.Path(r.path).read_bytes() for r in queries]
    replies, lat, server = [], [], []
    with tqdm(total=len(photos) * rounds, desc="search", unit="query", disable=not progress, leave=False) as bar:
        for round_ in range(rounds):
            for photo in photos:
                reply = client.search(photo=photo, k=SEARCH_K)
                if round_ == 0:
                    replies.append(reply)
                lat.append(reply.latency_ms)
                server.append(reply.took_ms)
                bar.update(1)
    return SearchRun(queries, replies, np.array(lat), np.array(server))


def offline_metrics(model_path, data: DemoData) -> dict:
    """Codes vs float on the served queries and gallery (+ the enrolled photos), without any server."""
    from facepq_core.codes import score_codes
    from opqn_model.api import FaceEncoder
    from opqn_model.evaluate import evaluate_embeddings
    from opqn_model.training_data import load_crops

    encoder = FaceEncoder.load(model_path)
    queries = list(data.queries) + [data.enrol_query]
    gallery = list(data.gallery) + list(data.enrol_photos)
    q_crops, q_kept, _ = load_crops(queries, encoder.pipeline, progress=False)
    g_crops, g_kept, _ = load_crops(gallery, encoder.pipeline, progress=False)
    q_emb, g_emb = encoder.trunk_features(q_crops), encoder.trunk_features(g_crops)
    g_people = np.array([r.person for r in g_kept])
    result = evaluate_embeddings(encoder.codec, q_emb, [r.person for r in q_kept], g_emb, g_people)
    scores = score_codes(encoder.codec.query_tables(q_emb), encoder.codec.encode(g_emb), encoder.codec.spec)
    result["rank1_ties"] = int(sum(len(set(g_people[row == row.max()])) > 1 for row in scores))
    result["fingerprint"] = encoder.fingerprint
    return result


def settings_dict(settings: DemoSettings) -> dict:
    return dataclasses.asdict(settings)
