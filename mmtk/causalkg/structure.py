"""Structure learning over discrete variables with pgmpy, under expert constraints, bootstrapped.

Every learner returns a DAG as a list of directed edges. PC and GES return an
equivalence class that pgmpy orients into one member DAG. Constraints
(forbidden and required edges, a partial order of variables) are passed to
pgmpy where the learner accepts them and are enforced on every result
afterwards, so they hold for GES too.

Bootstrap: each resample draws students with replacement (resample r uses
``numpy.random.default_rng([seed, r])``) and relearns the structure. Resamples
run in worker processes started by ``fork``, so the workers share the
parent's string-hash seed. Hill climbing sorts its candidate operations, so
its ties do not depend on that seed; PC and GES may.
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import networkx as nx
import numpy as np
import pandas as pd

from mmtk.core.errors import InputError
from mmtk.core.logging import get_logger
from mmtk.causalkg.resamples import ResampleStore

log = get_logger(__name__)

Edge = tuple[str, str]

# Recipe score names mapped to pgmpy 1.1 scoring-method names for discrete data.
SCORES = {"bic": "bic-d", "bdeu": "bdeu", "k2": "k2"}
ALGORITHMS = ("hill-climb", "pc", "ges")


@dataclass
class StructureSettings:
    """How to learn one DAG.

    ``score`` applies to hill climbing and GES, ``ci_test`` and
    ``significance_level`` to PC. ``order`` is a list of tiers: an edge from
    a later tier to an earlier one is forbidden; variables in no tier are
    unconstrained.
    """

    algorithm: str = "hill-climb"
    score: str = "bic"
    max_indegree: int | None = None
    ci_test: str = "chi_square"
    significance_level: float = 0.01
    forbidden: list[Edge] = field(default_factory=list)
    required: list[Edge] = field(default_factory=list)
    order: list[list[str]] = field(default_factory=list)

    def all_forbidden(self) -> set[Edge]:
        """Return the forbidden edges plus those implied by ``order``."""
        forbidden = set(map(tuple, self.forbidden))
        tier = {name: level for level, names in enumerate(self.order) for name in names}
        for later, later_level in tier.items():
            for earlier, earlier_level in tier.items():
                if later_level > earlier_level:
                    forbidden.add((later, earlier))
        return forbidden


def check_constraints(settings: StructureSettings, variables: list[str]) -> None:
    """Raise InputError when a constraint names an unknown variable or contradicts another."""
    known = set(variables)
    named = [name for edge in [*settings.forbidden, *settings.required] for name in edge]
    named += [name for tier in settings.order for name in tier]
    unknown = sorted({name for name in named if name not in known})
    if unknown:
        raise InputError(f"structure constraints name unknown skill(s) {', '.join(unknown)}; known skills: {', '.join(variables)}.")

    seen: dict[str, int] = {}
    for level, tier in enumerate(settings.order):
        for name in tier:
            if name in seen:
                raise InputError(f"structure.order lists skill {name!r} in tiers {seen[name] + 1} and {level + 1}; list each skill once.")
            seen[name] = level

    forbidden = settings.all_forbidden()
    for edge in settings.required:
        if tuple(edge) in forbidden:
            raise InputError(f"required edge {edge[0]} -> {edge[1]} is also forbidden (directly or by structure.order). Remove one of the two constraints.")
    required_graph = nx.DiGraph([tuple(e) for e in settings.required])
    if not nx.is_directed_acyclic_graph(required_graph):
        cycle = nx.find_cycle(required_graph)
        names = [u for u, _ in cycle] + [cycle[0][0]]
        raise InputError(f"required edges form a cycle: {' -> '.join(names)}. Remove one of them.")


def enforce_constraints(edges: Iterable[Edge], settings: StructureSettings, variables: list[str]) -> list[Edge]:
    """Return a DAG: the required edges, then each edge of ``edges`` in turn if it is allowed.

    An edge that is forbidden (directly or by the order) or that would close
    a cycle is reversed when the reverse is allowed and acyclic, and dropped
    otherwise.
    """
    forbidden = settings.all_forbidden()
    graph = nx.DiGraph()
    graph.add_nodes_from(variables)
    for edge in settings.required:
        graph.add_edge(*edge)
    for parent, child in edges:
        if graph.has_edge(parent, child) or graph.has_edge(child, parent):
            continue
        candidates = [edge for edge in ((parent, child), (child, parent)) if edge not in forbidden]
        for u, v in candidates:
            if not nx.has_path(graph, v, u):
                graph.add_edge(u, v)
                break
    return sorted(graph.edges())


def learn_structure(data: pd.DataFrame, settings: StructureSettings) -> list[Edge]:
    """Learn one DAG over the columns of ``data`` (discrete, categorical dtype)."""
    from pgmpy.causal_discovery import GES, PC, ExpertKnowledge

    variables = list(data.columns)
    forbidden = settings.all_forbidden()
    required = {tuple(e) for e in settings.required}
    knowledge = ExpertKnowledge(forbidden_edges=forbidden, required_edges=required) if forbidden or required else None

    if settings.algorithm == "hill-climb":
        learner = sorted_hill_climb()(scoring_method=SCORES[settings.score], max_indegree=settings.max_indegree, expert_knowledge=knowledge, return_type="dag", show_progress=False)
    elif settings.algorithm == "pc":
        learner = PC(ci_test=settings.ci_test, significance_level=settings.significance_level, expert_knowledge=knowledge, enforce_expert_knowledge=knowledge is not None, return_type="dag", n_jobs=1, show_progress=False)
    elif settings.algorithm == "ges":
        # pgmpy 1.1's GES takes no expert knowledge; enforce_constraints applies it below.
        learner = GES(scoring_method=SCORES[settings.score], return_type="dag")
    else:
        raise InputError(f"unknown structure algorithm {settings.algorithm!r}; accepted: {', '.join(ALGORITHMS)}.")

    learner.fit(data)
    edges = [(str(u), str(v)) for u, v in learner.causal_graph_.edges()]
    return enforce_constraints(edges, settings, variables)


@functools.lru_cache(maxsize=None)
def sorted_hill_climb() -> type:
    """Return pgmpy's HillClimbSearch with its candidate operations sorted by name.

    pgmpy takes the first operation with the best score change, and builds
    the candidates from Python sets, so ties were broken in string-hash
    order and the graph depended on ``PYTHONHASHSEED``. Sorted candidates
    break ties by operation and edge names instead.
    """
    from pgmpy.causal_discovery import HillClimbSearch

    class SortedHillClimbSearch(HillClimbSearch):
        def _legal_operations_dag(self, *args, **kwargs):
            operations = super()._legal_operations_dag(*args, **kwargs)
            return iter(sorted(operations, key=lambda item: (item[0][0], tuple(map(str, item[0][1])))))

    return SortedHillClimbSearch


def as_categorical(values: np.ndarray, columns: list[str], states: list[Any] | dict[str, list[Any]] | None = None) -> pd.DataFrame:
    """Wrap a 2-D array as a DataFrame of categorical columns.

    ``states`` lists the states of every column, or maps each column to its
    own list; the default is 0 and 1.
    """
    states = [0, 1] if states is None else states
    frame = pd.DataFrame(values, columns=columns)
    if isinstance(states, dict):
        return frame.astype({column: pd.CategoricalDtype(states[column]) for column in columns})
    return frame.astype(pd.CategoricalDtype(states))


def resample_indices(n_rows: int, seed: int, resample: int) -> np.ndarray:
    """Return the row indices of bootstrap resample ``resample`` (drawn with replacement)."""
    rng = np.random.default_rng([seed, resample])
    return rng.integers(0, n_rows, size=n_rows)


# ------------------------------------------------------------ process pool

WORKER_STATE: dict[str, Any] = {}


def _exit_with_parent() -> None:
    # Linux only: a worker gets SIGTERM when its parent dies, so a killed run leaves no idle workers behind.
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        log.debug("prctl is unavailable; worker %d will not follow its parent's exit", os.getpid())


def _init_worker(state: dict[str, Any]) -> None:
    WORKER_STATE.clear()
    WORKER_STATE.update(state)
    # One BLAS thread per worker: the pool already fills the cores.
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)


def preload_pgmpy() -> None:
    """Import the pgmpy modules the workers use, with pgmpy's deprecation warnings silenced."""
    import logging
    import warnings

    logging.getLogger("pgmpy").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="pgmpy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import pgmpy.causal_discovery  # noqa: F401
        import pgmpy.inference  # noqa: F401
        import pgmpy.models  # noqa: F401
        import pgmpy.parameter_estimator  # noqa: F401


