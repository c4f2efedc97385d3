"""A query node's view of its shards at one index version: open, verify, mask tombstones.

`load_view` memory-maps every segment of the served shards (zero-copy: the code
matrix is the file's pages, so resident memory is about the bytes scanned),
verifies each segment's sha256 once, advises the kernel to keep the metadata
columns out of the map, and turns tombstones into per-segment skip masks. A shard
whose segment is missing or corrupt is NOT_SERVING with the reason recorded.
A view is immutable once built; query_node.live_index swaps whole views.

A partitioned index (facepq_core.partition) loads its cell probe with the view; a search
with `nprobe` (1..L-1) scans only the cells its lookup tables score best, 0 or >= L everything.

Where the kernel of its codes runs AVX2 (4-bit codes; 8-bit ones without AVX-512), a node keeps an
unpartitioned index's codes as 32-row blocks (query_node.code_blocks: the layout those kernels read
without transposing) in place of the map's code pages, made once per segment and reused by later views
like the segment itself.
"""
from __future__ import annotations

import logging

import numpy as np

from facepq_core.errors import ConfigError, IndexFormatError
from query_node.code_blocks import CodeBlocks, node_keeps_blocks
from query_node.merge import Hit, merge_shard_lists
from query_node.scan import scan_tables
from query_node.shard_search import ScanStats, ShardData

log = logging.getLogger(__name__)


class IndexView:
    """The served shards of one index version (immutable once built)."""

    def __init__(self, manifest, shards: dict[int, ShardData], cell_probe=None, codec=None):
        """`codec`: the codec class `served_codec` returned for this manifest (looked up here when None)."""
        codec = codec if codec is not None else served_codec(manifest.model)
        self.manifest = manifest
        self.model = manifest.model
        self.kernel = codec.kernel   # the scan kernel family of the index's codec
        self.refine_kernel = manifest.model.refine.kernel if manifest.model.refine is not None else None
        self.version = str(manifest.version)
        self.shards = shards
        self.cell_probe = cell_probe  # facepq_core.partition.CellProbe, or None (exhaustive only)
        # 8-bit bound tables are only read from blocks: a view without them is spared building them per query
        self.holds_blocks = any(data.blocks for data in shards.values())

    def serving_shards(self) -> list[int]:
        return sorted(s for s, d in self.shards.items() if d.serving)

    def search(self, lookup_tables: np.ndarray, k: int, shards: list[int],
               stats: ScanStats | None = None, refine=None, threads: int = 1,
               with_codes: bool = False, nprobe: int = 0) -> list[list[Hit]]:
        """Exact top-k over `shards` (all serving) for float32 [Q, M, K] tables; one list per query.

        `stats` (optional) accumulates the kernel's seconds and rows over the shards scanned.
        `refine` (optional query_node.two_stage.RefineQuery): two stages; each shard answers the top k of
        its first-pass candidates re-scored by the refinement tier, merged exactly on those scores.
        `threads`: native threads a segment's scan may be split over (query_node.scan_threads; same answer).
        `with_codes`: each hit carries its stored code (the coordinator's query expansion).
        `nprobe`: on a partitioned index, scan only the cells `probe_cells` picks; 0 scans everything.
        Several queries with nprobe each scan their own cells (`probes`).
        """
        tables = scan_tables(lookup_tables, self.model.packed, self.model.code_bytes, blocks=self.holds_blocks)
        cells = self.probe_cells(lookup_tables, nprobe) if self.probes(nprobe) else None
        per_shard = [self.shards[s].search(tables, k, stats, refine, threads, with_codes, cells) for s in shards]
        return [merge_shard_lists([res[q] for res in per_shard], k) for q in range(tables.byte.shape[0])]

    def probes(self, nprobe: int) -> bool:
        """Whether a search with this nprobe scans some cells only: a partitioned index and 1 <= nprobe < L.

        Such a search scans each query's own cells, never the union of a batch's: 16 queries of 128
        cells of 4096 made one pass over up to half of a 100M index for all 16 (17 queries/s on one thread
        against ~150 one by one, `facepq bench scale`, AVX2-only EPYC), and a query's answer then depended
        on what else was in its batch.
        """
        return self.cell_probe is not None and 0 < nprobe < self.cell_probe.cells

    def probe_cells(self, lookup_tables: np.ndarray, nprobe: int) -> np.ndarray:
        """The cells each query of these tables [Q, M, K] scans, int64 [Q, nprobe], each row sorted (for
        `probes(nprobe)`; one vectorised pass for the whole batch)."""
        return self.cell_probe.probe(lookup_tables, nprobe)


