"""Learning paths: prerequisite order, candidate set, explanations and the simulated evaluation."""

from __future__ import annotations

import itertools

import networkx as nx
import numpy as np
import pytest

from mmtk.causalkg.effects import cpd_tables, fit_network, quiet_pgmpy
from mmtk.causalkg.network import CausalKnowledgeNetwork
from mmtk.causalkg.recommend import evaluate_paths, explain_path, recommend_path, skills_to_learn
from mmtk.causalkg.simulate import ARITHMETIC_EDGES, ARITHMETIC_SKILLS, sample_profiles
from mmtk.causalkg.structure import as_categorical


def network_on(skills, edges, seed=0, n=2000):
    quiet_pgmpy()
    profiles = sample_profiles(skills, edges, n, np.random.default_rng(seed))
    model = fit_network(as_categorical(profiles, skills), edges)
    records = [{"parent": u, "child": v, "effect": 0.3, "ci_low": 0.2, "ci_high": 0.4, "frequency": 0.9, "direction_frequency": 0.8} for u, v in edges]
    skill_records = [{"name": s, "description": f"skill {s}", "mastery_rate": float(profiles[:, k].mean())} for k, s in enumerate(skills)]
    return CausalKnowledgeNetwork(skills=skill_records, edges=records, dropped_edges=[], cpds=cpd_tables(model), mastery_model={}, mastery_threshold=0.8)


@pytest.fixture(scope="module")
def arithmetic_network():
    return network_on(ARITHMETIC_SKILLS, ARITHMETIC_EDGES)


def random_dag(rng, n_skills=7, p_edge=0.35):
    skills = [f"s{k}" for k in range(n_skills)]
    edges = [(skills[i], skills[j]) for i, j in itertools.combinations(range(n_skills), 2) if rng.random() < p_edge]
    order = rng.permutation(n_skills)
    names = {skills[i]: f"k{order[i]}" for i in range(n_skills)}
    return [names[s] for s in skills], [(names[u], names[v]) for u, v in edges]


def test_path_never_precedes_causal_parents():
    rng = np.random.default_rng(5)
    for trial in range(4):
        skills, edges = random_dag(rng)
        network = network_on(skills, edges, seed=trial, n=600)
        graph = network.graph()
        for target in skills:
            mastery = {s: float(rng.random() < 0.3) for s in skills}
            steps = recommend_path(network, mastery, target)
            position = {step.skill: i for i, step in enumerate(steps)}
            for step in steps:
                for parent in graph.predecessors(step.skill):
                    assert mastery[parent] >= 0.8 or position.get(parent, len(steps)) < position[step.skill], (trial, target, step.skill, parent)


def test_path_covers_exactly_unmastered_ancestors(arithmetic_network):
    mastery = {"number_sense": 0.9, "addition": 0.95, "subtraction": 0.1, "multiplication": 0.85, "division": 0.2, "fractions": 0.0}
    steps = recommend_path(arithmetic_network, mastery, "fractions")
    assert sorted(s.skill for s in steps) == ["division", "fractions", "subtraction"]
    assert steps[-1].skill == "fractions"
    assert steps[-1].target_after == pytest.approx(1.0)
    assert all(s.target_after >= s.target_before - 1e-12 for s in steps)


def test_first_step_maximises_target_probability(arithmetic_network):
    from mmtk.causalkg.recommend import InterventionalQueries

    mastery = {"number_sense": 1.0, "addition": 1.0}
    steps = recommend_path(arithmetic_network, mastery, "fractions")
    queries = InterventionalQueries(arithmetic_network)
    evidence = {"number_sense": 1, "addition": 1}
    ready = ["subtraction", "multiplication"]
    best = max(ready, key=lambda s: queries.probability("fractions", {s}, evidence))
    assert steps[0].skill == best
    assert steps[0].target_after == pytest.approx(queries.probability("fractions", {best}, evidence))


def test_mastered_target_gives_empty_path(arithmetic_network):
    mastery = {s: 1.0 for s in ARITHMETIC_SKILLS}
    assert recommend_path(arithmetic_network, mastery, "fractions") == []
    assert "already mastered" in explain_path([], "fractions")


def test_explanation_names_edges_and_gain(arithmetic_network):
    steps = recommend_path(arithmetic_network, {"number_sense": 1.0}, "subtraction")
    text = explain_path(steps, "subtraction", "ann")
    assert [s.skill for s in steps] == ["addition", "subtraction"]
    assert "edge addition -> subtraction: causal effect +0.30" in text
    assert "expected gain" in text


def test_skills_to_learn_is_topological():
    graph = nx.DiGraph([("a", "b"), ("b", "d"), ("c", "d"), ("e", "a")])
    # Lexicographic topological order of the whole graph is c, e, a, b, d; e is mastered.
    assert skills_to_learn(graph, {"e"}, "d") == ["c", "a", "b", "d"]


def test_evaluation_orders_strategies(arithmetic_network):
    result = evaluate_paths(arithmetic_network, "fractions", n_students=150, max_steps=4, seed=0)
    strategies = result["strategies"]
    assert result["n_students"] == 150
    assert len(strategies["recommended"]["mean"]) == 5
    # Every strategy starts from the same students.
    assert strategies["recommended"]["mean"][0] == strategies["random"]["mean"][0]
    # Prerequisite-respecting plans beat a random order by the end.
    assert strategies["recommended"]["mean"][-1] > strategies["random"]["mean"][-1]
    assert strategies["topological"]["mean"][-1] > strategies["random"]["mean"][-1]