def default_workers() -> int:
    """Return the number of cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def map_resamples(
    task: Callable[[int], Any],
    resamples: list[int],
    state: dict[str, Any],
    n_workers: int,
    on_result: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """Run ``task(resample)`` for each resample, in ``n_workers`` processes (1 = in this process).

    ``task`` reads its inputs from the module's worker state, set to ``state``.
    Results come back in the order of ``resamples``; ``on_result(resample,
    result)`` is called for each as soon as it and all earlier ones are done.
    When this process raises (for example on SIGTERM), resamples not yet
    started are cancelled.
    """
    results: list[Any] = []
    if n_workers <= 1 or len(resamples) <= 1:
        _init_worker(state)
        try:
            for resample in resamples:
                results.append(task(resample))
                if on_result is not None:
                    on_result(resample, results[-1])
            return results
        finally:
            WORKER_STATE.clear()
    # Import pgmpy here once: forked workers inherit the modules instead of each paying seconds of imports.
    preload_pgmpy()
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    context = multiprocessing.get_context(method)
    chunk = max(1, len(resamples) // (8 * n_workers))
    pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=context, initializer=_init_pool_worker, initargs=(state,))
    try:
        for resample, result in zip(resamples, pool.map(task, resamples, chunksize=chunk)):
            results.append(result)
            if on_result is not None:
                on_result(resample, result)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def map_missing_resamples(task: Callable[[int], Any], n_resamples: int, state: dict[str, Any], n_workers: int, store: ResampleStore | None) -> list[Any]:
    """Return ``task(r)`` for r in ``range(n_resamples)``, taking the results ``store`` already contains.

    The missing resamples run through :func:`map_resamples`, and each new
    result is added to ``store``, which is saved also when this raises.
    """
    stored = store.results if store is not None else {}
    missing = [r for r in range(n_resamples) if r not in stored]
    if store is not None and len(missing) < n_resamples:
        log.info("%d of %d %s resamples are stored, %d to compute", n_resamples - len(missing), n_resamples, store.kind, len(missing))
    try:
        computed = map_resamples(task, missing, state, n_workers, on_result=store.add if store is not None else None)
    except BaseException:
        if store is not None:
            store.save()
            done = sum(1 for r in store.results if r < n_resamples)
            log.warning("stopped with %d of %d %s resamples stored in %s; --resume continues from there", done, n_resamples, store.kind, store.path)
        raise
    if store is not None:
        store.save()
    results = {**stored, **dict(zip(missing, computed))}
    return [results[r] for r in range(n_resamples)]


def _init_pool_worker(state: dict[str, Any]) -> None:
    _exit_with_parent()
    _init_worker(state)


def _learn_resample(resample: int) -> list[Edge]:
    state = WORKER_STATE
    rows = resample_indices(len(state["values"]), state["seed"], resample)
    data = as_categorical(state["values"][rows], state["columns"], state["states"])
    return learn_structure(data, state["settings"])


@dataclass
class BootstrapResult:
    """Edge counts over the bootstrap resamples."""

    n_resamples: int
    directed_counts: dict[Edge, int]

    def adjacency_frequency(self, u: str, v: str) -> float:
        """Share of resamples with an edge between ``u`` and ``v`` in either direction."""
        return (self.directed_counts.get((u, v), 0) + self.directed_counts.get((v, u), 0)) / self.n_resamples

    def direction_frequency(self, u: str, v: str) -> float:
        """Share of resamples with the edge ``u -> v``."""
        return self.directed_counts.get((u, v), 0) / self.n_resamples


def bootstrap_structures(
    values: np.ndarray,
    columns: list[str],
    settings: StructureSettings,
    n_resamples: int,
    seed: int,
    n_workers: int,
    states: list[Any] | None = None,
    store: ResampleStore | None = None,
) -> BootstrapResult:
    """Learn a DAG on each of ``n_resamples`` bootstrap resamples of ``values`` (rows x columns).

    With a ``store``, resamples it already contains are not learned again,
    and each new edge list is added to it (saved also when this raises).
    """
    state = {"values": values, "columns": columns, "settings": settings, "seed": seed, "states": states}
    log.info("bootstrap structure learning started: %d resamples on %d worker process(es)", n_resamples, n_workers)
    edge_lists = map_missing_resamples(_learn_resample, n_resamples, state, n_workers, store)
    counts: dict[Edge, int] = {}
    for edges in edge_lists:
        for edge in edges:
            edge = (str(edge[0]), str(edge[1]))  # stored edges come back from JSON as lists
            counts[edge] = counts.get(edge, 0) + 1
    log.info("bootstrap structure learning finished: %d distinct directed edges", len(counts))
    return BootstrapResult(n_resamples=n_resamples, directed_counts=counts)


def consensus_dag(bootstrap: BootstrapResult, variables: list[str], threshold: float, settings: StructureSettings) -> list[Edge]:
    """Keep adjacencies seen in at least ``threshold`` of the resamples, in their more frequent direction.

    Edges are added from the most to the least frequent, and one that would
    close a cycle is reversed if allowed, or else dropped. Required edges are
    always kept.
    """
    pairs = {tuple(sorted(edge)) for edge in bootstrap.directed_counts}
    ranked = []
    for u, v in pairs:
        frequency = bootstrap.adjacency_frequency(u, v)
        if frequency < threshold:
            continue
        forward, backward = bootstrap.direction_frequency(u, v), bootstrap.direction_frequency(v, u)
        edge = (u, v) if forward >= backward else (v, u)
        ranked.append((-frequency, -max(forward, backward), edge))
    ranked.sort()
    return enforce_constraints([edge for _, _, edge in ranked], settings, variables)


def orient_consensus(data: pd.DataFrame, consensus: list[Edge], settings: StructureSettings) -> list[Edge]:
    """Return the DAG found by hill climbing on all rows, restricted to the consensus skeleton.

    Majority directions over resamples can contradict each other, because
    each resample returns an arbitrary member of its equivalence class. One
    score-based search on the full data orients the kept adjacencies
    consistently, and it drops an adjacency the score on all rows does not
    support. Resampling with replacement duplicates rows, which makes weak
    dependencies look stable (on asia, tub - lung appeared in 90% of
    resamples but not in the full-data search).
    """
    variables = list(data.columns)
    allowed = {edge for u, v in consensus for edge in ((u, v), (v, u))} | {tuple(e) for e in settings.required}
    outside = [(u, v) for u in variables for v in variables if u != v and (u, v) not in allowed]
    restricted = StructureSettings(
        algorithm="hill-climb",
        score=settings.score,
        max_indegree=settings.max_indegree,
        forbidden=[*settings.forbidden, *outside],
        required=settings.required,
        order=settings.order,
    )
    return enforce_constraints(learn_structure(data, restricted), settings, variables)

