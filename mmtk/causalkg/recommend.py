"""Learning paths on a causal knowledge network, with explanations, and their simulated evaluation.

Recommendation (greedy interventional ranking restricted to ready skills):
the candidates are the target's unmastered causal ancestors and the target
itself. At each step the skills whose causal parents are all mastered, or
already on the path, are ready; the path takes the ready skill c that
maximises P(target = 1 | do(path + c = 1), mastered skills = 1), so no skill
ever comes before its causal parents.

Evaluation: students are drawn from the network and each follows a plan one
skill per step. A step on skill c succeeds with probability ``p_ready`` when
all of c's parents are mastered and ``p_unready`` otherwise. After k steps a
student's score is 1 if the target is mastered, else the network's
P(target = 1 | target's parents in their current state), the chance its
table gives a student with those prerequisites.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np

from mmtk.core.errors import InputError
from mmtk.core.logging import get_logger
from mmtk.causalkg.network import CausalKnowledgeNetwork

log = get_logger(__name__)


class InterventionalQueries:
    """Cached P(target = 1 | do(skills = 1), evidence) on a fitted 0/1 network.

    An intervention is computed on the mutilated network: incoming edges of
    the intervened skills are cut, which makes them roots, and they are then
    observed at 1. Unlike pgmpy 1.1's ``CausalInference.query``, this also
    accepts an intervened skill that is a descendant of the target (its do()
    then leaves the target unchanged).
    """

    def __init__(self, network: CausalKnowledgeNetwork) -> None:
        self.model = network.bayesian_network()
        self.cache: dict[tuple, float] = {}
        self.engines: dict[frozenset, Any] = {}

    def _engine(self, intervened: frozenset):
        from pgmpy.factors.discrete import TabularCPD
        from pgmpy.inference import VariableElimination

        if intervened not in self.engines:
            model = self.model.copy()
            for skill in intervened:
                for parent in list(model.predecessors(skill)):
                    model.remove_edge(parent, skill)
                states = list(self.model.states[skill])
                model.remove_cpds(model.get_cpds(skill))
                model.add_cpds(TabularCPD(skill, len(states), [[1.0 / len(states)]] * len(states), state_names={skill: states}))
            self.engines[intervened] = VariableElimination(model)
        return self.engines[intervened]

    def probability(self, target: str, intervened: set[str] | frozenset = frozenset(), evidence: dict[str, int] | None = None) -> float:
        """Return P(target = 1 | do(intervened = 1), evidence)."""
        evidence = dict(evidence or {})
        intervened = frozenset(intervened)
        if target in intervened:
            return 1.0
        if target in evidence:
            return float(evidence[target] == 1)
        key = (target, intervened, tuple(sorted(evidence.items())))
        if key not in self.cache:
            observed = {**{s: v for s, v in evidence.items() if s not in intervened}, **{s: 1 for s in intervened}}
            factor = self._engine(intervened).query([target], evidence=observed, show_progress=False)
            self.cache[key] = float(factor.values[factor.state_names[target].index(1)])
        return self.cache[key]


@dataclass
class PathStep:
    """One recommended skill with the facts that explain it."""

    skill: str
    description: str
    student_mastery: float
    target_before: float
    target_after: float
    edges: list[dict[str, Any]] = field(default_factory=list)
    prerequisites: list[str] = field(default_factory=list)

    @property
    def expected_gain(self) -> float:
        """Expected rise of P(target mastered) when this skill is mastered."""
        return self.target_after - self.target_before

    def to_dict(self) -> dict[str, Any]:
        return {
            "skill": self.skill,
            "description": self.description,
            "student_mastery": self.student_mastery,
            "target_before": self.target_before,
            "target_after": self.target_after,
            "expected_gain": self.expected_gain,
            "edges": self.edges,
            "prerequisites_in_place": self.prerequisites,
        }


def check_target(network: CausalKnowledgeNetwork, target: str) -> None:
    """Raise InputError unless ``target`` is a skill of the network."""
    if target not in network.skill_names:
        raise InputError(f"unknown target skill {target!r}; the network's skills are: {', '.join(network.skill_names)}.")


def skills_to_learn(graph: nx.DiGraph, mastered: set[str], target: str) -> list[str]:
    """Return the target's unmastered causal ancestors plus the target, in topological order.

    Returns an empty list when the target is mastered, whatever its ancestors.
    """
    if target in mastered:
        return []
    to_learn = {a for a in nx.ancestors(graph, target) if a not in mastered} | {target}
    return [s for s in nx.lexicographical_topological_sort(graph) if s in to_learn]


def recommend_path(network: CausalKnowledgeNetwork, mastery: dict[str, float], target: str, queries: InterventionalQueries | None = None) -> list[PathStep]:
    """Recommend an ordered learning path towards ``target`` for one student (see the module docstring).

    ``mastery`` maps each skill to the student's P(mastered); skills at or
    above the network's mastery threshold count as mastered. Returns an
    empty list when the target is already mastered.
    """
    check_target(network, target)
    queries = queries or InterventionalQueries(network)
    graph = network.graph()
    descriptions = {s["name"]: s.get("description", "") for s in network.skills}
    mastered = {s for s, p in mastery.items() if p >= network.mastery_threshold}
    evidence = {s: 1 for s in mastered}
    remaining = skills_to_learn(graph, mastered, target)

    steps: list[PathStep] = []
    learned: list[str] = []
    current = queries.probability(target, frozenset(), evidence)
    while remaining:
        in_place = mastered | set(learned)
        ready = [s for s in remaining if all(p in in_place for p in graph.predecessors(s))]
        scored = [(queries.probability(target, frozenset([*learned, s]), evidence), s) for s in ready]
        # Highest P(target), ties broken by the topological order of 'remaining'.
        best_value, best = max(scored, key=lambda pair: (pair[0], -remaining.index(pair[1])))

        outgoing = [network.edge(best, child) for child in graph.successors(best) if child in remaining or child == target]
        steps.append(PathStep(
            skill=best,
            description=descriptions.get(best, ""),
            student_mastery=float(mastery.get(best, 0.0)),
            target_before=current,
            target_after=best_value,
            edges=outgoing,
            prerequisites=[p for p in graph.predecessors(best) if p in in_place],
        ))
        learned.append(best)
        remaining.remove(best)
        current = best_value
    return steps


def explain_path(steps: list[PathStep], target: str, student: str = "student", confidence: float = 0.95) -> str:
    """Render a path as numbered plain-text lines a teacher can read; ``confidence`` labels the intervals."""
    if not steps:
        return f"{student}: {target} is already mastered; nothing to learn.\n"
    lines = [f"{student}: learning path to {target} ({len(steps)} step(s))"]
    for number, step in enumerate(steps, start=1):
        lines.append(f"  {number}. {step.skill}" + (f" - {step.description}" if step.description else ""))
        lines.append(f"     current mastery estimate {step.student_mastery:.2f}; P({target} mastered) {step.target_before:.2f} -> {step.target_after:.2f} (expected gain {step.expected_gain:+.2f})")
        if step.prerequisites:
            lines.append(f"     prerequisites in place: {', '.join(step.prerequisites)}")
        for edge in step.edges:
            interval = f", {100 * confidence:g}% interval [{edge['ci_low']:+.2f}, {edge['ci_high']:+.2f}]" if edge.get("ci_low") is not None else ""
            lines.append(f"     edge {edge['parent']} -> {edge['child']}: causal effect {edge['effect']:+.2f}{interval}, in {100 * edge['frequency']:.0f}% of bootstrap graphs")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- evaluation


def topological_plan(graph: nx.DiGraph, mastered: set[str], target: str) -> list[str]:
    """Baseline: the skills to learn in lexicographic topological order."""
    return skills_to_learn(graph, mastered, target)


def random_plan(graph: nx.DiGraph, mastered: set[str], target: str, rng: np.random.Generator) -> list[str]:
    """Baseline: the skills to learn in a random order (prerequisites ignored)."""
    skills = skills_to_learn(graph, mastered, target)
    return [skills[i] for i in rng.permutation(len(skills))]


def _target_score(target: str, mastered: set[str], graph: nx.DiGraph, queries: InterventionalQueries) -> float:
    # 1 once the target is mastered, else its table entry for the current state of its parents.
    if target in mastered:
        return 1.0
    parents = {p: int(p in mastered) for p in graph.predecessors(target)}
    return queries.probability(target, frozenset(), parents)


def _simulate_plan(plan: list[str], initial: set[str], graph: nx.DiGraph, target: str, draws: np.ndarray, queries: InterventionalQueries, p_ready: float, p_unready: float) -> list[float]:
    mastered = set(initial)
    scores = [_target_score(target, mastered, graph, queries)]
    for step in range(len(draws)):
        if step < len(plan):
            skill = plan[step]
            ready = all(p in mastered for p in graph.predecessors(skill))
            if draws[step] < (p_ready if ready else p_unready):
                mastered.add(skill)
        scores.append(_target_score(target, mastered, graph, queries))
    return scores


def evaluate_paths(
    network: CausalKnowledgeNetwork,
    target: str,
    n_students: int,
    max_steps: int,
    seed: int,
    p_ready: float = 0.9,
    p_unready: float = 0.2,
) -> dict[str, Any]:
    """Compare the recommended path with topological and random baselines on simulated students.

    Students are drawn from the network and kept when they have not mastered
    the target. Every strategy uses the same uniform draws per student and
    step. Returns the mean score and its standard error after k = 0..max_steps
    steps for each strategy.
    """
    check_target(network, target)
    queries = InterventionalQueries(network)
    graph = network.graph()
    rng = np.random.default_rng(seed)

    students: list[dict[str, int]] = []
    for attempt in range(20):
        sample = queries.model.simulate(n_samples=4 * n_students, seed=int(rng.integers(2**31)), show_progress=False)
        students.extend(row for row in sample.astype(int).to_dict("records") if row[target] == 0)
        if len(students) >= n_students:
            break
    if not students:
        raise InputError(f"the network almost always masters {target!r}, so no simulated student is left to teach; choose another target.")
    students = students[:n_students]

    scores: dict[str, list[list[float]]] = {"recommended": [], "topological": [], "random": []}
    for profile in students:
        initial = {s for s, v in profile.items() if v == 1}
        draws = rng.random(max_steps)
        plans = {
            "recommended": [step.skill for step in recommend_path(network, {s: float(v) for s, v in profile.items()}, target, queries)],
            "topological": topological_plan(graph, initial, target),
            "random": random_plan(graph, initial, target, rng),
        }
        for name, plan in plans.items():
            scores[name].append(_simulate_plan(plan, initial, graph, target, draws, queries, p_ready, p_unready))

    result: dict[str, Any] = {"n_students": len(students), "max_steps": max_steps, "p_ready": p_ready, "p_unready": p_unready, "strategies": {}}
    for name, rows in scores.items():
        table = np.asarray(rows)  # (students, max_steps + 1)
        result["strategies"][name] = {
            "mean": table.mean(axis=0).tolist(),
            "stderr": (table.std(axis=0, ddof=1) / np.sqrt(len(rows))).tolist() if len(rows) > 1 else [0.0] * table.shape[1],
        }
    return result
