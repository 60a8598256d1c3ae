"""Conditional probability tables and interventional edge effects with pgmpy.

The effect of an edge parent -> child is read from interventional queries
``P(child | do(parent = s))`` computed by pgmpy's ``CausalInference`` on the
fitted network (pgmpy picks a back-door adjustment set). For 0/1 variables
the effect is the average causal effect

    ACE = P(child = 1 | do(parent = 1)) - P(child = 1 | do(parent = 0)),

and for variables with more states it is the largest total-variation
distance between ``P(child | do(parent = s))`` and ``P(child | do(parent = t))``
over pairs of parent states s, t (equal to |ACE| for 0/1 variables).
"""

from __future__ import annotations

import itertools
import logging
import warnings
from typing import Any

import numpy as np
import pandas as pd

from mmtk.core.logging import get_logger
from mmtk.causalkg.resamples import ResampleStore
from mmtk.causalkg.structure import Edge, WORKER_STATE, as_categorical, map_missing_resamples, resample_indices

log = get_logger(__name__)


def quiet_pgmpy() -> None:
    """Silence pgmpy's per-call info logs and its deprecation warnings for the calls used here."""
    logging.getLogger("pgmpy").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="pgmpy")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*pgmpy.*")


def fit_network(data: pd.DataFrame, edges: list[Edge], equivalent_sample_size: float = 5.0):
    """Fit a DiscreteBayesianNetwork with BDeu-smoothed tables over all columns of ``data``.

    ``data`` must be categorical, so states absent from a resample keep a
    row in the tables.
    """
    from pgmpy.models import DiscreteBayesianNetwork
    from pgmpy.parameter_estimator import DiscreteBayesianEstimator

    model = DiscreteBayesianNetwork(edges)
    model.add_nodes_from(data.columns)
    state_names = {column: list(data[column].cat.categories) for column in data.columns}
    estimator = DiscreteBayesianEstimator(state_names=state_names, prior_type="BDeu", equivalent_sample_size=equivalent_sample_size)
    return model.fit(data, estimator=estimator)


def interventional_distribution(inference, model, child: str, parent: str, state: Any) -> np.ndarray:
    """Return P(child | do(parent = state)) as an array over the child's states."""
    factor = inference.query([child], do={parent: state}, show_progress=False)
    order = [factor.state_names[child].index(s) for s in model.states[child]]
    return np.asarray(factor.values, dtype=np.float64)[order]


def edge_effect(model, parent: str, child: str, inference=None) -> float:
    """Return the interventional effect of ``parent`` on ``child`` (ACE for 0/1 variables, see module docstring)."""
    from pgmpy.inference import CausalInference

    inference = inference or CausalInference(model)
    parent_states = list(model.states[parent])
    child_states = list(model.states[child])
    distributions = {s: interventional_distribution(inference, model, child, parent, s) for s in parent_states}

    if sorted(parent_states) == [0, 1] and sorted(child_states) == [0, 1]:
        positive = child_states.index(1)
        return float(distributions[1][positive] - distributions[0][positive])
    return max(float(0.5 * np.abs(distributions[s] - distributions[t]).sum()) for s, t in itertools.combinations(parent_states, 2))


def edge_effects(model, edges: list[Edge]) -> dict[Edge, float]:
    """Return the effect of every edge of ``edges`` in the fitted ``model``."""
    from pgmpy.inference import CausalInference

    inference = CausalInference(model)
    return {edge: edge_effect(model, edge[0], edge[1], inference) for edge in edges}


def _effects_on_resample(resample: int) -> list[float]:
    state = WORKER_STATE
    quiet_pgmpy()
    rows = resample_indices(len(state["values"]), state["seed"], resample)
    data = as_categorical(state["values"][rows], state["columns"], state["states"])
    model = fit_network(data, state["edges"], state["equivalent_sample_size"])
    effects = edge_effects(model, state["edges"])
    return [effects[edge] for edge in state["edges"]]


def bootstrap_effects(
    values: np.ndarray,
    columns: list[str],
    edges: list[Edge],
    n_resamples: int,
    seed: int,
    n_workers: int,
    equivalent_sample_size: float = 5.0,
    states: list[Any] | None = None,
    store: ResampleStore | None = None,
) -> np.ndarray:
    """Refit the DAG ``edges`` on each bootstrap resample; return effects (resamples x edges).

    Resample r uses the same rows as resample r of the structure bootstrap.
    With a ``store``, resamples it already contains are not refitted, and
    each new row of effects is added to it (saved also when this raises).
    """
    if not edges:
        return np.zeros((n_resamples, 0))
    state = {"values": values, "columns": columns, "edges": edges, "seed": seed, "states": states, "equivalent_sample_size": equivalent_sample_size}
    log.info("bootstrap effects started: %d edges x %d resamples on %d worker process(es)", len(edges), n_resamples, n_workers)
    rows = map_missing_resamples(_effects_on_resample, n_resamples, state, n_workers, store)
    return np.asarray(rows, dtype=np.float64)  # (R, E)


def cpd_tables(model) -> dict[str, dict[str, Any]]:
    """Return each node's table as JSON-safe data: parents, states and P(node | parents).

    ``values[s][c]`` is P(node = states[s] | parents in configuration c), with
    configurations enumerated like ``itertools.product`` over the parents'
    states (last parent fastest), as in pgmpy's ``TabularCPD``.
    """
    tables = {}
    for node in model.nodes():
        cpd = model.get_cpds(node)
        parents = list(cpd.variables[1:])
        tables[str(node)] = {
            "parents": [str(p) for p in parents],
            "states": {str(v): [_plain(s) for s in cpd.state_names[v]] for v in cpd.variables},
            "values": np.asarray(cpd.get_values(), dtype=np.float64).tolist(),
        }
    return tables


def network_from_tables(tables: dict[str, dict[str, Any]]):
    """Rebuild a DiscreteBayesianNetwork from :func:`cpd_tables` output."""
    from pgmpy.factors.discrete import TabularCPD
    from pgmpy.models import DiscreteBayesianNetwork

    edges = [(parent, node) for node, table in tables.items() for parent in table["parents"]]
    model = DiscreteBayesianNetwork(edges)
    model.add_nodes_from(tables)
    for node, table in tables.items():
        states = table["states"]
        parents = table["parents"]
        cpd = TabularCPD(
            variable=node,
            variable_card=len(states[node]),
            values=table["values"],
            evidence=parents or None,
            evidence_card=[len(states[p]) for p in parents] or None,
            state_names={name: list(values) for name, values in states.items()},
        )
        model.add_cpds(cpd)
    model.check_model()
    return model


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
