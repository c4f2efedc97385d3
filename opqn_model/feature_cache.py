"""A disk cache of frozen-trunk features, keyed by photo content, so each photo is embedded once.

Key: sha256 of the photo file's bytes + a string naming the trunk (with its
weights) and the face pipeline settings. Renaming or copying a photo keeps its
entry; changing the trunk or the pipeline misses. A photo that could not be
used (bad image, no face) is stored as a marker with its reason, so a rerun
does not decode it again and still counts it.

Storage is one SQLite database in WAL mode (`features.sqlite` under the
root): writes are transactions, so two processes writing at once neither
corrupt it nor lose entries (the busy timeout waits for the other writer),
and ~6,000 lookups take milliseconds. The root is `$FACEPQ_CACHE`, else
`~/.cache/facepq/features`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import sqlite3
import time

import numpy as np

from facepq_core.errors import BadImage, FacepqError, PhotoSkipped
from opqn_model.datasets import SkipCounter
from opqn_model.images import read_bytes
from opqn_model.photos import align_photo

log = logging.getLogger(__name__)

_SCHEMA = """CREATE TABLE IF NOT EXISTS features (
    content_sha256 TEXT NOT NULL, model_key TEXT NOT NULL,
    reason TEXT, note TEXT, dim INTEGER, vector BLOB,
    PRIMARY KEY (content_sha256, model_key))"""
BUSY_TIMEOUT_S = 60.0


def default_root() -> pathlib.Path:
    env = os.environ.get("FACEPQ_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "facepq" / "features"


class FeatureCache:
    """Features (float32 vectors) or skip reasons per (photo content, model key).

    Args:
        root: folder of the cache (created); default `default_root()`.

    Picklable: the SQLite connection is opened lazily in each process.
    `hits` / `misses` count lookups in this process.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = pathlib.Path(root) if root is not None else default_root()
        self.path = self.root / "features.sqlite"
        self.hits = 0
        self.misses = 0
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None

    def __getstate__(self):
        return {"root": self.root, "path": self.path, "hits": 0, "misses": 0, "_conn": None, "_pid": None}

    def _db(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():  # a connection never crosses a fork
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(_SCHEMA)
            except (OSError, sqlite3.Error) as exc:
                raise FacepqError(f"cannot open the feature cache {self.path}: {exc} "
                                  "(set $FACEPQ_CACHE to a writable folder)") from None
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def get(self, content_sha256: str, model_key: str):
        """None on a miss; else ('ok', vector float32 [F], note) or ('skip', reason, None)."""
        row = self._db().execute("SELECT reason, note, dim, vector FROM features WHERE content_sha256=? AND model_key=?",
                                 (content_sha256, model_key)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        reason, note, dim, blob = row
        if reason is not None:
            return ("skip", reason, None)
        return ("ok", np.frombuffer(blob, dtype=np.float32, count=dim).copy(), note)

    def put_many(self, model_key: str, entries) -> None:
        """Store entries (content_sha256, vector float32 [F] or None, reason or None, note or None) in one transaction."""
        rows = []
        for sha, vector, reason, note in entries:
            if vector is None:
                rows.append((sha, model_key, reason, None, None, None))
            else:
                vector = np.ascontiguousarray(vector, dtype=np.float32).ravel()
                rows.append((sha, model_key, None, note, vector.size, vector.tobytes()))
        if not rows:
            return
        db = self._db()
        db.execute("BEGIN IMMEDIATE")  # take the write lock up front: no upgrade deadlock between writers
        try:
            db.executemany("INSERT OR REPLACE INTO features VALUES (?, ?, ?, ?, ?, ?)", rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def __len__(self) -> int:
        return self._db().execute("SELECT COUNT(*) FROM features").fetchone()[0]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def model_key(trunk, pipeline) -> str:
    """The cache key part naming what produced a feature: trunk (and weights) + pipeline settings."""
    return f"{getattr(trunk, 'cache_key', 'trunk:' + trunk.name)}|{pipeline.cache_key}"


def embed_records(records, trunk, pipeline, cache: FeatureCache | None = None, progress: bool = True,
                  batch_size: int = 32):
    """Trunk features of one face per photo, reading and filling the cache.

    Parameters
    ----------
    records : sequence of PhotoRecord
    trunk : a trunk object (see opqn_model.trunks); its `input_size` must equal `pipeline.size`
    pipeline : FacePipeline producing the crops the trunk takes
    cache : FeatureCache or None (no caching)
    progress : show a tqdm bar in photos/s

    Returns
    -------
    features : float32 [n_ok, trunk.feature_dim], in the order of `kept_records`
    kept_records : list[PhotoRecord] of the photos that gave a feature
    skipped : SkipCounter of the photos that did not (and the conversions made)
    """
    from tqdm import tqdm

    if pipeline.size != trunk.input_size:
        raise FacepqError(f"trunk {trunk.name!r} takes {trunk.input_size} px crops but the pipeline makes "
                          f"{pipeline.size} px crops")
    key = model_key(trunk, pipeline)
    records = list(records)
    skipped = SkipCounter()
    results: list[np.ndarray | None] = [None] * len(records)
    pending: list[tuple[int, str, np.ndarray, str | None]] = []  # (index, sha, crop, note)
    started = time.perf_counter()

    def flush():
        if not pending:
            return
        vectors = trunk.features(np.stack([crop for _, _, crop, _ in pending]))
        for (i, _, _, _), vector in zip(pending, vectors):
            results[i] = vector
        if cache is not None:
            cache.put_many(key, [(sha, vec, None, note) for (_, sha, _, note), vec in zip(pending, vectors)])
        pending.clear()

    with tqdm(total=len(records), unit="photo", desc=f"embed ({trunk.name})", disable=not progress) as bar:
        for i, record in enumerate(records):
            bar.update(1)
            try:
                data, _ = read_bytes(record.path)
            except BadImage as exc:  # no content to key on: counted, not cached
                skipped.add(exc.reason, record.path)
                continue
            sha = hashlib.sha256(data).hexdigest()
            hit = cache.get(sha, key) if cache is not None else None
            if hit is not None:
                status, value, note = hit
                if status == "ok":
                    results[i] = value
                    skipped.add_note(note, record.path)
                else:
                    skipped.add(value, record.path)
                continue
            try:
                crop, note = align_photo(data, pipeline)
            except PhotoSkipped as exc:
                skipped.add(exc.reason, record.path)
                if cache is not None:
                    cache.put_many(key, [(sha, None, exc.reason, None)])
                continue
            skipped.add_note(note, record.path)
            pending.append((i, sha, crop, note))
            if len(pending) >= batch_size:
                flush()
        flush()
    kept = [r for r, v in zip(records, results) if v is not None]
    dim = trunk.feature_dim
    features = np.stack([v for v in results if v is not None]).astype(np.float32) if kept else \
        np.zeros((0, dim), dtype=np.float32)
    elapsed = time.perf_counter() - started
    log.info("embedded %d of %d photos with trunk %s in %.1f s (%.1f photos/s; cache hits %s)", len(kept),
             len(records), trunk.name, elapsed, len(records) / max(elapsed, 1e-9),
             cache.hits if cache is not None else "n/a")
    return features, kept, skipped
