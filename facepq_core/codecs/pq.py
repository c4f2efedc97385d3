"""Codec 'pq': product quantization of the rotated, centred unit embedding, scored by inner product.

    z(f) = R n(n(f) - mean)          n = L2 normalisation, R: [E, E] orthonormal (OPQ; Ge et al., CVPR 2013)
    code:   c_m = argmin_k |z_m - C_m[k]|^2          (z_m: the m-th of M chunks of d = E / M dims)
    table:  LUT[m, k] = z(q)_m . C_m[k]
so score(query, face) = sum_m LUT[m, c_m] = z(q) . z~(face), the query's inner product with the face's
reconstruction: close to the cosine of the centred embeddings, since both have unit length before
quantization. Centring first matters: face embeddings sit in a narrow cone, and the cosine of centred
vectors ranks as the raw cosine does (0.997x its mAP on LFW validation people) while spreading them
over the sphere the quantizer covers.

Fitted by opqn_model.refine_fit (k-means per chunk after an OPQ rotation). Used as a refinement
tier ("codes:BITS", facepq_core.refine): e.g. 32 x 256 = 256 bits (32 bytes) of the 128-d dlib
embedding, re-scoring the candidates of a compact first pass.
"""
from __future__ import annotations

import numpy as np

from facepq_core.codecs.base import Codec, register_codec, state_array
from facepq_core.codes import CodeSpec
from facepq_core.errors import ConfigError


def centred_unit(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """n(n(x) - mean) for float32 [N, E] (float64 norms: large values overflow float32 squares)."""
    def unit(v):
        norms = np.sqrt(np.square(v, dtype=np.float64).sum(1, keepdims=True))
        return (v / np.maximum(norms, 1e-12)).astype(np.float32)

    return unit(unit(x) - mean)


@register_codec
class PQCodec(Codec):
    """Args:
        rotation: float32 [E, E], orthonormal rows; chunk m of a face is (R z)[m*d:(m+1)*d].
        mean: float32 [E], the mean of the fitted unit embeddings.
        centroids: float32 [M, K, d] with M * d = E.
    """

    name = "pq"

    def __init__(self, rotation: np.ndarray, mean: np.ndarray, centroids: np.ndarray):
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        if centroids.ndim != 3:
            raise ConfigError(f"pq codec: centroids must be [M, K, d], got shape {centroids.shape}")
        M, K, d = centroids.shape
        super().__init__(CodeSpec(M, K), embedding_dim=M * d)
        self.rotation = np.ascontiguousarray(rotation, dtype=np.float32)
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        self.centroids, self.d = centroids, d
        if self.rotation.shape != (M * d, M * d) or self.mean.shape != (M * d,):
            raise ConfigError(f"pq codec: rotation {self.rotation.shape} and mean {self.mean.shape} do not fit "
                              f"{M} chunks of {d} dims")
        self._centroid_sq = np.square(centroids).sum(-1)  # [M, K]

    def rotated(self, x: np.ndarray) -> np.ndarray:
        """Checked embeddings float32 [N, E] -> their chunks float32 [N, M, d]."""
        z = centred_unit(x, self.mean) @ self.rotation.T
        return z.reshape(len(z), self.spec.M, self.d)

    def _sub_codes(self, x: np.ndarray) -> np.ndarray:
        z = self.rotated(x)
        # |z - c|^2 = |z|^2 - 2 z.c + |c|^2; |z|^2 is the same for every k
        dist = self._centroid_sq[None] - 2 * np.einsum("nmd,mkd->nmk", z, self.centroids)
        return dist.argmin(-1).astype(np.uint8)

    def _tables(self, x: np.ndarray) -> np.ndarray:
        return np.einsum("nmd,mkd->nmk", self.rotated(x), self.centroids)

    # Expansion space: the rotated, centred unit embedding z; a code stands for its reconstruction, the
    # concatenated centroids C_m[c_m]; tables of a vector are its chunks' inner products with the centroids.
    def expansion_vector(self, features) -> np.ndarray:
        from facepq_core.codecs.base import check_embeddings

        z = self.rotated(check_embeddings(features, self.embedding_dim))
        return np.ascontiguousarray(z.reshape(len(z), -1), dtype=np.float32)

    def reconstruct(self, codes) -> np.ndarray:
        sub = self._stored_sub_codes(codes)
        picked = self.centroids[np.arange(self.spec.M)[None, :], sub]  # [N, M, d]
        return np.ascontiguousarray(picked.reshape(len(sub), -1), dtype=np.float32)

    def tables_from_vector(self, vectors) -> np.ndarray:
        z = self._checked_vectors(vectors, self.embedding_dim).reshape(-1, self.spec.M, self.d)
        return np.ascontiguousarray(np.einsum("nmd,mkd->nmk", z, self.centroids), dtype=np.float32)

    def codewords(self) -> np.ndarray:
        """float32 [M, K, d]: the centroids (a code decodes to its reconstruction in the rotated space)."""
        return self.centroids

    def float_features(self, features) -> np.ndarray:
        from facepq_core.codecs.base import check_embeddings

        return centred_unit(check_embeddings(features, self.embedding_dim), self.mean)

    def state(self) -> dict:
        return {"rotation": self.rotation, "mean": self.mean, "centroids": self.centroids}

    @classmethod
    def from_state(cls, state: dict) -> PQCodec:
        return cls(state_array(state, "rotation", 2, cls.name), state_array(state, "mean", 1, cls.name),
                   state_array(state, "centroids", 3, cls.name))
