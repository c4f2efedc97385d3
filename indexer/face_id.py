"""Stable face ids: the same photo (or embedding) gets the same id on every run and machine.

An id is the first 8 bytes (big-endian) of a sha256 over the content, so
re-ingesting a gallery finds its faces already present and skips them, and an
interrupted ingest can simply be run again.
"""
from __future__ import annotations

import hashlib

import numpy as np


def _first_u64(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "big")


def face_id_for_photo(content: bytes, face_index: int = 0) -> int:
    """Id of face number `face_index` in the photo whose file bytes are `content`.

    sha256(content || b'\\0' || face_index as 4 bytes big-endian)[:8] as an unsigned 64-bit int.
    """
    if face_index < 0 or face_index >= 2**32:
        raise ValueError(f"face_index must be in [0, 2**32), got {face_index}")
    h = hashlib.sha256(content)
    h.update(b"\0" + int(face_index).to_bytes(4, "big"))
    return _first_u64(h.digest())


def face_id_for_embedding(embedding_row_bytes: bytes, source: str) -> int:
    """Id of a face given as an embedding row (its float32 bytes) from `source` (file#row or a label).

    sha256(row bytes || b'\\0' || source utf-8)[:8] as an unsigned 64-bit int.
    """
    h = hashlib.sha256(bytes(embedding_row_bytes))
    h.update(b"\0" + str(source).encode("utf-8"))
    return _first_u64(h.digest())


def face_ids_for_embeddings(embeddings: np.ndarray, sources) -> np.ndarray:
    """Vectorised-over-rows `face_id_for_embedding`: float32 [N, E] + N sources -> uint64 [N]."""
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    out = np.empty(emb.shape[0], dtype=np.uint64)
    for i, src in enumerate(sources):
        out[i] = face_id_for_embedding(emb[i].tobytes(), src)
    return out


def isin_sorted(values: np.ndarray, sorted_arr: np.ndarray) -> np.ndarray:
    """bool mask: which `values` are in `sorted_arr` (ascending uint64 face ids), by binary search."""
    values = np.asarray(values, dtype=np.uint64)
    if sorted_arr.size == 0:
        return np.zeros(values.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_arr, values), sorted_arr.size - 1)
    return sorted_arr[pos] == values


def as_id_array(ids) -> np.ndarray:
    """Face ids (a set, list or array of ints) -> uint64 array (no copy when already uint64)."""
    if isinstance(ids, np.ndarray):
        return ids.astype(np.uint64, copy=False)
    ids = list(ids)
    return np.fromiter((int(i) for i in ids), dtype=np.uint64, count=len(ids))
