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

import numpy as np

from opqn_model.codes import unpack_codes
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


def split_queries(labels: list[str], queries_per_person: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (queries, gallery): per person with >= 2 items, a seeded choice of queries; the rest is gallery."""
    rng = np.random.default_rng(seed)
    by_person: dict[str, list[int]] = {}
    for i, person in enumerate(labels):
        by_person.setdefault(person, []).append(i)
    queries, gallery = [], []
    for person in sorted(by_person):
        idx = by_person[person]
        if len(idx) < 2:
            gallery.extend(idx)
            continue
        chosen = set(rng.choice(idx, size=min(queries_per_person, len(idx) - 1), replace=False).tolist())
        queries.extend(i for i in idx if i in chosen)
        gallery.extend(i for i in idx if i not in chosen)
    return np.array(queries, dtype=np.int64), np.array(gallery, dtype=np.int64)
