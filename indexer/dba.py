"""Database-side augmentation (DBA; Gordo et al., ECCV 2016, with the α weights of Radenović et al. 2018).

Each gallery face is encoded from a weighted average of its own trunk embedding and those of its k
nearest gallery neighbours, so the photos of one person pull together before they become codes:
    f'_i = ( f_i + sum_{j in kNN(i)} max(0, cos(f_i, f_j))^α f_j ) / ( 1 + sum_j max(0, cos(f_i, f_j))^α )
(a convex combination of raw embeddings, so f' stays in the range of the trunk's embeddings that the
codec was fitted on; the neighbours and weights come from the cosine of the embeddings).

Cost: exact kNN over the job's own faces, N x N inner products of E-d vectors in blocks of
`BLOCK` rows: O(N^2 E) time, O(BLOCK N) memory beyond the N x E embeddings the driver holds
(e.g. 6k faces x 128-d: well under a second; 1M faces: ~1.3e14 multiply-adds, hours on one core,
where an approximate kNN would be needed). The index holds codes, not embeddings, so the neighbours of
faces added later (enrolments, other ingests) cannot be recomputed in place: the manifest records the
augmentation and every later change of the gallery marks it stale (indexer.commit); re-ingesting the
whole gallery into a new index recomputes it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facepq_core.errors import ConfigError

MAX_DBA_K = 100
MAX_DBA_ALPHA = 1000.0
BLOCK = 2048  # rows of the similarity matrix computed at once


@dataclass(frozen=True)
class DBA:
    """k: neighbours averaged in (>= 1); alpha: exponent of their cosine weights (0: plain average)."""

    k: int
    alpha: float = 3.0

    def record(self, faces: int) -> dict:
        """The manifest's `augmentation` entry for an index ingested with this DBA over `faces` faces."""
        return {"kind": "dba", "k": self.k, "alpha": self.alpha, "faces": int(faces), "stale": False}


def check_dba(k, alpha) -> DBA:
    """DBA options as a DBA; ConfigError for k outside 1..MAX_DBA_K or alpha outside 0..MAX_DBA_ALPHA."""
    from facepq_core.expansion import checked_weighting

    return DBA(*checked_weighting("DBA", "k", k, 1, MAX_DBA_K, alpha, MAX_DBA_ALPHA, ConfigError))


def nearest_neighbours(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by cosine, each face excluded from its own list.

    Args:
        features: float32 [N, E].  k: neighbours wanted (at most N - 1 are returned).
    Returns:
        (indices int64 [N, k'], cosines float32 [N, k']) best first, k' = min(k, N - 1); ties by the lower index.
    """
    x = np.asarray(features, dtype=np.float32)
    n = len(x)
    kk = min(int(k), max(n - 1, 0))
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    idx = np.zeros((n, kk), np.int64)
    sims = np.zeros((n, kk), np.float32)
    if not kk:
        return idx, sims
    for lo in range(0, n, BLOCK):
        block = unit[lo:lo + BLOCK] @ unit.T  # [b, N]
        block[np.arange(len(block)), np.arange(lo, lo + len(block))] = -np.inf  # not its own neighbour
        order = np.argsort(-block, axis=1, kind="stable")[:, :kk]
        idx[lo:lo + len(block)] = order
        sims[lo:lo + len(block)] = np.take_along_axis(block, order, axis=1)
    return idx, sims


def augment(features: np.ndarray, dba: DBA) -> np.ndarray:
    """The DBA embeddings float32 [N, E] of float32 [N, E] gallery embeddings (see the module docstring)."""
    x = np.asarray(features, dtype=np.float32)
    idx, sims = nearest_neighbours(x, dba.k)
    weights = np.power(np.clip(sims, 0.0, None).astype(np.float64), dba.alpha)  # [N, k']
    total = x.astype(np.float64) + np.einsum("nk,nke->ne", weights, x[idx].astype(np.float64))
    return (total / (1.0 + weights.sum(1, keepdims=True))).astype(np.float32)
