"""Cell partitions (inverted file): faces grouped into L coarse cells, a query scans a few of them.

Space. The cells live in the space the codes quantize, seen through the codes themselves:
a face is the one-hot vector of its M sub-codes (M*K dims, M ones), and a cell's centroid
C[l] (float32 [M, K]) is the mean one-hot vector of its faces, i.e. the histogram of
sub-code values per subspace. The k-means in that space needs only codes, so ingest,
Enrol, compaction and merging (which all see codes) assign cells with no embeddings, and
any "lut" codec (OPQN, PQ, binary, 4- or 8-bit) works unchanged inside a cell.

    assignment:  cell(face) = argmin_l |onehot(face) - C[l]|^2 = argmax_l 2 sum_m C[l, m, c_m] - |C[l]|^2
    probing:     a query scans the `nprobe` cells with the highest  sum_{m,k} T[m, k] C[l, m, k],
                 the mean score of the cell's faces under the query's lookup table T (score =
                 sum_m T[m, c_m]), so a node picks cells from the tables it already receives.

The partition is exact inside the cells it scans (the same kernels, the same scores); it can
only miss faces of cells it skips, so its recall is measured against the exhaustive answer
(`facepq bench scale`), never assumed. nprobe = 0 or >= L scans everything.

Stored with the index as one file (`partition/<sha256>.npz`, named by its content), recorded in
the manifest (`PartitionRef`) and bound to the model's fingerprint: a partition of another
model's codes is refused.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from facepq_core.codes import CodeSpec, unpack_codes
from facepq_core.errors import ConfigError, IndexFormatError

PARTITION_DIR = "partition"
# k-means fits on at most this many faces per cell (a uniform sample): enough for the histograms.
SAMPLE_PER_CELL = 64
FIT_ITERATIONS = 12
MAX_CELLS = 65536
_ASSIGN_BLOCK = 65536


@dataclass(frozen=True)
class PartitionRef:
    """What a manifest records about an index's partition: cell count and the file (by content)."""

    cells: int
    sha256: str

    @property
    def path(self) -> str:
        return f"{PARTITION_DIR}/{self.sha256}.npz"

    def to_dict(self) -> dict:
        return {"cells": self.cells, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict) -> "PartitionRef":
        try:
            ref = cls(cells=int(d["cells"]), sha256=str(d["sha256"]))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise IndexFormatError(f"manifest 'partition' entry is malformed: {exc!r}"[:300]) from None
        if not 1 <= ref.cells <= MAX_CELLS or len(ref.sha256) != 64 or not all(c in "0123456789abcdef"
                                                                               for c in ref.sha256):
            raise IndexFormatError(f"manifest 'partition' entry is malformed: {d!r}"[:300])
        return ref


def check_cells(cells: int) -> int:
    """A cell count a user asked for (`--cells`): 1..MAX_CELLS, else ConfigError."""
    if not isinstance(cells, int) or not 1 <= cells <= MAX_CELLS:
        raise ConfigError(f"--cells must be an integer in 1..{MAX_CELLS} (0 or absent: no partition), got {cells!r}")
    return cells


