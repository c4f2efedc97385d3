"""Segments: immutable Arrow IPC files of (face_id, person, source, code) rows.

A segment is written once, as exactly one uncompressed record batch, so the
`code` column (fixed_size_binary(code_bytes)) is one contiguous byte range of
the file: `open_segment` memory-maps the file and hands out a zero-copy
`uint8 [rows, code_bytes]` view for the scan kernels. The sha256 of the file is
computed while it is written and recorded in the manifest; `open_segment`
re-checks it (and the size, schema and row count) before anything is served.

The metadata columns (face_id, person, source) of a local segment are read with
positional reads (`SegmentView.hit_metadata`, `SegmentView.tombstone_mask`), never
through the map: a mapped page once touched stays in the process's resident set,
so a query node that looked hits up through the map grew towards the whole file.
A long-lived reader also advises the kernel to keep those pages out of the map
(`SegmentView.advise_random_access`).

A partitioned index (facepq_core.partition) writes each segment's rows grouped by cell, in
cell order (stable: rows of one cell keep their order), and records the partition's sha256
and the per-cell row offsets in the schema metadata (`facepq.partition`,
`facepq.cell_offsets`, L + 1 comma-separated ints): every write path (ingest, Enrol,
compaction, merging) goes through `write_segment`, so none can break the grouping.

An index with a refinement tier (facepq_core.refine) has a fifth column, `refine`
(fixed_size_binary(tier bytes)), after the codes: read the same way, for a search's
candidates only (`SegmentView.refine_rows`), so it never becomes resident either.
"""
from __future__ import annotations

import errno
import hashlib
import io
import logging
import mmap
import os
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from facepq_core.digest import sha256_file
from facepq_core.errors import IndexFormatError
from indexer.errors import IndexPathError, SegmentCorrupt
from indexer.face_id import as_id_array, isin_sorted
from indexer.manifest import ModelMeta, SegmentRef
from indexer.segment_reader import MetadataReader
from indexer.store import SHARD_DIR, IndexStore

log = logging.getLogger(__name__)

_PAGE = mmap.PAGESIZE

__all__ = ["SegmentCorrupt", "SegmentView", "write_segment", "open_segment", "segment_schema", "segment_path"]

COLUMNS = ("face_id", "person", "source", "code")
PARTITION_KEY, OFFSETS_KEY = "facepq.partition", "facepq.cell_offsets"
REFINE_COLUMN = "refine"


def segment_columns(model: ModelMeta | None) -> tuple[str, ...]:
    """Column names of a segment of `model`'s index: the refine column only with a refinement tier."""
    return COLUMNS + ((REFINE_COLUMN,) if model is not None and model.refine is not None else ())


def segment_schema(model: ModelMeta) -> pa.Schema:
    """Arrow schema of a segment holding codes of `model` (metadata as in docs/index-format.md)."""
    fields = [pa.field("face_id", pa.uint64(), nullable=False), pa.field("person", pa.string(), nullable=False),
              pa.field("source", pa.string(), nullable=False),
              pa.field("code", pa.binary(model.code_bytes), nullable=False)]
    metadata = {"facepq.model_fingerprint": model.fingerprint, "facepq.codec": model.codec,
                "facepq.M": str(model.M), "facepq.K": str(model.K), "facepq.code_bytes": str(model.code_bytes)}
    if model.refine is not None:
        fields.append(pa.field(REFINE_COLUMN, pa.binary(model.refine.code_bytes), nullable=False))
        metadata.update({"facepq.refine": model.refine.kind, "facepq.refine_codec": model.refine.codec,
                         "facepq.refine_bytes": str(model.refine.code_bytes)})
    return pa.schema(fields, metadata=metadata)


