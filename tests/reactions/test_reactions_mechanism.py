"""Mechanism files, mass-action right-hand sides, the layer and canonical form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmtk.core.errors import InputError
from mmtk.reactions.compare import compare_mechanisms
from mmtk.reactions.mechanism import Mechanism, canonicalize, load_mechanism, mechanism_from_dict
from mmtk.reactions.model import AdamSettings, TorchMassAction, predict_dcdt

EXAMPLES = ["linear-chain", "michaelis-menten", "hydrogen-oxidation"]

# Canonical hydrogen oxidation over (H2, O2, H2O, H, O, OH): column, k_f, k_r.
CANONICAL_HYDROGEN = [
    ((0, 1, 0, 1, -1, -1), 33750.0, 1000.0),
    ((1, 0, 0, -1, 1, -1), 10800.0, 1000.0),
    ((0, 0, 1, -1, 0, -1), 1400.0, 1.0),
    ((0, 1, 0, 0, -2, 0), 337.5, 1.0),
    ((1, 0, 0, -2, 0, 0), 216.0, 2.0),
    ((-1, 0, 1, 0, -1, 0), 100.0, 0.771429),
]


def _mechanism(species, equations):
    return mechanism_from_dict({"species": species, "reactions": [{"equation": e, "k_forward": kf, "k_reverse": kr} for e, kf, kr in equations]}, "test")


def test_rhs_matches_hand_computed_rates():
    mechanism = _mechanism(["A", "B", "C"], [("A + B <=> C", 2.0, 3.0)])
    c = np.array([0.5, 0.4, 0.1])
    # net flux = 2 * 0.5 * 0.4 - 3 * 0.1 = 0.1
    np.testing.assert_allclose(mechanism.rhs(c), [-0.1, -0.1, 0.1], rtol=1e-14)

    squared = _mechanism(["H", "H2"], [("2 H <=> H2", 216.0, 2.0)])
    # net flux = 216 * 0.3**2 - 2 * 0.2 = 19.04; H is consumed twice per event.
    np.testing.assert_allclose(squared.rhs(np.array([0.3, 0.2])), [-38.08, 19.04], rtol=1e-14)


def test_irreversible_reaction_has_zero_reverse_rate():
    mechanism = load_mechanism("michaelis-menten")
    assert mechanism.k_reverse.tolist() == [1000.0, 0.0]
    c = np.array([0.2, 0.5, 0.3, 0.1])  # E, S, ES, P
    binding = 1e6 * 0.2 * 0.5 - 1e3 * 0.3
    catalysis = 10 * 0.3
    np.testing.assert_allclose(mechanism.rhs(c), [-binding + catalysis, -binding, binding - catalysis, catalysis], rtol=1e-14)


@pytest.mark.parametrize("name", EXAMPLES)
def test_true_parameters_reproduce_rhs(name):
    mechanism = load_mechanism(name)
    c = np.random.default_rng(3).uniform(0, 1, size=(50, mechanism.n_species))
    b_f, b_r = mechanism.log_rates()
    W = mechanism.stoichiometry.astype(np.float64)
    expected = mechanism.rhs(c)
    np.testing.assert_allclose(predict_dcdt(c, W, b_f, b_r), expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())

    layer = TorchMassAction(c, expected, mechanism.n_reactions, 0.0, AdamSettings(), "cpu")
    loss = layer.loss(torch.tensor(W), torch.tensor(b_f), torch.tensor(b_r), with_penalty=False)
    assert loss.item() <= (1e-12 * np.abs(expected).max()) ** 2


def test_jacobian_matches_finite_differences():
    mechanism = load_mechanism("hydrogen-oxidation")
    c = np.random.default_rng(0).uniform(0.1, 1, size=6)
    step = 1e-6
    numeric = np.stack([(mechanism.rhs(c + step * e) - mechanism.rhs(c - step * e)) / (2 * step) for e in np.eye(6)], axis=1)
    np.testing.assert_allclose(mechanism.jacobian(c), numeric, rtol=1e-6, atol=1e-4)


def test_yaml_round_trip(tmp_path):
    mechanism = load_mechanism("hydrogen-oxidation")
    path = mechanism.save(tmp_path / "h.yaml")
    again = load_mechanism(str(path))
    assert again.species == mechanism.species
    np.testing.assert_array_equal(again.stoichiometry, mechanism.stoichiometry)
    np.testing.assert_array_equal(again.k_forward, mechanism.k_forward)
    np.testing.assert_array_equal(again.k_reverse, mechanism.k_reverse)


@pytest.mark.parametrize(
    ("species", "equation", "message"),
    [
        (["A", "B"], "A + C <=> B", "cannot read term 'C'"),
        (["A", "B"], "A B", "has no arrow"),
        (["A", "B"], "A + B <=> B", "both sides"),
        (["A", "B"], "A <=> A", "both sides"),
        (["A", "B"], "A => B", "unknown arrow mark '=>'"),
        (["A", "B"], "A <= B", "unknown arrow mark '<='"),
        (["A", "B"], "A = B", "unknown arrow mark '='"),
        (["A", "B"], "A \u2192 B", "unknown arrow mark"),
        (["A", "B"], "A -> B -> A", "has 2 arrows"),
    ],
)
def test_bad_equations_rejected(species, equation, message):
    with pytest.raises(InputError, match=message):
        _mechanism(species, [(equation, 1.0, 1.0)])


def test_bad_rates_rejected():
    with pytest.raises(InputError, match="k_reverse is missing"):
        mechanism_from_dict({"species": ["A", "B"], "reactions": [{"equation": "A <=> B", "k_forward": 1.0}]}, "m.yaml")
    with pytest.raises(InputError, match="k_reverse must be 0"):
        _mechanism(["A", "B"], [("A -> B", 1.0, 2.0)])
    with pytest.raises(InputError, match="finite number >= 0"):
        _mechanism(["A", "B"], [("A <=> B", -1.0, 2.0)])
    with pytest.raises(InputError, match="bundled mechanisms"):
        load_mechanism("missing.yaml")


def test_canonical_truth_matches_table():
    canonical = canonicalize(load_mechanism("hydrogen-oxidation"))
    np.testing.assert_array_equal(canonical.stoichiometry.T, [row[0] for row in CANONICAL_HYDROGEN])
    np.testing.assert_allclose(canonical.k_forward, [row[1] for row in CANONICAL_HYDROGEN], rtol=1e-12)
    np.testing.assert_allclose(canonical.k_reverse, [row[2] for row in CANONICAL_HYDROGEN], rtol=1e-6)
    assert canonical.equations()[0] == "O + OH <=> O2 + H"


def test_canonical_form_idempotent():
    for name in EXAMPLES:
        once = canonicalize(load_mechanism(name))
        twice = canonicalize(once)
        np.testing.assert_array_equal(once.stoichiometry, twice.stoichiometry)
        np.testing.assert_array_equal(once.k_forward, twice.k_forward)
        np.testing.assert_array_equal(once.k_reverse, twice.k_reverse)


@pytest.mark.parametrize("name", EXAMPLES)
def test_canonical_invariant_to_permutation_and_sign(name):
    truth = load_mechanism(name)
    reference = canonicalize(truth)
    rng = np.random.default_rng(5)
    for _ in range(10):
        order = rng.permutation(truth.n_reactions)
        flip = rng.random(truth.n_reactions) < 0.5
        W = truth.stoichiometry[:, order] * np.where(flip, -1, 1)
        k_f = np.where(flip, truth.k_reverse[order], truth.k_forward[order])
        k_r = np.where(flip, truth.k_forward[order], truth.k_reverse[order])
        shuffled = canonicalize(Mechanism(truth.species, W, k_f, k_r))
        np.testing.assert_array_equal(shuffled.stoichiometry, reference.stoichiometry)
        np.testing.assert_array_equal(shuffled.k_forward, reference.k_forward)
        np.testing.assert_array_equal(shuffled.k_reverse, reference.k_reverse)


def test_canonical_tie_rule():
    canonical = canonicalize(load_mechanism("linear-chain"))
    # Equal k_f and k_r: the first non-zero entry is negative; the faster reaction comes first.
    np.testing.assert_array_equal(canonical.stoichiometry.T, [[0, -1, 1], [-1, 1, 0]])
    assert canonical.equations() == ["x2 <=> x3", "x1 <=> x2"]

    tied = Mechanism(["A", "B", "C"], np.array([[0, 1], [1, -1], [-1, 0]]), [5.0, 5.0], [5.0, 5.0])
    # Both columns flip; equal k_f then sorts columns lexicographically.
    np.testing.assert_array_equal(canonicalize(tied).stoichiometry.T, [[-1, 1, 0], [0, -1, 1]])


def test_canonical_tie_tolerates_round_off():
    # Fitted rates of a tied reaction differ in the last digits; the tie rule still applies.
    W = np.array([[0.0], [1.0], [-1.0]])
    for k_f, k_r in ((1.0, 1.0 - 1e-15), (1.0 - 1e-15, 1.0), (1000.0, 1000.0 * (1 + 1e-12))):
        canonical = canonicalize(Mechanism(["A", "B", "C"], W, [k_f], [k_r]))
        np.testing.assert_array_equal(canonical.stoichiometry.T, [[0, -1, 1]])
        assert canonical.k_forward[0] == k_r
        assert canonical.k_reverse[0] == k_f

    # Beyond the tolerance the faster direction is the forward one.
    slower_forward = canonicalize(Mechanism(["A", "B", "C"], -W, [1.0], [1.0 + 1e-6]))
    np.testing.assert_array_equal(slower_forward.stoichiometry.T, [[0, 1, -1]])
    assert slower_forward.k_forward[0] == 1.0 + 1e-6


def test_comparison_reports_relative_errors():
    truth = load_mechanism("hydrogen-oxidation")
    found = Mechanism(truth.species, -truth.stoichiometry[:, ::-1], truth.k_reverse[::-1] * 1.001, truth.k_forward[::-1])
    comparison = compare_mechanisms(found, truth)
    assert comparison["stoichiometry_match"]
    assert comparison["canonical_matrix_equal"]
    assert comparison["max_rate_relative_error"] == pytest.approx(1e-3, rel=1e-9)

    wrong = Mechanism(truth.species, truth.stoichiometry[:, :5], truth.k_forward[:5], truth.k_reverse[:5])
    result = compare_mechanisms(wrong, truth)
    assert not result["stoichiometry_match"]
    assert sum(not row["matched"] for row in result["reactions"]) == 1


def test_comparison_of_irreversible_reaction():
    truth = load_mechanism("michaelis-menten")
    found = Mechanism(truth.species, truth.stoichiometry, truth.k_forward, [1000.0, 1e-9])
    comparison = compare_mechanisms(found, truth)
    catalysis = next(row for row in comparison["reactions"] if row["k_reverse_true"] == 0)
    assert catalysis["k_reverse_relative_error"] is None
    assert catalysis["k_reverse_to_k_forward"] == pytest.approx(1e-10)
    assert comparison["max_rate_relative_error"] == 0.0
