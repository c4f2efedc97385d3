"""The codec interface, its registry, and the one policy for embeddings a codec accepts."""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from facepq_core.codes import CodeSpec, pack_codes
from facepq_core.errors import ConfigError

# Scoring kernel families a query node has; a codec names the one its tables need.
# "lut": sum_m table[m, c_m] over byte (or packed nibble) sub-codes (query_node.scan scans a whole
#        shard with it; facepq_core.refine re-scores a few candidates with it).
# "dot": the inner product of a float16 vector stored per face with the query's float32 vector
#        (refinement tiers only: facepq_core.refine; never a first pass).
KERNELS = ("lut", "dot")

# Largest |value| accepted in an embedding. Larger values are not embeddings of any trunk
# here, and their squares overflow float32 in a codec's normalisation (NaN tables or
# arbitrary codes), so they are refused everywhere (coordinator, ingest, evaluation).
MAX_EMBEDDING_VALUE = 1e15

_CODECS: dict[str, type["Codec"]] = {}
# Modules that register codecs; imported on first lookup so importing the package stays light.
_CODEC_MODULES = ("facepq_core.codecs.opqn", "facepq_core.codecs.binary", "facepq_core.codecs.pq",
                  "facepq_core.codecs.float16", "facepq_core.codecs.binary_gated",
                  "facepq_core.codecs.whitened")


def register_codec(cls: type["Codec"]) -> type["Codec"]:
    """Class decorator: record `cls` under `cls.name`."""
    if cls.kernel not in KERNELS:
        raise ValueError(f"codec {cls.name!r} needs kernel {cls.kernel!r}; query nodes have {KERNELS}")
    _CODECS[cls.name] = cls
    return cls


def _load_all() -> None:
    for module in _CODEC_MODULES:
        importlib.import_module(module)


def list_codecs() -> list[str]:
    _load_all()
    return sorted(_CODECS)


def codec_class(name: str) -> type["Codec"]:
    """The registered codec class `name`; ConfigError naming the known codecs otherwise."""
    _load_all()
    if name not in _CODECS:
        raise ConfigError(f"unknown codec {name!r}; this facepq knows {', '.join(sorted(_CODECS))} "
                          f"(an index or model written by a newer facepq needs that version)")
    return _CODECS[name]


def codec_from_state(name: str, state: dict) -> "Codec":
    """Rebuild a codec from its `state()` (ConfigError for an unknown name or a malformed state)."""
    return codec_class(name).from_state(state)


# Below this many rows a codec's matrix products run in einsum loops rather than BLAS: OpenBLAS's threads
# busy-wait after every call and burned ~25 ms of a core per single query in the coordinator, taken from
# the query nodes on a shared machine. Batches (ingest, evaluation) take the BLAS product, where that spin
# is paid once per batch.
BLAS_MIN_ROWS = 64


