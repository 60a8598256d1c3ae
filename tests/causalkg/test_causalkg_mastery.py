"""DINA EM and the correct-share rule against simulated and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from mmtk.causalkg.mastery import DINA, CorrectShareRule, all_profiles, mastery_model_from_parameters
from mmtk.causalkg.simulate import simulate_cohort


@pytest.fixture(scope="module")
def cohort():
    return simulate_cohort(n_students=3000, seed=3)


def test_dina_recovers_slip_and_guess(cohort):
    model = DINA().fit(cohort.responses, cohort.q_matrix)
    assert np.abs(model.slip - cohort.slip).max() < 0.05
    assert np.abs(model.guess - cohort.guess).max() < 0.05
    assert np.abs(model.slip - cohort.slip).mean() < 0.02


def test_dina_classifies_profiles(cohort):
    model = DINA().fit(cohort.responses, cohort.q_matrix)
    mastered = model.mastery_probabilities(cohort.responses) >= 0.5
    assert (mastered == cohort.profiles.astype(bool)).mean() > 0.95


def test_dina_tolerates_missing_responses(cohort):
    responses = cohort.responses.copy()
    rng = np.random.default_rng(0)
    responses[rng.random(responses.shape) < 0.15] = np.nan
    model = DINA().fit(responses, cohort.q_matrix)
    assert np.isfinite(model.log_likelihood)
    assert np.abs(model.slip - cohort.slip).max() < 0.07
    assert np.abs(model.guess - cohort.guess).max() < 0.07


def test_dina_parameters_roundtrip(cohort):
    model = DINA().fit(cohort.responses[:300], cohort.q_matrix)
    rebuilt = mastery_model_from_parameters(model.parameters())
    np.testing.assert_allclose(rebuilt.mastery_probabilities(cohort.responses[:5]), model.mastery_probabilities(cohort.responses[:5]))


def test_dina_posterior_matches_bayes_rule():
    # One item needing skill 1 of 1: P(master | correct) = 0.5*0.9 / (0.5*0.9 + 0.5*0.2).
    model = DINA.from_parameters({"model": "dina", "q_matrix": [[1]], "slip": [0.1], "guess": [0.2], "profile_prior": [0.5, 0.5]})
    probability = model.mastery_probabilities(np.array([[1.0], [0.0], [np.nan]]))[:, 0]
    assert probability[0] == pytest.approx(0.45 / 0.55)
    assert probability[1] == pytest.approx(0.05 / 0.45)
    assert probability[2] == pytest.approx(0.5)


def test_all_profiles_enumerates_bits():
    profiles = all_profiles(3)
    assert profiles.shape == (8, 3)
    assert len({tuple(p) for p in profiles}) == 8
    assert profiles[5].tolist() == [1, 0, 1]


def test_correct_share_rule_hand_case():
    q_matrix = np.array([[1, 0], [1, 1], [0, 1]])
    responses = np.array([[1.0, 0.0, np.nan], [np.nan, np.nan, np.nan]])
    shares = CorrectShareRule().fit(responses, q_matrix).mastery_probabilities(responses)
    assert shares[0].tolist() == [0.5, 0.0]
    assert shares[1].tolist() == [0.5, 0.5]
