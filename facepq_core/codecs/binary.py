"""Codec 'binary': B-bit sign codes of an affine projection, scored by Hamming distance.

    bits(f) = [ P^T (n(f) - mean) > 0 ]      n = L2 normalisation (optional), P: [E, B]
stored as B/8 bytes, bit j of a face's code in byte j // 8 at position j % 8 (least
significant first). ITQ (Gong & Lazebnik, CVPR 2011; opqn_model.methods.itq) fits P as a
PCA projection followed by an orthogonal rotation; hashing networks whose last layer
already gives the B values use P = I and mean = 0.

A B-bit code is an 8-bit product code with M = B/8 sub-codes of K = 256 values, so the
query nodes' table kernel scores it exactly with one 256-entry table per byte:
    hamming      table[m, v] = -popcount(q_m XOR v)   (q: the query's own bits; the score
                                                        is minus the Hamming distance)
    asymmetric   table[m, v] = sum_j h_{8m+j} (2 bit_j(v) - 1)   (h: the query's real-valued
                                                                   projection, not binarised)
Both are exact integer-valued (Hamming) or float sums, so ranking through the nodes equals
a brute-force ranking.
"""
from __future__ import annotations

import numpy as np

from facepq_core.codecs.base import Codec, check_embeddings, register_codec, state_array
from facepq_core.codes import CodeSpec
from facepq_core.errors import ConfigError

SCORINGS = ("hamming", "asymmetric")
_POPCOUNT = np.array([bin(v).count("1") for v in range(256)], dtype=np.float32)
# [256, 8]: +1 where bit j of byte value v is set, -1 where not (asymmetric tables)
_SIGNS = np.where((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1, 1.0, -1.0).astype(np.float32)


@register_codec
class BinaryCodec(Codec):
    """Args:
        projection: float32 [E, B], B a multiple of 8.
        mean: float32 [E], subtracted (after the optional normalisation) before projecting.
        normalize: L2-normalise each embedding first.
        scoring: 'hamming' (symmetric, the default) or 'asymmetric' (real-valued query).
    """

    name = "binary"
    hamming_tables = True

    def __init__(self, projection: np.ndarray, mean: np.ndarray, normalize: bool = True, scoring: str = "hamming"):
        projection = np.ascontiguousarray(projection, dtype=np.float32)
        if projection.ndim != 2 or projection.shape[1] % 8 or not projection.shape[1]:
            raise ConfigError(f"binary codes need a projection [E, B] with B a positive multiple of 8, "
                              f"got shape {projection.shape}")
        if scoring not in SCORINGS:
            raise ConfigError(f"binary scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
        bits = projection.shape[1]
        super().__init__(CodeSpec(bits // 8, 256), embedding_dim=projection.shape[0])
        self.projection = projection
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        if self.mean.shape != (projection.shape[0],):
            raise ConfigError(f"binary codec: mean {self.mean.shape} does not fit the projection {projection.shape}")
        self.normalize, self.scoring, self.bits = bool(normalize), scoring, bits

    def with_scoring(self, scoring: str) -> "BinaryCodec":
        """The same codes scored another way (query side only: the stored codes do not change)."""
        return BinaryCodec(self.projection, self.mean, self.normalize, scoring)

    def project(self, features) -> np.ndarray:
        """Embeddings -> the real values whose signs are the bits, float32 [N, B]."""
        x = check_embeddings(features, self.embedding_dim)
        if self.normalize:
            x = x / np.maximum(np.sqrt(np.square(x, dtype=np.float64).sum(1, keepdims=True)), 1e-12).astype(np.float32)
        return (x - self.mean) @ self.projection

    def _sub_codes(self, x: np.ndarray) -> np.ndarray:
        return np.packbits(self.project(x) > 0, axis=1, bitorder="little")

    def _tables(self, x: np.ndarray) -> np.ndarray:
        return self._tables_of(self.project(x))

    def _tables_of(self, h: np.ndarray) -> np.ndarray:
        """Tables from real values [N, B] (hamming: their signs' bits; asymmetric: the values)."""
        if self.scoring == "hamming":
            q = np.packbits(h > 0, axis=1, bitorder="little")  # [N, M]
            return -_POPCOUNT[q[:, :, None] ^ np.arange(256, dtype=np.uint8)[None, None, :]]
        return np.einsum("nmj,vj->nmv", h.reshape(len(h), -1, 8), _SIGNS)

    def codewords(self) -> np.ndarray:
        """float32 [B/8, 256, 8]: each byte value as the signs (+-1) of its 8 bits."""
        return np.broadcast_to(_SIGNS.astype(np.float32), (self.spec.M, 256, 8)).copy()

    def float_features(self, features) -> np.ndarray:
        return self.project(features)

    # Expansion space: the projection h (whose signs are the bits); a code stands for its bits as +-1.
    # Tables of a vector are those of h = that vector: with Hamming scoring only its signs count, so the
    # expanded query is the sign of the weighted vote of the query's and its hits' bits.
    def expansion_vector(self, features) -> np.ndarray:
        return np.ascontiguousarray(self.project(features), dtype=np.float32)

    def reconstruct(self, codes) -> np.ndarray:
        bits = np.unpackbits(self._stored_sub_codes(codes).astype(np.uint8), axis=1, bitorder="little")
        return (2.0 * bits.astype(np.float32) - 1.0)[:, : self.bits]

    def tables_from_vector(self, vectors) -> np.ndarray:
        return np.ascontiguousarray(self._tables_of(self._checked_vectors(vectors, self.bits)), dtype=np.float32)

    def state(self) -> dict:
        return {"projection": self.projection, "mean": self.mean, "normalize": int(self.normalize),
                "scoring": self.scoring}

    @classmethod
    def from_state(cls, state: dict) -> "BinaryCodec":
        return cls(state_array(state, "projection", 2, cls.name), state_array(state, "mean", 1, cls.name),
                   bool(int(state.get("normalize", 1))), str(state.get("scoring", "hamming")))
