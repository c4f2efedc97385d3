"""Summary of an index: what `facepq index info` prints (and tests read)."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from indexer.live import segment_live_mask, tombstone_ids
from indexer.segment import open_segment
from indexer.store import IndexStore


def index_info(index_uri, verify: bool = False) -> dict:
    """Version, live faces (rows - tombstoned), distinct people, shards, segments, tombstones, bytes.

    Args:
        verify: check every segment's size and sha256 (reads every file once); raises SegmentCorrupt.
    Raises:
        IndexFormatError: no index at `index_uri`, or a corrupt manifest.
    """
    store = index_uri if isinstance(index_uri, IndexStore) else IndexStore(index_uri)
    manifest = store.load_manifest()
    people: set[str] = set()
    shards = []
    for i, state in enumerate(manifest.shards):
        dead = tombstone_ids(state)
        for ref in state.segments:
            view = open_segment(store, ref, verify=verify, model=manifest.model)
            persons = view.persons
            if dead.size:
                persons = persons.filter(pa.array(segment_live_mask(view, dead)))
            people.update(pc.unique(persons).to_pylist())
        shards.append({"shard": i, "faces": state.rows - len(state.tombstones), "rows": state.rows,
                       "segments": len(state.segments), "tombstones": len(state.tombstones), "bytes": state.bytes})
    return {
        "index": store.uri, "version": manifest.version, "format_version": manifest.format_version,
        "created_at": manifest.created_at, "message": manifest.message, "model": manifest.model.to_dict(),
        "faces": manifest.live_faces, "rows": manifest.rows, "people": len(people),
        "shard_count": manifest.shard_count, "segments": len(manifest.segments),
        "tombstones": manifest.tombstone_count, "bytes": manifest.bytes, "shards": shards,
        "tiers": storage_tiers(manifest.model),
        **({"augmentation": dict(manifest.augmentation)} if manifest.augmentation is not None else {}),
    }


def storage_tiers(model) -> list[dict]:
    """Bytes per face of each stored tier: the first-pass codes (scanned, resident in a node's memory) and
    the refinement tier when the index has one (read for candidates only, not resident)."""
    tiers = [{"tier": "codes", "codec": model.codec, "bytes_per_face": model.code_bytes, "resident": True}]
    if model.refine is not None:
        tiers.append({"tier": "refine", "kind": model.refine.kind, "codec": model.refine.codec,
                      "bytes_per_face": model.refine.code_bytes, "resident": False})
    return tiers
