"""Simulated students from a known skill network and the DINA response model.

Skill profiles follow a noisy-AND prerequisite model: a root skill is
mastered with probability ``p_root``; any other skill with ``p_ready`` when
all its parents are mastered and ``p_unready`` otherwise. Responses then
follow DINA with the given slip and guess per item.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

# A fixed arithmetic prerequisite network, used by the simulated recipe and tests.
ARITHMETIC_EDGES = [
    ("number_sense", "addition"),
    ("addition", "subtraction"),
    ("addition", "multiplication"),
    ("multiplication", "division"),
    ("subtraction", "fractions"),
    ("division", "fractions"),
]
ARITHMETIC_SKILLS = ["number_sense", "addition", "subtraction", "multiplication", "division", "fractions"]


@dataclass
class SimulatedCohort:
    """Simulated students: true profiles, responses and the generating parameters."""

    skills: list[str]
    edges: list[tuple[str, str]]
    profiles: np.ndarray  # (N, K) int 0/1
    responses: np.ndarray  # (N, J) float 0/1
    q_matrix: np.ndarray  # (J, K) int 0/1
    slip: np.ndarray  # (J,)
    guess: np.ndarray  # (J,)


def prerequisite_q_matrix(skills: list[str], edges: list[tuple[str, str]], items_per_skill: int = 3) -> np.ndarray:
    """Build a Q-matrix with ``items_per_skill`` single-skill items per skill plus one item per edge needing both skills."""
    index = {name: k for k, name in enumerate(skills)}
    rows = []
    for k in range(len(skills)):
        for _ in range(items_per_skill):
            row = np.zeros(len(skills), dtype=np.int64)
            row[k] = 1
            rows.append(row)
    for parent, child in edges:
        row = np.zeros(len(skills), dtype=np.int64)
        row[index[parent]] = row[index[child]] = 1
        rows.append(row)
    return np.stack(rows)  # (J, K)


def sample_profiles(
    skills: list[str],
    edges: list[tuple[str, str]],
    n_students: int,
    rng: np.random.Generator,
    p_root: float = 0.6,
    p_ready: float = 0.85,
    p_unready: float = 0.1,
) -> np.ndarray:
    """Draw binary skill profiles (n_students x K) from the noisy-AND prerequisite model."""
    graph = nx.DiGraph(edges)
    graph.add_nodes_from(skills)
    index = {name: k for k, name in enumerate(skills)}
    profiles = np.zeros((n_students, len(skills)), dtype=np.int64)
    for skill in nx.lexicographical_topological_sort(graph):
        parents = [index[p] for p in graph.predecessors(skill)]
        if parents:
            ready = profiles[:, parents].all(axis=1)  # (N,)
            p = np.where(ready, p_ready, p_unready)
        else:
            p = np.full(n_students, p_root)
        profiles[:, index[skill]] = rng.random(n_students) < p
    return profiles


def dina_responses(profiles: np.ndarray, q_matrix: np.ndarray, slip: np.ndarray, guess: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw 0/1 responses (N x J) from DINA for the given profiles."""
    eta = profiles @ q_matrix.T == q_matrix.sum(axis=1)[None, :]  # (N, J)
    p_correct = np.where(eta, 1.0 - slip[None, :], guess[None, :])  # (N, J)
    return (rng.random(p_correct.shape) < p_correct).astype(np.float64)


def simulate_cohort(
    n_students: int,
    seed: int,
    skills: list[str] | None = None,
    edges: list[tuple[str, str]] | None = None,
    items_per_skill: int = 3,
    slip_range: tuple[float, float] = (0.05, 0.2),
    guess_range: tuple[float, float] = (0.05, 0.2),
) -> SimulatedCohort:
    """Simulate a cohort on a known skill network (the arithmetic network by default)."""
    skills = list(skills or ARITHMETIC_SKILLS)
    edges = list(edges or ARITHMETIC_EDGES)
    rng = np.random.default_rng(seed)
    q_matrix = prerequisite_q_matrix(skills, edges, items_per_skill)
    slip = rng.uniform(*slip_range, size=q_matrix.shape[0])
    guess = rng.uniform(*guess_range, size=q_matrix.shape[0])
    profiles = sample_profiles(skills, edges, n_students, rng)
    responses = dina_responses(profiles, q_matrix, slip, guess, rng)
    return SimulatedCohort(skills=skills, edges=edges, profiles=profiles, responses=responses, q_matrix=q_matrix, slip=slip, guess=guess)