class CellPartition:
    """L cell centroids of one model's codes.

    Args:
        centroids: float32 [L, M, K], per cell the fraction of its faces with sub-code k in subspace m.
        spec: the code layout the centroids describe.
        fingerprint: the model whose codes were partitioned.
    """

    def __init__(self, centroids: np.ndarray, spec: CodeSpec, fingerprint: str):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.spec = spec
        self.fingerprint = str(fingerprint)
        if self.centroids.ndim != 3 or self.centroids.shape[1:] != (spec.M, spec.K) or not len(self.centroids):
            raise ConfigError(f"cell centroids must be float32 [L, {spec.M}, {spec.K}], got {self.centroids.shape}")
        self._sq = np.square(self.centroids).sum(axis=(1, 2))  # |C[l]|^2, float32 [L]
        # Per subspace a [K, L] table, so assignment is M row gathers: sum_m C[:, m, c_m].
        self._by_code = np.ascontiguousarray(self.centroids.transpose(1, 2, 0))

    @property
    def cells(self) -> int:
        return self.centroids.shape[0]

    # ---- ingest side -----------------------------------------------------------------------------
    @classmethod
    def fit(cls, codes: np.ndarray, spec: CodeSpec, cells: int, fingerprint: str, seed: int = 0,
            iterations: int = FIT_ITERATIONS) -> "CellPartition":
        """k-means (Lloyd) of stored codes uint8 [N, code_bytes] in one-hot space into `cells` cells.

        Fits on a uniform sample of at most SAMPLE_PER_CELL * cells faces. Cells left empty are
        re-seeded with a random face. Raises ConfigError when there are fewer faces than cells.
        """
        check_cells(cells)
        codes = np.asarray(codes, dtype=np.uint8)
        if codes.shape[0] < cells:
            raise ConfigError(f"{cells} cells need at least {cells} faces to fit on; the first write has "
                              f"{codes.shape[0]} (use fewer --cells, or none for a small gallery)")
        rng = np.random.default_rng(seed)
        if codes.shape[0] > SAMPLE_PER_CELL * cells:
            codes = codes[np.sort(rng.choice(codes.shape[0], SAMPLE_PER_CELL * cells, replace=False))]
        sub = unpack_codes(codes, spec).astype(np.intp)
        part = cls(_histograms(sub[rng.choice(sub.shape[0], cells, replace=False)], np.arange(cells), cells, spec),
                   spec, fingerprint)
        for _ in range(iterations):
            labels = part._assign_sub(sub)
            centroids = _histograms(sub, labels, cells, spec)
            empty = np.flatnonzero(np.bincount(labels, minlength=cells) == 0)
            if empty.size:
                centroids[empty] = _histograms(sub[rng.choice(sub.shape[0], empty.size, replace=False)],
                                               np.arange(empty.size), empty.size, spec)
            part = cls(centroids, spec, fingerprint)
        return part

    def assign(self, codes: np.ndarray) -> np.ndarray:
        """Stored codes uint8 [N, code_bytes] -> cell of each face, int32 [N] (ties: the lower cell)."""
        return self._assign_sub(unpack_codes(codes, self.spec).astype(np.intp))

    def _assign_sub(self, sub: np.ndarray) -> np.ndarray:
        out = np.empty(sub.shape[0], dtype=np.int32)
        for lo in range(0, sub.shape[0], _ASSIGN_BLOCK):
            block = sub[lo:lo + _ASSIGN_BLOCK]
            score = np.zeros((block.shape[0], self.cells), dtype=np.float32)
            for m in range(self.spec.M):
                score += self._by_code[m][block[:, m]]
            out[lo:lo + block.shape[0]] = np.argmax(2 * score - self._sq, axis=1)
        return out

    # ---- query side ------------------------------------------------------------------------------
    def probe(self, lookup_tables: np.ndarray, nprobe: int) -> np.ndarray:
        """Lookup tables float32 [Q, M, K] -> the `nprobe` best cells of each query, int64 [Q, nprobe], sorted.

        Best = highest mean score of the cell's faces; ties go to the lower cell.
        """
        tables = np.asarray(lookup_tables, dtype=np.float32).reshape(-1, self.spec.M * self.spec.K)
        score = tables @ self.centroids.reshape(self.cells, -1).T  # [Q, L]
        nprobe = min(int(nprobe), self.cells)
        best = np.argsort(-score, axis=1, kind="stable")[:, :nprobe]
        return np.sort(best, axis=1)

    # ---- storage ---------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, centroids=self.centroids, M=self.spec.M, K=self.spec.K,
                 fingerprint=np.array(self.fingerprint))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, expect_fingerprint: str, where: str = "partition") -> "CellPartition":
        """Inverse of `to_bytes`; IndexFormatError when unreadable or made for another model."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                spec = CodeSpec(M=int(z["M"]), K=int(z["K"]))
                part = cls(z["centroids"], spec, str(z["fingerprint"]))
        except (ValueError, KeyError, OSError, EOFError, ConfigError) as exc:
            raise IndexFormatError(f"{where} is not a readable cell partition: {exc}"[:300]) from None
        if part.fingerprint != expect_fingerprint:
            raise IndexFormatError(f"{where} partitions codes of model {part.fingerprint}, the index model is "
                                   f"{expect_fingerprint}; refusing it")
        if not np.isfinite(part.centroids).all():
            raise IndexFormatError(f"{where} has non-finite centroids")
        return part


def _histograms(sub: np.ndarray, labels: np.ndarray, cells: int, spec: CodeSpec) -> np.ndarray:
    """Mean one-hot vector per label: float32 [cells, M, K] (zeros for a label with no faces)."""
    counts = np.zeros((cells, spec.M, spec.K), dtype=np.float64)
    for m in range(spec.M):
        np.add.at(counts[:, m, :], (labels, sub[:, m]), 1.0)
    sizes = np.bincount(labels, minlength=cells).astype(np.float64)
    return (counts / np.maximum(sizes, 1.0)[:, None, None]).astype(np.float32)


def cell_offsets(cells_of_rows: np.ndarray, cells: int) -> np.ndarray:
    """Cells int [N] of rows already grouped by cell -> row offsets int64 [cells + 1] (cell l: rows off[l]..off[l+1])."""
    return np.concatenate(([0], np.cumsum(np.bincount(cells_of_rows, minlength=cells)))).astype(np.int64)


def cell_ranges(offsets: np.ndarray, cells: np.ndarray) -> list[tuple[int, int]]:
    """Row ranges [(lo, hi)] of the given sorted cells in a segment, adjacent cells merged, empty ones dropped."""
    out: list[tuple[int, int]] = []
    for c in cells.tolist():
        lo, hi = int(offsets[c]), int(offsets[c + 1])
        if hi == lo:
            continue
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out
