"""facepq_core.calibration: thresholds, TARs and similarities recovered from scores of known distributions."""
from __future__ import annotations

import json
from statistics import NormalDist

import numpy as np
import pytest

from facepq_core.calibration import Calibration, fit_calibration, pair_scores, threshold_at_far
from facepq_core.errors import CheckpointError, InvalidRequest


@pytest.fixture(scope="module")
def gaussian():
    """Impostor scores N(0, 1), genuine N(4, 1): every threshold, TAR and log-likelihood ratio is known."""
    rng = np.random.default_rng(0)
    genuine, impostor = rng.normal(4, 1, 200_000), rng.normal(0, 1, 2_000_000)
    return genuine, impostor, fit_calibration(genuine, impostor, "ab" * 8, "opqn", people=7)


def test_thresholds_and_true_accept_rates_are_those_of_the_distributions(gaussian):
    _, _, cal = gaussian
    assert [p.far for p in cal.operating_points] == [1e-2, 1e-3, 1e-4]
    for p in cal.operating_points:
        known = NormalDist().inv_cdf(1 - p.far)
        assert p.threshold == pytest.approx(known, abs=0.03 if p.far < 1e-3 else 0.01)
        assert p.tar == pytest.approx(1 - NormalDist(4, 1).cdf(known), abs=0.01)
        assert p.measured_far <= p.far
    # between the targets, thresholds follow the impostor tail
    assert cal.threshold_for(3e-3) == pytest.approx(NormalDist().inv_cdf(1 - 3e-3), abs=0.02)
    assert cal.far_at(NormalDist().inv_cdf(1 - 3e-3)) == pytest.approx(3e-3, rel=0.1)


def test_the_similarity_is_the_posterior_of_equal_priors(gaussian):
    _, _, cal = gaussian
    a, b = cal.logistic  # log N(s; 4, 1) - log N(s; 0, 1) = 4 s - 8
    assert (a, b) == (pytest.approx(4, abs=0.1), pytest.approx(-8, abs=0.2))
    assert float(cal.similarity(2.0)) == pytest.approx(0.5, abs=0.02)
    sims = cal.similarity(np.linspace(-5, 9, 50))
    assert (np.diff(sims) > 0).all() and sims[0] < 1e-6 and sims[-1] > 1 - 1e-6


def test_a_threshold_lets_at_most_far_of_the_impostors_through_exactly_at_the_edge():
    impostor = np.sort(np.array([5, 4, 4, 3, 2, 1, 1, 0, 0, 0], np.float32))[::-1]
    assert threshold_at_far(impostor, 0.1) == np.nextafter(np.float32(4), np.float32(5))  # 4 is tied: both refused
    assert threshold_at_far(impostor, 0.3) == np.nextafter(np.float32(3), np.float32(4))
    assert threshold_at_far(impostor, 0.05) == np.nextafter(np.float32(5), np.float32(6))


def test_fars_the_data_cannot_measure_are_left_out_and_refused():
    rng = np.random.default_rng(1)
    cal = fit_calibration(rng.normal(3, 1, 500), rng.normal(0, 1, 5_000), "f" * 16, "binary")
    assert [p.far for p in cal.operating_points] == [1e-2, 1e-3] and cal.extra["unmeasurable_fars"] == [1e-4]
    assert cal.far_range[0] == pytest.approx(1 / 5_000)
    with pytest.raises(InvalidRequest, match="below what this model's calibration measured"):
        cal.threshold_for(1e-5)
    for bad in (0, 1, -0.1, float("nan")):
        with pytest.raises(InvalidRequest, match=r"far must be a number in \(0, 1\)"):
            cal.threshold_for(bad)
    with pytest.raises(InvalidRequest, match="genuine and impostor pairs"):
        fit_calibration([], [1.0], "f" * 16, "opqn")


def test_a_calibration_file_belongs_to_one_model(gaussian, tmp_path):
    _, _, cal = gaussian
    path = tmp_path / "model.calibration.json"
    cal.save(path)
    assert Calibration.load(path, "ab" * 8) == cal
    with pytest.raises(CheckpointError, match="measured for model abab.*not 0000"):
        Calibration.load(path, "0" * 16)
    d = json.loads(path.read_text())
    path.write_text(json.dumps({**d, "format": "facepq-calibration/99"}))
    with pytest.raises(CheckpointError, match="facepq calibrate"):
        Calibration.load(path)
    path.write_text("{ truncated")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Calibration.load(path)


def test_pair_scores_split_a_score_matrix_and_leave_a_photo_against_itself_out():
    scores = np.arange(9, dtype=np.float32).reshape(3, 3)
    genuine, impostor = pair_scores(scores, ["a", "a", "b"], ["a", "a", "b"], np.eye(3, dtype=bool))
    assert sorted(genuine.tolist()) == [1, 3] and sorted(impostor.tolist()) == [2, 5, 6, 7]