def load_view(store, shard_ids: list[int], previous: IndexView | None = None, verify: bool = True,
              manifest=None, recheck: frozenset = frozenset(), code_blocks: bool | None = None) -> IndexView:
    """Open the current manifest's segments of `shard_ids`.

    Args:
        store: indexer.store.IndexStore.
        shard_ids: shards this node serves; each must exist in the index.
        previous: a view whose already verified segments (same id) are reused.
        verify: check every newly opened segment's size and sha256.
        manifest: the manifest to open (default: the current one).
        recheck: segment ids never reused from `previous` (their files changed on disk).
        code_blocks: keep the codes as `CodeBlocks` (None: where `code_blocks.node_keeps_blocks` says so).
    Raises:
        IndexFormatError: no index / unreadable manifest. ConfigError: a shard outside the index.
    """
    from indexer.errors import SegmentCorrupt
    from indexer.partition_store import load_prober
    from indexer.segment import open_segment

    manifest = manifest if manifest is not None else store.load_manifest()
    bad = [s for s in shard_ids if s < 0 or s >= manifest.shard_count]
    if bad:
        raise ConfigError(f"shard(s) {bad} do not exist: the index at {store.uri} has {manifest.shard_count} "
                          f"shards (0..{manifest.shard_count - 1})")
    codec = served_codec(manifest.model)
    cell_probe = load_prober(store, manifest.model)  # IndexFormatError when missing, altered or another model's
    if code_blocks is None:
        code_blocks = node_keeps_blocks(manifest.model.packed, partitioned=cell_probe is not None,
                                        hamming=codec.hamming_tables)
    reuse, reuse_blocks = {}, {}
    if previous is not None:
        for data in previous.shards.values():
            reuse.update({seg.ref.id: seg for seg in data.segments if seg.ref.id not in recheck})
            reuse_blocks.update({seg.ref.id: b for seg, b in zip(data.segments, data.blocks) if b is not None})
    shards = {}
    for shard in shard_ids:
        state = manifest.shards[shard]
        data = ShardData(shard=shard)
        try:
            for ref in state.segments:
                seg = reuse.get(ref.id)
                if seg is None or seg.ref.sha256 != ref.sha256:
                    seg = open_segment(store, ref, verify=verify or ref.id in recheck, model=manifest.model)
                    seg.advise_random_access()
                data.segments.append(seg)
                if code_blocks:  # a reused segment keeps its blocks
                    reused = reuse_blocks.get(ref.id) if reuse.get(ref.id) is seg else None
                    data.blocks.append(reused if reused is not None else _code_blocks(seg))
        except SegmentCorrupt as exc:
            log.error("shard %d NOT_SERVING at version %d: %s", shard, manifest.version, exc)
            shards[shard] = ShardData(shard=shard, serving=False, reason=str(exc))
            continue
        _mask_tombstones(data, state.tombstones)
        shards[shard] = data
    return IndexView(manifest, shards, cell_probe, codec)


def served_codec(model):
    """The codec class of an index's codes, which a node can scan; an index of an unknown codec, or of one
    that can only be a refinement tier, is never served (IndexFormatError saying why)."""
    from facepq_core.codecs import codec_class

    try:
        codec = codec_class(model.codec)
        if model.refine is not None:  # an unknown refinement codec is refused here, not at the first search
            codec_class(model.refine.codec)
    except ConfigError as exc:
        raise IndexFormatError(f"cannot serve this index: {exc}") from None
    if codec.kernel != "lut":
        raise IndexFormatError(f"cannot serve this index: its codec {model.codec} (kernel {codec.kernel}) "
                               f"can only be a refinement tier, not the scanned codes")
    return codec


def _code_blocks(seg) -> CodeBlocks | None:
    """The segment's codes as `CodeBlocks`, its map's code pages released; None for a segment whose codes
    are not a local file's map (a remote segment's heap copy: blocks would double the node's memory)."""
    if not seg.local_map:
        return None
    return CodeBlocks.of(seg.codes, on_chunk=seg.release_code_pages)


def _mask_tombstones(data: ShardData, tombstones) -> None:
    """Fill data.skips (one mask or None per segment) and the shard's row counts."""
    tomb = np.fromiter(tombstones, dtype=np.uint64, count=len(tombstones))
    for seg in data.segments:
        if tomb.size:
            # tombstone_mask reads the face ids with positional reads in chunks rather than
            # np.isin over seg.face_ids (the map), which would leave the whole column resident
            # for as long as the segment is served. Not madvise(DONTNEED) after the fact: the
            # whole column would still be resident at once while the masks are computed (a
            # peak of 8 bytes a row per segment), and madvise is Linux-only best effort.
            skip = seg.tombstone_mask(tomb)
            data.skips.append(skip if skip.any() else None)
        else:
            data.skips.append(None)
        data.rows += seg.rows
        data.code_bytes += seg.codes.nbytes
    data.live_rows = data.rows - sum(int(s.sum()) for s in data.skips if s is not None)
