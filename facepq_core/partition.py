"""Cell partitions (inverted file): faces grouped into L coarse cells, a query scans a few of them.

Space. The cells live in the head space the codes quantize, seen through the codes: a face is
where its code decodes to, x(face) = concat_m W[m, c_m] (float [M*s]), with W the codec's
codewords (`Codec.codewords()`: OPQN's unit assignment vectors, PQ's centroids, a byte's bit
signs; the identity, i.e. one-hot sub-codes, for a codec that does not say). k-means of x fits
the centroids. Only codes are needed, so ingest, Enrol, compaction and merging (which all see
codes) assign cells with no embeddings, and any "lut" codec works unchanged inside a cell.

    assignment:  cell(face) = argmin_l |x(face) - mu_l|^2
    probing:     a query scans the `nprobe` cells with the highest  sum_{m,k} T[m, k] H[l, m, k],
                 where H[l, m, k] is the fraction of cell l's faces (of the fitting sample) with
                 sub-code k in subspace m: the mean score of the cell's faces under the query's lookup
                 table T (score = sum_m T[m, c_m]), so a node picks cells from the tables it already
                 receives, whatever the codec's scoring.

Computing that sum costs L*M*K per query (2M multiply-adds at 1024 cells of 8x256 codes: ~3 ms
in numpy loops, far more than the scan it saves). Every codec's tables are affine in a few
features of its codewords, phi(m, k) = [1, W[m, k], |W[m, k]|^2] (OPQN: log-softmax of x.W, PQ
inner products, Hamming tables over bit signs, L2 tables), so T[m, :] = phi_m beta_m, with beta_m
the least-squares fit (a pseudo-inverse fixed per partition), and the sum is exactly
sum_m beta_m . E_l[phi_m], E_l[phi_m] = H[l, m, :] phi_m fixed per cell: L*M*(s+2) per query.
For tables outside that span the fit is the closest such table (the probe is then approximate,
the scan within the probed cells exact as always).

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
# Codewords wider than this are projected on their leading principal directions per subspace before
# fitting: OPQN's assignment vectors are as wide as the head's sub-vectors (256-d for the 64-bit dlib
# model: 2048-d points, 2 TFLOP to assign 1M faces to 1024 cells, measured 332 s with fitting);
# distances between codewords, all that k-means and the probe use, survive in a few dimensions.
MAX_CODEWORD_DIMS = 16
FIT_ITERATIONS = 12
# k-means++ picks its seeds one by one, each after a pass over the points; on at most this many points per
# cell (a uniform subsample of the fitting sample), Lloyd's iterations then see the whole sample. Seeding all
# 64 x 4096 points of a 4096-cell fit took 116 s of its 126 s; with 16 x 4096 the whole fit takes 8 s.
SEED_SAMPLE_PER_CELL = 16
MAX_CELLS = 65536
# Rows per assignment block: the [rows, L] score block (64 MiB at 4096 cells) is written by one matrix
# product and read by one argmax, so a block stays large enough for BLAS and small enough for the caches.
_ASSIGN_BLOCK = 4096


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
    """L cells of one model's codes.

    Args:
        codewords: float32 [M, K, s], what each sub-code value decodes to (Codec.codewords()).
        centroids: float32 [L, M*s], the cells' centres in that space.
        histograms: float32 [L, M, K], per cell the fraction of its faces with sub-code k in subspace m.
        spec: the code layout.  fingerprint: the model whose codes were partitioned.
    """

    def __init__(self, codewords: np.ndarray, centroids: np.ndarray, histograms: np.ndarray, spec: CodeSpec,
                 fingerprint: str):
        self.codewords = np.ascontiguousarray(codewords, dtype=np.float32)
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.histograms = np.ascontiguousarray(histograms, dtype=np.float32)
        self.spec = spec
        self.fingerprint = str(fingerprint)
        M, K = spec.M, spec.K
        if self.codewords.ndim != 3 or self.codewords.shape[:2] != (M, K):
            raise ConfigError(f"codewords must be float32 [{M}, {K}, s], got {self.codewords.shape}")
        L = self.centroids.shape[0] if self.centroids.ndim == 2 else 0
        if not L or self.centroids.shape[1] != M * self.codewords.shape[2] or self.histograms.shape != (L, M, K):
            raise ConfigError(f"cells: centroids {self.centroids.shape} and histograms {self.histograms.shape} do "
                              f"not fit codewords {self.codewords.shape}")
        # argmax_l 2 x.mu_l - |mu_l|^2 as one product: [x, 1] . [2 mu_l, -|mu_l|^2] (no pass over the scores
        # to scale and shift them: 4.3 s instead of 8.6 s per 1M faces at 4096 cells of 32-d points).
        self._scorer = np.ascontiguousarray(np.concatenate(
            [2 * self.centroids, -np.square(self.centroids).sum(1, keepdims=True)], axis=1).T)  # [F + 1, L]

    @property
    def cells(self) -> int:
        return self.centroids.shape[0]

    @property
    def nbytes(self) -> int:
        return self.codewords.nbytes + self.centroids.nbytes + self.histograms.nbytes

    def decode(self, sub: np.ndarray) -> np.ndarray:
        """Sub-codes int [N, M] -> their head-space points float32 [N, M*s]."""
        return self.codewords[np.arange(self.spec.M)[None, :], sub].reshape(len(sub), -1)

    # ---- ingest side -----------------------------------------------------------------------------
    @classmethod
    def fit(cls, codes: np.ndarray, spec: CodeSpec, cells: int, fingerprint: str, codewords: np.ndarray | None = None,
            seed: int = 0, iterations: int = FIT_ITERATIONS) -> "CellPartition":
        """k-means (Lloyd) of stored codes uint8 [N, code_bytes], decoded by `codewords` (None: one-hot).

        Fits on a uniform sample of at most SAMPLE_PER_CELL * cells faces. Cells left empty are
        re-seeded with a random face. Raises ConfigError when there are fewer faces than cells.
        """
        check_cells(cells)
        codes = np.asarray(codes, dtype=np.uint8)
        if codes.shape[0] < cells:
            raise ConfigError(f"{cells} cells need at least {cells} faces to fit on; the first write has "
                              f"{codes.shape[0]} (use fewer --cells, or none for a small gallery)")
        if codewords is None:
            codewords = np.broadcast_to(np.eye(spec.K, dtype=np.float32), (spec.M, spec.K, spec.K))
        else:
            codewords = principal_codewords(np.asarray(codewords, dtype=np.float32), MAX_CODEWORD_DIMS)
        rng = np.random.default_rng(seed)
        if codes.shape[0] > SAMPLE_PER_CELL * cells:
            codes = codes[np.sort(rng.choice(codes.shape[0], SAMPLE_PER_CELL * cells, replace=False))]
        sub = unpack_codes(codes, spec).astype(np.intp)
        empty_hist = np.zeros((cells, spec.M, spec.K), np.float32)
        part = cls(codewords, np.zeros((cells, spec.M * codewords.shape[2]), np.float32), empty_hist, spec, fingerprint)
        x = part.decode(sub)
        centroids = _seeds(x, cells, rng)
        for _ in range(iterations):
            part = cls(codewords, centroids, empty_hist, spec, fingerprint)
            labels = part._nearest(x)
            sums = np.zeros_like(centroids, dtype=np.float64)
            np.add.at(sums, labels, x)
            sizes = np.bincount(labels, minlength=cells)
            centroids = (sums / np.maximum(sizes, 1)[:, None]).astype(np.float32)
            empty = np.flatnonzero(sizes == 0)
            if empty.size:
                centroids[empty] = x[rng.choice(len(x), empty.size, replace=False)]
        part = cls(codewords, centroids, empty_hist, spec, fingerprint)
        return cls(codewords, centroids, _histograms(sub, part._nearest(x), cells, spec), spec, fingerprint)

    def assign(self, codes: np.ndarray) -> np.ndarray:
        """Stored codes uint8 [N, code_bytes] -> cell of each face, int32 [N] (ties: the lower cell)."""
        sub = unpack_codes(codes, self.spec).astype(np.intp)
        return self._nearest_of(sub.shape[0], lambda lo, hi: self.decode(sub[lo:hi]))

    def _nearest(self, x: np.ndarray) -> np.ndarray:
        """Points float32 [N, F] -> nearest centroid int32 [N]."""
        return self._nearest_of(len(x), lambda lo, hi: x[lo:hi])

    def _nearest_of(self, n: int, points_of) -> np.ndarray:
        """Nearest centroid int32 [n] of the points `points_of(lo, hi)` (float32 [hi - lo, F]), block by block:
        argmax 2 x.mu - |mu|^2. The block buffers are made once per call: a 64 MiB score block allocated per
        4096 faces cost 1 of 6 s per 1M faces at 4096 cells."""
        out = np.empty(n, dtype=np.int32)
        block = min(_ASSIGN_BLOCK, n)
        points = np.ones((block, self._scorer.shape[0]), np.float32)  # [x, 1]
        score = np.empty((block, self.cells), np.float32)
        for lo in range(0, n, block):
            m = min(block, n - lo)
            points[:m, :-1] = points_of(lo, lo + m)
            np.matmul(points[:m], self._scorer, out=score[:m])
            out[lo:lo + m] = np.argmax(score[:m], axis=1)
        return out

    # ---- query side ------------------------------------------------------------------------------
    def prober(self) -> "CellProbe":
        """What a node keeps to pick cells (the partition itself stays with writers).

        The cheaper exact form of the mean-score sum: codeword features when s + 2 < K (tables affine in
        them, see the module docstring), else the histograms themselves (one-hot, or codewords as wide as K).
        """
        M, K = self.spec.M, self.spec.K
        if self.codewords.shape[2] + 2 < K:
            phi = np.concatenate([np.ones((M, K, 1), np.float32), self.codewords,
                                  np.square(self.codewords).sum(-1, keepdims=True)], axis=2).astype(np.float64)
            return CellProbe(np.linalg.pinv(phi).astype(np.float32),
                             np.einsum("lmk,mkp->lmp", self.histograms.astype(np.float64), phi).astype(np.float32))
        return CellProbe(None, self.histograms)

    def probe(self, lookup_tables: np.ndarray, nprobe: int) -> np.ndarray:
        """The cells a query scans; see `CellProbe.probe` (built for each call here: a node keeps a prober)."""
        return self.prober().probe(lookup_tables, nprobe)

    def mean_scores(self, lookup_tables: np.ndarray) -> np.ndarray:
        """float32 [Q, L]: the mean score of each cell's faces, summed over the histograms directly (the
        reference the probe's features form agrees with when the tables are affine in the codeword features)."""
        tables = np.asarray(lookup_tables, dtype=np.float32).reshape(-1, self.spec.M * self.spec.K)
        return np.einsum("qf,lf->ql", tables, self.histograms.reshape(self.cells, -1))

    # ---- storage ---------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, codewords=self.codewords, centroids=self.centroids, histograms=self.histograms,
                 M=self.spec.M, K=self.spec.K, fingerprint=np.array(self.fingerprint))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, expect_fingerprint: str, where: str = "partition") -> "CellPartition":
        """Inverse of `to_bytes`; IndexFormatError when unreadable or made for another model."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                spec = CodeSpec(M=int(z["M"]), K=int(z["K"]))
                part = cls(z["codewords"], z["centroids"], z["histograms"], spec, str(z["fingerprint"]))
        except (ValueError, KeyError, OSError, EOFError, ConfigError) as exc:
            raise IndexFormatError(f"{where} is not a readable cell partition: {exc}"[:300]) from None
        if part.fingerprint != expect_fingerprint:
            raise IndexFormatError(f"{where} partitions codes of model {part.fingerprint}, the index model is "
                                   f"{expect_fingerprint}; refusing it")
        if not all(np.isfinite(a).all() for a in (part.codewords, part.centroids, part.histograms)):
            raise IndexFormatError(f"{where} has non-finite values")
        return part


class CellProbe:
    """What a node needs to pick cells from a query's tables: the mean score of each cell's faces.

    Args:
        phi_pinv: float32 [M, s+2, K], the least-squares fit of a table on codeword features per subspace;
            None when `cell_terms` are the histograms themselves.
        cell_terms: float32 [L, M, s+2], each cell's mean codeword features; or [L, M, K] histograms.
    """

    def __init__(self, phi_pinv: np.ndarray | None, cell_terms: np.ndarray):
        self.phi_pinv, self.cell_terms = phi_pinv, np.ascontiguousarray(cell_terms, dtype=np.float32)

    @property
    def cells(self) -> int:
        return self.cell_terms.shape[0]

    @property
    def nbytes(self) -> int:
        return self.cell_terms.nbytes + (self.phi_pinv.nbytes if self.phi_pinv is not None else 0)

    def scores(self, lookup_tables: np.ndarray) -> np.ndarray:
        """Tables float32 [Q, M, K] -> float32 [Q, L], the mean score of each cell's faces."""
        tables = np.asarray(lookup_tables, dtype=np.float32)
        tables = tables.reshape(-1, *tables.shape[-2:])
        # einsum loops, not BLAS: a few queries per call, and OpenBLAS's threads busy-wait after every
        # call (measured 20 ms for 16 queries x 64 cells on a loaded 2-core machine; see codecs/opqn.py).
        beta = tables if self.phi_pinv is None else np.einsum("mpk,qmk->qmp", self.phi_pinv, tables)
        return np.einsum("qmp,lmp->ql", beta, self.cell_terms)

    def probe(self, lookup_tables: np.ndarray, nprobe: int) -> np.ndarray:
        """Lookup tables float32 [Q, M, K] -> the `nprobe` best cells of each query, int64 [Q, nprobe], sorted.

        Best = highest mean score of the cell's faces; ties go to the lower cell.
        """
        score = self.scores(lookup_tables)
        nprobe = min(int(nprobe), self.cells)
        best = np.argsort(-score, axis=1, kind="stable")[:, :nprobe]
        return np.sort(best, axis=1)