def rows_times(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x [N, E] @ weight.T ([O, E]) -> [N, O]: BLAS for batches, einsum loops for a few rows (BLAS_MIN_ROWS)."""
    if len(x) >= BLAS_MIN_ROWS:
        return x @ weight.T
    return np.einsum("ne,oe->no", x, weight)


def check_embeddings(features, dim: int) -> np.ndarray:
    """The one policy for embeddings: float32 [N, dim], finite, |values| <= MAX_EMBEDDING_VALUE.

    Returns a C-contiguous float32 array; raises ConfigError with what is wrong.
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ConfigError(f"embeddings must be float32 [N, {dim}] for this model, got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise ConfigError("embeddings contain NaN or infinite values")
    if x.size and float(np.abs(x).max()) > MAX_EMBEDDING_VALUE:
        raise ConfigError(f"embedding values must lie within +-{MAX_EMBEDDING_VALUE:g} (largest here "
                          f"{float(np.abs(x).max()):.3g}); is this an embedding of this model's trunk?")
    return np.ascontiguousarray(x)


class Codec(ABC):
    """A registered code type: embeddings -> stored codes, and -> query lookup tables.

    Subclasses set `name` (registry key, written into checkpoints, manifests and node status)
    and `kernel` (the scan kernel family), and implement `_sub_codes`, `_tables`, `state`
    and `from_state`. Scores are sum_m tables[m, c_m], higher is better, and the query
    nodes' kernels compute exactly that.

    Args:
        spec: the code layout (M sub-codes of K values; nibble-packed when K <= 16).
        embedding_dim: length of the trunk embedding the codec takes.
    """

    name: ClassVar[str]
    kernel: ClassVar[str] = "lut"
    # Its byte tables may be Hamming tables, which the popcount kernel (query_node.hamming_scan) scans
    # from row-major codes: a node then keeps the codes as they are stored (query_node.code_blocks).
    hamming_tables: ClassVar[bool] = False

    def __init__(self, spec: CodeSpec, embedding_dim: int):
        self.spec = spec
        self.embedding_dim = int(embedding_dim)

    # ---- what every codec offers ------------------------------------------------------------------
    def encode(self, features) -> np.ndarray:
        """Embeddings float32 [N, E] -> stored codes uint8 [N, spec.code_bytes]."""
        x = check_embeddings(features, self.embedding_dim)
        if not len(x):
            return np.zeros((0, self.spec.code_bytes), np.uint8)
        return pack_codes(self._sub_codes(x), self.spec)

    def query_tables(self, features) -> np.ndarray:
        """Embeddings float32 [N, E] -> lookup tables float32 [N, M, K]; score = sum_m table[m, c_m].

        Raises ConfigError when an embedding gives non-finite tables (nothing usable to send).
        """
        x = check_embeddings(features, self.embedding_dim)
        tables = np.ascontiguousarray(self._tables(x), dtype=np.float32)
        if not np.isfinite(tables).all():
            raise ConfigError("this embedding gives a lookup table with NaN/inf values; send a usable embedding")
        return tables

    @property
    def code_bytes(self) -> int:
        """Bytes stored per face."""
        return self.spec.code_bytes

    @property
    def query_shape(self) -> tuple[int, int]:
        """Shape of one query's table: (M, K) for the "lut" kernel."""
        return (self.spec.M, self.spec.K)

    def codewords(self) -> np.ndarray | None:
        """float32 [M, K, s]: the head-space point each sub-code value stands for (what a code decodes to,
        subspace by subspace), so cell partitions (facepq_core.partition) group faces by where their codes
        lie; None: not known (cells then treat different sub-codes as unrelated)."""
        return None

    def float_features(self, features) -> np.ndarray | None:
        """The codec's float counterpart of the codes, [N, F] (compared by cosine), or None."""
        return None

    def describe(self) -> dict:
        """What an index records about the codes (besides the model fingerprint)."""
        return {"codec": self.name, **self.spec.to_dict()}

    # ---- query expansion (facepq_core.expansion): codes seen in the query's space -------------------
    def expansion_vector(self, features) -> np.ndarray:
        """Embeddings float32 [N, E] -> the queries' representations float32 [N, D], the space `reconstruct`
        maps codes into and `tables_from_vector` takes (ConfigError: this codec offers no expansion)."""
        raise ConfigError(f"the {self.name} codec offers no query expansion")

    def reconstruct(self, codes) -> np.ndarray:
        """Stored codes uint8 [N, code_bytes] -> float32 [N, D]: what each code stands for in the space of
        `expansion_vector` (ConfigError: this codec offers no expansion, or codes of another layout)."""
        raise ConfigError(f"the {self.name} codec offers no query expansion")

    def tables_from_vector(self, vectors) -> np.ndarray:
        """Vectors float32 [N, D] of `expansion_vector`'s space -> lookup tables float32 [N, M, K]; for
        v = expansion_vector(f) they equal query_tables(f) (to float rounding)."""
        raise ConfigError(f"the {self.name} codec offers no query expansion")

    def _stored_sub_codes(self, codes) -> np.ndarray:
        """Stored codes -> sub-codes intp [N, M]; ConfigError when they are not uint8 [N, code_bytes]."""
        from facepq_core.codes import unpack_codes

        arr = np.asarray(codes)
        if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != self.spec.code_bytes:
            raise ConfigError(f"{self.name} codes must be uint8 [N, {self.spec.code_bytes}], got "
                              f"{arr.dtype} {list(arr.shape)}")
        return unpack_codes(arr, self.spec).astype(np.intp)

    def _checked_vectors(self, vectors, dim: int) -> np.ndarray:
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape[1] != dim or not np.isfinite(v).all():
            raise ConfigError(f"{self.name} expansion vectors must be finite float32 [N, {dim}], got {list(v.shape)}")
        return v

    # ---- what a codec implements ------------------------------------------------------------------
    @abstractmethod
    def _sub_codes(self, x: np.ndarray) -> np.ndarray:
        """Checked embeddings float32 [N, E] -> sub-codes uint8 [N, M]."""

    @abstractmethod
    def _tables(self, x: np.ndarray) -> np.ndarray:
        """Checked embeddings float32 [N, E] -> tables float32 [N, M, K]."""

    @abstractmethod
    def state(self) -> dict:
        """Everything needed to rebuild the codec: numpy arrays and plain scalars."""

    @classmethod
    @abstractmethod
    def from_state(cls, state: dict) -> "Codec":
        """Inverse of `state()`; ConfigError for a malformed state."""


def state_array(state: dict, key: str, ndim: int, name: str) -> np.ndarray:
    """A float32 array of `ndim` dims from a codec state (ConfigError naming the codec when absent or wrong)."""
    try:
        value = np.asarray(state[key], dtype=np.float32)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{name} codec state lacks a usable {key!r}: {exc!r}") from None
    if value.ndim != ndim or not np.isfinite(value).all():
        raise ConfigError(f"{name} codec state: {key!r} must be a finite {ndim}-d array, got shape {value.shape}")
    return np.ascontiguousarray(value)
