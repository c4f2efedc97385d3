"""Shard routing: which shard of an index holds a face.

A face with id `face_id` (an unsigned 64-bit integer, `indexer.face_id`) lives in
shard `face_id % shard_count`. This is part of the on-disk contract
(docs/index-format.md): the writer places rows by it, commits and deletes find a
face's shard by it, and an index's shard count never changes, so neither does a
face's shard. Every code path asks these two functions; none spells the rule out.
"""
from __future__ import annotations

import numpy as np

from facepq_core.errors import ConfigError

__all__ = ["shard_of", "shard_of_id"]

_U64_LIMIT = 1 << 64


def _check_shard_count(shard_count: int) -> int:
    shard_count = int(shard_count)
    if not 1 <= shard_count < _U64_LIMIT:
        raise ConfigError(f"shard count must be >= 1, got {shard_count}")
    return shard_count


def shard_of(face_ids, shard_count: int) -> np.ndarray:
    """Shard of each face id: `face_id % shard_count`, vectorised.

    Parameters
    ----------
    face_ids : uint64 [n] (or anything `np.asarray(..., dtype=np.uint64)` takes; an
        uint64 array is not copied).
    shard_count : int >= 1.

    Returns
    -------
    [n] shard numbers in the smallest unsigned type that holds `shard_count - 1`
    (uint8 up to 256 shards): small ints are what the writer's radix sort
    (`np.argsort(kind="stable")`) and `np.bincount` want.
    """
    shard_count = _check_shard_count(shard_count)
    ids = np.asarray(face_ids, dtype=np.uint64)
    if shard_count & (shard_count - 1) == 0:  # a power of two: a mask, 6x cheaper than uint64 modulo
        shard = ids & np.uint64(shard_count - 1)
    else:
        shard = ids % np.uint64(shard_count)
    return shard.astype(np.min_scalar_type(shard_count - 1), copy=False)


def shard_of_id(face_id: int, shard_count: int) -> int:
    """Shard of one face id (`shard_of` for a single uint64 id)."""
    face_id = int(face_id)
    if not 0 <= face_id < _U64_LIMIT:
        raise ValueError(f"a face id is an unsigned 64-bit integer, got {face_id}")
    return face_id % _check_shard_count(shard_count)
