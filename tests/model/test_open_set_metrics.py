"""opqn_model.open_set: DIR@FAR of a hand-made gallery, where every number can be counted by eye."""
from __future__ import annotations

import numpy as np
import pytest

from opqn_model.open_set import ProbeOutcomes, code_scores, dir_at_far, dir_at_threshold


def test_dir_and_far_count_probes_as_defined():
    gallery = ["ann", "bob", "distractor"]
    probes = ["ann", "bob", "ann", "cy", "dee", "eve", "fay"]  # 3 mated, 4 non-mated
    scores = np.array([[0.9, 0.1, 0.2],    # ann found, high
                       [0.2, 0.45, 0.3],   # bob found, middling
                       [0.1, 0.8, 0.2],    # ann taken for bob: never counts for DIR
                       [0.5, 0.1, 0.2],    # strangers' best scores: 0.5, 0.7, 0.3, 0.4
                       [0.1, 0.2, 0.7],
                       [0.3, 0.1, 0.1],
                       [0.4, 0.2, 0.1]], np.float32)
    o = ProbeOutcomes.of(scores, probes, gallery)
    assert o.mated.tolist() == [True, True, True, False, False, False, False]
    result = dir_at_far(o, (0.25, 0.5, 0.1))
    assert result["rank1"] == pytest.approx(2 / 3) and (result["n_mated"], result["n_nonmated"]) == (3, 4)
    at_quarter, at_half, at_tenth = result["points"]
    assert at_quarter["measured_far"] == 0.25 and at_quarter["dir"] == pytest.approx(1 / 3)  # t just above 0.5
    assert at_half["measured_far"] == 0.5 and at_half["dir"] == pytest.approx(2 / 3)          # t just above 0.4
    assert at_tenth["measurable"] is False and at_tenth["measured_far"] == 0
    assert dir_at_threshold(o, 0.2)["far"] == 1.0 and dir_at_threshold(o, 0.95)["dir"] == 0.0
    both = ProbeOutcomes.concat([o, o])
    assert dir_at_far(both, (0.25,))["points"][0]["dir"] == pytest.approx(1 / 3)


def test_code_scores_of_binary_codes_are_minus_hamming_distances():
    from facepq_core.codecs.binary import BinaryCodec

    rng = np.random.default_rng(0)
    codec = BinaryCodec(rng.normal(size=(16, 64)).astype(np.float32), np.zeros(16, np.float32))
    probes = rng.normal(size=(5, 16)).astype(np.float32)
    gallery = np.concatenate([probes, rng.normal(size=(9, 16)).astype(np.float32)])
    scores = code_scores(codec, probes, gallery)
    assert scores.shape == (5, 14) and (scores <= 0).all() and (scores == np.round(scores)).all()
    assert (scores[np.arange(5), np.arange(5)] == 0).all()  # each probe's own code: distance 0, the best
