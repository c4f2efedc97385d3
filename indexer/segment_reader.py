"""Positional reads of a local segment's metadata columns (face_id, person, source) and refinement rows.

A query node maps a segment to scan its codes, but reads the few rows it returns
with `os.pread`: pages touched through a file mapping stay in the process (RSS),
while pages read with pread stay in the page cache only. See `indexer.segment`.
"""
from __future__ import annotations

import os
import struct
import weakref

import numpy as np
import pyarrow as pa

from indexer.errors import SegmentCorrupt

_TWO_INT32 = struct.Struct("<ii")  # a string's start and end in its column's data (Arrow offsets, little-endian)
_UINT64 = struct.Struct("<Q")  # a face id


class MetadataReader:
    """Positional reads (os.pread) of a local segment's face_id, person and source columns.

    The file offset of each column buffer is its Arrow buffer's address minus the map's
    base address (the batch is a zero-copy view of the map), checked to lie inside the
    file. The descriptor is the one the map was made from, so both always see the same
    file even if a writer renames another one over its path; it closes with this object.

    Args:
        fd: an open, read-only descriptor of the segment file (owned from now on).
        base: address of the map of the whole file; size: its length in bytes.
        batch: the segment's record batch, read from that map.
        where: names the segment in error messages.
    Raises:
        ValueError: a column buffer is not inside the map (the reader cannot be used).
    """

    def __init__(self, fd: int, base: int, size: int, batch: pa.RecordBatch, where: str):
        self.fd, self.where = fd, where
        n = batch.num_rows
        ids, persons, sources = batch.column(0), batch.column(1), batch.column(2)
        self._ids = _file_offset(ids.buffers()[1], base, size, 8 * (ids.offset + n)) + 8 * ids.offset
        self._strings = [self._string_column(col, base, size) for col in (persons, sources)]
        self._refine = None  # (file offset of row 0, bytes a row) of the refine column, when there is one
        if batch.num_columns > 4:
            col = batch.column(4)
            width = col.type.byte_width
            self._refine = (_file_offset(col.buffers()[1], base, size, width * (col.offset + n)) + width * col.offset,
                            width)
        self._closer = weakref.finalize(self, os.close, fd)

    @staticmethod
    def _string_column(col: pa.Array, base: int, size: int) -> tuple[int, int, int]:
        """(file offset of the column's first int32 offset, file offset of its data, data length)."""
        offsets, data = col.buffers()[1], col.buffers()[2]
        first = _file_offset(offsets, base, size, 4 * (col.offset + len(col) + 1)) + 4 * col.offset
        data_len = data.size if data is not None else 0
        data_at = _file_offset(data, base, size, data_len) if data is not None else 0
        return first, data_at, data_len

    def close(self) -> None:
        self._closer()

    def _pread(self, n: int, offset: int) -> bytes:
        got = os.pread(self.fd, n, offset)
        if len(got) != n:
            raise SegmentCorrupt(f"{self.where} was truncated while served (short read at byte {offset})")
        return got

    def face_id_range(self, lo: int, hi: int) -> np.ndarray:
        """uint64 [hi - lo]: the face ids of rows lo..hi-1 (a fresh array, not the map)."""
        out = np.empty(hi - lo, dtype=np.uint64)
        offset, want = self._ids + 8 * lo, out.nbytes
        got = os.preadv(self.fd, [out], offset) if hasattr(os, "preadv") else None
        if got is None:
            out[:] = np.frombuffer(self._pread(want, offset), dtype=np.uint64)
        elif got != want:
            raise SegmentCorrupt(f"{self.where} was truncated while served (short read at byte {offset})")
        return out

    def refine_rows(self, rows: np.ndarray) -> np.ndarray:
        """uint8 [n, width]: the refinement rows of in-range int64 `rows`, one positional read each (~1 us)."""
        first, width = self._refine
        pread, fd = os.pread, self.fd
        chunks = [pread(fd, width, first + width * row) for row in rows.tolist()]
        data = b"".join(chunks)
        if len(data) != width * len(chunks):
            raise SegmentCorrupt(f"{self.where} was truncated while served (short read of a refinement row)")
        return np.frombuffer(data, dtype=np.uint8).reshape(len(chunks), width)

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, list[str], list[str]]:
        """(face_ids uint64 [n], persons [n], sources [n]) of in-range int64 `rows`.

        Five reads a row (id, two offset pairs, two strings): ~1 us each from the page cache.
        """
        pread, fd, unpack, unpack_id = os.pread, self.fd, _TWO_INT32.unpack, _UINT64.unpack
        (p_first, p_at, p_len), (s_first, s_at, s_len) = self._strings
        ids, persons, sources = [], [], []
        try:
            for row in rows.tolist():
                ids.append(unpack_id(pread(fd, 8, self._ids + 8 * row))[0])
                p_start, p_end = unpack(pread(fd, 8, p_first + 4 * row))
                s_start, s_end = unpack(pread(fd, 8, s_first + 4 * row))
                if not (0 <= p_start <= p_end <= p_len and 0 <= s_start <= s_end <= s_len):
                    raise SegmentCorrupt(f"{self.where} has a bad string offset at row {row} (altered in place?)")
                person = pread(fd, p_end - p_start, p_at + p_start)
                source = pread(fd, s_end - s_start, s_at + s_start)
                if len(person) != p_end - p_start or len(source) != s_end - s_start:
                    raise struct.error("short read")
                persons.append(person.decode("utf-8"))
                sources.append(source.decode("utf-8"))
        except struct.error as exc:  # a short read of an id, an offset pair or a string: the file shrank
            raise SegmentCorrupt(f"{self.where} was truncated while served (short read)") from exc
        except UnicodeDecodeError as exc:
            raise SegmentCorrupt(f"{self.where} has invalid UTF-8 (altered in place?)") from exc
        return np.array(ids, dtype=np.uint64), persons, sources


def _file_offset(buf: pa.Buffer, base: int, size: int, need: int) -> int:
    """Offset in the file of a buffer of the mapped batch; it must hold `need` bytes inside the file."""
    offset = buf.address - base
    if offset < 0 or buf.size < need or offset + buf.size > size:
        raise ValueError(f"buffer at {buf.address:#x}+{buf.size} is not inside the map at {base:#x}+{size}")
    return offset
