"""Fit the refinement codes a model offers to its indexes (facepq_core.refine: tier "codes:BITS").

After a training method has written model.pt, `add_refine_codes` fits a product quantizer of
the same trunk embeddings the method used (training + validation people) with BITS bits
(facepq_core.codecs.pq: OPQ rotation of the centred unit embedding, k-means per chunk) and
writes model.pt again with it (`refine_codecs` in the checkpoint, covered by the fingerprint).
An index created with `--refine codes:BITS` then stores these codes beside its first-pass codes
and re-scores each shard's candidates with them. The first-pass codes are unchanged.
"""
from __future__ import annotations

import logging

import numpy as np

from facepq_core.codecs.pq import PQCodec, centred_unit
from facepq_core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# K of the refinement quantizer: one byte per sub-code, and its chunks as short as the bits allow.
REFINE_K = 256


def refine_shape(bits: int, embedding_dim: int) -> tuple[int, int]:
    """(M, d) of a BITS-bit refinement quantizer of E-dim embeddings: M = BITS / 8 chunks of d = E / M dims."""
    if bits % 8 or bits < 8:
        raise ConfigError(f"refinement codes need a positive multiple of 8 bits, got {bits}")
    M = bits // 8
    if embedding_dim % M:
        raise ConfigError(f"{bits}-bit refinement codes split the {embedding_dim}-d embedding into {M} chunks, "
                          f"which does not divide it; use BITS = 8 x a divisor of {embedding_dim}")
    return M, embedding_dim // M


def kmeans_np(x: np.ndarray, k: int, iters: int, rng: np.random.Generator,
              init: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd k-means of float32 [N, c] -> (centroids [k, c], assignment int [N]); empty clusters re-seeded.

    numpy and BLAS: for the short chunks of a refinement quantizer (c = 4) torch's per-call cost made
    the fit 10x slower. `init` warm-starts from earlier centroids (OPQ refits the same chunks).
    """
    n = len(x)
    centroids = x[rng.choice(n, k, replace=False)].copy() if init is None else init.copy()
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        assign = (np.square(centroids).sum(1)[None] - 2 * x @ centroids.T).argmin(1)
        counts = np.bincount(assign, minlength=k)
        sums = np.stack([np.bincount(assign, weights=x[:, j], minlength=k) for j in range(x.shape[1])], 1)
        empty = counts == 0
        centroids = np.where(empty[:, None], x[rng.integers(0, n, k)], sums / np.maximum(counts, 1)[:, None])
        centroids = centroids.astype(np.float32)
    return centroids, assign


def fit_refine_pq(embeddings: np.ndarray, bits: int, opq_iterations: int = 10, kmeans_iterations: int = 25,
                  seed: int = 0) -> PQCodec:
    """A BITS-bit PQCodec fitted to float32 [N, E] embeddings (N >= 2; fewer than K points repeat codewords).

    OPQ (Ge et al. 2013): from a random rotation, alternate k-means per chunk (warm-started) and the
    orthogonal Procrustes rotation that maps the data closest to its quantized chunks.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) < 2:
        raise DataError(f"fitting refinement codes needs at least 2 embeddings, got shape {x.shape}")
    M, d = refine_shape(bits, x.shape[1])
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    mean = unit.mean(0)
    z = centred_unit(x, mean)
    fitted = min(REFINE_K, len(x))
    rng = np.random.default_rng(seed)
    rotation = np.linalg.qr(rng.standard_normal((x.shape[1], x.shape[1])))[0].T.astype(np.float32)
    centroids = [None] * M
    for it in range(opq_iterations + 1):
        y = z @ rotation.T
        recon = np.empty_like(y)
        last = it == opq_iterations
        for m in range(M):
            chunk = y[:, m * d:(m + 1) * d]
            centroids[m], assign = kmeans_np(chunk, fitted, kmeans_iterations if last or it == 0 else 3, rng,
                                             centroids[m])
            recon[:, m * d:(m + 1) * d] = centroids[m][assign]
        if not last:
            u, _, vt = np.linalg.svd(recon.T @ z, full_matrices=False)
            rotation = (u @ vt).astype(np.float32)
    repeat = np.arange(REFINE_K) % fitted  # as head_init: a repeated codeword changes no score
    log.info("refinement codes: %d x %d product quantizer (%d bits) of %d-d chunks fitted on %d embeddings", M,
             REFINE_K, bits, d, len(x))
    return PQCodec(rotation, mean, np.stack([c[repeat] for c in centroids]))


def refine_states(embeddings: np.ndarray, bits: int, seed: int = 0) -> dict:
    """{"codes:BITS": {"codec": "pq", **state}}: what a checkpoint stores (opqn_model.checkpoint)."""
    codec = fit_refine_pq(embeddings, bits, seed=seed)
    return {f"codes:{bits}": {"codec": codec.name, **codec.state()}}


def add_refine_codes(model_path, embeddings: np.ndarray, bits: int, seed: int = 0) -> str:
    """Write model.pt at `model_path` again with BITS-bit refinement codes of `embeddings`; returns the new
    fingerprint (the refinement codes are part of the model's identity)."""
    from opqn_model.checkpoint import load_checkpoint, save_checkpoint

    payload = load_checkpoint(model_path)
    own = {"format", "method", "codec", "model_config", "trunk", "head", "trunk_state", "fingerprint", "codec_state",
           "refine_codecs"}
    return save_checkpoint(model_path, payload["model_config"], payload["head"], payload["trunk_state"],
                           method=payload["method"], codec_state=payload.get("codec_state"),
                           refine_codecs=refine_states(embeddings, bits, seed),
                           **{k: v for k, v in payload.items() if k not in own})


__all__ = ["add_refine_codes", "fit_refine_pq", "refine_shape", "refine_states"]