def new_segment_id() -> str:
    """`<utc yyyymmddThhmmss>-<12 hex>`: sortable by creation time, unique without coordination."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:12]


def segment_path(shard: int, segment_id: str) -> str:
    return f"{SHARD_DIR}/{shard:04d}/{segment_id}.arrow"


def _string_array(values, n: int, what: str) -> pa.Array:
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(np.asarray(values, dtype=object),
                                                                                    type=pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.type != pa.string():
        arr = arr.cast(pa.string())
    if len(arr) != n:
        raise ValueError(f"{what} has {len(arr)} entries for {n} face ids")
    if arr.null_count:
        raise ValueError(f"{what} contains nulls")
    return arr


def _binary_column(values, n: int, width: int, what: str) -> pa.Array:
    """uint8 [n, width] -> fixed_size_binary(width), wrapped without a copy."""
    values = np.ascontiguousarray(values)
    if values.dtype != np.uint8 or values.shape != (n, width):
        raise ValueError(f"{what} must be uint8 [{n}, {width}], got {values.dtype} {values.shape}")
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(values)])


def build_batch(face_ids, persons, sources, codes, model: ModelMeta, refine=None, partition=None) -> pa.RecordBatch:
    """Validate the columns and assemble one record batch (codes are wrapped without a copy).

    With `partition` (the index's facepq_core.partition.CellPartition) the rows are grouped by cell
    (a copy) and the schema metadata records the cell offsets.

    Args:
        face_ids: uint64 [n].
        persons, sources: n strings (list, numpy object array, or pyarrow string array).
        codes: uint8 [n, model.code_bytes].
        refine: uint8 [n, model.refine.code_bytes] when the index has a refinement tier, else None.
    """
    ids = np.ascontiguousarray(face_ids, dtype=np.uint64)
    if ids.ndim != 1:
        raise ValueError(f"face_ids must be 1-D, got shape {ids.shape}")
    n = ids.shape[0]
    columns = [pa.array(ids, type=pa.uint64()), _string_array(persons, n, "persons"),
               _string_array(sources, n, "sources"), _binary_column(codes, n, model.code_bytes, "codes")]
    if (refine is None) != (model.refine is None):
        raise ValueError("refine rows must be given exactly when the index has a refinement tier "
                         f"({model.refine.kind if model.refine else 'none'})")
    if refine is not None:
        columns.append(_binary_column(refine, n, model.refine.code_bytes, "refine rows"))
    batch = pa.RecordBatch.from_arrays(columns, schema=segment_schema(model))
    return batch if partition is None else _grouped_by_cell(batch, np.ascontiguousarray(codes), partition, model)


def _grouped_by_cell(batch: pa.RecordBatch, codes: np.ndarray, partition, model: ModelMeta) -> pa.RecordBatch:
    """`batch` with its rows in cell order (stable) and the cell offsets in its schema metadata."""
    from facepq_core.partition import cell_offsets

    cells = partition.assign(codes)
    order = np.argsort(cells, kind="stable")
    if (np.diff(cells) < 0).any():
        batch = batch.take(pa.array(order))
    offsets = cell_offsets(cells, partition.cells)
    metadata = dict(batch.schema.metadata or {})
    metadata.update({PARTITION_KEY.encode(): model.partition.sha256.encode(),
                     OFFSETS_KEY.encode(): ",".join(map(str, offsets.tolist())).encode()})
    return batch.replace_schema_metadata(metadata)


class _HashingWriter(io.RawIOBase):
    """A write-only file that forwards to `raw` and hashes and counts every byte on the way."""

    def __init__(self, raw):
        super().__init__()
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.raw.write(view)
        self.size += len(view)
        return len(view)

    def close(self) -> None:  # the underlying file belongs to IndexStore.open_atomic
        super().close()


def write_segment(store: IndexStore, shard: int, face_ids, persons, sources, codes, model: ModelMeta,
                  refine=None) -> SegmentRef:
    """Write one segment file into `shard` and return its manifest entry.

    The file appears under its final name only once complete (IndexStore.open_atomic);
    it is not part of the index until a commit references it. `refine`: the refinement
    rows (uint8 [n, tier bytes]) when the index has a tier.
    """
    from indexer.partition_store import load_partition

    batch = build_batch(face_ids, persons, sources, codes, model, refine, load_partition(store, model))
    if batch.num_rows == 0:
        raise ValueError("refusing to write an empty segment")
    seg_id = new_segment_id()
    rel = segment_path(shard, seg_id)
    options = pa.ipc.IpcWriteOptions(compression=None)
    with store.open_atomic(rel) as f:
        hashing = _HashingWriter(f)
        sink = pa.PythonFile(hashing, mode="w")
        with pa.ipc.new_file(sink, batch.schema, options=options) as writer:
            writer.write_batch(batch)
        sink.close()
    return SegmentRef(id=seg_id, path=rel, rows=batch.num_rows, bytes=hashing.size, sha256=hashing.sha.hexdigest())


@dataclass
class SegmentView:
    """A read-only, memory-mapped segment.

    Attributes:
        ref: its manifest entry.
        face_ids: uint64 [rows], zero-copy.
        codes: uint8 [rows, code_bytes], zero-copy view of the code column.
        persons, sources: pyarrow string arrays [rows].
        fingerprint: model fingerprint from the file's schema metadata.
        refine: uint8 [rows, tier bytes], zero-copy view of the refine column (None without a tier).
        cell_offsets: int64 [L + 1], the rows of cell l are cell_offsets[l]..cell_offsets[l+1], when the
            segment is grouped by the index model's partition (None otherwise: scanned whole).

    `face_ids`, `persons`, `sources` and `refine` read through the map: every page they touch
    stays resident in this process. Long-lived readers (a query node) use `hit_metadata`,
    `tombstone_mask` and `refine_rows`, which read a local file with positional reads instead.
    """

    ref: SegmentRef
    batch: pa.RecordBatch
    face_ids: np.ndarray
    codes: np.ndarray
    persons: pa.Array
    sources: pa.Array
    fingerprint: str
    reader: "MetadataReader | None" = field(default=None, repr=False, compare=False)
    file_map: mmap.mmap | None = field(default=None, repr=False, compare=False)  # a local file's map, if any
    map_address: int = field(default=0, repr=False, compare=False)  # where that map starts in memory
    refine: np.ndarray | None = field(default=None, repr=False, compare=False)
    cell_offsets: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def rows(self) -> int:
        return self.batch.num_rows

    def refine_rows(self, rows) -> np.ndarray:
        """uint8 [n, tier bytes]: the refinement rows of the given rows (int [n], any order), without the map.

        Raises:
            IndexError: a row outside 0..rows-1.  ValueError: the segment has no refine column.
            SegmentCorrupt: the file no longer holds what was verified (truncated in place).
        """
        if self.refine is None:
            raise ValueError(f"segment {self.ref.path} has no refinement tier")
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= self.rows):
            raise IndexError(f"rows out of range 0..{self.rows - 1} in segment {self.ref.path}")
        if self.reader is None:  # a remote store's segment lives in memory already
            return self.refine[rows]
        return self.reader.refine_rows(rows)

    def person_at(self, i: int) -> str:
        return self.persons[int(i)].as_py()

    def source_at(self, i: int) -> str:
        return self.sources[int(i)].as_py()

    def hit_metadata(self, rows) -> tuple[np.ndarray, list[str], list[str]]:
        """(face_ids uint64 [n], persons [n], sources [n]) of the given rows, without touching the map.

        Args:
            rows: int [n], row numbers in this segment (any order, repeats allowed).
        Raises:
            IndexError: a row outside 0..rows-1.
            SegmentCorrupt: the file no longer holds what was verified (truncated or altered in place).
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= self.rows):
            raise IndexError(f"rows out of range 0..{self.rows - 1} in segment {self.ref.path}")
        if self.reader is None:  # a remote store's segment lives in memory already
            return (self.face_ids[rows].copy(), self.persons.take(pa.array(rows)).to_pylist(),
                    self.sources.take(pa.array(rows)).to_pylist())
        return self.reader.read(rows)

    def tombstone_mask(self, tombstones, chunk_rows: int = 1 << 20) -> np.ndarray:
        """bool [rows]: True for rows whose face_id is in `tombstones` (a set or array of ints).

        A local file's face ids are read in chunks of `chunk_rows` with positional reads:
        through the map the whole column (8 bytes a row, as much as the codes of a 64-bit
        model) would stay resident for as long as the segment is served.
        """
        dead = np.unique(as_id_array(tombstones))
        if not dead.size:
            return np.zeros(self.rows, dtype=bool)
        if self.reader is None:
            return isin_sorted(self.face_ids, dead)
        out = np.empty(self.rows, dtype=bool)
        for lo in range(0, self.rows, chunk_rows):
            hi = min(lo + chunk_rows, self.rows)
            out[lo:hi] = isin_sorted(self.reader.face_id_range(lo, hi), dead)
        return out

    def live_mask(self, tombstones) -> np.ndarray:
        """bool [rows]: False for rows whose face_id is in `tombstones` (a set or array of ints)."""
        return ~self.tombstone_mask(tombstones)

    def advise_random_access(self) -> None:
        """Keep this segment's metadata (face_id, person, source) out of the map's resident pages.

        A long-lived reader (a query node) reads these columns with positional reads
        (hit_metadata, tombstone_mask), never through the map, so no search faults them in.
        Two things still could:
        - a fault next to them: the kernel maps the already cached pages around a faulting one too
          (fault-around, a 64 KiB window, MADV_RANDOM or not), but only within the fault's VMA. The
          whole pages holding only metadata get their own VMA (MADV_RANDOM, which also turns readahead
          off for any other reader of the arrays), so a scan of the first codes maps no metadata.
        - opening the file, before that split: Arrow reads the record batch header from the page the
          face ids start on, and fault-around maps up to 15 pages of face ids with it. MADV_DONTNEED
          unmaps them again (the page cache keeps them; a later access faults a page back in).
        The refine column (after the codes) gets the same advice: a node reads it with positional reads
        for a search's candidates only.
        Only for a segment mapped from a local file with a positional reader (its metadata buffers
        were checked to lie in the map): DONTNEED on the heap copy of a remote segment would zero it.
        The code column keeps the default advice: it is scanned front to back. Best effort: a
        platform without madvise, or a kernel that refuses it, leaves the map as it is.
        """
        if not self.local_map:
            return
        if self.refine is not None:  # after the codes: its own VMA, so the scan's fault-around stops at it
            self._advise_away(self.refine.ctypes.data - self.map_address, self.refine.nbytes)
        # The metadata buffers are adjacent in the file (column order, padding between), codes after them.
        bufs = [self.batch.column(0).buffers()[1]] + [b for column in (self.persons, self.sources)
                                                      for b in column.buffers() if b is not None]
        lo = min(b.address for b in bufs) - self.map_address
        hi = max(b.address + b.size for b in bufs) - self.map_address
        self._advise_away(lo, hi - lo)

    @property
    def local_map(self) -> bool:
        """True when the columns are a local file's map with a positional reader, so pages of it can be
        advised away (a remote segment's columns are a heap copy: DONTNEED on it would zero it)."""
        return self.reader is not None and self.file_map is not None and hasattr(self.file_map, "madvise")

    def release_code_pages(self, first: int = 0, stop: int | None = None) -> None:
        """Unmap the resident pages of rows [first, stop) of the code column (default: all), for a reader that
        keeps its own copy of the codes (a query node's `query_node.code_blocks`): they stay in the page
        cache, and a later read of `codes` faults a page back in. Only for a `local_map` (nothing done
        otherwise)."""
        stop = self.rows if stop is None else stop
        width = self.codes.shape[1]
        if self.local_map and stop > first:
            self._advise_away(self.codes.ctypes.data - self.map_address + first * width, (stop - first) * width)

    def _advise_away(self, lo: int, size: int) -> None:
        """MADV_RANDOM on the whole pages of [lo, lo + size) of the map, then MADV_DONTNEED on every page it touches."""
        hi = lo + size
        inner_lo, inner_hi = -(-lo // _PAGE) * _PAGE, hi // _PAGE * _PAGE
        outer_lo, outer_hi = lo // _PAGE * _PAGE, -(-hi // _PAGE) * _PAGE
        try:
            if inner_hi > inner_lo:
                self.file_map.madvise(mmap.MADV_RANDOM, inner_lo, inner_hi - inner_lo)
            self.file_map.madvise(mmap.MADV_DONTNEED, outer_lo, outer_hi - outer_lo)
        except (AttributeError, OSError) as exc:  # no such advice here (not Linux), or the kernel refused
            log.debug("%s: no page-cache advice (%s)", self.ref.path, exc)


def column_view(col: pa.Array, dtype, width: int) -> np.ndarray:
    """Zero-copy numpy view of a fixed-width column's data buffer, honouring the array offset."""
    buf = col.buffers()[1]
    itemsize = np.dtype(dtype).itemsize * width
    flat = np.frombuffer(buf, dtype=dtype, count=len(col) * width, offset=col.offset * itemsize)
    return flat.reshape(len(col), width) if width > 1 or dtype == np.uint8 else flat


def open_segment(store_or_path: IndexStore | str, ref: SegmentRef, verify: bool = True,
                 model: ModelMeta | None = None) -> SegmentView:
    """Memory-map a segment and check it against its manifest entry.

    Args:
        store_or_path: the IndexStore, or the index root (path/URI).
        ref: the segment's manifest entry.
        verify: check file size and sha256 against `ref` (reads the whole file once).
        model: when given, the file's code width and model fingerprint must match it.
    Raises:
        SegmentCorrupt: missing, truncated, altered, or of another schema/model.
    """
    store = store_or_path if isinstance(store_or_path, IndexStore) else IndexStore(store_or_path)
    where = f"segment {ref.path} of {store.uri}"
    local = fd = mapped = None
    try:
        local = store.local_path(ref.path)
        if local is not None:
            fd, mapped, buf = _map_file(local)
        else:
            buf = pa.py_buffer(store.read_bytes(ref.path))
    except IndexPathError as exc:  # a symbolic link on the way: IndexStore refuses to follow it
        raise SegmentCorrupt(f"{where} cannot be read: {exc}") from exc
    except (FileNotFoundError, IndexFormatError) as exc:
        raise SegmentCorrupt(f"{where} is missing") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SegmentCorrupt(f"{where} cannot be read: it is a symbolic link (never followed)") from exc
        raise SegmentCorrupt(f"{where} cannot be read: {exc}") from exc
    try:
        try:
            view = _open_mapped(buf, local, ref, where, verify, model)
        except OSError as exc:  # the checksum's read failed (e.g. no descriptor left): unusable, not a crash
            raise SegmentCorrupt(f"{where} cannot be read: {exc}") from exc
        if fd is not None:
            view.file_map, view.map_address = mapped, buf.address
            view.reader = _reader(fd, buf, view.batch, where)
            fd = None  # the reader owns it now
        return view
    finally:
        if fd is not None:
            os.close(fd)


def _open_mapped(buf: pa.Buffer, local: str | None, ref: SegmentRef, where: str, verify: bool,
                 model: ModelMeta | None) -> SegmentView:
    if buf.size != ref.bytes:  # free to check, and catches truncation even without the hash
        raise SegmentCorrupt(f"{where} has {buf.size} bytes, manifest says {ref.bytes} (truncated or replaced)")
    if verify:
        # Hash a local file with ordinary reads, not through the mapping: reading every
        # page of the map would make the whole file (ids, names, sources) resident in this
        # process, while the scan only ever touches the code column. What the hash reads stays
        # in the page cache, where a query node's positional hit lookups find it (measured: 1.2
        # ms a top-10 search on a freshly started 10M-row node when it was dropped, 0.3 ms kept).
        digest = sha256_file(local) if local is not None else hashlib.sha256(memoryview(buf)).hexdigest()
        if digest != ref.sha256:
            raise SegmentCorrupt(f"{where} fails its sha256 check (file altered or corrupt); refusing to serve it")
    try:
        reader = pa.ipc.open_file(buf)
        if reader.num_record_batches != 1:
            raise SegmentCorrupt(f"{where} has {reader.num_record_batches} record batches, expected exactly 1")
        batch = reader.get_batch(0)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise SegmentCorrupt(f"{where} is not a readable Arrow IPC file: {exc}") from exc
    return _view(batch, ref, where, model)


def _reader(fd: int, buf: pa.Buffer, batch: pa.RecordBatch, where: str) -> MetadataReader | None:
    """A MetadataReader over `fd`, or None (closing fd) when the batch is not a view of the map."""
    try:
        return MetadataReader(fd, buf.address, buf.size, batch, where)
    except ValueError as exc:  # Arrow copied a buffer (not expected for files we write): read via the arrays
        log.warning("%s: metadata is read through the map (%s)", where, exc)
        os.close(fd)
        return None


def _map_file(path: str) -> tuple[int, mmap.mmap | None, pa.Buffer]:
    """(read-only descriptor, read-only memory map of the whole file, that map as an Arrow buffer, zero copy).

    Python's mmap rather than `pa.memory_map`: Arrow's memory-mapped reads advise the
    kernel WILLNEED over the range read, which pages in the whole segment (ids, names,
    sources) at open; with a plain map only the pages a query touches become resident.
    The map itself is kept for page advice (SegmentView.advise_random_access); the
    descriptor stays open for positional reads of the same file (MetadataReader).
    An empty file has no map (None).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # the store checked the folders above it
    try:
        if os.fstat(fd).st_size == 0:
            return fd, None, pa.py_buffer(b"")
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        return fd, mapped, pa.py_buffer(mapped)
    except BaseException:
        os.close(fd)
        raise


def _view(batch: pa.RecordBatch, ref: SegmentRef, where: str, model: ModelMeta | None) -> SegmentView:
    schema = batch.schema
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    if model is not None:
        expected = segment_columns(model)
    else:  # a reader that does not name the model (e.g. reading face ids only) takes either layout
        with_refine = COLUMNS + (REFINE_COLUMN,)
        expected = with_refine if tuple(schema.names) == with_refine else COLUMNS
    if tuple(schema.names) != expected:
        raise SegmentCorrupt(f"{where} has columns {schema.names}, expected {list(expected)}")
    code_type = schema.field("code").type
    if (schema.field("face_id").type != pa.uint64() or not pa.types.is_fixed_size_binary(code_type)
            or schema.field("person").type != pa.string() or schema.field("source").type != pa.string()):
        raise SegmentCorrupt(f"{where} has an unexpected schema: {schema}")
    code_bytes = code_type.byte_width
    if model is not None:
        if code_bytes != model.code_bytes:
            raise SegmentCorrupt(f"{where} stores {code_bytes}-byte codes, the index model uses {model.code_bytes}")
        if meta.get("facepq.model_fingerprint") != model.fingerprint:
            raise SegmentCorrupt(f"{where} was written by model {meta.get('facepq.model_fingerprint')}, "
                                 f"the index model is {model.fingerprint}")
    if batch.num_rows != ref.rows:
        raise SegmentCorrupt(f"{where} has {batch.num_rows} rows, manifest says {ref.rows}")
    ids_col, code_col = batch.column(0), batch.column(3)
    if ids_col.null_count or code_col.null_count:
        raise SegmentCorrupt(f"{where} has null face ids or codes")
    refine = None
    if len(expected) > len(COLUMNS):
        refine_col = batch.column(4)
        refine_type = schema.field(REFINE_COLUMN).type
        if not pa.types.is_fixed_size_binary(refine_type) or refine_col.null_count:
            raise SegmentCorrupt(f"{where} has a refine column of type {refine_type} with {refine_col.null_count} nulls")
        width = refine_type.byte_width
        if model is not None and (width != model.refine.code_bytes or meta.get("facepq.refine") != model.refine.kind):
            raise SegmentCorrupt(f"{where} stores {width}-byte refinement rows of tier {meta.get('facepq.refine')}, "
                                 f"the index's tier is {model.refine.kind} ({model.refine.code_bytes} bytes)")
        refine = column_view(refine_col, np.uint8, width)
    return SegmentView(ref=ref, batch=batch, face_ids=column_view(ids_col, np.uint64, 1),
                       codes=column_view(code_col, np.uint8, code_bytes), persons=batch.column(1),
                       sources=batch.column(2), fingerprint=meta.get("facepq.model_fingerprint", ""), refine=refine,
                       cell_offsets=_cell_offsets(meta, batch.num_rows, where, model))


def _cell_offsets(meta: dict, rows: int, where: str, model: ModelMeta | None) -> np.ndarray | None:
    """The segment's per-cell row offsets when grouped by `model`'s partition, else None (SegmentCorrupt if malformed)."""
    if model is None or model.partition is None or meta.get(PARTITION_KEY) != model.partition.sha256:
        return None
    try:
        offsets = np.array([int(v) for v in meta.get(OFFSETS_KEY, "").split(",")], dtype=np.int64)
    except ValueError:
        raise SegmentCorrupt(f"{where} has unreadable cell offsets") from None
    if (offsets.shape != (model.partition.cells + 1,) or offsets[0] != 0 or offsets[-1] != rows
            or (np.diff(offsets) < 0).any()):
        raise SegmentCorrupt(f"{where} has cell offsets that do not fit its {rows} rows and "
                             f"{model.partition.cells} cells")
    return offsets
