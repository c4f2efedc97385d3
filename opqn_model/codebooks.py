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

from facepq.errors import ConfigError
from opqn_model.codes import CodeSpec

# Code lengths the project documents and tests; any M * log2(K) that fits is accepted.
STANDARD_BITS = (16, 24, 32, 36, 48, 64)


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


def valid_code_specs(bits: int, sub_dim: int | None = None) -> list[CodeSpec]:
    """Every (M, K) with M * log2(K) == bits, K a power of two in [2, min(sub_dim, 256)]."""
    specs = []
    for log_k in range(1, 9):
        K = 1 << log_k
        if bits % log_k or (sub_dim is not None and K > sub_dim):
            continue
        specs.append(CodeSpec(bits // log_k, K))
    return specs


def resolve_code_spec(bits: int, M: int | None = None, K: int | None = None, sub_dim: int | None = None) -> CodeSpec:
    """Pick (M, K) for a code of `bits` bits.

    Without M/K the largest K is taken (K=256 when bits is a multiple of 8: one byte
    per subspace and the fewest table lookups per code; 36 bits gives 6 x 64).
    Pass K=16 for 4-bit codes (two per byte, the fastest scan). `sub_dim` (d) bounds
    K <= d. An impossible request raises ConfigError naming the valid choices.
    """
    if bits < 1:
        raise ConfigError(f"bits must be positive, got {bits}")
    candidates = valid_code_specs(bits, sub_dim)
    if M is not None:
        candidates = [s for s in candidates if s.M == M]
    if K is not None:
        candidates = [s for s in candidates if s.K == K]
    if not candidates:
        wanted = f"{bits} bits" + (f" with M={M}" if M else "") + (f" with K={K}" if K else "")
        wanted += f" and sub-vectors of d={sub_dim}" if sub_dim else ""
        options = "; ".join(
            f"{b} bits: " + ", ".join(f"{s.M}x{s.K}" for s in valid_code_specs(b, sub_dim) if s.K >= 4)
            for b in STANDARD_BITS
        )
        raise ConfigError(
            f"no valid code for {wanted}: bits must equal M*log2(K) with K a power of two and "
            f"2 <= K <= min(d, 256). Valid (M x K): {options}"
        )
    return max(candidates, key=lambda s: s.K)
