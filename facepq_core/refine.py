"""Refinement tiers: a finer representation stored beside each face's code, read only for candidates.

Two-stage search: the compact first-pass codes are scanned as always and give the top R
candidates of each shard; each candidate's refinement row is then read (positional reads,
never kept in memory) and re-scored exactly with the query's refinement table; the shard
answers the top k of the re-scored candidates. A tier is a registered codec
(facepq_core.codecs) chosen per index at ingest:

    none        codes only (the default)
    codes:BITS  a longer product quantizer of the same embedding, fitted when the model was
                trained (codec 'pq', BITS / 8 bytes a face, e.g. codes:256 = 32 bytes)
    float16     the unit embedding itself (codec 'float16', 2 bytes per dimension: 256 bytes
                for dlib's 128-d). A biometric template: whoever holds the index holds it.

`RefineTier` is what an index records about its tier (manifest format 3) and what a node
needs to check and score a request: the codec, its bytes per face and the query table's
shape. `rescore` is the one scoring function of the second pass (nodes and tests).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from facepq_core.errors import ConfigError

NONE = "none"
FLOAT16 = "float16"
_CODES = re.compile(r"^codes:(\d+)$")
# Candidates per shard a two-stage search re-scores unless told otherwise, and the most it may ask for.
DEFAULT_CANDIDATES = 100
MAX_CANDIDATES = 4096


def parse_refine(text: str | None) -> str | None:
    """'none' / None -> None; 'float16' -> 'float16'; 'codes:BITS' -> 'codes:BITS' (BITS a positive multiple of 8).

    Raises ConfigError naming the accepted forms.
    """
    if text is None or text == NONE:
        return None
    if text == FLOAT16:
        return FLOAT16
    match = _CODES.match(text)
    if match and int(match.group(1)) > 0 and int(match.group(1)) % 8 == 0:
        return f"codes:{int(match.group(1))}"
    raise ConfigError(f"--refine must be none, float16 or codes:BITS (BITS a multiple of 8, e.g. codes:256), "
                      f"got {text!r}")


def refine_bits(kind: str) -> int | None:
    """BITS of a 'codes:BITS' tier, None for any other."""
    match = _CODES.match(kind)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class RefineTier:
    """An index's refinement tier.

    Args:
        kind: as chosen at ingest ('codes:256', 'float16').
        codec: the registered codec that made the rows ('pq', 'float16').
        code_bytes: bytes stored per face (the segment's `refine` column width).
        query_shape: (rows, columns) of one query's refinement table.
    """

    kind: str
    codec: str
    code_bytes: int
    query_shape: tuple[int, int]

    @classmethod
    def of(cls, kind: str, codec) -> RefineTier:
        """The tier of a facepq_core.codecs.Codec used as refinement `kind`."""
        return cls(kind=kind, codec=codec.name, code_bytes=int(codec.code_bytes),
                   query_shape=tuple(int(v) for v in codec.query_shape))

    @property
    def kernel(self) -> str:
        from facepq_core.codecs import codec_class

        return codec_class(self.codec).kernel

    def to_dict(self) -> dict:
        return {"kind": self.kind, "codec": self.codec, "code_bytes": self.code_bytes,
                "query_shape": list(self.query_shape)}

    @classmethod
    def from_dict(cls, d: dict) -> RefineTier:
        """Raises ConfigError for a malformed entry (the manifest reports it as a corrupt index)."""
        try:
            shape = tuple(int(v) for v in d["query_shape"])
            tier = cls(kind=str(d["kind"]), codec=str(d["codec"]), code_bytes=int(d["code_bytes"]),
                       query_shape=shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"refine tier entry is incomplete or malformed: {exc!r}") from None
        if len(shape) != 2 or min(shape) < 1 or tier.code_bytes < 1:
            raise ConfigError(f"refine tier entry has an impossible layout: {d}")
        return tier


def rescore(kernel: str, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Second-pass scores of candidates: float32 [R], higher is better.

    Args:
        kernel: the tier codec's kernel family ('lut' or 'dot').
        query: float32 [a, b], one query's refinement table (`RefineTier.query_shape`).
        rows: uint8 [R, code_bytes], the candidates' stored refinement rows.
    'lut': sum_m query[m, c_m] in subspace order (facepq_core.codes.score_codes, the kernels'
    reference); 'dot': rows read as little-endian float16 [R, b], widened to float32, times query[0].
    """
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    if kernel == "lut":
        from facepq_core.codes import CodeSpec, unpack_codes

        table = np.asarray(query, dtype=np.float32)
        sub = unpack_codes(rows, CodeSpec(*table.shape))
        scores = np.zeros(len(rows), dtype=np.float32)
        for m in range(table.shape[0]):  # score_codes' sum in its order, one 1-D take per subspace (8x faster)
            scores += table[m].take(sub[:, m])
        return scores
    if kernel == "dot":
        vectors = rows.view("<f2").astype(np.float32)
        # einsum, not BLAS: each row's sum in one fixed order, whatever R is (answers equal a brute force)
        return np.einsum("re,e->r", vectors, np.asarray(query, dtype=np.float32)[0])
    raise ConfigError(f"no second-pass scoring for kernel {kernel!r}")
