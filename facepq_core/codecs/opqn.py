"""Codec 'opqn': the eval-mode OPQN head (Zhang, Zhe & Yan, Pattern Recognition 2023) in numpy.

The head projects an embedding f to x = W f + b in R^{M d} (its batch norms and linear
layer folded into one affine map by the model, which alone knows its layers:
`opqn_model.head.OPQNHead.export_codec`), splits x into M sub-vectors x_m and
compares each normalised x̂_m with K assignment vectors (the head's A_m times
sqrt(d)):
    code:   c_m = argmax_k (x̂_m . A_m)_k
    table:  LUT[m, k] = w_m log softmax_k(x̂_m . A_m),  w_m = |x_m| / mean_m' |x_m'|
so score(query, face) = sum_m LUT[m, c_m] is the log-likelihood of the face's code under
the query's soft assignment, each subspace weighted by the length of the query's own
sub-vector (see README, "The OPQN model", for why log-probabilities and why w_m).

Single queries (the coordinator) run in numpy loops (einsum without `optimize`), never
BLAS (facepq_core.codecs.base.rows_times says why).
"""
from __future__ import annotations

import numpy as np

from facepq_core.codecs.base import Codec, register_codec, rows_times, state_array
from facepq_core.codes import CodeSpec
from facepq_core.errors import ConfigError


@register_codec
class OPQNCodec(Codec):
    """Args:
        weight: float32 [M*d, E], the folded projection.
        bias: float32 [M*d].
        assignment: float32 [M, d, K], the assignment vectors A_m already scaled by sqrt(d).
        M, K, d: subspaces, codewords per subspace, dims per subspace.
    """

    name = "opqn"

    def __init__(self, weight: np.ndarray, bias: np.ndarray, assignment: np.ndarray, M: int, K: int, d: int):
        super().__init__(CodeSpec(int(M), int(K)), embedding_dim=np.shape(weight)[1])
        self.M, self.K, self.d = int(M), int(K), int(d)
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)
        self.bias = np.ascontiguousarray(bias, dtype=np.float32)
        self.assignment = np.ascontiguousarray(assignment, dtype=np.float32)
        if self.weight.shape[0] != self.M * self.d or self.bias.shape != (self.M * self.d,) \
                or self.assignment.shape != (self.M, self.d, self.K):
            raise ConfigError(f"opqn codec: weight {self.weight.shape}, bias {self.bias.shape} and assignment "
                              f"{self.assignment.shape} do not fit M={self.M}, d={self.d}, K={self.K}")

    def _project(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(normalised sub-vectors x̂ float32 [N, M, d], their lengths float64 [N, M, 1])."""
        z = (rows_times(x, self.weight) + self.bias).reshape(-1, self.M, self.d)
        # float64 norms: squares of large projections overflow float32.
        norms = np.sqrt(np.square(z, dtype=np.float64).sum(-1, keepdims=True))
        return (z / np.maximum(norms, 1e-12)).astype(np.float32), norms

    def _logits(self, unit: np.ndarray) -> np.ndarray:
        return np.einsum("nmd,mdk->nmk", unit, self.assignment)

    def _sub_codes(self, x: np.ndarray) -> np.ndarray:
        unit, _ = self._project(x)
        return self._logits(unit).argmax(-1).astype(np.uint8)

    def _tables(self, x: np.ndarray) -> np.ndarray:
        return self._tables_of(*self._project(x))

    def _tables_of(self, unit: np.ndarray, norms: np.ndarray) -> np.ndarray:
        """Tables from unit sub-vectors [N, M, d] and their lengths [N, M, 1]."""
        logits = self._logits(unit)
        logits -= logits.max(-1, keepdims=True)
        tables = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        tables *= (norms / np.maximum(norms.mean(axis=1, keepdims=True), 1e-12)).astype(np.float32)
        return tables

    # Expansion space: the projection z = W f + b scaled to unit length (its sub-vectors' lengths, which
    # weigh the subspaces' tables, are kept relative to each other). A sub-code c_m stands for the unit
    # assignment vector A_m[:, c_m]: the table scores x̂_m . A_m, so that direction is what c_m means in the
    # query's space (the codec holds no other codeword); a code is the M of them, scaled to unit length.
    def expansion_vector(self, features) -> np.ndarray:
        from facepq_core.codecs.base import check_embeddings

        unit, norms = self._project(check_embeddings(features, self.embedding_dim))
        z = (unit * norms).reshape(len(unit), -1)
        return (z / np.maximum(np.sqrt(np.square(z).sum(1, keepdims=True)), 1e-12)).astype(np.float32)

    def reconstruct(self, codes) -> np.ndarray:
        sub = self._stored_sub_codes(codes)  # [N, M]
        words = self.assignment / np.maximum(np.linalg.norm(self.assignment, axis=1, keepdims=True), 1e-12)
        picked = words[np.arange(self.M)[None, :], :, sub]  # [N, M, d]
        return (picked.reshape(len(sub), -1) / np.sqrt(self.M)).astype(np.float32)

    def tables_from_vector(self, vectors) -> np.ndarray:
        z = self._checked_vectors(vectors, self.M * self.d).reshape(-1, self.M, self.d)
        norms = np.sqrt(np.square(z, dtype=np.float64).sum(-1, keepdims=True))
        return np.ascontiguousarray(self._tables_of((z / np.maximum(norms, 1e-12)).astype(np.float32), norms),
                                    dtype=np.float32)

    def codewords(self) -> np.ndarray:
        """float32 [M, K, d]: the unit assignment vector of each sub-code (what x̂_m is closest to)."""
        return np.ascontiguousarray(self.assignment.transpose(0, 2, 1) / np.sqrt(self.d), dtype=np.float32)

    def float_features(self, features) -> np.ndarray:
        """Per-subspace normalised sub-vectors flattened, float32 [N, M*d]: the codes' float counterpart."""
        from facepq_core.codecs.base import check_embeddings

        unit, _ = self._project(check_embeddings(features, self.embedding_dim))
        return unit.reshape(len(unit), -1)

    def state(self) -> dict:
        return {"weight": self.weight, "bias": self.bias, "assignment": self.assignment, "M": self.M, "K": self.K,
                "d": self.d}

    @classmethod
    def from_state(cls, state: dict) -> "OPQNCodec":
        try:
            M, K, d = int(state["M"]), int(state["K"]), int(state["d"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"opqn codec state lacks M/K/d: {exc!r}") from None
        return cls(state_array(state, "weight", 2, cls.name), state_array(state, "bias", 1, cls.name),
                   state_array(state, "assignment", 3, cls.name), M, K, d)
