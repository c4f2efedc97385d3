import math

import numpy as np
import pytest

from opqn_model.metrics import retrieval_metrics


def test_map_and_precision_against_a_hand_computed_example():
    # query 'a': ranked gallery a b a b -> hits at ranks 1 and 3 -> AP = (1/1 + 2/3) / 2 = 5/6
    # query 'b': ranked gallery a b a b -> hits at ranks 2 and 4 -> AP = (1/2 + 2/4) / 2 = 1/2
    scores = np.array([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    gallery = ["a", "b", "a", "b"]
    m = retrieval_metrics(scores, ["a", "b"], gallery, ks=(1, 2, 10))
    assert m["map"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert m["p_at_1"] == pytest.approx(0.5)  # a: hit, b: miss
    assert m["p_at_2"] == pytest.approx(0.5)
    assert m["r_at_2"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert m["p_at_10"] == pytest.approx(0.5)  # k capped at the gallery size 4: 2/4 each
    assert m["r_at_10"] == pytest.approx(1.0)
    assert m["n_queries"] == 2


def test_queries_without_relevant_items_are_left_out_and_counted():
    scores = np.array([[1.0, 0.0], [1.0, 0.0]])
    m = retrieval_metrics(scores, ["a", "z"], ["a", "b"])
    assert m["map"] == 1.0 and m["n_queries"] == 1 and m["n_skipped_queries"] == 1


def test_ties_are_ranked_by_gallery_order():
    scores = np.array([[1.0, 1.0, 1.0]])
    m = retrieval_metrics(scores, ["b"], ["a", "b", "b"], ks=(1,))
    assert m["p_at_1"] == 0.0
    assert m["map"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_all_queries_without_relevant_items_give_nan():
    m = retrieval_metrics(np.zeros((1, 2)), ["x"], ["a", "b"])
    assert math.isnan(m["map"])
