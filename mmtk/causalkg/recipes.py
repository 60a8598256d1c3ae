"""Recipe dataclasses of ``build-causal-kg`` and ``recommend-path``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from mmtk.core.recipe import param


@dataclass
class DataSection:
    source: Literal["files", "simulated"] = param("files", help="files: read responses and Q-matrix; simulated: students drawn from the built-in arithmetic skill network with DINA responses")
    responses: Optional[Path] = param(None, help="response matrix (students x items; text, .csv or .h5), or a folder with data.txt, q.txt and skills.csv")
    q_matrix: Optional[Path] = param(None, help="Q-matrix (items x skills; text, .csv or .h5); defaults to q.txt in the responses folder")
    skills: Optional[Path] = param(None, help="CSV with header naming each skill (columns name or skill, and description)")
    skill_names: list[str] = param(default_factory=list, help="skill ids, one per Q-matrix column; overrides names from the files")
    simulated_students: int = param(1000, min=10, help="number of simulated students (source=simulated)")


@dataclass
class MasterySection:
    model: Literal["dina", "correct-share"] = param("dina", help="dina: DINA fitted by EM; correct-share: share of correct answers on each skill's items")
    threshold: float = param(0.8, min=0.0, max=1.0, min_exclusive=True, help="P(mastered) at or above which a skill counts as mastered")
    max_iter: int = param(500, min=1, help="maximum DINA EM iterations")
    tol: float = param(1e-6, min=0.0, min_exclusive=True, help="DINA EM stops when the log-likelihood gains less (nats)")
    prior_smoothing: float = param(0.01, min=0.0, help="pseudo-count added to every skill profile's expected count when DINA updates the profile prior (0 = maximum likelihood)")


@dataclass
class StructureSection:
    algorithm: Literal["hill-climb", "pc", "ges"] = param("hill-climb", help="pgmpy structure learner")
    score: Literal["bic", "bdeu", "k2"] = param("bic", help="score of hill climbing and GES")
    max_indegree: Optional[int] = param(None, min=1, help="maximum parents per skill in hill climbing (null = no limit)")
    ci_test: Literal["chi_square", "g_sq", "log_likelihood"] = param("chi_square", help="conditional-independence test of PC")
    significance_level: float = param(0.01, min=0.0, max=1.0, min_exclusive=True, help="significance level of PC's tests")
    forbidden_edges: list[list[str]] = param(default_factory=list, help="edges [parent, child] that must not appear")
    required_edges: list[list[str]] = param(default_factory=list, help="edges [parent, child] that must appear")
    order: list[list[str]] = param(default_factory=list, help="partial order as tiers of skills: no edge may point from a later tier to an earlier one")
    orient_by_mastery_rate: bool = param(False, help="forbid edges from a less often mastered skill to a more often mastered one (a prerequisite is mastered at least as often as the skills that need it)")


@dataclass
class BootstrapSection:
    resamples: int = param(200, min=1, help="number of bootstrap resamples of the students")
    threshold: float = param(0.5, min=0.0, max=1.0, min_exclusive=True, help="keep an edge present (either direction) in at least this share of resamples")
    workers: int = param(0, min=0, help="worker processes (0 = one per available core)")


@dataclass
class EffectsSection:
    min_effect: float = param(0.05, min=0.0, max=1.0, help="drop edges whose causal effect (ACE, a difference of two probabilities) is below this value")
    confidence: float = param(0.95, min=0.0, max=1.0, min_exclusive=True, help="level of the bootstrap percentile interval of each effect")
    equivalent_sample_size: float = param(5.0, min=0.0, min_exclusive=True, help="BDeu equivalent sample size of the conditional probability tables")


@dataclass
class BuildRecipe:
    seed: int = param(0, help="seed of the bootstrap resamples and the simulated data")
    device: str = param("cpu", help="accepted for a uniform interface; the tool runs on CPU processes")
    data: DataSection = field(default_factory=DataSection)
    mastery: MasterySection = field(default_factory=MasterySection)
    structure: StructureSection = field(default_factory=StructureSection)
    bootstrap: BootstrapSection = field(default_factory=BootstrapSection)
    effects: EffectsSection = field(default_factory=EffectsSection)
    figure_format: Literal["png", "svg"] = param("png", help="file format of the drawn network")


@dataclass
class StudentSection:
    name: str = param("student", help="label of the single student in the output")
    responses: Optional[list[Optional[int]]] = param(None, help="one student's 0/1 responses in item order (null inside the list = missing; null = not given)")
    mastery: Optional[dict[str, float]] = param(None, help="one student's P(mastered) per skill; unlisted skills count as 0 (null = not given)")
    file: Optional[Path] = param(None, help="file of students: a response matrix (text, .csv, .h5) or, with file_kind=mastery, a CSV whose header names the skills")
    file_kind: Literal["responses", "mastery"] = param("responses", help="what the rows of 'file' contain")


@dataclass
class EvaluateSection:
    enabled: bool = param(True, help="compare the recommended path with baselines on simulated students")
    students: int = param(300, min=1, help="simulated students who have not mastered the target")
    steps: int = param(6, min=1, help="learning steps k per simulated student")
    p_ready: float = param(0.9, min=0.0, max=1.0, help="chance a step succeeds when all the skill's parents are mastered")
    p_unready: float = param(0.2, min=0.0, max=1.0, help="chance a step succeeds otherwise")


@dataclass
class RecommendRecipe:
    network: Path = param(help="network.json written by build-causal-kg, or its run folder")
    target: str = param(help="skill to reach")
    seed: int = param(0, help="seed of the simulated evaluation")
    device: str = param("cpu", help="accepted for a uniform interface; the tool runs on CPU")
    student: StudentSection = field(default_factory=StudentSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