def _histograms(sub: np.ndarray, labels: np.ndarray, cells: int, spec: CodeSpec) -> np.ndarray:
    """Fraction of each label's rows with sub-code k in subspace m: float32 [cells, M, K] (zeros: no rows)."""
    counts = np.zeros((cells, spec.M, spec.K), dtype=np.float64)
    for m in range(spec.M):
        np.add.at(counts[:, m, :], (labels, sub[:, m]), 1.0)
    sizes = np.bincount(labels, minlength=cells).astype(np.float64)
    return (counts / np.maximum(sizes, 1.0)[:, None, None]).astype(np.float32)


def _seeds(x: np.ndarray, cells: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) on at most SEED_SAMPLE_PER_CELL * cells of the points:
    each next seed drawn with probability proportional to its squared distance from the nearest seed so far;
    float32 [cells, F]. Distances as |x|^2 - 2 x.s + |s|^2: one matrix-vector product per seed."""
    if len(x) > SEED_SAMPLE_PER_CELL * cells:
        x = x[np.sort(rng.choice(len(x), SEED_SAMPLE_PER_CELL * cells, replace=False))]
    x = np.ascontiguousarray(x, dtype=np.float32)
    sq = np.square(x).sum(1)

    def distances(seed: np.ndarray) -> np.ndarray:
        d = x @ (-2 * seed)
        d += sq
        d += float(np.square(seed).sum())
        return np.maximum(d, 0, out=d).astype(np.float64)  # rounding can make a distance slightly negative

    seeds = np.empty((cells, x.shape[1]), np.float32)
    seeds[0] = x[rng.integers(len(x))]
    nearest = distances(seeds[0])
    for i in range(1, cells):
        running = np.cumsum(nearest)
        total = running[-1]
        pick = rng.integers(len(x)) if total <= 0 else int(np.searchsorted(running, rng.random() * total))
        seeds[i] = x[min(pick, len(x) - 1)]
        np.minimum(nearest, distances(seeds[i]), out=nearest)
    return seeds


def principal_codewords(codewords: np.ndarray, dims: int) -> np.ndarray:
    """Codewords float32 [M, K, s] -> [M, K, min(s, dims)]: each subspace's codewords centred and projected on
    their `dims` leading principal directions (unchanged when s <= dims)."""
    if codewords.shape[2] <= dims:
        return codewords
    centred = codewords - codewords.mean(axis=1, keepdims=True)
    out = np.empty(codewords.shape[:2] + (dims,), np.float32)
    for m in range(codewords.shape[0]):
        _, _, vt = np.linalg.svd(centred[m].astype(np.float64), full_matrices=False)
        out[m] = centred[m] @ vt[:dims].T.astype(np.float32)
    return out


def cell_offsets(cells_of_rows: np.ndarray, cells: int) -> np.ndarray:
    """Cells int [N] of rows already grouped by cell -> row offsets int64 [cells + 1] (cell l: rows off[l]..off[l+1])."""
    return np.concatenate(([0], np.cumsum(np.bincount(cells_of_rows, minlength=cells)))).astype(np.int64)
