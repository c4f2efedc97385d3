"""α-query expansion (αQE; Radenović, Tolias & Chum, TPAMI 2018, after Gordo et al., ECCV 2016), from codes.

After a first search, the query is combined with its top-n hits, each weighted by its
similarity to the query raised to α, and searched again:
    q' = n( n(q) + sum_i max(0, n(q) . n(r_i))^α n(r_i) )          n = L2 normalisation
An index holds codes only, so each hit is `r_i = codec.reconstruct(code_i)`: what its code
stands for in the space of the query's own representation `codec.expansion_vector(query)`
(per codec: facepq_core.codecs). The combined vector becomes new lookup tables with
`codec.tables_from_vector(q')`. α = 0 is average query expansion (every hit weighs 1);
a large α keeps only the hits most like the query.

`check_expansion` is the one check of the options (the coordinator's INVALID_ARGUMENT cases).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from facepq_core.errors import InvalidRequest

MAX_EXPANSION_N = 100  # hits combined with the query at most (their codes travel in the first round's reply)
MAX_EXPANSION_ALPHA = 1000.0


@dataclass(frozen=True)
class Expansion:
    """n: top hits combined with the query (0 = no expansion); alpha: exponent of their similarity weights."""

    n: int = 0
    alpha: float = 3.0


def check_expansion(n, alpha) -> Expansion:
    """The options as an Expansion; InvalidRequest for n outside 0..MAX_EXPANSION_N or alpha outside
    0..MAX_EXPANSION_ALPHA (or not a finite number)."""
    return Expansion(*checked_weighting("expansion", "n", n, 0, MAX_EXPANSION_N, alpha, MAX_EXPANSION_ALPHA,
                                        InvalidRequest))


def checked_weighting(what: str, count_name: str, count, lo: int, hi: int, alpha, max_alpha: float,
                      error: type) -> tuple[int, float]:
    """(count, alpha) of a neighbour weighting (αQE here, DBA in indexer.dba): `error` naming `what` unless count
    is an integer in lo..hi and alpha a finite number in 0..max_alpha."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not lo <= count <= hi:
        raise error(f"{what} {count_name} must be an integer in {lo}..{hi}, got {count!r}")
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise error(f"{what} alpha must be a number, got {alpha!r}") from None
    if not math.isfinite(a) or not 0.0 <= a <= max_alpha:
        raise error(f"{what} alpha must be a finite number in 0..{max_alpha:g}, got {alpha!r}")
    return int(count), a


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.sqrt(np.square(x).sum(-1, keepdims=True)), 1e-12)


def alpha_expand(query: np.ndarray, neighbours: np.ndarray, alpha: float) -> np.ndarray:
    """The expanded query vector.

    Args:
        query: float [D], the query's representation (codec.expansion_vector).
        neighbours: float [n, D], the reconstructions of its top-n hits (codec.reconstruct), n >= 0.
        alpha: >= 0.
    Returns:
        float32 [D], unit length: n(n(q) + sum_i max(0, cos(q, r_i))^α n(r_i)). With no neighbours, n(q).
    """
    q = _unit(query)
    r = _unit(np.asarray(neighbours, dtype=np.float64).reshape(-1, q.shape[0]))
    sims = np.clip(r @ q, 0.0, None)
    weights = np.power(sims, alpha)  # 0 ** 0 = 1: α = 0 averages every hit
    return _unit(q + weights @ r).astype(np.float32)
