"""The two stages of the ingest pipeline that run on Ray workers.

`read_and_align` (a plain function, CPU tasks) turns a batch of photo paths
into aligned face crops; `read_embedding_chunk` turns a chunk of an embeddings
file into rows; `EncoderActor` (a class: the checkpoint is loaded once per
actor) turns crops or embeddings into OPQN codes. Bad photos become rows with a
`skip` reason, never exceptions, so one broken file cannot fail a job.

Batches are dicts of numpy arrays, as Ray Data's `map_batches` passes them;
all three run (and are tested) without Ray on plain dicts.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from indexer.face_id import face_id_for_embedding, face_id_for_photo

log = logging.getLogger(__name__)


def read_and_align(batch: dict[str, np.ndarray], pipeline: dict) -> dict[str, np.ndarray]:
    """Photo paths -> face crops.

    Args:
        batch: {"path": str [n], "person": str [n]}.
        pipeline: FacePipeline settings (`FacePipeline.to_dict()`), as stored in the checkpoint.
    Returns:
        {"face_id": uint64 [n], "person": str [n], "source": str [n], "skip": str [n] ('' = ok),
         "note": str [n] (conversion applied, '' = none), "crop": uint8 [n, S, S, 3] (zeros when skipped)}.
    """
    from facepq_core.errors import PhotoSkipped
    from opqn_model.face_pipeline import FacePipeline
    from opqn_model.images import read_bytes
    from opqn_model.photos import align_photo

    face_pipeline = FacePipeline.from_dict(pipeline)
    paths = [str(p) for p in batch["path"]]
    n, size = len(paths), face_pipeline.size
    crops = np.zeros((n, size, size, 3), dtype=np.uint8)
    face_ids = np.zeros(n, dtype=np.uint64)
    skips, notes = [""] * n, [""] * n
    for i, path in enumerate(paths):
        try:
            content, _ = read_bytes(path)
            face_ids[i] = face_id_for_photo(content, 0)
            crops[i], note = align_photo(content, face_pipeline)
            notes[i] = note or ""
        except PhotoSkipped as exc:
            skips[i] = exc.reason
        except Exception as exc:  # noqa: BLE001 - a photo the decoders choke on must not kill the job
            log.warning("skipping %s: %s: %s", path, type(exc).__name__, exc)
            skips[i] = "error"
    return {"face_id": face_ids, "person": np.asarray(batch["person"], dtype=object),
            "source": np.asarray(paths, dtype=object), "skip": np.asarray(skips, dtype=object),
            "note": np.asarray(notes, dtype=object), "crop": crops}


def read_embedding_chunk(batch: dict[str, np.ndarray], path: str, kind: str) -> dict[str, np.ndarray]:
    """Chunks of an embeddings file -> rows with their face ids.

    Args:
        batch: {"start": int64 [c], "stop": int64 [c], "row_group": int64 [c], "sources": object [c]}
            (sources: the chunk's per-row source strings, for face ids; empty for Parquet, which has them).
        path: the .npy or .parquet file; kind: 'npy' or 'parquet'.
    Returns:
        {"row": int64 [n], "face_id": uint64 [n], "embedding": float32 [n, E]}.
    """
    rows, ids, embs = [], [], []
    for start, stop, group, sources in zip(batch["start"], batch["stop"], batch["row_group"], batch["sources"]):
        start, stop = int(start), int(stop)
        if kind == "npy":
            emb = np.ascontiguousarray(np.load(path, mmap_mode="r")[start:stop], dtype=np.float32)
            sources = list(sources)
        else:
            import pyarrow.parquet as pq

            table = pq.ParquetFile(path).read_row_group(int(group), columns=["embedding", "source"])
            emb = _embedding_matrix(table.column("embedding"))
            sources = [str(s) for s in table.column("source").to_pylist()]
        rows.append(np.arange(start, stop, dtype=np.int64))
        ids.append(np.fromiter((face_id_for_embedding(emb[i].tobytes(), sources[i]) for i in range(len(emb))),
                               dtype=np.uint64, count=len(emb)))
        embs.append(emb)
    return {"row": np.concatenate(rows), "face_id": np.concatenate(ids), "embedding": np.concatenate(embs)}


def _embedding_matrix(column) -> np.ndarray:
    """A list<float> / fixed_size_list<float> Arrow column -> float32 [n, E] (rows must share one length)."""
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(column)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if flat.size % n:
        raise ValueError("embedding rows have different lengths")
    return flat.reshape(n, flat.size // n)


class EncoderActor:
    """Crops or embeddings -> codes; the checkpoint is loaded once per actor.

    Args:
        model_path: checkpoint path (must be readable where the actor runs).
        refine: the index's refinement tier ('codes:256', 'float16'), whose rows are made beside the codes.
        features: emit the trunk embeddings ("feature" float32 [n, E]) instead of codes: the driver encodes
            them after database-side augmentation (indexer.dba), which needs every face's embedding first.
    """

    def __init__(self, model_path: str, threads: int | None = None, refine: str | None = None,
                 features: bool = False):
        import torch

        from opqn_model.api import FaceEncoder

        if threads:
            torch.set_num_threads(threads)
        self.encoder = FaceEncoder.load(model_path)
        self.code_bytes = self.encoder.codec.spec.code_bytes
        self.refine = self.encoder.refine_codec(refine) if refine else None
        self.features = bool(features)
        log.debug("encoder actor pid %d loaded %s", os.getpid(), model_path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Adds "code" uint8 [n, code_bytes] (and "refine" uint8 [n, tier bytes] with a refinement tier);
        drops "crop"/"embedding" (not needed downstream).

        Photo batches: rows with a non-empty "skip" get all-zero codes and are not encoded.
        """
        import torch

        out = {k: v for k, v in batch.items() if k not in ("crop", "embedding")}
        with torch.inference_mode():
            if "embedding" in batch:
                self._encode(np.asarray(batch["embedding"], dtype=np.float32), out, None)
                return out
            crops = batch["crop"]
            ok = np.array([not s for s in batch["skip"]], dtype=bool)
            feats = self.encoder.trunk_features(np.ascontiguousarray(crops[ok])) if ok.any() else None
            self._encode(feats, out, ok)
        return out

    def _encode(self, feats, out: dict, ok) -> None:
        """Codes (and refinement rows) of embeddings `feats` into `out`; rows outside `ok` stay zero.
        With `features`: the embeddings themselves ("feature"), checked as the codec would check them."""
        if self.features:
            from facepq_core.codecs import check_embeddings

            dim = self.encoder.codec.embedding_dim
            rows = np.zeros((len(ok) if ok is not None else len(feats), dim), dtype=np.float32)
            if feats is not None:
                checked = check_embeddings(feats, dim)
                rows[ok if ok is not None else slice(None)] = checked
            out["feature"] = rows
            return
        tiers = [("code", self.encoder.codec)] + ([("refine", self.refine)] if self.refine is not None else [])
        for key, codec in tiers:
            if ok is None:
                out[key] = codec.encode(feats)
                continue
            rows = np.zeros((len(ok), codec.code_bytes), dtype=np.uint8)
            if feats is not None:
                rows[ok] = codec.encode(feats)
            out[key] = rows
