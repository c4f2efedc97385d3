"""Evaluation: float features vs OPQN codes on the seen and unseen identity protocols.

Protocols (queries / gallery):
- unseen: people the model never trained on. For each such person with at least
  two photos, `queries_per_person` photos (a seeded choice) are queries and the
  rest of that person's photos join the gallery; the gallery holds only unseen
  people. This is the setting OPQN is built for: enrol new people, no retraining.
- seen: people the model trained on. Queries are the photos held out of training
  (stored in the checkpoint's split); the gallery is their training photos.

Each protocol is scored three ways on the same queries and gallery:
- `map` / `p_at_k` ...: the model's codes: query lookup tables vs gallery codes, as served;
- `map_float`: the trunk's float embeddings, cosine similarity (the reference a
  quantizer is judged against);
- `map_float_head`: the codec's float counterpart before quantization (opqn: the head's
  normalised sub-vectors; binary: the projection whose signs are the bits).
"""
from __future__ import annotations

import os

import numpy as np

from facepq_core.codes import score_codes
from opqn_model.metrics import retrieval_metrics


def cosine_scores(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    return q @ g.T


def evaluate_embeddings(codec, q_emb: np.ndarray, q_labels, g_emb: np.ndarray, g_labels) -> dict:
    """Codes vs float on given trunk embeddings; `codec` is a facepq_core.codecs.Codec (e.g. FaceEncoder.codec).

    Codes are scored exactly as the query nodes score them (facepq_core.codes.score_codes, the
    kernels' reference): the query's lookup tables against the gallery's stored codes.
    """
    codes = codec.encode(g_emb)
    tables = codec.query_tables(q_emb)
    result = retrieval_metrics(score_codes(tables, codes, codec.spec), q_labels, g_labels)
    float_trunk = retrieval_metrics(cosine_scores(q_emb, g_emb), q_labels, g_labels)
    q_float, g_float = codec.float_features(q_emb), codec.float_features(g_emb)
    float_head = retrieval_metrics(cosine_scores(q_float, g_float), q_labels, g_labels) if q_float is not None \
        else {"map": float("nan")}
    result.update({
        "map_float": float_trunk["map"], "p_at_1_float": float_trunk["p_at_1"],
        "map_float_head": float_head["map"], "codec": codec.name,
        "bits": codec.spec.bits, "M": codec.spec.M, "K": codec.spec.K,
        "n_gallery": int(len(g_labels)),
    })
    result["map_ratio_vs_float"] = result["map"] / result["map_float"] if result["map_float"] else float("nan")
    return result


def protocol_records(records, split: dict, protocol: str, queries_per_person: int = 1, seed: int = 0):
    """(query records, gallery records) of a protocol, from a checkpoint's stored split.

    unseen: people absent from training (not in train_people or val_people); a seeded
    choice of `queries_per_person` photos each are queries, their other photos the gallery.
    seen: training people; queries are the photos held out of training (stored split),
    the gallery their other photos.
    """
    from facepq_core.errors import DataError
    from opqn_model.datasets import split_photos_per_person

    trained = set(split.get("train_people", [])) | set(split.get("val_people", []))
    if protocol == "unseen":
        unseen = [r for r in records if r.person not in trained]
        if not unseen:
            raise DataError("no person in this data is unseen by the model: every person was used in training")
        gallery, queries = split_photos_per_person(unseen, queries_per_person, seed)
        return queries, gallery
    if protocol == "seen":
        train_people = set(split.get("train_people", []))
        root = split.get("root", "")
        held_out = set(split.get("seen_queries", []))
        seen = [r for r in records if r.person in train_people]
        queries = [r for r in seen if os.path.relpath(os.path.abspath(r.path), root) in held_out]
        if not queries:
            raise DataError("no held-out photo of a training person found in this data: run seen evaluation "
                            "on the data the model was trained on")
        qset = {r.path for r in queries}
        return queries, [r for r in seen if r.path not in qset]
    raise DataError(f"unknown protocol {protocol!r}; use 'seen' or 'unseen'")


def evaluate_checkpoint(model_path, data, protocol: str = "unseen", queries_per_person: int = 1, seed: int = 0,
                        progress: bool = True, method: str | None = None) -> dict:
    """Load a checkpoint, embed the protocol's photos (cached for frozen trunks) and score codes vs float.

    `method`: the method the checkpoint must have been trained with (CheckpointError otherwise); None = any.
    """
    import torch

    from opqn_model.api import FaceEncoder
    from opqn_model.checkpoint import load_checkpoint
    from opqn_model.datasets import list_photos
    from opqn_model.training_data import embeddings_of, model_inputs

    payload = load_checkpoint(model_path, method)
    split = payload.get("split") or {}
    encoder = FaceEncoder.from_checkpoint(payload)
    queries, gallery = protocol_records(list_photos(data), split, protocol, queries_per_person, seed)
    with torch.inference_mode():
        q_in, q_kept, q_skips = model_inputs(queries, encoder.trunk, encoder.pipeline, progress)
        g_in, g_kept, g_skips = model_inputs(gallery, encoder.trunk, encoder.pipeline, progress)
        q_emb, g_emb = embeddings_of(q_in, encoder.trunk), embeddings_of(g_in, encoder.trunk)
    result = evaluate_embeddings(encoder.codec, q_emb, [r.person for r in q_kept], g_emb, [r.person for r in g_kept])
    result.update({"protocol": protocol, "method": encoder.method, "trunk": encoder.trunk_name, "fingerprint": encoder.fingerprint,
                   "n_people": len({r.person for r in q_kept} | {r.person for r in g_kept}),
                   "skipped": q_skips.merge(g_skips).skipped})
    return result
