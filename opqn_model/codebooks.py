"""Fixed orthonormal codebooks of OPQN (Zhang, Zhe & Yan, Pattern Recognition 2023).

The codebooks are not learned. T is the orthonormal DCT-II basis of size d x d
(T[j, k] = cos(pi (j + 1/2) k / d), column 0 scaled by 1/sqrt(2), the whole matrix
by sqrt(2/d)). C_1 holds the first K columns of T and C_m = T C_{m-1}: every
codebook has K orthonormal codewords, and different subspaces get different
(rotated) codebooks. This is the construction in the paper's official code.

Because codewords are orthonormal, <C_m p, C_m e_c> = p_c: the soft-quantized
vector's inner product with codeword c is simply its assignment probability,
which is why a query's lookup table is the probability table itself.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

from facepq_core.errors import ConfigError


def dct_basis(d: int) -> np.ndarray:
    """Orthonormal DCT-II basis, float64 [d, d]; columns are the basis vectors."""
    j = np.arange(d)[:, None] + 0.5
    k = np.arange(d)[None, :]
    t = np.cos(np.pi * j * k / d)
    t[:, 0] /= math.sqrt(2.0)
    return t * math.sqrt(2.0 / d)


def orthonormal_codebooks(M: int, K: int, d: int) -> np.ndarray:
    """The M fixed codebooks, float32 [M, d, K] (codewords are columns).

    Raises ConfigError when K > d (K orthonormal codewords need d >= K dimensions).
    """
    if K > d:
        raise ConfigError(f"K={K} codewords need sub-vectors of at least {K} dims, got d={d}")
    t = dct_basis(d)
    books = np.empty((M, d, K), dtype=np.float64)
    books[0] = t[:, :K]
    for m in range(1, M):
        books[m] = t @ books[m - 1]
    return books.astype(np.float32)


def codebook_fingerprint(books: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(books, dtype=np.float32).tobytes()).hexdigest()[:16]
