"""The nibble order of a codebook: which label each of its 256 codewords gets.

A code's label is arbitrary (the codewords can be numbered in any order without changing a code's
meaning or any score), but the AVX2 scan of 8-bit codes bounds each byte's table entry T[16h + l]
through the byte's two nibbles (`query_node.fastscan.bound8_tables`): by the maximum of its row h,
of its column l, and by an additive cover A[h] + B[l]. Those bounds are tight when the 16 codewords
of a row are near each other (then the row's maximum is near each of its entries) and when the
codeword at (h, l) is close to u_h + v_l for a row vector u_h and a column vector v_l (then the
table, a linear function of the codeword, is nearly additive). `nibble_order` numbers a codebook so:

  rows:    a balanced 4-level k-d split of the codewords (each split at the median along the group's
           principal axis) gives 16 groups of 16 near codewords, the high nibbles;
  columns: within each group the codewords are matched one-to-one to 16 column vectors v_l
           (minimum total squared distance of codeword - group mean to v_l, a 16 x 16 assignment),
           the v_l being refitted as the mean of what was matched to them, a few rounds.

Measured with top-100 queries over 1M random 8-byte codes (FAISS-trained 8 x 256 codebooks on Gaussian
data, the `facepq bench scan` set-up), the share of rows whose quantized bound still reaches the 100th
score: 54-83% as FAISS numbered the codewords, 0.45-0.76% in this order; on the dlib OPQN model's codes
of LFW faces 0.14% (0.37% as k-means left them). See the README's scan kernel section.
"""
from __future__ import annotations

import numpy as np

NIBBLE_ROWS = 16
ROUNDS = 8


def nibble_order(codewords: np.ndarray, rounds: int = ROUNDS) -> np.ndarray:
    """The labels' order of a codebook float [256, d]: int64 [256], order[label] = the codeword given
    that label (a permutation; relabel codes with its inverse, `np.argsort(order)`).

    Deterministic for a given codebook. Raises ValueError for a codebook that is not 256 finite codewords.
    """
    c = np.asarray(codewords, dtype=np.float64)
    if c.ndim != 2 or len(c) != NIBBLE_ROWS * NIBBLE_ROWS or not np.isfinite(c).all():
        raise ValueError(f"a nibble order needs 256 finite codewords [256, d], got shape {c.shape}")
    groups = _kd_groups(c, levels=4)
    members = np.concatenate(groups)                     # group h at [16h, 16h + 16)
    residual = np.concatenate([c[g] - c[g].mean(0) for g in groups])
    column = np.empty(len(c), dtype=np.int64)
    for lab, g in enumerate(_kd_groups(residual, levels=4)):  # a first guess ignoring the one-per-group rule
        column[g] = lab
    for _ in range(rounds):
        v = np.stack([residual[column == lab].mean(0) if (column == lab).any() else np.zeros(c.shape[1])
                      for lab in range(NIBBLE_ROWS)])
        for h in range(NIBBLE_ROWS):
            at = slice(NIBBLE_ROWS * h, NIBBLE_ROWS * (h + 1))
            cost = np.square(residual[at][:, None, :] - v[None]).sum(-1)
            column[at] = assignment(cost)
    order = np.empty(len(c), dtype=np.int64)
    order[NIBBLE_ROWS * np.repeat(np.arange(NIBBLE_ROWS), NIBBLE_ROWS) + column] = members
    return order


def _kd_groups(x: np.ndarray, levels: int) -> list[np.ndarray]:
    """2**levels equal groups of rows of x: each group split at its median along its principal axis."""
    groups = [np.arange(len(x))]
    for _ in range(levels):
        split = []
        for g in groups:
            centred = x[g] - x[g].mean(0)
            axis = np.linalg.svd(centred, full_matrices=False)[2][0]
            ranked = g[np.argsort(centred @ axis, kind="stable")]
            split += [ranked[:len(g) // 2], ranked[len(g) // 2:]]
        groups = split
    return groups


def assignment(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost one-to-one assignment of a square cost matrix [n, n]: int64 [n], row i -> column.

    The Hungarian method with potentials (shortest augmenting paths), O(n^3): fine for the 16 x 16
    matrices here, and no dependency for it.
    """
    cost = np.asarray(cost, dtype=np.float64)
    n = len(cost)
    inf = np.inf
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=np.int64)     # match[j]: the row (1-based) given column j; 0: none
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        minv = np.full(n + 1, inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = match[j0]
            free = ~used[1:]
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            masked = np.where(free, minv[1:], inf)
            j1 = int(masked.argmin()) + 1
            delta = masked[j1 - 1]
            u[match[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    rows_to_cols = np.empty(n, dtype=np.int64)
    rows_to_cols[match[1:] - 1] = np.arange(n)
    return rows_to_cols
