"""facepq_core.nibble_order: the numbering of a codebook's 256 codewords the AVX2 8-bit scan's bound needs."""
import itertools

import numpy as np
import pytest

from facepq_core.nibble_order import assignment, nibble_order


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_assignment_is_the_cheapest_of_all_permutations(n):
    rng = np.random.default_rng(n)
    for trial in range(30):
        cost = rng.standard_normal((n, n)) if trial % 2 else rng.integers(0, 3, (n, n)).astype(float)  # ties
        got = assignment(cost)
        assert sorted(got) == list(range(n))
        best = min(cost[np.arange(n), list(p)].sum() for p in itertools.permutations(range(n)))
        assert cost[np.arange(n), got].sum() == pytest.approx(best, abs=1e-12)


def test_assignment_of_a_16x16_matrix_beats_every_random_permutation():
    rng = np.random.default_rng(0)
    cost = rng.random((16, 16))
    total = cost[np.arange(16), assignment(cost)].sum()
    assert all(total <= cost[np.arange(16), rng.permutation(16)].sum() for _ in range(2000))


def test_the_order_is_a_deterministic_permutation_grouping_near_codewords():
    rng = np.random.default_rng(1)
    books = rng.standard_normal((256, 4))
    order = nibble_order(books)
    assert sorted(order) == list(range(256)) and np.array_equal(order, nibble_order(books))
    ordered = books[order].reshape(16, 16, 4)   # [high nibble, low nibble, dims]

    def spread(groups):   # mean squared distance of a group's codewords to their mean
        return np.square(groups - groups.mean(1, keepdims=True)).sum(-1).mean()

    shuffled = books[rng.permutation(256)].reshape(16, 16, 4)
    assert spread(ordered) < 0.5 * spread(shuffled)   # rows: codewords near each other
    # columns: codeword - its row's mean is alike along a column (the additive part of the bound)
    residual = ordered - ordered.mean(1, keepdims=True)
    assert spread(residual.transpose(1, 0, 2)) < 0.5 * spread((shuffled - shuffled.mean(1, keepdims=True))
                                                               .transpose(1, 0, 2))


def test_the_order_refuses_what_is_not_256_finite_codewords():
    with pytest.raises(ValueError, match="256 finite codewords"):
        nibble_order(np.zeros((100, 4)))
    bad = np.zeros((256, 4))
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="256 finite codewords"):
        nibble_order(bad)
