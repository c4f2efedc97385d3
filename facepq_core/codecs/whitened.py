"""Codec 'whitened': a learned whitening of the embedding in front of another codec (Gordo et al., ECCV 2016).

    w(f) = n(P (f - m))        m: float32 [E], P: float32 [D, E], n = L2 normalisation
    encode(f) = inner.encode(w(f)), query_tables(f) = inner.query_tables(w(f)), and so on

The whitening of a frozen trunk's embedding (`facepq train --trunk dlib --whitening D`): a shift and a
linear layer started as the PCA-whitening of the training embeddings, trained with the head
(opqn_model.input_whitening), folded here so serving needs no torch. The inner codec (opqn, binary,
binary_gated) takes the D-d whitened vectors; the layout (`spec`), the scan kernel, the codewords and
the expansion space (`reconstruct`, `tables_from_vector`) are the inner codec's, so query nodes,
partitions and query expansion see the inner codec's codes. Embedding checks apply to the raw input.

State: the inner codec's own keys, plus `whiten_mean`, `whiten_projection` and `inner_codec` (its
name), in one flat dict (checkpoints store flat states of arrays and scalars; a method's check of its
inner codec's arrays reads them where it always did). A whitened codec does not wrap another one.
"""
from __future__ import annotations

import numpy as np

from facepq_core.codecs.base import Codec, check_embeddings, codec_class, register_codec, rows_times, state_array
from facepq_core.errors import ConfigError

_OWN_KEYS = ("whiten_mean", "whiten_projection", "inner_codec")


def whiten(x: np.ndarray, mean: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """Checked embeddings float32 [N, E] -> n(P (x - m)) float32 [N, D] (norms in float64; a zero vector stays 0)."""
    z = rows_times(x - mean, projection)
    norms = np.sqrt(np.square(z, dtype=np.float64).sum(1, keepdims=True))
    return (z / np.maximum(norms, 1e-12)).astype(np.float32)


@register_codec
class WhitenedCodec(Codec):
    """Args:
        mean: float32 [E], the learned shift m.
        projection: float32 [D, E], the learned linear map P.
        inner: the codec of the whitened, normalised D-d vectors (first-pass, "lut" kernel; not itself whitened).
    """

    name = "whitened"

    def __init__(self, mean: np.ndarray, projection: np.ndarray, inner: Codec):
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        self.projection = np.ascontiguousarray(projection, dtype=np.float32)
        if self.projection.ndim != 2 or self.mean.shape != (self.projection.shape[1],):
            raise ConfigError(f"whitened codec: mean {self.mean.shape} and projection {self.projection.shape} "
                              "must be [E] and [D, E]")
        if isinstance(inner, WhitenedCodec) or inner.kernel != self.kernel:
            raise ConfigError(f"whitened codec: the inner codec must be a first-pass codec, got {inner.name!r}")
        if inner.embedding_dim != self.projection.shape[0]:
            raise ConfigError(f"whitened codec: the whitening gives {self.projection.shape[0]}-d vectors, the inner "
                              f"{inner.name} codec takes {inner.embedding_dim}-d")
        super().__init__(inner.spec, embedding_dim=self.projection.shape[1])
        self.inner = inner

    def whiten(self, features) -> np.ndarray:
        """Raw embeddings [N, E] (checked) -> what the inner codec takes, float32 [N, D]."""
        return whiten(check_embeddings(features, self.embedding_dim), self.mean, self.projection)

    # ---- the inner codec, on whitened vectors --------------------------------------------------------
    def _sub_codes(self, x: np.ndarray) -> np.ndarray:
        return self.inner._sub_codes(whiten(x, self.mean, self.projection))

    def _tables(self, x: np.ndarray) -> np.ndarray:
        return self.inner._tables(whiten(x, self.mean, self.projection))

    def float_features(self, features) -> np.ndarray | None:
        return self.inner.float_features(self.whiten(features))

    def expansion_vector(self, features) -> np.ndarray:
        return self.inner.expansion_vector(self.whiten(features))

    # ---- the inner codec's space, unchanged ----------------------------------------------------------
    def reconstruct(self, codes) -> np.ndarray:
        return self.inner.reconstruct(codes)

    def tables_from_vector(self, vectors) -> np.ndarray:
        return self.inner.tables_from_vector(vectors)

    def codewords(self) -> np.ndarray | None:
        return self.inner.codewords()

    # ---- state -----------------------------------------------------------------------------------------
    def state(self) -> dict:
        inner = self.inner.state()
        clash = set(inner) & set(_OWN_KEYS)
        if clash:  # no registered codec uses these keys; a new one that did would need a prefix here
            raise ConfigError(f"whitened codec: inner codec {self.inner.name} state uses reserved keys {sorted(clash)}")
        return {**inner, "whiten_mean": self.mean, "whiten_projection": self.projection,
                "inner_codec": self.inner.name}

    @classmethod
    def from_state(cls, state: dict) -> "WhitenedCodec":
        inner_name = str(state.get("inner_codec", ""))
        if not inner_name or inner_name == cls.name:
            raise ConfigError(f"whitened codec state needs the name of a first-pass inner codec, got {inner_name!r}")
        inner_state = {k: v for k, v in state.items() if k not in _OWN_KEYS}
        return cls(state_array(state, "whiten_mean", 1, cls.name), state_array(state, "whiten_projection", 2, cls.name),
                   codec_class(inner_name).from_state(inner_state))
