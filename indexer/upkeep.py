"""Upkeep: merge small segments so an index that grows by many small writes stays a few files per shard.

Every Enrol commits a segment per shard it touches, and nothing used to merge them: a node holds two
file descriptors per served segment (the descriptor for positional reads and the memory map's own), so
a busy enrolment service drove its nodes into their descriptor limit. The policy here is size-tiered:

* a segment is *small* below `MergePolicy.small_rows` (default: the writer's segment size, so segments
  an ingest wrote full are never touched);
* small segments fall into tiers by size, tier t holding rows in [fanout**t, fanout**(t+1));
* when a tier of a shard holds `fanout` or more segments, its smallest `fanout` become one segment of the
  next tier up (at most `max_merge_rows` rows in one merge: a round's work is bounded).

So each row is rewritten about log_fanout(small_rows) times in its life, and a shard never keeps more
than about fanout x (tiers) small segments. A merge copies rows as they are (tombstoned rows included, so
every tombstone still names a present row: `compact` removes them) and commits like any writer (the
commit lock, one new version; readers of older versions keep their files until garbage collection).

`plan_merges` is pure (tested on manifests alone); `merge_small_segments` runs one bounded round;
`query_node.upkeep.Upkeep` runs rounds in the background of a coordinator.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from indexer.commit import _publish as publish
from indexer.lock import commit_lock
from indexer.manifest import Manifest, SegmentRef
from indexer.segment import column_view, open_segment, write_segment
from indexer.store import IndexStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergePolicy:
    """Args:
        small_rows: segments with fewer rows are merged (default 1,000,000: the writer's segment size).
        fanout: how many segments of one size tier become one of the next.
        max_merge_rows: the most rows one merge rewrites (bounds a round's time and memory).
    """

    small_rows: int = 1_000_000
    fanout: int = 8
    max_merge_rows: int = 2_000_000

    def __post_init__(self):
        if self.fanout < 2 or self.small_rows < 2 or self.max_merge_rows < 2:
            raise ValueError(f"merge policy needs fanout, small_rows and max_merge_rows >= 2, got {self}")

    def tier(self, rows: int) -> int:
        return int(math.log(max(rows, 1), self.fanout) + 1e-9)


def plan_merges(manifest: Manifest, policy: MergePolicy) -> dict[int, list[SegmentRef]]:
    """shard -> the segments to merge into one now (at most one merge per shard; empty when none is due)."""
    plan = {}
    for shard, state in enumerate(manifest.shards):
        tiers: dict[int, list[SegmentRef]] = {}
        for ref in state.segments:
            if ref.rows < policy.small_rows:
                tiers.setdefault(policy.tier(ref.rows), []).append(ref)
        for tier in sorted(tiers):
            group = sorted(tiers[tier], key=lambda r: (r.rows, r.id))
            if len(group) < policy.fanout:
                continue
            chosen, rows = [], 0
            for ref in group[:policy.fanout]:
                if chosen and rows + ref.rows > policy.max_merge_rows:
                    break
                chosen.append(ref)
                rows += ref.rows
            if len(chosen) >= 2:
                plan[shard] = chosen
                break
    return plan


@dataclass
class MergeStats:
    """What one round did."""

    version: int | None = None
    merges: int = 0
    segments_merged: int = 0
    rows_rewritten: int = 0
    shards: list[int] = field(default_factory=list)


def merge_small_segments(store: IndexStore, policy: MergePolicy = MergePolicy(), redis_url: str | None = None,
                         lock_timeout: float = 60.0) -> MergeStats:
    """One bounded round: every merge `plan_merges` finds due, committed as one new version (none if none)."""
    stats = MergeStats()
    if store.current_version() is None or not plan_merges(store.load_manifest(), policy):
        return stats  # the usual case, without taking the lock
    with commit_lock(store, redis_url, lock_timeout):
        old = store.load_manifest()
        plan = plan_merges(old, policy)  # again under the lock: another writer may have moved on
        if not plan:
            return stats
        new = old.successor("")
        for shard, refs in sorted(plan.items()):
            merged = _merge(store, shard, refs, new)
            chosen = {r.id for r in refs}
            state = new.shards[shard]
            at = next(i for i, s in enumerate(state.segments) if s.id in chosen)
            kept = [s for s in state.segments if s.id not in chosen]
            state.segments = kept[:at] + [merged] + kept[at:]
            stats.merges += 1
            stats.segments_merged += len(refs)
            stats.rows_rewritten += merged.rows
            stats.shards.append(shard)
        new.message = (f"upkeep: merged {stats.segments_merged} small segments into {stats.merges} "
                       f"({stats.rows_rewritten} rows)")
        stats.version = publish(store, new)
    return stats


def _merge(store: IndexStore, shard: int, refs: list[SegmentRef], manifest: Manifest) -> SegmentRef:
    """Write the rows of `refs` (in order, checksums verified) as one new segment of `shard`."""
    model = manifest.model
    views = [open_segment(store, ref, verify=True, model=model) for ref in refs]
    ids = np.concatenate([v.face_ids for v in views])
    codes = np.concatenate([column_view(v.batch.column(3), np.uint8, model.code_bytes) for v in views])
    persons = pa.concat_arrays([v.persons for v in views])
    sources = pa.concat_arrays([v.sources for v in views])
    # an index with a refinement tier keeps each face's row beside its code (as compaction does)
    refine = np.concatenate([column_view(v.batch.column(4), np.uint8, model.refine.code_bytes) for v in views]) \
        if model.refine is not None else None
    return write_segment(store, shard, ids, persons, sources, codes, model, refine)
