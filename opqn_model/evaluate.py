"""Evaluation: float features vs OPQN codes on the seen and unseen identity protocols.

Protocols (queries / gallery):
- unseen: people the model never trained on. For each such person with at least
  two photos, `queries_per_person` photos (a seeded choice) are queries and the
  rest of that person's photos join the gallery; the gallery holds only unseen
  people. This is the setting OPQN is built for: enrol new people, no retraining.
- seen: people the model trained on. Queries are the photos held out of training
  (stored in the checkpoint's split); the gallery is their training photos.

Each protocol is scored three ways on the same queries and gallery:
- `map` / `p_at_k` ...: OPQN codes, asymmetric: query lookup table vs gallery codes;
- `map_float`: the trunk's float embeddings, cosine similarity (the reference a
  quantizer is judged against);
- `map_float_head`: the head's float sub-vectors before quantization.
"""
from __future__ import annotations

import os

import numpy as np

from facepq_core.codes import unpack_codes
from opqn_model.metrics import retrieval_metrics


def lut_scores(lookup_tables: np.ndarray, stored_codes: np.ndarray, code_spec) -> np.ndarray:
    """Asymmetric scores [Q, G] = sum_m LUT[q, m, c_m(g)]."""
    sub = unpack_codes(stored_codes, code_spec)
    scores = np.zeros((lookup_tables.shape[0], sub.shape[0]), np.float32)
    for m in range(code_spec.M):
        scores += lookup_tables[:, m, :][:, sub[:, m]]
    return scores


def cosine_scores(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    return q @ g.T


def evaluate_embeddings(encoder, q_emb: np.ndarray, q_labels, g_emb: np.ndarray, g_labels) -> dict:
    """Codes vs float on given trunk embeddings. `encoder` is a FaceEncoder (or anything with its head API)."""
    codes = encoder.encode(g_emb)
    luts = encoder.lookup_tables(q_emb)
    result = retrieval_metrics(lut_scores(luts, codes, encoder.code_spec), q_labels, g_labels)
    float_trunk = retrieval_metrics(cosine_scores(q_emb, g_emb), q_labels, g_labels)
    float_head = retrieval_metrics(
        cosine_scores(encoder.float_features(q_emb), encoder.float_features(g_emb)), q_labels, g_labels)
    result.update({
        "map_float": float_trunk["map"], "p_at_1_float": float_trunk["p_at_1"],
        "map_float_head": float_head["map"],
        "bits": encoder.code_spec.bits, "M": encoder.code_spec.M, "K": encoder.code_spec.K,
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
                        progress: bool = True) -> dict:
    """Load a checkpoint, embed the protocol's photos (cached for frozen trunks) and score codes vs float."""
    import torch

    from opqn_model.api import FaceEncoder
    from opqn_model.checkpoint import load_checkpoint
    from opqn_model.datasets import list_photos
    from opqn_model.training_data import embeddings_of, model_inputs

    payload = load_checkpoint(model_path)
    split = payload.get("split") or {}
    encoder = FaceEncoder.from_checkpoint(payload)
    queries, gallery = protocol_records(list_photos(data), split, protocol, queries_per_person, seed)
    with torch.inference_mode():
        q_in, q_kept, q_skips = model_inputs(queries, encoder.trunk, encoder.pipeline, progress)
        g_in, g_kept, g_skips = model_inputs(gallery, encoder.trunk, encoder.pipeline, progress)
        q_emb, g_emb = embeddings_of(q_in, encoder.trunk), embeddings_of(g_in, encoder.trunk)
    result = evaluate_embeddings(encoder, q_emb, [r.person for r in q_kept], g_emb, [r.person for r in g_kept])
    result.update({"protocol": protocol, "trunk": encoder.trunk_name, "fingerprint": encoder.fingerprint,
                   "n_people": len({r.person for r in q_kept} | {r.person for r in g_kept}),
                   "skipped": q_skips.merge(g_skips).skipped})
    return result
