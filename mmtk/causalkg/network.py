"""The causal knowledge network: skills, weighted causal edges, tables and the mastery model.

``network.json`` (schema ``mmtk.causal-kg/1``) is self-contained, so
``recommend-path`` needs nothing else:

- ``skills``: list of ``{"name", "description", "mastery_rate"}``;
- ``edges``: retained edges, each ``{"parent", "child", "effect", "ci_low",
  "ci_high", "frequency", "direction_frequency"}``;
- ``dropped_edges``: consensus edges dropped because their effect was below
  the threshold, same fields plus ``"reason"``;
- ``cpds``: per skill ``{"parents", "states", "values"}`` (see
  :func:`mmtk.causalkg.effects.cpd_tables`);
- ``mastery_model``: the fitted mastery model's parameters;
- ``mastery_threshold``: P(mastered) at or above which a skill counts as mastered;
- ``settings``: the structure and effect settings used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from mmtk.core.errors import DataError
from mmtk.core.io import atomic_path, write_json

SCHEMA = "mmtk.causal-kg/1"


@dataclass
class CausalKnowledgeNetwork:
    """A learned causal knowledge network (see the module docstring for the fields)."""

    skills: list[dict[str, Any]]
    edges: list[dict[str, Any]]
    dropped_edges: list[dict[str, Any]]
    cpds: dict[str, dict[str, Any]]
    mastery_model: dict[str, Any]
    mastery_threshold: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def skill_names(self) -> list[str]:
        return [skill["name"] for skill in self.skills]

    def graph(self) -> nx.DiGraph:
        """Return the retained edges as a networkx DiGraph with edge attributes."""
        graph = nx.DiGraph()
        for skill in self.skills:
            graph.add_node(skill["name"], description=skill.get("description", ""))
        for edge in self.edges:
            graph.add_edge(edge["parent"], edge["child"], **{k: v for k, v in edge.items() if k not in ("parent", "child")})
        return graph

    def edge(self, parent: str, child: str) -> dict[str, Any]:
        """Return the record of the retained edge ``parent -> child``."""
        for edge in self.edges:
            if edge["parent"] == parent and edge["child"] == child:
                return edge
        raise KeyError((parent, child))

    def bayesian_network(self):
        """Return the fitted pgmpy DiscreteBayesianNetwork."""
        from mmtk.causalkg.effects import network_from_tables

        return network_from_tables(self.cpds)

    # --------------------------------------------------------------- files

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "skills": self.skills,
            "edges": self.edges,
            "dropped_edges": self.dropped_edges,
            "cpds": self.cpds,
            "mastery_model": self.mastery_model,
            "mastery_threshold": self.mastery_threshold,
            "settings": self.settings,
        }

    def write_json(self, path: Path) -> Path:
        return write_json(path, self.to_dict())

    def write_graphml(self, path: Path) -> Path:
        """Write the retained edges with their weights, and the skills with descriptions, as GraphML."""
        graph = self.graph()
        for _, _, data in graph.edges(data=True):
            for key, value in list(data.items()):
                if value is None:
                    data[key] = float("nan")
        with atomic_path(path) as tmp:
            nx.write_graphml(graph, tmp)
        return path

    @classmethod
    def read(cls, path: Path) -> "CausalKnowledgeNetwork":
        """Read ``network.json``, or the one inside a build-causal-kg run folder."""
        if path.is_dir():
            path = path / "network.json"
        if not path.is_file():
            raise DataError(f"network file not found: {path}. Pass the network.json written by 'mmtk build-causal-kg' or its run folder.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            hint = " network.graphml and other exports cannot be read back." if path.suffix.lower() != ".json" else " The file is truncated or was edited; rebuild it."
            raise DataError(f"cannot read network file {path} as JSON ({exc}). Pass the network.json written by 'mmtk build-causal-kg' or its run folder.{hint}") from exc
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise DataError(f"{path} is not a causal knowledge network (schema {found!r}, expected {SCHEMA!r}). Pass the network.json written by 'mmtk build-causal-kg'.")
        network = _network_from_dict(data, path)
        _check_network(network, path)
        return network


def _network_from_dict(data: dict[str, Any], path: Path) -> CausalKnowledgeNetwork:
    missing = [key for key in ("skills", "edges", "dropped_edges", "cpds", "mastery_model", "mastery_threshold") if key not in data]
    if missing:
        raise DataError(f"network file {path} lacks the key(s) {', '.join(missing)}; it is truncated or was edited. Rebuild it with 'mmtk build-causal-kg'.")
    for key, kind in (("skills", list), ("edges", list), ("dropped_edges", list), ("cpds", dict), ("mastery_model", dict)):
        if not isinstance(data[key], kind):
            raise DataError(f"network file {path}: '{key}' is a {type(data[key]).__name__}, expected a {kind.__name__}. Rebuild it with 'mmtk build-causal-kg'.")
    threshold = data["mastery_threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise DataError(f"network file {path}: mastery_threshold {threshold!r} must be a number in (0, 1], the P(mastered) at or above which a skill counts as mastered.")
    return CausalKnowledgeNetwork(
        skills=data["skills"],
        edges=data["edges"],
        dropped_edges=data["dropped_edges"],
        cpds=data["cpds"],
        mastery_model=data["mastery_model"],
        mastery_threshold=float(threshold),
        settings=data.get("settings", {}),
    )


# Largest deviation from 1 accepted for a column sum of a conditional probability table (JSON keeps 17 digits).
CPD_SUM_TOLERANCE = 1e-6


def _check_network(network: CausalKnowledgeNetwork, path: Path) -> None:
    """Raise DataError unless skills, edges, tables and mastery model of ``network`` agree.

    Every skill must be a record with a unique name, and every edge must join
    two known skills. The edges must equal the parents listed in the tables
    and form an acyclic graph. Every skill needs one 0/1 table whose columns
    sum to 1, and the mastery model must rebuild with one Q-matrix column per
    skill.
    """
    rebuild = "Rebuild it with 'mmtk build-causal-kg'."
    names = []
    for index, skill in enumerate(network.skills):
        if not isinstance(skill, dict) or not isinstance(skill.get("name"), str) or not skill["name"]:
            raise DataError(f"network file {path}: skills entry {index + 1} ({skill!r}) is not a record with a 'name' string. {rebuild}")
        names.append(skill["name"])
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise DataError(f"network file {path}: skill {duplicate!r} is listed twice. {rebuild}")
    known = set(names)

    edges = set()
    for index, edge in enumerate(network.edges):
        if not isinstance(edge, dict) or not isinstance(edge.get("parent"), str) or not isinstance(edge.get("child"), str):
            raise DataError(f"network file {path}: edges entry {index + 1} ({edge!r}) is not a record with 'parent' and 'child' strings. {rebuild}")
        unknown = [s for s in (edge["parent"], edge["child"]) if s not in known]
        if unknown:
            raise DataError(f"network file {path}: edge {edge['parent']} -> {edge['child']} names the unknown skill {unknown[0]!r}; the skills are {', '.join(names)}. {rebuild}")
        edges.add((edge["parent"], edge["child"]))
    graph = nx.DiGraph(list(edges))
    if not nx.is_directed_acyclic_graph(graph):
        cycle_edges = nx.find_cycle(graph)
        cycle = " -> ".join([u for u, _ in cycle_edges] + [cycle_edges[0][0]])
        raise DataError(f"network file {path}: the edges form the cycle {cycle}; a causal knowledge network must be acyclic. {rebuild}")

    missing = [n for n in names if n not in network.cpds]
    extra = [n for n in network.cpds if n not in known]
    if missing or extra:
        problem = f"no conditional probability table for {', '.join(missing)}" if missing else f"a table for the unknown skill(s) {', '.join(map(str, extra))}"
        raise DataError(f"network file {path} has {problem}; 'cpds' needs one table per skill. {rebuild}")
    table_edges = set()
    for name in names:
        table_edges |= _check_table(name, network.cpds[name], known, path)
    if table_edges != edges:
        difference = sorted(edges ^ table_edges)
        parent, child = difference[0]
        where = "edges list but not in the table parents" if (parent, child) in edges else "table parents of " + child + " but not in the edges list"
        raise DataError(f"network file {path}: edge {parent} -> {child} is in the {where} ({len(difference)} such edge(s)); 'edges' must match the parents in 'cpds'. {rebuild}")

    from mmtk.causalkg.mastery import mastery_model_from_parameters

    try:
        model = mastery_model_from_parameters(network.mastery_model)
        n_items, n_skills = model.q_matrix.shape
        sizes = {key: len(network.mastery_model[key]) for key in ("slip", "guess") if key in network.mastery_model}
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"network file {path}: the mastery_model is incomplete or malformed ({type(exc).__name__}: {exc}). {rebuild}") from exc
    if n_skills != len(names):
        raise DataError(f"network file {path}: the mastery model's Q-matrix has {n_skills} skill columns but the network has {len(names)} skills. {rebuild}")
    for key, size in sizes.items():
        if size != n_items:
            raise DataError(f"network file {path}: mastery_model.{key} has {size} values but its Q-matrix has {n_items} items. {rebuild}")
    prior = network.mastery_model.get("profile_prior")
    if prior is not None and len(prior) != 2**n_skills:
        raise DataError(f"network file {path}: mastery_model.profile_prior has {len(prior)} values but {n_skills} skills have {2**n_skills} profiles. {rebuild}")


def _check_table(name: str, table: Any, known: set[str], path: Path) -> set[tuple[str, str]]:
    """Raise DataError unless ``table`` is a 0/1 table of ``name`` whose columns sum to 1; return its parent edges."""
    rebuild = "Rebuild it with 'mmtk build-causal-kg'."
    if not isinstance(table, dict) or not isinstance(table.get("parents"), list) or not isinstance(table.get("states"), dict) or "values" not in table:
        raise DataError(f"network file {path}: the table of {name} lacks 'parents', 'states' or 'values'. {rebuild}")
    parents = table["parents"]
    unknown = [p for p in parents if p not in known]
    if unknown:
        raise DataError(f"network file {path}: the table of {name} names the unknown parent {unknown[0]!r}. {rebuild}")
    for variable in (name, *parents):
        if table["states"].get(variable) != [0, 1]:
            raise DataError(f"network file {path}: the table of {name} gives the states of {variable} as {table['states'].get(variable)!r}; expected [0, 1]. {rebuild}")
    try:
        values = np.asarray(table["values"], dtype=np.float64)  # (2, 2^parents)
    except (TypeError, ValueError) as exc:
        raise DataError(f"network file {path}: the table of {name} contains a value that is not a number ({exc}). {rebuild}") from exc
    expected = (2, 2 ** len(parents))
    if values.shape != expected:
        raise DataError(f"network file {path}: the table of {name} has shape {values.shape}; with {len(parents)} parent(s) it needs {expected}. {rebuild}")
    outside = ~np.isfinite(values) | (values < 0) | (values > 1)
    if outside.any():
        state, column = np.argwhere(outside)[0]
        raise DataError(f"network file {path}: the table of {name} contains {values[state, column]:g} in row {state + 1}, column {column + 1}; probabilities must lie in [0, 1]. {rebuild}")
    sums = values.sum(axis=0)  # (2^parents,)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > CPD_SUM_TOLERANCE:
        raise DataError(f"network file {path}: column {worst + 1} of the table of {name} sums to {sums[worst]:.6g}; every column of P({name} | parents) must sum to 1. {rebuild}")
    return {(p, name) for p in parents}

def draw_network(network: CausalKnowledgeNetwork, path: Path, title: str = "") -> Path:
    """Draw the network for a teacher: prerequisites to the left, arrows labelled with effect and bootstrap frequency.

    Node colour is the share of students who master the skill (with a colour
    bar), arrow width grows with the effect, and a legend lists the skill
    descriptions. Written as PNG or SVG by the suffix of ``path``, cropped to
    its content.
    """
    import matplotlib.pyplot as plt

    figure, _, _ = network_figure(network, title)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight", pad_inches=0.15)
    plt.close(figure)
    return path


# Layout units: one layer step to the right, one rank step down, in inches of the figure.
LAYER_STEP = 2.2
RANK_STEP = 1.5


def network_figure(network: CausalKnowledgeNetwork, title: str = ""):
    """Return (figure, node texts, edge-label texts) of the drawn network; see :func:`draw_network`.

    Nodes are rounded boxes sized to their names, so long names stay inside;
    edge labels sit on their arrow in a white box, moved along the arrow when
    they would cover a node or another label.
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    graph = network.graph()
    positions = _layered_layout(graph)
    described = [s for s in network.skills if s.get("description")]
    xs = [x for x, _ in positions.values()] or [0.0]
    ys = [y for _, y in positions.values()] or [0.0]
    width = max(6.0, max(xs) - min(xs) + 2.5)
    height = max(2.5, max(ys) - min(ys) + 1.6)
    figure = plt.figure(figsize=(width + 1.2, height))
    axes = figure.add_axes((0.0, 0.0, width / (width + 1.2), 1.0))
    axes.set_xlim(min(xs) - 1.25, max(xs) + 1.25)
    axes.set_ylim(min(ys) - 0.8, max(ys) + 0.8)
    axes.axis("off")

    colours = plt.get_cmap("YlGn")
    norm = Normalize(0.0, 1.0)
    rates = {s["name"]: s.get("mastery_rate", 0.5) for s in network.skills}
    nodes = {}
    for name, (x, y) in positions.items():
        rate = rates.get(name, 0.5)
        nodes[name] = axes.text(
            x, y, name, ha="center", va="center", fontsize=9, zorder=3,
            color="white" if rate > 0.65 else "black",
            bbox={"boxstyle": "round,pad=0.5", "fc": colours(norm(rate)), "ec": "black"},
        )

    # Arrows are clipped at the node boxes; a slight curve keeps an edge that skips a layer off the nodes it passes.
    rad = 0.15
    for parent, child in graph.edges:
        line_width = 1.0 + 4.0 * abs(graph.edges[parent, child].get("effect", 0.0))
        axes.annotate(
            "", xy=positions[child], xytext=positions[parent], zorder=2,
            arrowprops={"arrowstyle": "-|>,head_length=0.8,head_width=0.4", "mutation_scale": 8 + 2 * line_width, "lw": line_width, "color": "#4a4a4a",
                        "patchA": nodes[parent].get_bbox_patch(), "patchB": nodes[child].get_bbox_patch(),
                        "shrinkA": 2, "shrinkB": 2, "connectionstyle": f"arc3,rad={rad}"},
        )

    labels = {}
    taken = [(x, y, 0.45, 0.3) for x, y in positions.values()]  # (centre x, centre y, half width, half height)
    for parent, child in sorted(graph.edges):
        data = graph.edges[parent, child]
        text = f"{data['effect']:+.2f} ({100 * data['frequency']:.0f}%)"
        (x1, y1), (x2, y2) = positions[parent], positions[child]
        control = ((x1 + x2) / 2 + rad * (y2 - y1), (y1 + y2) / 2 - rad * (x2 - x1))
        candidates = []
        for t in (0.5, 0.4, 0.6, 0.3, 0.7, 0.45, 0.55, 0.35, 0.65):
            # Point at parameter t on the quadratic Bezier curve that arc3 draws.
            x = (1 - t) ** 2 * x1 + 2 * (1 - t) * t * control[0] + t**2 * x2
            y = (1 - t) ** 2 * y1 + 2 * (1 - t) * t * control[1] + t**2 * y2
            overlap = sum(max(0.0, hw + 0.45 - abs(x - bx)) * max(0.0, hh + 0.14 - abs(y - by)) for bx, by, hw, hh in taken)
            candidates.append((overlap, (x, y, 0.45, 0.14)))
            if overlap == 0.0:
                break
        spot = min(candidates, key=lambda c: c[0])[1]
        taken.append(spot)
        labels[parent, child] = axes.text(spot[0], spot[1], text, ha="center", va="center", fontsize=7, zorder=4, bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "#9a9a9a", "alpha": 0.95})

    bar = figure.colorbar(ScalarMappable(norm=norm, cmap=colours), ax=axes, fraction=0.03, pad=0.01, shrink=0.8)
    bar.set_label("share of students with mastery", fontsize=8)
    bar.ax.tick_params(labelsize=7)

    heading = title or "Causal knowledge network"
    subtitle = "arrow: prerequisite -> skill; label: causal effect (ACE) and bootstrap frequency; colour: share of students with mastery"
    wrap = max(40, int(width * 11))
    # One draw places the node boxes, so the arrows are clipped at their final outlines.
    figure.canvas.draw()
    axes.set_title(heading + "\n" + "\n".join(textwrap.wrap(subtitle, wrap)), fontsize=9)
    if described:
        lines = [textwrap.fill(f"{s['name']}: {s['description']}", max(50, int(width * 13)), subsequent_indent="    ") for s in described]
        axes.text(0.0, -0.02, "\n".join(lines), transform=axes.transAxes, fontsize=8, va="top", ha="left", family="monospace")
    return figure, nodes, labels


def _layered_layout(graph: nx.DiGraph) -> dict[str, tuple[float, float]]:
    # Layer = longest path from a root, so every prerequisite is drawn left of its dependants.
    for node in nx.topological_sort(graph):
        parents = list(graph.predecessors(node))
        graph.nodes[node]["layer"] = 1 + max(graph.nodes[p]["layer"] for p in parents) if parents else 0
    layers: dict[int, list[str]] = {}
    for node in sorted(graph.nodes):
        layers.setdefault(graph.nodes[node]["layer"], []).append(node)
    positions: dict[str, tuple[float, float]] = {}
    for layer in sorted(layers):
        # Within a layer, order by the mean height of the parents, which reduces crossings.
        nodes = sorted(layers[layer], key=lambda n: (sum(positions[p][1] for p in graph.predecessors(n)) / max(1, graph.in_degree(n)), n))
        for rank, node in enumerate(nodes):
            # Alternate layers are shifted by a third of a rank so that straight runs through a chain do not line up.
            offset = RANK_STEP / 3 if layer % 2 else 0.0
            positions[node] = (LAYER_STEP * layer, -RANK_STEP * (rank - (len(nodes) - 1) / 2) + offset)
    return positions
