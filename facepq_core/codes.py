"""Code layout shared by the model, the index and the scan kernels.

A face's code is M sub-codes c_m in [0, K). With K > 16 each sub-code takes one
byte (`code_bytes = M`); with K <= 16 two sub-codes share a byte, low nibble
first (`code_bytes = ceil(M / 2)`), so 4-bit codes cost half the memory and
the scan can merge subspaces (2j, 2j+1) into one 256-entry table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from facepq_core.errors import ConfigError


@dataclass(frozen=True)
class CodeSpec:
    """Shape of a product-quantization code.

    Args:
        M: number of subspaces (codebooks), >= 1.
        K: codewords per codebook, a power of two in [2, 256].
    """

    M: int
    K: int

    def __post_init__(self):
        if self.M < 1:
            raise ConfigError(f"M (codebooks) must be >= 1, got {self.M}")
        if self.K < 2 or self.K > 256 or self.K & (self.K - 1):
            raise ConfigError(f"K (codewords) must be a power of two in [2, 256], got {self.K}")

    @property
    def bits_per_subcode(self) -> int:
        return int(math.log2(self.K))

    @property
    def bits(self) -> int:
        return self.M * self.bits_per_subcode

    @property
    def packed(self) -> bool:
        """True when two sub-codes share one byte (K <= 16)."""
        return self.K <= 16

    @property
    def code_bytes(self) -> int:
        return (self.M + 1) // 2 if self.packed else self.M

    def to_dict(self) -> dict:
        return {"M": self.M, "K": self.K, "bits": self.bits, "code_bytes": self.code_bytes, "packed": self.packed}


# Code lengths the project documents and tests; any M * log2(K) that fits is accepted.
STANDARD_BITS = (16, 24, 32, 36, 48, 64)


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


def pack_codes(codes: np.ndarray, spec: CodeSpec) -> np.ndarray:
    """Sub-codes [N, M] uint8 -> stored codes [N, code_bytes] uint8 (packs nibbles when K <= 16)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.ndim != 2 or codes.shape[1] != spec.M:
        raise ValueError(f"codes must be [N, {spec.M}], got {codes.shape}")
    if not spec.packed:
        return codes
    n = codes.shape[0]
    padded = np.zeros((n, spec.code_bytes * 2), dtype=np.uint8)
    padded[:, : spec.M] = codes
    return np.ascontiguousarray(padded[:, 0::2] | (padded[:, 1::2] << 4))


def unpack_codes(stored: np.ndarray, spec: CodeSpec) -> np.ndarray:
    """Stored codes [N, code_bytes] uint8 -> sub-codes [N, M] uint8."""
    stored = np.ascontiguousarray(stored, dtype=np.uint8)
    if stored.ndim != 2 or stored.shape[1] != spec.code_bytes:
        raise ValueError(f"stored codes must be [N, {spec.code_bytes}], got {stored.shape}")
    if not spec.packed:
        return stored
    out = np.empty((stored.shape[0], spec.code_bytes * 2), dtype=np.uint8)
    out[:, 0::2] = stored & 0x0F
    out[:, 1::2] = stored >> 4
    return np.ascontiguousarray(out[:, : spec.M])


def score_codes(lookup_tables: np.ndarray, stored: np.ndarray, spec: CodeSpec) -> np.ndarray:
    """Reference (slow, exact) score of every code: sum_m table[m, c_m], in subspace order.

    Args:
        lookup_tables: float32 [M, K] (one query) or [Q, M, K].
        stored: uint8 [N, code_bytes].
    Returns:
        float32 [N] (one query) or [Q, N] scores, higher is better. The query nodes' kernels
        agree with this (bit for bit when the table values are exactly representable sums).
    """
    sub = unpack_codes(stored, spec).astype(np.intp)
    tables = np.asarray(lookup_tables, dtype=np.float32)
    single = tables.ndim == 2
    tables = tables[None] if single else tables
    if tables.ndim != 3 or tables.shape[1:] != (spec.M, spec.K):
        raise ValueError(f"lookup tables must be [Q, {spec.M}, {spec.K}] or [{spec.M}, {spec.K}], "
                         f"got {np.shape(lookup_tables)}")
    scores = np.zeros((tables.shape[0], sub.shape[0]), np.float32)
    for m in range(spec.M):
        scores += tables[:, m, :][:, sub[:, m]]
    return scores[0] if single else scores
