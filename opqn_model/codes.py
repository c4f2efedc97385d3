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

from facepq.errors import ConfigError


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


def score_codes(lookup_table: np.ndarray, stored: np.ndarray, spec: CodeSpec) -> np.ndarray:
    """Reference (slow, exact) asymmetric score: sum_m P[m, c_m] for every code.

    Args:
        lookup_table: float32 [M, K].
        stored: uint8 [N, code_bytes].
    Returns:
        float32 [N] scores, higher is better. The compiled kernels must agree with this.
    """
    sub = unpack_codes(stored, spec).astype(np.intp)
    lut = np.asarray(lookup_table, dtype=np.float32)
    return lut[np.arange(spec.M)[None, :], sub].sum(axis=1, dtype=np.float32)
