"""Interventional edge effects and table round trips against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from mmtk.causalkg.effects import cpd_tables, edge_effect, fit_network, network_from_tables, quiet_pgmpy
from mmtk.causalkg.network import CausalKnowledgeNetwork
from mmtk.causalkg.recommend import InterventionalQueries
from mmtk.causalkg.structure import as_categorical


def confounded_tables():
    """Z -> X, Z -> Y, X -> Y with P(Z=1)=0.4, P(X=1|Z)=(0.2, 0.7), P(Y=1|X,Z) given below."""
    return {
        "Z": {"parents": [], "states": {"Z": [0, 1]}, "values": [[0.6], [0.4]]},
        "X": {"parents": ["Z"], "states": {"X": [0, 1], "Z": [0, 1]}, "values": [[0.8, 0.3], [0.2, 0.7]]},
        # Columns (X, Z) = (0,0), (0,1), (1,0), (1,1).
        "Y": {"parents": ["X", "Z"], "states": {"Y": [0, 1], "X": [0, 1], "Z": [0, 1]}, "values": [[0.9, 0.5, 0.6, 0.2], [0.1, 0.5, 0.4, 0.8]]},
    }


def test_ace_equals_backdoor_hand_value():
    quiet_pgmpy()
    model = network_from_tables(confounded_tables())
    # Back-door over Z: 0.6 * (0.4 - 0.1) + 0.4 * (0.8 - 0.5) = 0.30.
    assert edge_effect(model, "X", "Y") == pytest.approx(0.30)
    # The observational contrast is confounded by Z: 0.272 / 0.4 - 0.108 / 0.6 = 0.50.
    from pgmpy.inference import VariableElimination

    inference = VariableElimination(model)
    p_x1 = inference.query(["Y"], evidence={"X": 1}, show_progress=False).values[1]
    p_x0 = inference.query(["Y"], evidence={"X": 0}, show_progress=False).values[1]
    assert p_x1 - p_x0 == pytest.approx(0.50)


def test_root_effect_is_conditional_difference():
    quiet_pgmpy()
    model = network_from_tables(confounded_tables())
    # Z has no parents, so do(Z) equals conditioning: P(X=1|Z=1) - P(X=1|Z=0).
    assert edge_effect(model, "Z", "X") == pytest.approx(0.5)


def test_tables_roundtrip_through_pgmpy():
    quiet_pgmpy()
    tables = confounded_tables()
    assert cpd_tables(network_from_tables(tables)) == tables


def test_fit_keeps_states_absent_from_data():
    quiet_pgmpy()
    values = np.array([[0, 1], [1, 1], [0, 1], [1, 1]])
    model = fit_network(as_categorical(values, ["A", "B"]), [("A", "B")], equivalent_sample_size=4.0)
    table = np.asarray(model.get_cpds("B").get_values())
    assert table.shape == (2, 2)
    # BDeu with ESS 4: pseudo-count 1 per cell, so P(B=1|A=0) = (2 + 1) / (2 + 2).
    assert table[1, 0] == pytest.approx(0.75)


def test_intervention_on_descendant_leaves_target_unchanged():
    quiet_pgmpy()
    network = CausalKnowledgeNetwork(skills=[{"name": n} for n in "ZXY"], edges=[], dropped_edges=[], cpds=confounded_tables(), mastery_model={}, mastery_threshold=0.8)
    queries = InterventionalQueries(network)
    # pgmpy 1.1's CausalInference rejects do() on a descendant of the query variable.
    assert queries.probability("Z", {"Y"}) == pytest.approx(0.4)
    assert queries.probability("X", {"Y"}) == pytest.approx(0.6 * 0.2 + 0.4 * 0.7)
    # Observing Y=1 instead does change P(Z=1).
    assert queries.probability("Z", set(), {"Y": 1}) > 0.45


def test_intervention_matches_pgmpy_causal_inference():
    quiet_pgmpy()
    from pgmpy.inference import CausalInference

    tables = confounded_tables()
    network = CausalKnowledgeNetwork(skills=[{"name": n} for n in "ZXY"], edges=[], dropped_edges=[], cpds=tables, mastery_model={}, mastery_threshold=0.8)
    reference = CausalInference(network_from_tables(tables)).query(["Y"], do={"X": 1}, show_progress=False)
    expected = reference.values[reference.state_names["Y"].index(1)]
    assert InterventionalQueries(network).probability("Y", {"X"}) == pytest.approx(expected)
    assert expected == pytest.approx(0.6 * 0.4 + 0.4 * 0.8)
