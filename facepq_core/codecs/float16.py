"""Codec 'float16': the unit embedding itself, stored as E little-endian float16 values (2E bytes a face).

    stored:  n(f) as float16          n = L2 normalisation
    query:   n(q) as float32, one row [1, E]
    score:   n(q) . n(f)             (the cosine of the trunk embeddings, to float16 rounding)

Kernel "dot": only a refinement tier ("float16", facepq_core.refine) uses it, re-scoring the few
candidates of a first pass; nothing scans a whole shard of these. It needs no fitting, so any model
offers it. What it stores is the face's embedding: a biometric template, unlike a short code (see
README, "Two-stage search").
"""
from __future__ import annotations

import numpy as np

from facepq_core.codecs.base import Codec, check_embeddings, register_codec
from facepq_core.errors import ConfigError


def unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.square(x, dtype=np.float64).sum(1, keepdims=True))
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


@register_codec
class Float16Codec(Codec):
    """Args:
        embedding_dim: E, the trunk embedding's length.
    """

    name = "float16"
    kernel = "dot"

    def __init__(self, embedding_dim: int):
        if int(embedding_dim) < 1:
            raise ConfigError(f"float16 codec: embedding_dim must be >= 1, got {embedding_dim}")
        super().__init__(spec=None, embedding_dim=int(embedding_dim))

    @property
    def code_bytes(self) -> int:
        return 2 * self.embedding_dim

    @property
    def query_shape(self) -> tuple[int, int]:
        return (1, self.embedding_dim)

    def encode(self, features) -> np.ndarray:
        """Embeddings float32 [N, E] -> uint8 [N, 2E]: the unit embeddings as little-endian float16."""
        x = unit_rows(check_embeddings(features, self.embedding_dim))
        return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(len(x), self.code_bytes)

    def _sub_codes(self, x: np.ndarray) -> np.ndarray:  # encode() is overridden: no sub-codes
        raise NotImplementedError

    def _tables(self, x: np.ndarray) -> np.ndarray:
        return unit_rows(x)[:, None, :]

    def float_features(self, features) -> np.ndarray:
        return unit_rows(check_embeddings(features, self.embedding_dim))

    def describe(self) -> dict:
        return {"codec": self.name, "code_bytes": self.code_bytes, "dim": self.embedding_dim}

    def state(self) -> dict:
        return {"embedding_dim": self.embedding_dim}

    @classmethod
    def from_state(cls, state: dict) -> Float16Codec:
        try:
            return cls(int(state["embedding_dim"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"float16 codec state lacks embedding_dim: {exc!r}") from None
