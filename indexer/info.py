"""Summary of an index: what `facepq index info` prints (and tests read)."""
from __future__ import annotations

import numpy as np
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
    cell_rows = None  # rows per cell over every segment (a partitioned index)
    for i, state in enumerate(manifest.shards):
        dead = tombstone_ids(state)
        for ref in state.segments:
            view = open_segment(store, ref, verify=verify, model=manifest.model)
            if view.cell_offsets is not None:
                sizes = np.diff(view.cell_offsets)
                cell_rows = sizes if cell_rows is None else cell_rows + sizes
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
        **({"cells": cell_balance(cell_rows)} if cell_rows is not None else {}),
    }


def cell_balance(cell_rows: np.ndarray) -> dict:
    """How evenly a partitioned index's rows fill its cells. The cells are fitted once, on the first faces
    written; if later faces fall unevenly, the largest cells grow and searches that probe them slow down
    (recall is unchanged: faces are always in their nearest cell)."""
    mean = float(cell_rows.mean()) if cell_rows.size else 0.0
    return {"cells": int(cell_rows.size), "largest_rows": int(cell_rows.max(initial=0)), "mean_rows": mean,
            "largest_over_mean": float(cell_rows.max(initial=0) / mean) if mean else 0.0,
            "empty": int((cell_rows == 0).sum())}


def storage_tiers(model) -> list[dict]:
    """Bytes per face of each stored tier: the first-pass codes (scanned, resident in a node's memory) and
    the refinement tier when the index has one (read for candidates only, not resident)."""
    tiers = [{"tier": "codes", "codec": model.codec, "bytes_per_face": model.code_bytes, "resident": True}]
    if model.refine is not None:
        tiers.append({"tier": "refine", "kind": model.refine.kind, "codec": model.refine.codec,
                      "bytes_per_face": model.refine.code_bytes, "resident": False})
    return tiers
