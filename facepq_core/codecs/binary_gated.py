"""Codec 'binary_gated': binary sign codes of a feature-gated projection (DAGH on a frozen trunk).

    z = (f - mean) * inv_std                      standardisation (the head's BatchNorm)
    a = sigmoid(W2 relu(W1 z + b1) + b2)          feature-channel attention (opqn_model.hash_head.FeatureGate)
    h = (z * a) @ P,  bits = [h > 0]              P: [E, B]

The codes, their layout and the scoring (Hamming or asymmetric byte tables) are those of
the 'binary' codec; only the projection is not affine.
"""
from __future__ import annotations

import numpy as np

from facepq_core.codecs.base import check_embeddings, register_codec, state_array
from facepq_core.codecs.binary import BinaryCodec
from facepq_core.errors import ConfigError

_GATE_KEYS = ("inv_std", "gate_w1", "gate_b1", "gate_w2", "gate_b2")


@register_codec
class GatedBinaryCodec(BinaryCodec):
    """Args:
        projection: float32 [E, B]; mean, inv_std: float32 [E].
        gate_w1 [H, E], gate_b1 [H], gate_w2 [E, H], gate_b2 [E]: the gate's two layers.
        scoring: 'hamming' or 'asymmetric'.
    """

    name = "binary_gated"

    def __init__(self, projection, mean, inv_std, gate_w1, gate_b1, gate_w2, gate_b2, scoring: str = "hamming"):
        super().__init__(projection, mean, normalize=False, scoring=scoring)
        f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
        self.inv_std, self.gate_w1, self.gate_b1 = f32(inv_std), f32(gate_w1), f32(gate_b1)
        self.gate_w2, self.gate_b2 = f32(gate_w2), f32(gate_b2)
        e, h = self.embedding_dim, self.gate_w1.shape[0] if self.gate_w1.ndim == 2 else -1
        want = {"inv_std": (e,), "gate_w1": (h, e), "gate_b1": (h,), "gate_w2": (e, h), "gate_b2": (e,)}
        for key in _GATE_KEYS:
            if getattr(self, key).shape != want[key]:
                raise ConfigError(f"binary_gated codec: {key} {getattr(self, key).shape} does not fit "
                                  f"{e}-d embeddings (want {want[key]})")

    def with_scoring(self, scoring: str) -> "GatedBinaryCodec":
        return GatedBinaryCodec(self.projection, self.mean, *(getattr(self, k) for k in _GATE_KEYS), scoring=scoring)

    def project(self, features) -> np.ndarray:
        z = (check_embeddings(features, self.embedding_dim) - self.mean) * self.inv_std
        hidden = np.maximum(z @ self.gate_w1.T + self.gate_b1, 0)
        gate = 1.0 / (1.0 + np.exp(-(hidden @ self.gate_w2.T + self.gate_b2)))
        return ((z * gate) @ self.projection).astype(np.float32)

    def state(self) -> dict:
        return {"projection": self.projection, "mean": self.mean, "scoring": self.scoring,
                **{k: getattr(self, k) for k in _GATE_KEYS}}

    @classmethod
    def from_state(cls, state: dict) -> "GatedBinaryCodec":
        ndims = {"inv_std": 1, "gate_w1": 2, "gate_b1": 1, "gate_w2": 2, "gate_b2": 1}
        return cls(state_array(state, "projection", 2, cls.name), state_array(state, "mean", 1, cls.name),
                   *(state_array(state, k, ndims[k], cls.name) for k in _GATE_KEYS),
                   scoring=str(state.get("scoring", "hamming")))
