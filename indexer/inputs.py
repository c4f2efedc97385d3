"""What an ingest reads: photo lists, or embeddings files of the model's trunk.

    photos      a folder <root>/<person>/<photo>, or a .csv/.parquet list with `path`, `person`
                (opqn_model.datasets.list_photos); one work item per photo.
    npy         X.npy float32 [N, E] with a sidecar X.csv or X.parquet holding `person` and
                optionally `source` (default `X.npy#<row>`); one work item per chunk of rows.
    parquet     a Parquet file with columns `embedding` (list<float>), `person`, `source`;
                one work item per row group.

For embeddings the driver keeps the per-row `person` / `source` columns and the
workers return row numbers, so those strings never travel through Ray twice.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass

import numpy as np

from facepq_core.errors import DataError

EMBEDDING_CHUNK_ROWS = 32_768


# ---- inputs ------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """Work items of one ingest and, for embeddings, the per-row labels (pyarrow string arrays)."""

    kind: str  # 'photos' | 'npy' | 'parquet'
    items: list[dict]
    count: int
    persons: object = None  # embeddings: pyarrow string array [N], indexed by row
    sources: object = None


def _embedding_sidecar(path: pathlib.Path) -> pathlib.Path:
    for suffix in (".csv", ".parquet"):
        candidate = path.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    raise DataError(f"embeddings file {path} needs a sidecar {path.with_suffix('.csv')} or "
                    f"{path.with_suffix('.parquet')} with a 'person' column (one row per embedding)")


def list_inputs(gallery: str, embedding_dim: int | None = None) -> Inputs:
    """Work items of the gallery (photos, .npy embeddings + sidecar, or Parquet embeddings)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = pathlib.Path(gallery)
    if path.suffix.lower() == ".npy":
        if not path.is_file():
            raise DataError(f"embeddings file {path} does not exist")
        try:
            emb = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise DataError(f"cannot read embeddings {path}: {exc}") from exc
        if emb.ndim != 2 or emb.dtype != np.float32:
            raise DataError(f"{path} must hold float32 [N, E] embeddings, got {emb.dtype} {list(emb.shape)}")
        sidecar = _embedding_sidecar(path)
        table = pq.read_table(sidecar) if sidecar.suffix == ".parquet" else _read_csv_table(sidecar)
        if "person" not in table.column_names or table.num_rows != emb.shape[0]:
            raise DataError(f"{sidecar} must have a 'person' column and {emb.shape[0]} rows "
                            f"(has {table.num_rows} rows, columns {table.column_names})")
        n = emb.shape[0]
        sources = (table.column("source").cast(pa.string()) if "source" in table.column_names
                   else pa.array([f"{path.name}#{i}" for i in range(n)], type=pa.string()))
        sources = sources.combine_chunks() if isinstance(sources, pa.ChunkedArray) else sources
        items = [{"start": s, "stop": min(n, s + EMBEDDING_CHUNK_ROWS), "row_group": 0,
                  "sources": sources[s:s + EMBEDDING_CHUNK_ROWS].to_pylist()} for s in range(0, n, EMBEDDING_CHUNK_ROWS)]
        _check_dim(emb.shape[1], embedding_dim, path)
        return Inputs("npy", items, n, _persons(table.column("person"), sidecar), sources)
    if path.suffix.lower() == ".parquet" and path.is_file():
        schema = pq.read_schema(path)
        if "embedding" in schema.names:
            missing = [c for c in ("person", "source") if c not in schema.names]
            if missing:
                raise DataError(f"{path}: an embeddings Parquet file needs columns embedding, person, source "
                                f"(missing {', '.join(missing)})")
            first = pq.ParquetFile(path).read_row_group(0, columns=["embedding"]) if \
                pq.ParquetFile(path).metadata.num_row_groups else None
            if first is not None and first.num_rows:
                _check_dim(len(first.column("embedding")[0]), embedding_dim, path)
            meta = pq.ParquetFile(path).metadata
            items, start = [], 0
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                items.append({"start": start, "stop": start + rows, "row_group": g, "sources": []})
                start += rows
            table = pq.read_table(path, columns=["person", "source"])
            return Inputs("parquet", items, start, _persons(table.column("person"), path),
                          _strings(table.column("source")))
    from opqn_model.datasets import list_photos

    import pyarrow as pa

    records = list_photos(gallery)
    persons = _persons(pa.array([r.person for r in records], type=pa.string()), gallery).to_pylist()
    return Inputs("photos", [{"path": r.path, "person": p} for r, p in zip(records, persons)], len(records))


def _read_csv_table(path: pathlib.Path):
    import pyarrow.csv as pacsv

    try:
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={"person": "string", "source": "string"}))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a bad CSV
        raise DataError(f"cannot read {path}: {exc}") from exc


def _strings(column):
    import pyarrow as pa

    column = column.cast(pa.string())
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _persons(column, where) -> object:
    """The person column in its stored form (facepq_core.names), checked before any work starts: a name
    the index would refuse stops the ingest here, not after Ray has encoded the gallery."""
    from facepq_core.errors import InvalidRequest
    from indexer.person_column import checked_persons

    try:
        return checked_persons(_strings(column), str(where))
    except InvalidRequest as exc:
        raise DataError(f"{exc}; fix the name (a folder name, or the list's person column) and ingest again") from None


def _check_dim(found: int, expected: int | None, path) -> None:
    if expected is not None and found != expected:
        raise DataError(f"{path} holds {found}-d embeddings; this model's trunk gives {expected}-d")
