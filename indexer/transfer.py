"""Export and import an index's people: codes and metadata, no photos, between clusters of one model.

    export_people("index/", "people.arrow", persons=["Ada Lovelace"])    # every person when None
    import_people("other-index/", "people.arrow")                       # same model fingerprint only

The file is one Arrow IPC file with a segment's columns (`face_id`, `person`, `source`, `code`;
docs/index-format.md) holding the live faces, and in its schema metadata the index's model
(`facepq.model`: the manifest's model section as JSON) and `facepq.export_format`. Photos and
float embeddings are never in it: only what the index itself holds. Importing goes through
indexer.writer.IndexWriter (the path every write takes): names pass the one name rule, faces
already live in the target (same face id) are skipped, and the whole file is one commit. A file
of another model is refused naming both fingerprints: codes of two models cannot be compared.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from facepq_core.atomic import atomic_writer
from facepq_core.errors import DataError, NotFound
from facepq_core.names import normalise_person
from indexer.live import segment_live_mask, tombstone_ids
from indexer.manifest import ModelMeta
from indexer.person_column import person_mask
from indexer.segment import column_view, open_segment, segment_schema
from indexer.store import IndexStore

log = logging.getLogger(__name__)

EXPORT_FORMAT = "1"
__all__ = ["ImportResult", "export_people", "import_people", "read_export"]


@dataclass(frozen=True)
class ImportResult:
    index_version: int | None
    faces_added: int
    faces_skipped: int      # already live in the target index
    people: int


def export_people(index, out_path, persons=None) -> tuple[int, int]:
    """Write the live faces of `persons` (every person when None) to `out_path`; returns (faces, people).

    Raises:
        NotFound: a named person with no live face (nothing is written).
    """
    store = index if isinstance(index, IndexStore) else IndexStore(index)
    manifest = store.load_manifest()
    wanted = None if persons is None else list(dict.fromkeys(normalise_person(p) for p in persons))
    batches, seen = [], set()
    for state in manifest.shards:
        dead = tombstone_ids(state)
        for ref in state.segments:
            view = open_segment(store, ref, verify=True, model=manifest.model)
            keep = segment_live_mask(view, dead)
            if wanted is not None:
                chosen = np.zeros(view.rows, dtype=bool)
                for p in wanted:
                    mine = person_mask(view.persons, p) & keep
                    if mine.any():
                        seen.add(p)
                    chosen |= mine
                keep &= chosen
            if keep.any():
                batches.append(view.batch.filter(pa.array(keep)))
    missing = [p for p in wanted or [] if p not in seen]
    if missing:
        from indexer.people import unknown_person_message

        raise NotFound(f"{unknown_person_message(store, missing[0])}; nothing exported")
    schema = segment_schema(manifest.model)
    schema = schema.with_metadata({**schema.metadata, b"facepq.export_format": EXPORT_FORMAT.encode(),
                                   b"facepq.model": json.dumps(manifest.model.to_dict()).encode()})
    with atomic_writer(out_path) as f, pa.ipc.new_file(f, schema) as writer:
        for batch in batches:
            writer.write_batch(pa.RecordBatch.from_arrays(batch.columns, schema=schema))
    faces = sum(b.num_rows for b in batches)
    people = len(set().union(*[set(b.column(1).to_pylist()) for b in batches])) if batches else 0
    return faces, people


def read_export(path) -> tuple[ModelMeta, pa.Table]:
    """(the model the codes belong to, the faces) of an export file; DataError when it is not one."""
    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{path} is not a facepq people export (an Arrow IPC file): {exc}") from None
    meta = table.schema.metadata or {}
    if meta.get(b"facepq.export_format") != EXPORT_FORMAT.encode() or b"facepq.model" not in meta:
        raise DataError(f"{path} is not a facepq people export of format {EXPORT_FORMAT} (no facepq.export_format "
                        f"in its metadata); write one with `facepq index export`")
    model = ModelMeta.from_dict(json.loads(meta[b"facepq.model"]))
    if table.schema.names[:4] != ["face_id", "person", "source", "code"]:
        raise DataError(f"{path} has columns {table.schema.names}, not face_id, person, source, code")
    return model, table


def import_people(index, path, redis_url: str | None = None, shard_count: int | None = None) -> ImportResult:
    """Add the faces of an export file to `index` (created when absent, with `shard_count` shards) in one commit.

    Raises:
        IndexFormatError: the index holds codes of another model (both fingerprints named).
        InvalidRequest: a name the index would refuse.
    """
    from indexer.writer import IndexWriter

    model, table = read_export(path)
    table = table.combine_chunks()
    writer = IndexWriter(index, model, shard_count=shard_count, redis_url=redis_url)
    n = table.num_rows
    if not n:
        return ImportResult(writer.store.current_version(), 0, 0, 0)
    codes = column_view(table.column(3).chunk(0), np.uint8, model.code_bytes) if table.column(3).num_chunks else \
        np.zeros((0, model.code_bytes), np.uint8)
    ids = column_view(table.column(0).chunk(0), np.uint64, 1)
    # an index with a refinement tier exports its rows beside the codes (the segment schema): they go in too
    refine = column_view(table.column(4).chunk(0), np.uint8, model.refine.code_bytes) \
        if model.refine is not None else None
    writer.add(ids, table.column(1).chunk(0), table.column(2).chunk(0), codes, refine)
    version = writer.commit(f"import {path} ({n} faces of model {model.fingerprint})")
    people = len(set(table.column(1).to_pylist()))
    return ImportResult(version, int(writer.stats.rows_added), n - int(writer.stats.rows_added), people)
